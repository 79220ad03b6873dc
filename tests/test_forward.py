"""The one forward loop (contrans_tl.forward) against direct computations on tiny models:
batching under left padding, the early stop, logits at chosen rows (output soft-cap
included), prefix-KV prefill, and the position state steering hooks are told."""

import ast
from pathlib import Path

import pytest
import torch

import contrans_tl
from contrans_tl import forward
from contrans_tl.concepts import ConceptVector
from contrans_tl.data import emotion_scenarios
from contrans_tl.evals.emotion import EmotionTask, negatives, split_scenarios
from contrans_tl.forward import (
    Forward,
    forward_until,
    logits_at,
    padded_batches,
    prefill_cache,
    repeat_cache,
    token_logprobs,
)
from contrans_tl.models import boot_bridge, model_provenance
from contrans_tl.steering import greedy_decode, make_steering
from contrans_tl.tokens import pad_token_id

TEXTS = [
    "The cat sat on the mat .",
    "Hello there",
    "In 1890 the house , built of stone , was sold to a merchant .",
    "A dog .",
    "It rained all day and the river rose .",
]
PACKAGE = Path(contrans_tl.__file__).parent


def _ids(model, texts=TEXTS):
    return [list(model.tokenizer(t)["input_ids"]) for t in texts]


def _pad(model):
    return pad_token_id(model.tokenizer, model.cfg.d_vocab)


def _vector(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=g)
    return ConceptVector(v, tuple(range(model.cfg.n_layers)), model_provenance(model), "x")


@pytest.fixture(scope="module")
def capped_gemma(meta_tokenizer):
    """A tiny Gemma 3 with a final logit soft-cap (the fixture's config has none)."""
    from conftest import tiny_gemma3_hf

    hf = tiny_gemma3_hf(meta_tokenizer, seed=7)
    hf.config.final_logit_softcapping = 0.5
    model = boot_bridge(hf, meta_tokenizer, model_id="tiny-gemma3-capped")
    assert model.cfg.output_logits_soft_cap == 0.5
    return model


# --- batching --------------------------------------------------------------------------


def test_padded_batches_sort_pad_and_index():
    seqs = [[5, 6], [7, 8, 9], [1], [2, 3], [4, 4, 4]]
    left = list(padded_batches(seqs, 2, pad_id=0))
    assert [b.index for b in left] == [[1, 4], [0, 3], [2]]  # longest first, ties stable
    assert left[1].ids.tolist() == [[5, 6], [2, 3]] and left[2].ids.tolist() == [[1]]
    b = next(padded_batches([[5, 6], [7, 8, 9]], 2, pad_id=0))
    assert b.ids.tolist() == [[7, 8, 9], [0, 5, 6]] and b.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert b.offsets == [0, 1] and b.lengths == [3, 2] and b.mask.dtype == torch.long
    r = next(padded_batches([[5, 6], [7, 8, 9]], 2, pad_id=0, side="right"))
    assert r.ids.tolist() == [[7, 8, 9], [5, 6, 0]] and r.offsets == [0, 0]
    e = next(padded_batches([[], [3]], 2, pad_id=9, allow_empty=True))
    assert e.index == [1, 0] and e.ids.tolist() == [[3], [9]] and e.mask.tolist() == [[1], [0]]
    with pytest.raises(ValueError, match=r"sequences \[0\] are empty"):
        list(padded_batches([[], [3]], 2, pad_id=0))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(padded_batches(seqs, 0, pad_id=0))


@pytest.mark.parametrize("model_name", ["small_llama", "small_gemma"])
def test_batched_equals_unbatched_under_left_padding(model_name, request):
    model = request.getfixturevalue(model_name)
    seqs = _ids(model)
    for batch in padded_batches(seqs, 3, _pad(model)):
        last = torch.zeros_like(batch.mask, dtype=torch.bool)
        last[:, -1] = True
        got = logits_at(model, batch.ids, batch.mask, last)
        for r, i in enumerate(batch.index):
            with torch.no_grad():
                alone = model(torch.tensor([seqs[i]]))[0, -1].float()
            torch.testing.assert_close(got[r], alone, atol=1e-4, rtol=1e-4)


# --- the early stop --------------------------------------------------------------------


def test_early_stop_gives_the_states_of_a_full_run_and_nothing_after(small_gemma):
    model = small_gemma
    batch = next(padded_batches(_ids(model), 8, _pad(model)))
    names = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    got: dict[str, torch.Tensor] = {}
    later: list[str] = []

    def grab(name):
        return lambda x, hook: got.update({name: x.detach().clone()})

    hooks = [(n, grab(n)) for n in names]
    with model.hooks(fwd_hooks=[("blocks.3.hook_resid_pre", lambda x, hook: later.append(1))]):
        forward_until(model, batch.ids, batch.mask, hooks, stop_after=names[-1])
    assert later == []  # block 3 never ran
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.ids, attention_mask=batch.mask)
    real = batch.mask.bool()
    for n in names:
        torch.testing.assert_close(got[n][real], cache[n][real], atol=1e-5, rtol=1e-5)
    assert all(not model.hook_dict[n].fwd_hooks for n in names)  # hooks removed
    with pytest.raises(ValueError, match="stop_after='ln_final.hook_out' is not one of"):
        forward_until(model, batch.ids, batch.mask, hooks, stop_after="ln_final.hook_out")


# --- logits at chosen rows -------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["small_llama", "small_gemma", "capped_gemma"])
def test_logits_and_logprobs_at_rows_equal_the_models_own(model_name, request, monkeypatch):
    model = request.getfixturevalue(model_name)
    batch = next(padded_batches(_ids(model), 8, _pad(model)))
    at = batch.mask.bool() & (torch.rand(batch.mask.shape, generator=torch.Generator()) < 0.6)
    at[0, -1] = True
    with torch.no_grad():
        full = model(batch.ids, attention_mask=batch.mask).float()
    torch.testing.assert_close(
        logits_at(model, batch.ids, batch.mask, at), full[at], atol=1e-4, rtol=1e-4
    )
    targets = torch.randint(0, model.cfg.d_vocab, batch.ids.shape, generator=torch.Generator())
    ref = torch.log_softmax(full, -1).gather(-1, targets[..., None])[..., 0][at]
    monkeypatch.setattr(forward, "_UNEMBED_ROWS", 3)  # several unembedding chunks
    got = token_logprobs(model, batch.ids, batch.mask, at, targets)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_soft_cap_is_applied_where_the_model_has_one(capped_gemma):
    model = capped_gemma
    ids = torch.tensor([_ids(model)[0]])
    at = torch.ones_like(ids, dtype=torch.bool)
    got = logits_at(model, ids, None, at)
    assert float(got.abs().max()) <= 0.5  # capped at 0.5
    states: dict[str, torch.Tensor] = {}
    forward_until(
        model,
        ids,
        None,
        [("ln_final.hook_out", lambda x, hook: states.update(h=x))],
        stop_after="ln_final.hook_out",
    )
    uncapped = model.unembed(states["h"])[0].float()
    assert float((uncapped - got).abs().max()) > 1e-2  # the cap matters on this model


def test_emotion_logits_get_the_soft_cap(capped_gemma):
    """Emotion logits used to skip the soft-cap (a bug): they now equal the model's own."""
    model = capped_gemma
    split = split_scenarios(emotion_scenarios(), n_fewshot=1, n_refine=2, n_validation=2)
    task = EmotionTask.build(model, split)
    queries = task.query_ids(model, negatives(split, "fear", 4))
    for reuse in (True, False):
        pred = task.predict(model, queries, batch_size=3, reuse_prefix=reuse)
        for i, q in enumerate(queries):
            with torch.no_grad():
                own = model(torch.tensor([task.prefix_ids + q]))[0, -1].float()
            torch.testing.assert_close(
                pred.emotion_logits[i], own[task.emotion_ids], atol=1e-4, rtol=1e-4
            )
            assert int(pred.top_token[i]) == int(own.argmax())


# --- prefix KV prefill -----------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["small_llama", "small_gemma"])
def test_prefix_prefill_equals_full_recompute(model_name, request):
    model = request.getfixturevalue(model_name)
    pad = _pad(model)
    seqs = _ids(model)
    prefix, rest = seqs[2], [s[1:] for s in seqs[:2] + seqs[3:]]  # drop their BOS, if any
    cache = prefill_cache(model, torch.tensor([prefix]))
    n_cached = cache.get_seq_length()
    p = len(prefix)
    for batch in padded_batches(rest, 3, pad, side="right"):
        n = len(batch.index)
        mask = torch.cat([torch.ones(n, p, dtype=torch.long), batch.mask], 1)
        rows = repeat_cache(cache, torch.zeros(n, dtype=torch.long))
        got = logits_at(model, batch.ids, mask, batch.mask.bool(), past_key_values=rows)
        with torch.no_grad():
            full = model(torch.cat([torch.tensor([prefix] * n), batch.ids], 1), attention_mask=mask)
        torch.testing.assert_close(
            got, full[:, p:][batch.mask.bool()].float(), atol=1e-4, rtol=1e-4
        )
    assert cache.get_seq_length() == n_cached  # the shared prefix is untouched


def test_left_padded_prefixes_and_repeated_rows(small_gemma):
    """Several prefixes prefilled together (left-padded), rows picked with repeats."""
    model = small_gemma
    seqs = _ids(model)
    heads = next(padded_batches(seqs[:3], 3, _pad(model)))
    cache = prefill_cache(model, heads.ids, attention_mask=heads.mask)
    pick = torch.tensor([2, 0, 2])
    cont = torch.tensor([[11, 12], [13, 14], [15, 16]])
    mask = torch.cat([heads.mask[pick], torch.ones(3, 2, dtype=torch.long)], 1)
    at = torch.ones_like(cont, dtype=torch.bool)
    got = logits_at(model, cont, mask, at, past_key_values=repeat_cache(cache, pick))
    for r, i in enumerate(pick.tolist()):
        with torch.no_grad():
            alone = model(torch.tensor([seqs[heads.index[i]] + cont[r].tolist()]))[0, -2:]
        torch.testing.assert_close(got[2 * r : 2 * r + 2], alone.float(), atol=1e-4, rtol=1e-4)


# --- what steering hooks are told ------------------------------------------------------


def _record_state(model, steering, seen):
    def rec(x, *, hook):
        st = steering.state
        mask = st.attention_mask
        seen.append((st.offset, st.prompt_length, None if mask is None else tuple(mask.shape)))

    return model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", rec)])


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_position_state_under_kv_cache(small_gemma, positions):
    model = small_gemma
    steering = make_steering(model, _vector(model), alpha=3.0, positions=positions)
    prompts = ["The cat sat", "Hello", "In 1890 the house ,"]
    width = max(len(model.tokenizer(p)["input_ids"]) for p in prompts)
    runs = {}
    for use_cache in (True, False):
        seen: list = []
        with _record_state(model, steering, seen), Forward(model, steering) as fwd:
            runs[use_cache] = greedy_decode(
                model.tokenizer,
                prompts,
                lambda ids, mask, c=use_cache: fwd.decoder(ids.shape[1], use_cache=c),
                max_new_tokens=4,
                batch_size=3,
                stop_at_eos=False,
                decode=False,
                device=torch.device("cpu"),
            )
        if use_cache:  # the prompt from 0, then one new token at a time after it
            steps = [(width + k - 1, width, (3, width + k)) for k in range(1, 4)]
            assert seen == [(0, width, (3, width)), *steps]
        else:  # the whole sequence each time
            assert seen == [(0, width, (3, width + k)) for k in range(4)]
    assert runs[True] == runs[False]  # "prompt"/"generated" mean the same with the cache
    assert (steering.state.offset, steering.state.prompt_length) == (0, None)
    assert steering.state.attention_mask is None and not steering.attached
    plain = greedy_decode(
        model.tokenizer,
        prompts,
        lambda ids, mask: Forward(model).decoder(ids.shape[1]),
        max_new_tokens=4,
        batch_size=3,
        stop_at_eos=False,
        decode=False,
        device=torch.device("cpu"),
    )
    assert plain != runs[True]  # the steering did something


def test_generated_positions_leave_the_prompt_pass_unsteered(small_gemma):
    model = small_gemma
    steering = make_steering(model, _vector(model), alpha=3.0, positions="generated")
    batch = next(padded_batches(_ids(model), 8, _pad(model)))
    with Forward(model, steering) as fwd:
        first = fwd.decoder(batch.ids.shape[1])(batch.ids, batch.mask)
        every = fwd.run(batch.ids, batch.mask)[:, -1]  # bare pass: all prompt
    with torch.no_grad():
        plain = model(batch.ids, attention_mask=batch.mask)[:, -1]
    torch.testing.assert_close(first, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(every, plain, atol=1e-5, rtol=1e-5)


def test_forward_attaches_counted_and_refuses_misuse(small_llama, small_gemma):
    steering = make_steering(small_llama, _vector(small_llama), alpha=1.0)
    ids = torch.tensor([_ids(small_llama)[0]])
    with pytest.raises(RuntimeError, match="only inside `with Forward"):
        Forward(small_llama, steering).run(ids)
    with pytest.raises(ValueError, match="made for model"):
        Forward(small_gemma, steering).__enter__()
    assert not steering.attached
    with steering, Forward(small_llama, steering) as fwd:
        fwd.run(ids, torch.ones_like(ids), offset=0, prompt_length=1)
        assert steering.state.prompt_length == 1
        with pytest.raises(RuntimeError, match="in use already"):
            fwd.__enter__()
    assert not steering.attached and steering.state.prompt_length is None
    Forward(small_llama).run(ids)  # no steering: no `with` needed


# --- module boundaries -----------------------------------------------------------------


STATE_HOLDERS = {"recontrol.py"}


def test_only_the_forward_loop_drives_steering_state():
    """Only contrans_tl.forward tells steering hooks about positions: no other module
    (evaluations, baselines, pipelines) sets the position state or enters it itself."""
    fields = {"offset", "attention_mask", "prompt_length"}
    owners = {PACKAGE / "forward.py", PACKAGE / "steering.py"}
    bad = []
    for path in sorted(set(PACKAGE.rglob("*.py")) - owners):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for t in targets:
                for el in t.elts if isinstance(t, ast.Tuple) else [t]:
                    if isinstance(el, ast.Attribute) and el.attr in fields:
                        bad.append(f"{path.name}:{node.lineno} sets .{el.attr}")
            if isinstance(node, ast.ImportFrom):
                names = {a.name for a in node.names}
                # an intervention with position-aware hooks makes its own state for
                # Forward to set (RE-Control's controller); it reads it, never sets it
                forbidden = {"steering_session"} | (
                    set() if path.name in STATE_HOLDERS else {"PositionState"}
                )
                bad += [f"{path.name} imports {n}" for n in names & forbidden]
    assert bad == []


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_unembeds_only_the_last_position(small_gemma, use_cache):
    """Every decoding step unembeds one position per row, the prompt's prefill included,
    and the tokens are those of full-logit greedy decoding."""
    rows: list[int] = []
    handle = small_gemma.unembed.register_forward_hook(
        lambda mod, args, out: rows.append(out.shape[1])
    )
    prompts = ["the cat sat on", "a much longer prompt than the first one is"]
    try:
        got = contrans_tl.generate(
            small_gemma, prompts, max_new_tokens=4, decode=False, use_cache=use_cache
        )
    finally:
        handle.remove()
    assert rows and set(rows) == {1}
    tok = small_gemma.tokenizer
    for p, ids in zip(prompts, got):  # one prompt at a time, full logits, argmax
        seq = tok(p)["input_ids"]
        for t in ids:
            logits = small_gemma(torch.tensor([seq]))[0, -1]
            assert int(logits.argmax()) == t
            seq = seq + [t]
