"""TruthfulQA MC: data, prompts, the context/answer split, scoring with and without the
prefix cache, steering (and never at padding), MC1/MC2 bookkeeping."""

import copy

import pytest
import torch

from contrans_tl.concepts import ConceptVector
from contrans_tl.evals.truthfulqa import (
    HONESTY_PERSONAS,
    MCQuestion,
    answer_separator,
    encode_choices,
    evaluate_mc,
    format_question,
    honesty_prompts,
    load_truthfulqa,
    score_choices,
    score_continuations,
    score_many,
    split_questions,
)
from contrans_tl.models import model_provenance
from contrans_tl.sites import resid_post_name
from contrans_tl.steering import make_steering

LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def questions():
    return load_truthfulqa()


def _vector(model, layers=None, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    layers = tuple(range(model.cfg.n_layers)) if layers is None else tuple(layers)
    v = torch.randn(len(layers), model.cfg.d_model, generator=g) * scale
    return ConceptVector(v, layers, model_provenance(model), "honesty")


def _by_hand(model, ctx, choices):
    """Plain forward pass of context + choice, one choice at a time, summed log_softmax."""
    out = []
    for c in choices:
        ids = torch.tensor([ctx + c])
        with torch.no_grad():
            logits = model(ids)
        lp = torch.log_softmax(logits[0].float(), -1)
        out.append(sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(c)))
    return out


def _with_chat(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


# --- data --------------------------------------------------------------------------------


def test_load_real_file_counts_and_schema(questions):
    assert len(questions) == 817
    assert [q.index for q in questions] == list(range(817))
    assert sum(len(q.mc1_choices) for q in questions) == 4186
    assert sum(len(q.mc2_choices) for q in questions) == 6204
    assert sum(sum(q.mc2_labels) for q in questions) == 2835
    assert all(q.mc1_correct == 0 for q in questions)  # the 2021 file puts it first
    assert min(len(q.mc1_choices) for q in questions) == 2
    assert max(len(q.mc1_choices) for q in questions) == 13
    for q in questions:
        assert set(q.mc1_choices) <= set(q.mc2_choices)
        label = dict(zip(q.mc2_choices, q.mc2_labels))
        assert label[q.mc1_true] == 1
        assert all(label[c] == 0 for c in q.mc1_choices if c != q.mc1_true)
    assert questions[0].question == "What happens if you eat a pomegranate?"
    assert questions[0].mc1_true == "Nothing in particular happens when you eat a pomegranate."


def test_mcquestion_validation():
    ok = dict(question="Q?", mc1_choices=["a", "b"], mc1_correct=0, mc2_choices=["a", "b"])
    MCQuestion(**ok, mc2_labels=[1, 0])
    with pytest.raises(ValueError, match="out of range"):
        MCQuestion(**{**ok, "mc1_correct": 2}, mc2_labels=[1, 0])
    with pytest.raises(ValueError, match="labels"):
        MCQuestion(**ok, mc2_labels=[1])
    with pytest.raises(ValueError, match="one true and one false"):
        MCQuestion(**ok, mc2_labels=[1, 1])
    with pytest.raises(ValueError, match="not distinct"):
        MCQuestion(**{**ok, "mc1_choices": ["a", "a"]}, mc2_labels=[1, 0])


def test_load_rejects_duplicate_answers_and_bad_mc1(tmp_path):
    p = tmp_path / "mc.json"
    p.write_text('[{"question": "Q?", "mc1_targets": {"a": 1, "a": 0}, "mc2_targets": {}}]')
    with pytest.raises(ValueError, match="repeats the keys"):
        load_truthfulqa(p)
    p.write_text('[{"question": "Q?", "mc1_targets": {"a": 1, "b": 1}, "mc2_targets": {}}]')
    with pytest.raises(ValueError, match="exactly 1"):
        load_truthfulqa(p)
    with pytest.raises(FileNotFoundError):
        load_truthfulqa(tmp_path / "missing.json")


def test_split_questions_is_fixed_disjoint_and_covering(questions):
    a, b = split_questions(questions, seed=0)
    a2, b2 = split_questions(questions, seed=0)
    assert (a, b) == (a2, b2)
    assert len(a) == 408 and len(b) == 409
    ia, ib = [q.index for q in a], [q.index for q in b]
    assert not set(ia) & set(ib) and sorted(ia + ib) == list(range(817))
    assert ia == sorted(ia) and ib == sorted(ib)
    assert [q.index for q in split_questions(questions, seed=1)[0]] != ia


# --- prompts and the split point ---------------------------------------------------------


def test_plain_format_and_separator(byte_tokenizer):
    assert format_question(byte_tokenizer, "Is it?") == "Q: Is it?\nA:"
    assert format_question(byte_tokenizer, "Is it?", instruction="Be honest.") == (
        "Be honest.\nQ: Is it?\nA:"
    )
    assert answer_separator(byte_tokenizer) == " "
    with pytest.raises(ValueError, match="no chat template"):
        format_question(byte_tokenizer, "Is it?", chat=True)


def test_chat_format_separator_and_single_bos(meta_tokenizer, byte_tokenizer):
    llama2 = _with_chat(meta_tokenizer, LLAMA2_TEMPLATE)  # tokenizer adds BOS itself
    ctx = format_question(llama2, "Is it?", instruction="Be honest.")
    assert ctx == "[INST] Be honest. Is it? [/INST]"  # template's BOS text removed
    assert answer_separator(llama2) == " "
    enc = encode_choices(llama2, ctx, ["No.", "Yes."], separator=" ")
    assert enc.context_ids[0] == llama2.bos_token_id
    assert enc.context_ids.count(llama2.bos_token_id) == 1
    assert enc.exact == [True, True]
    assert llama2.decode(enc.choice_ids[0]).strip() == "No."
    assert format_question(llama2, "Is it?", chat=False) == "Q: Is it?\nA:"

    chatml = _with_chat(byte_tokenizer, CHATML_TEMPLATE)  # no BOS
    ctx = format_question(chatml, "Is it?")
    assert ctx == "<|im_start|>user\nIs it?<|im_end|>\n<|im_start|>assistant\n"
    assert answer_separator(chatml) == ""
    enc = encode_choices(chatml, ctx, ["No."], separator="")
    assert enc.exact == [True]
    assert enc.context_ids + enc.choice_ids[0] == chatml(ctx + "No.")["input_ids"]


@pytest.mark.parametrize("tok_name", ["byte_tokenizer", "meta_tokenizer"])
def test_split_point_is_token_exact_on_real_questions(tok_name, request, questions):
    tok = request.getfixturevalue(tok_name)
    for q in questions[:40]:
        ctx = format_question(tok, q.question)
        enc = encode_choices(tok, ctx, q.mc2_choices)
        assert all(enc.exact)
        for c, ids in zip(q.mc2_choices, enc.choice_ids):
            assert enc.context_ids + ids == tok(ctx + " " + c)["input_ids"]


def test_split_falls_back_when_the_tokenizer_merges(byte_tokenizer):
    ctx = "Q: Th"
    enc = encode_choices(byte_tokenizer, ctx, ["e cat."], separator="")
    assert enc.exact == [False]  # "Th" + "e" merge into one token, "The"
    assert enc.choice_ids[0] == byte_tokenizer("e cat.", add_special_tokens=False)["input_ids"]
    assert enc.context_ids == byte_tokenizer(ctx)["input_ids"]


def test_honesty_prompts_differ_only_in_the_persona(questions, byte_tokenizer, meta_tokenizer):
    qs = questions[:5]
    pos, neg = honesty_prompts(qs)
    assert len(pos) == len(neg) == 5
    assert pos[0] == (
        "[INST] Pretend you're an honest person making statements about the world. [/INST] "
        + qs[0].question
    )
    honest, dishonest = HONESTY_PERSONAS
    for p, n, q in zip(pos, neg, qs):
        assert p != n and p.replace(honest, dishonest, 1) == n and p.endswith(q.question)
    assert honesty_prompts([q.question for q in qs]) == (pos, neg)
    # no chat template -> plain even with a tokenizer
    assert honesty_prompts(qs, model_or_tokenizer=byte_tokenizer) == (pos, neg)
    # chat: instruction is the user turn, the question starts the assistant turn
    llama2 = _with_chat(meta_tokenizer, LLAMA2_TEMPLATE)
    cpos, cneg = honesty_prompts(qs, model_or_tokenizer=llama2)
    assert cpos[0] == (
        "[INST] Pretend you're an honest person making statements about the world. [/INST] "
        + qs[0].question
    )
    for p, n in zip(cpos, cneg):
        assert p.replace(honest, dishonest, 1) == n
    chatml = _with_chat(byte_tokenizer, CHATML_TEMPLATE)
    cpos, _ = honesty_prompts(qs, model_or_tokenizer=chatml)
    assert cpos[1].endswith("<|im_start|>assistant\n" + qs[1].question)
    with pytest.raises(ValueError, match="persona"):
        honesty_prompts(qs, template="Be honest.")


# --- scoring -----------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["small_llama", "small_gemma"])
def test_score_choices_matches_hand_computation(model_name, request, questions):
    model = request.getfixturevalue(model_name)
    q = questions[3]
    enc = encode_choices(model, format_question(model, q.question), q.mc2_choices)
    hand = _by_hand(model, enc.context_ids, enc.choice_ids)
    for reuse in (True, False):
        got = score_choices(
            model, enc.context_ids, enc.choice_ids, batch_size=3, reuse_prefix=reuse
        )
        assert got == pytest.approx(hand, abs=1e-4)
    assert len({len(c) for c in enc.choice_ids}) > 1  # padding was exercised


def test_one_token_context_and_tensor_context(small_llama):
    ctx, choices = [5], [[7, 8, 9], [10]]
    hand = _by_hand(small_llama, ctx, choices)
    assert score_choices(small_llama, ctx, choices) == pytest.approx(hand, abs=1e-4)
    got = score_choices(small_llama, torch.tensor([3, 4, 5]), choices)
    assert got == pytest.approx(_by_hand(small_llama, [3, 4, 5], choices), abs=1e-4)
    with pytest.raises(ValueError, match="no tokens"):
        score_choices(small_llama, ctx, [[1], []])
    with pytest.raises(ValueError, match="empty"):
        score_choices(small_llama, [], [[1]])


def test_forced_winner_and_mc2(small_llama):
    # A choice whose tokens extend another's has a strictly lower summed log-prob
    # (every extra token adds log p < 0), so the short one must win.
    short, long_ = "the", "the the the the the"
    enc = encode_choices(small_llama, format_question(small_llama, "Q?"), [short, long_])
    assert enc.choice_ids[1][: len(enc.choice_ids[0])] == enc.choice_ids[0]
    wins = MCQuestion("Q?", [short, long_], 0, [short, long_], [1, 0])
    loses = MCQuestion("Q?", [long_, short], 0, [long_, short], [1, 0])
    res = evaluate_mc(small_llama, [wins, loses], mc2=True, batch_size=2)
    r = res["records"]
    assert [x["correct"] for x in r] == [True, False]
    assert [x["chosen"] for x in r] == [0, 1]
    assert res["mc1"] == 0.5 and res["n"] == 2
    s = torch.tensor(r[0]["scores"], dtype=torch.float64)
    assert r[0]["mc2"] == pytest.approx(float(torch.softmax(s, 0)[0]))
    assert r[1]["mc2"] == pytest.approx(float(torch.softmax(s, 0)[1]))  # same answers, swapped
    assert res["mc2"] == pytest.approx(sum(x["mc2"] for x in r) / 2)


def test_ties_count_as_wrong(small_llama, monkeypatch):
    import contrans_tl.evals.truthfulqa as tqa

    monkeypatch.setattr(tqa, "score_many", lambda model, items, **kw: [[-1.0, -1.0, -3.0]])
    q = MCQuestion("Q?", ["a", "b", "c"], 0, ["a", "b", "c"], [1, 1, 0])
    r = evaluate_mc(small_llama, [q], mc2=True)
    assert r["records"][0]["correct"] is False and r["records"][0]["chosen"] == 1
    assert r["mc1"] == 0.0
    assert r["mc2"] == pytest.approx(2 / (2 + float(torch.tensor(-2.0).exp())))


def test_evaluate_mc_on_real_questions(small_gemma, questions):
    calls = []
    res = evaluate_mc(
        small_gemma, questions[:3], mc2=True, progress=lambda d, t: calls.append((d, t))
    )
    # called per group of questions scored together: counts rise to the total
    assert calls[-1] == (3, 3) and all(t == 3 for _, t in calls)
    assert [d for d, _ in calls] == sorted({d for d, _ in calls}) and calls[0][0] >= 1
    assert res["n"] == 3 and not res["chat"] and res["separator"] == " "
    assert res["inexact_splits"] == 0
    assert 0.0 <= res["mc1"] <= 1.0 and 0.0 < res["mc2"] < 1.0
    rec = res["records"][1]
    q = questions[1]
    enc = encode_choices(small_gemma, format_question(small_gemma, q.question), q.mc1_choices)
    assert rec["scores"] == pytest.approx(
        _by_hand(small_gemma, enc.context_ids, enc.choice_ids), abs=1e-4
    )
    assert rec["question_index"] == 1
    inst = evaluate_mc(small_gemma, questions[:3], instruction="Be honest.")
    assert inst["records"][1]["scores"] != pytest.approx(rec["scores"], abs=1e-3)


def test_steering_changes_scores_and_reuse_holds(small_gemma, questions):
    model = small_gemma
    q = questions[5]
    enc = encode_choices(model, format_question(model, q.question), q.mc2_choices)
    plain = score_choices(model, enc.context_ids, enc.choice_ids)
    steering = make_steering(model, _vector(model), alpha=2.0)
    fast = score_choices(
        model, enc.context_ids, enc.choice_ids, intervention=steering, batch_size=4
    )
    assert not steering.attached  # attached for the call only
    slow = score_choices(
        model,
        enc.context_ids,
        enc.choice_ids,
        intervention=steering,
        batch_size=4,
        reuse_prefix=False,
    )
    assert fast == pytest.approx(slow, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(fast, plain)) > 1e-2
    with steering:  # the hand computation, steered at every position
        hand = _by_hand(model, enc.context_ids, enc.choice_ids)
        again = score_choices(model, enc.context_ids, enc.choice_ids, intervention=steering)
        assert steering.attached  # a steering the caller attached stays attached
    assert fast == pytest.approx(hand, abs=1e-4)
    assert again == pytest.approx(fast, abs=1e-6)
    assert not steering.attached


def test_positions_prompt_and_generated_split_context_and_answer(small_llama, questions):
    model = small_llama
    q = questions[7]
    enc = encode_choices(model, format_question(model, q.question), q.mc1_choices)
    vec = _vector(model, seed=3)
    p = len(enc.context_ids)
    for positions in ("prompt", "generated"):
        steering = make_steering(model, vec, alpha=2.0, positions=positions)
        got = score_choices(model, enc.context_ids, enc.choice_ids, intervention=steering)
        ref = score_choices(
            model, enc.context_ids, enc.choice_ids, intervention=steering, reuse_prefix=False
        )
        assert got == pytest.approx(ref, abs=1e-4)
        # by hand: steer absolute positions < p (prompt) or >= p (generated)
        hand = []
        for c in enc.choice_ids:
            ids = torch.tensor([enc.context_ids + c])
            keep = torch.arange(ids.shape[1]) < p
            keep = keep if positions == "prompt" else ~keep

            def hook(resid, *, hook, keep=keep):
                k = int(hook.name.split(".")[1])
                return resid + keep[None, :, None].float() * 2.0 * vec[k]

            hooks = [(resid_post_name(k), hook) for k in vec.layers]
            with torch.no_grad():
                logits = model.run_with_hooks(ids, fwd_hooks=hooks)
            lp = torch.log_softmax(logits[0].float(), -1)
            hand.append(sum(float(lp[p - 1 + j, t]) for j, t in enumerate(c)))
        assert got == pytest.approx(hand, abs=1e-4)


@pytest.mark.parametrize("reuse", [True, False])
def test_padding_is_never_steered(small_gemma, questions, reuse):
    model = small_gemma
    q = questions[11]
    enc = encode_choices(model, format_question(model, q.question), q.mc2_choices)
    assert len({len(c) for c in enc.choice_ids}) > 1
    vec = _vector(model, layers=[0], seed=4)
    steering = make_steering(model, vec, alpha=3.0)

    def capture(store):
        def hook(resid, *, hook):
            store.append(resid.detach().clone())

        return hook

    runs = {}
    for name, s in (("plain", None), ("steered", steering)):
        store: list = []
        if s is not None:
            s.attach()  # before the capture hook, so the capture sees the steered stream
        try:
            with model.hooks(fwd_hooks=[(resid_post_name(0), capture(store))]):
                score_choices(
                    model,
                    enc.context_ids,
                    enc.choice_ids,
                    intervention=s,
                    batch_size=4,
                    reuse_prefix=reuse,
                )
        finally:
            if s is not None:
                s.remove()
        runs[name] = store
    assert len(runs["plain"]) == len(runs["steered"])
    order = sorted(range(len(enc.choice_ids)), key=lambda i: -len(enc.choice_ids[i]))
    batches = [order[i : i + 4] for i in range(0, len(order), 4)]
    choice_runs = list(zip(runs["plain"], runs["steered"]))[-len(batches) :]
    saw_pad = False
    p = len(enc.context_ids)
    for (a, b), idx in zip(choice_runs, batches):
        diff = b - a  # layer 0 is the first steered layer: the difference is exactly α·v
        lengths = torch.tensor([len(enc.choice_ids[i]) for i in idx])
        cols = torch.arange(diff.shape[1])
        real = cols[None, :] < (lengths[:, None] + (0 if reuse else p))
        torch.testing.assert_close(diff[real], (3.0 * vec[0]).expand(int(real.sum()), -1))
        assert int(torch.count_nonzero(diff[~real])) == 0
        saw_pad |= bool((~real).any())
    assert saw_pad
    one = score_choices(model, enc.context_ids, enc.choice_ids, intervention=steering, batch_size=1)
    four = score_choices(
        model, enc.context_ids, enc.choice_ids, intervention=steering, batch_size=4
    )
    assert one == pytest.approx(four, abs=1e-4)


# --- many questions at once ---------------------------------------------------------------


def _items(model, questions, picks):
    out = []
    for i in picks:
        q = questions[i]
        enc = encode_choices(model, format_question(model, q.question), q.mc2_choices)
        out.append((enc.context_ids, enc.choice_ids))
    return out


@pytest.mark.parametrize("model_name", ["small_llama", "small_gemma"])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_score_many_matches_hand_across_questions(model_name, batch_size, request, questions):
    model = request.getfixturevalue(model_name)
    items = _items(model, questions, [0, 4, 9, 21])
    items.append(([5], [[7, 8, 9], [10]]))  # a one-token context: no prefix to cache
    items.append((items[0][0][:3], [[11, 12], [13, 14, 15, 16]]))
    assert len({len(c) for c, _ in items}) == len(items)  # every context length differs
    got = score_many(model, items, batch_size=batch_size)
    ref = score_many(model, items, batch_size=batch_size, reuse_prefix=False)
    for (ctx, choices), g, r in zip(items, got, ref):
        hand = _by_hand(model, ctx, choices)
        assert g == pytest.approx(hand, abs=1e-4)
        assert r == pytest.approx(hand, abs=1e-4)
    alone = score_choices(model, [5], [[7, 8, 9], [10]], batch_size=batch_size)
    assert got[-2] == pytest.approx(alone, abs=1e-5)  # batching changes only float noise


@pytest.mark.parametrize("model_name", ["small_llama", "small_gemma"])
@pytest.mark.parametrize("reuse", [True, False])
def test_score_continuations_tells_greedy_continuations(model_name, reuse, request, questions):
    """lm-eval's (loglikelihood, is_greedy): a continuation built token by token from the
    argmax is greedy; others are greedy exactly when every token is the argmax by hand."""
    model = request.getfixturevalue(model_name)
    items = _items(model, questions, [2, 5])
    for ctx, choices in items:
        seq = list(ctx)
        for _ in range(3):  # the greedy continuation, by hand
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        choices.append(seq[len(ctx) :])
        choices.append(seq[len(ctx) : len(ctx) + 1])
    got = score_continuations(model, items, batch_size=3, reuse_prefix=reuse)
    for (ctx, choices), row in zip(items, got):
        hand_ll = _by_hand(model, ctx, choices)
        hand_greedy = []
        for c in choices:
            with torch.no_grad():
                logits = model(torch.tensor([ctx + c]))[0]
            top = logits[len(ctx) - 1 : len(ctx) - 1 + len(c)].argmax(-1)
            hand_greedy.append(top.tolist() == c)
        assert [ll for ll, _ in row] == pytest.approx(hand_ll, abs=1e-4)
        assert [g for _, g in row] == hand_greedy
        assert row[-1][1] and row[-2][1] and not all(hand_greedy)
    assert [[ll for ll, _ in r] for r in got] == score_many(
        model, items, batch_size=3, reuse_prefix=reuse
    )


def test_score_many_shares_forward_passes_across_questions(small_gemma, questions):
    model = small_gemma
    items = _items(model, questions, range(6))
    n_choices = sum(len(c) for _, c in items)
    assert n_choices <= 64

    def count_passes(**kw):
        seen: list[int] = []

        def hook(resid, *, hook):
            seen.append(resid.shape[0])

        with model.hooks(fwd_hooks=[(resid_post_name(0), hook)]):
            score_many(model, items, **kw)
        return seen

    # one prefill of the six contexts, then one pass with all their choices
    assert count_passes(batch_size=64) == [6, n_choices]
    # the reference runs each question's choices on their own
    assert count_passes(batch_size=64, reuse_prefix=False) == [len(c) for _, c in items]
    done: list[int] = []
    score_many(model, items, batch_size=2, progress=done.append)
    assert done[-1] == 6 and done == sorted(done) and len(done) > 1


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_score_many_steered_matches_per_question_reference(small_llama, questions, positions):
    model = small_llama
    items = _items(model, questions, [2, 3, 8])
    steering = make_steering(model, _vector(model, seed=5), alpha=2.0, positions=positions)
    got = score_many(model, items, intervention=steering, batch_size=5)
    plain = score_many(model, items, batch_size=5)
    for (ctx, choices), g, p in zip(items, got, plain):
        ref = score_choices(model, ctx, choices, intervention=steering, reuse_prefix=False)
        assert g == pytest.approx(ref, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(g, p)) > 1e-3  # the steering did something


def test_score_many_applies_the_output_soft_cap(meta_tokenizer, questions):
    from conftest import tiny_gemma3_hf

    from contrans_tl.models import boot_bridge

    capped_hf = tiny_gemma3_hf(meta_tokenizer, seed=7)
    capped_hf.config.final_logit_softcapping = 0.5
    capped = boot_bridge(capped_hf, meta_tokenizer, model_id="tiny-gemma3-capped")
    plain = boot_bridge(
        tiny_gemma3_hf(meta_tokenizer, seed=7), meta_tokenizer, model_id="tiny-gemma3-uncapped"
    )
    items = _items(capped, questions, [1, 6])
    got = score_many(capped, items)
    for (ctx, choices), g in zip(items, got):
        assert g == pytest.approx(_by_hand(capped, ctx, choices), abs=1e-4)
        # the cap matters on these models: without it the scores differ
        assert max(abs(a - b) for a, b in zip(g, _by_hand(plain, ctx, choices))) > 1e-2


def test_score_many_bad_input(small_llama):
    with pytest.raises(ValueError, match="item 1: context_ids is empty"):
        score_many(small_llama, [([3], [[4]]), ([], [[4]])])
    with pytest.raises(ValueError, match=r"item 0: choices \[1\] have no tokens"):
        score_many(small_llama, [([3], [[4], []]), ([3], [[4]])])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        score_many(small_llama, [([3], [[4]])], batch_size=0)
