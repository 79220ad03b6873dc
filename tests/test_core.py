"""Core checks on tiny random models, each against a direct computation."""

import pytest
import torch

from contrans_tl.activations import read_resid_post
from contrans_tl.concepts import ConceptVector, mean_difference
from contrans_tl.maps import LinearMapFitter, MapScorer, fit_residual_map, paired_positions
from contrans_tl.sites import match_layers_by_depth, parse_layers, resid_post_name
from contrans_tl.steering import generate, make_steering, steer
from contrans_tl.tokens import encode, word_end_positions

TEXTS = [
    "The cat sat on the mat .",
    "A much longer sentence about the history of the city , built in 1890 , follows here .",
    "Short one .",
    "Bob 's house was painted red in the spring of 1921 .",
    "She said that the river , which flows north , is cold .",
]


def direct_resid(model, text: str, layer: int) -> torch.Tensor:
    """resid_post of one unpadded text, read with TL's own run_with_cache."""
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    _, cache = model.run_with_cache(ids, names_filter=[resid_post_name(layer)])
    return cache[resid_post_name(layer)][0]


# --- sites -----------------------------------------------------------------------------


def test_match_layers_by_depth_pairs_last_with_last_and_is_monotone():
    pairs = match_layers_by_depth(30, 18)
    assert len(pairs) == 18 and pairs[-1] == (29, 17)
    src = [s for s, _ in pairs]
    assert src == sorted(src) and pairs[0][0] == 1  # depth 1/18 -> nearest 2/30 -> layer 1
    assert match_layers_by_depth(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_parse_layers_forms_and_errors():
    assert parse_layers("all", 10) is None
    assert parse_layers("1,3,5", 10) == [1, 3, 5]
    assert parse_layers("2-4,-1", 10) == [2, 3, 4, 9]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("12", 10)
    with pytest.raises(ValueError, match="cannot read layer spec"):
        parse_layers("a-b", 10)


# --- activations -----------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["last", "all", "word_ends"])
def test_batched_left_padded_reads_equal_unbatched(small_gemma, positions):
    layers = [1, 3]
    batched = read_resid_post(small_gemma, TEXTS, layers, positions=positions, batch_size=4)
    for i, text in enumerate(TEXTS):
        for k in layers:
            direct = direct_resid(small_gemma, text, k)
            rows = batched.text_index == i
            want = direct[batched.token_index[rows]]
            # float32 reduction order differs between batch shapes (~1e-5 of the scale);
            # a padding or position bug moves states by the order of the scale itself
            scale = float(want.abs().max())
            torch.testing.assert_close(batched.states[k][rows], want, atol=1e-4 * scale, rtol=0)


def test_last_position_skips_bos_and_all_skips_special(small_gemma):
    reads = read_resid_post(small_gemma, TEXTS[:2], [0], positions="all")
    enc = encode(small_gemma.tokenizer, TEXTS[:2])
    assert enc[0].special[0]  # this tokenizer adds BOS
    assert int((reads.text_index == 0).sum()) == len(enc[0]) - 1
    last = read_resid_post(small_gemma, TEXTS[:2], [0], positions="last")
    assert last.token_index.tolist() == [len(e) - 1 for e in enc]


def test_read_stops_early_and_reads_only_requested_hooks(small_llama, monkeypatch):
    called = []
    for k in range(small_llama.cfg.n_layers):
        point = small_llama.hook_dict[f"blocks.{k}.hook_resid_pre"]
        point.add_hook(lambda x, hook, k=k: called.append(k))
    try:
        read_resid_post(small_llama, TEXTS[:2], [1])
    finally:
        for k in range(small_llama.cfg.n_layers):
            small_llama.hook_dict[f"blocks.{k}.hook_resid_pre"].remove_hooks("fwd")
    assert max(called) == 1  # block 2 never ran


# --- word ends -------------------------------------------------------------------------


def test_word_ends_pair_the_same_words_across_tokenizers(small_llama, small_gemma):
    text = TEXTS[1]
    e_src = encode(small_llama.tokenizer, [text])[0]
    e_tgt = encode(small_gemma.tokenizer, [text])[0]
    ps, pt = paired_positions(e_src, e_tgt, "word_ends")
    assert len(ps) == len(pt) >= 10
    words = text.split()
    ws, wt = word_end_positions(e_src), word_end_positions(e_tgt)
    for w in sorted(set(ws) & set(wt)):
        # both tokens end exactly at the word's last character
        end = sum(len(x) + 1 for x in words[: w + 1]) - 1
        assert e_src.offsets[ws[w]][1] == end and e_tgt.offsets[wt[w]][1] == end


# --- refine ----------------------------------------------------------------------------


def test_mean_difference_equals_direct_means(small_llama):
    pos, neg = TEXTS[:2], TEXTS[2:5]
    v = mean_difference(small_llama, pos, neg, layers=[0, 2], concept="x")
    for k in (0, 2):
        mp = torch.stack([direct_resid(small_llama, t, k)[-1] for t in pos]).mean(0)
        mn = torch.stack([direct_resid(small_llama, t, k)[-1] for t in neg]).mean(0)
        torch.testing.assert_close(v[k], mp - mn, atol=1e-5, rtol=1e-4)
    assert v.model.model_id == "tiny-llama-48" and v.layers == (0, 2)


# --- maps ------------------------------------------------------------------------------


def test_planted_linear_map_recovered_and_streaming_equals_full_solve():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64)
    a = torch.randn(12, 7, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    fit_svd, fit_ridge = LinearMapFitter(12, 7), LinearMapFitter(12, 7)
    for chunk in range(0, 500, 64):  # streaming
        fit_svd.update(x[chunk : chunk + 64], (x @ a)[chunk : chunk + 64])
        fit_ridge.update(x[chunk : chunk + 64], (x @ a + b)[chunk : chunk + 64])
    w, bias = fit_svd.solve("svd")
    torch.testing.assert_close(w.double(), a, atol=1e-4, rtol=1e-4)
    assert bias.abs().max() == 0
    w2, b2 = fit_ridge.solve("ridge", ridge=0.0)
    torch.testing.assert_close(w2.double(), a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b2.double(), b, atol=1e-4, rtol=1e-4)
    # a noisy target: streaming equals one full least-squares solve
    y = x @ a + 0.1 * torch.randn(500, 7, generator=g, dtype=torch.float64)
    fit = LinearMapFitter(12, 7)
    for chunk in range(0, 500, 100):
        fit.update(x[chunk : chunk + 100], y[chunk : chunk + 100])
    full = torch.linalg.lstsq(x, y).solution
    torch.testing.assert_close(fit.solve("svd")[0].double(), full, atol=1e-5, rtol=1e-5)


def test_fitter_rejects_swapped_sides():
    fit = LinearMapFitter(12, 7)
    with pytest.raises(ValueError, match="swapped"):
        fit.update(torch.randn(4, 7), torch.randn(4, 12))


def test_identity_map_returns_the_source_vector(small_llama):
    texts = [t + " " + u for t in TEXTS for u in TEXTS] * 3
    rmap = fit_residual_map(small_llama, small_llama, texts, pairing="all", heldout_fraction=0.1)
    assert rmap.layer_pairs == [(0, 0), (1, 1), (2, 2)]
    for _, t in rmap.layer_pairs:
        assert rmap.metrics[t]["r2"] > 0.999
    v = mean_difference(small_llama, TEXTS[:2], TEXTS[2:], concept="x")
    out = rmap.transplant(v)
    torch.testing.assert_close(out.vectors, v.vectors, atol=1e-3, rtol=1e-3)
    assert out.method == "transplanted" and out.model.model_id == "tiny-llama-48"


def test_cross_tokenizer_map_shapes_metrics_and_transplant(small_llama, small_gemma):
    texts = TEXTS * 8
    rmap = fit_residual_map(small_llama, small_gemma, texts, pairing="auto", heldout_fraction=0.2)
    assert rmap.pairing == "word_ends"
    assert rmap.layer_pairs == match_layers_by_depth(3, 5)
    assert rmap.weights[4].shape == (48, 40)
    for m in rmap.metrics.values():
        assert {"r2", "cosine", "r2_last", "cosine_last"} <= set(m)
    v = mean_difference(small_llama, TEXTS[:2], TEXTS[2:], concept="x")
    out = rmap.transplant(v)
    assert out.vectors.shape == (5, 40)
    torch.testing.assert_close(out[4], v[2] @ rmap.weights[4])
    with pytest.raises(ValueError, match="width"):
        rmap.transplant(mean_difference(small_gemma, TEXTS[:2], TEXTS[2:]))


def test_pairing_all_refuses_different_tokenizers(small_llama, small_gemma):
    with pytest.raises(ValueError, match="tokenize the text identically"):
        fit_residual_map(small_llama, small_gemma, TEXTS * 2, pairing="all", heldout_fraction=0)


# --- transplant ------------------------------------------------------------------------


def _vector(model, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    from contrans_tl.models import model_provenance

    return ConceptVector(
        vectors=torch.randn(len(layers), model.cfg.d_model, generator=g),
        layers=tuple(layers),
        model=model_provenance(model),
        concept="test",
    )


def _all_resid(model, ids):
    names = [resid_post_name(k) for k in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(ids, names_filter=names)
    return [cache[n] for n in names]


def test_hook_adds_exactly_alpha_v_at_the_layer_and_nothing_before(small_gemma):
    ids = torch.tensor([small_gemma.tokenizer(TEXTS[1])["input_ids"]])
    clean = _all_resid(small_gemma, ids)
    v = _vector(small_gemma, [2])
    with steer(small_gemma, v, alpha=0.7):
        steered = _all_resid(small_gemma, ids)
    for k in range(2):
        torch.testing.assert_close(steered[k], clean[k], atol=0, rtol=0)
    torch.testing.assert_close(steered[2], clean[2] + 0.7 * v[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered[4], clean[4])
    # the context manager removed its hooks
    torch.testing.assert_close(_all_resid(small_gemma, ids)[4], clean[4], atol=0, rtol=0)


def test_alpha_times_2v_equals_2alpha_times_v(small_gemma):
    ids = torch.tensor([small_gemma.tokenizer(TEXTS[0])["input_ids"]])
    v = _vector(small_gemma, [0, 2, 4])
    v2 = v.replace(vectors=2 * v.vectors)
    with steer(small_gemma, v2, alpha=0.3):
        a = small_gemma(ids)
    with steer(small_gemma, v, alpha=0.6):
        b = small_gemma(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_hooks_removed_after_exception_and_others_kept(small_gemma):
    ids = torch.tensor([small_gemma.tokenizer(TEXTS[0])["input_ids"]])
    calls = []
    point = small_gemma.hook_dict[resid_post_name(1)]
    point.add_hook(lambda x, hook: calls.append(1))
    try:
        clean = small_gemma(ids)
        with pytest.raises(RuntimeError), steer(small_gemma, _vector(small_gemma, [1]), 1.0):
            raise RuntimeError("boom")
        torch.testing.assert_close(small_gemma(ids), clean, atol=0, rtol=0)
        assert len(point.fwd_hooks) == 1  # the user's hook is still there
    finally:
        point.remove_hooks("fwd")


def test_run_with_hooks_list_matches_context_manager(small_llama):
    ids = torch.tensor([small_llama.tokenizer(TEXTS[3])["input_ids"]])
    v = _vector(small_llama, [0, 1, 2])
    s = make_steering(small_llama, v, 0.5)
    a = small_llama.run_with_hooks(ids, fwd_hooks=s.hooks())
    with s:
        b = small_llama(ids)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_cached_and_uncached_generation_agree(small_gemma, positions):
    v = _vector(small_gemma, [1, 3], seed=3)
    prompts = [TEXTS[0], TEXTS[1], TEXTS[2]]
    s = make_steering(small_gemma, v, 2.0, positions=positions)
    cached = generate(
        small_gemma,
        prompts,
        max_new_tokens=6,
        intervention=s,
        use_cache=True,
        decode=False,
        stop_at_eos=False,
    )
    uncached = generate(
        small_gemma,
        prompts,
        max_new_tokens=6,
        intervention=s,
        use_cache=False,
        decode=False,
        stop_at_eos=False,
    )
    assert cached == uncached
    plain = generate(small_gemma, prompts, max_new_tokens=6, decode=False, stop_at_eos=False)
    assert cached != plain  # the steering does something


def test_batched_generation_equals_one_by_one(small_gemma):
    v = _vector(small_gemma, [2], seed=4)
    s = make_steering(small_gemma, v, 2.0, positions="all")
    together = generate(
        small_gemma,
        TEXTS,
        max_new_tokens=5,
        intervention=s,
        batch_size=5,
        decode=False,
        stop_at_eos=False,
    )
    alone = [
        generate(
            small_gemma, [t], max_new_tokens=5, intervention=s, decode=False, stop_at_eos=False
        )[0]
        for t in TEXTS
    ]
    assert together == alone


def test_generated_only_leaves_the_prompt_untouched(small_gemma):
    v = _vector(small_gemma, [0], seed=5)
    s = make_steering(small_gemma, v, 5.0, positions="generated")
    plain = generate(small_gemma, [TEXTS[1]], max_new_tokens=1, decode=False, stop_at_eos=False)
    steered = generate(
        small_gemma, [TEXTS[1]], max_new_tokens=1, intervention=s, decode=False, stop_at_eos=False
    )
    assert plain == steered  # the first new token is read off the prompt's last position


def test_relative_scale_uses_stored_norms(small_llama):
    v = mean_difference(small_llama, TEXTS[:2], TEXTS[2:], concept="x")
    s = make_steering(small_llama, v, 0.5, scale="relative")
    for k, d in s.additions.items():
        assert float(d.norm()) == pytest.approx(0.5 * v.metadata["resid_norms"][str(k)], rel=1e-5)


def test_position_semantics_exactly(small_llama):
    """Which absolute positions get the vector, for each mode, on a full pass and on one
    cached step, with left padding in row 0."""
    from contrans_tl.steering import PositionState, _addition_hook

    d = torch.ones(4)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # row 0: one pad
    prompt_len = 4  # padded prompt: positions 0..3; generated: 4, 5

    def steered(positions, offset, seq):
        state = PositionState(prompt_length=prompt_len, offset=offset, attention_mask=mask)
        out = _addition_hook(d, positions, state)(torch.zeros(2, seq, 4), hook=None)
        return out[..., 0].long().tolist()

    assert steered("all", 0, 6) == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert steered("prompt", 0, 6) == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert steered("generated", 0, 6) == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]]
    # cached step feeding the first generated token (absolute position 4)
    assert steered("generated", 4, 1) == [[1], [1]]
    assert steered("prompt", 4, 1) == [[0], [0]]
    # a bare forward pass (no state): everything is prompt
    bare = _addition_hook(d, "generated", PositionState())(torch.zeros(1, 3, 4), hook=None)
    assert bare.abs().sum() == 0
    bare = _addition_hook(d, "prompt", PositionState())(torch.zeros(1, 3, 4), hook=None)
    assert bare[..., 0].tolist() == [[1.0, 1.0, 1.0]]


def test_position_weight_is_shared_but_never_stale():
    """The per-pass position weight is computed once for all layers' hooks, and is
    recomputed when the mask or the offset changes, also in place; an in-place change of
    the vector is picked up too."""
    from contrans_tl.steering import PositionState, _addition_hook

    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    state = PositionState(prompt_length=3, offset=0, attention_mask=mask)
    d = torch.ones(4)
    hooks = [_addition_hook(d, "prompt", state) for _ in range(3)]  # three "layers"
    x = torch.zeros(2, 3, 4)
    first = [h(x, hook=None)[..., 0].tolist() for h in hooks]
    assert first == [[[0, 1, 1], [1, 1, 1]]] * 3
    w1 = state.weight("prompt", x)
    assert w1 is state.weight("prompt", x)  # memoized within a pass
    mask[1, 0] = 0  # in place: a new pad in row 1
    assert hooks[0](x, hook=None)[..., 0].tolist() == [[0, 1, 1], [0, 1, 1]]
    state.attention_mask = torch.ones(2, 3, dtype=torch.long)  # a new mask object
    assert hooks[1](x, hook=None)[..., 0].tolist() == [[1, 1, 1], [1, 1, 1]]
    state.offset = 2  # a cached step at absolute position 2, then 3 (generated)
    y = torch.zeros(2, 1, 4)
    assert hooks[2](y, hook=None)[..., 0].tolist() == [[1], [1]]
    state.offset = 3
    state.attention_mask = torch.ones(2, 4, dtype=torch.long)
    assert hooks[2](y, hook=None)[..., 0].tolist() == [[0], [0]]
    d.mul_(2)  # the vector changed in place
    state.offset = 0
    state.attention_mask = None
    assert hooks[0](x, hook=None)[..., 0].tolist() == [[2, 2, 2], [2, 2, 2]]
    with torch.inference_mode():  # inference tensors carry no version counter: no memo
        m = torch.tensor([[0, 1, 1], [1, 1, 1]])
        st = PositionState(prompt_length=3, offset=0, attention_mask=m)
        out = _addition_hook(torch.ones(4), "all", st)(torch.zeros(2, 3, 4), hook=None)
        assert out[..., 0].tolist() == [[0, 1, 1], [1, 1, 1]]


def test_map_scorer_r2_against_direct_computation_and_single_target():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(5, 7, generator=g), torch.randn(7, generator=g)
    x, y = torch.randn(11, 5, generator=g), torch.randn(11, 7, generator=g)
    scorer = MapScorer(w, b)
    scorer.update(x[:4], y[:4])
    scorer.update(x[4:], y[4:])
    pred = x.double() @ w.double() + b.double()
    y64 = y.double()
    r2 = 1 - ((y64 - pred) ** 2).sum() / ((y64 - y64.mean(0)) ** 2).sum()
    assert scorer.result()["r2"] == pytest.approx(float(r2), rel=1e-9)
    one = MapScorer(w, b)
    one.update(x[:1], y[:1])  # a single held-out target has no variance: R² undefined
    got = one.result()
    assert got["n"] == 1 and got["r2"] != got["r2"]
