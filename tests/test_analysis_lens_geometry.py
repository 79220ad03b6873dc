"""Logit-lens token shifts and residual-stream geometry, each against a direct computation."""

import contextlib

import jaxtyping
import numpy as np
import pytest
import torch

from contrans_tl.activations import read_resid_post
from contrans_tl.analysis import (
    TextShifts,
    TokenShift,
    aggregate_shifts,
    before_after_pca,
    logit_lens,
    pca_2d,
    separation_by_layer,
    separation_scores,
    token_shifts,
    tsne_2d,
)
from contrans_tl.concepts import ConceptVector
from contrans_tl.models import model_provenance
from contrans_tl.sites import resid_post_name
from contrans_tl.steering import steer

TEXTS = [
    "The cat sat on the mat .",
    "A much longer sentence about the history of the city , built in 1890 , follows here .",
    "Short one .",
    "Bob 's house was painted red in the spring of 1921 .",
    "She said that the river , which flows north , is cold .",
]


def _vector(model, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ConceptVector(
        vectors=torch.randn(len(layers), model.cfg.d_model, generator=g),
        layers=tuple(layers),
        model=model_provenance(model),
        concept="test",
    )


def _all_resid(model, text):
    """Logits and every resid_post of one unpadded text, from TL's run_with_cache."""
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    names = [resid_post_name(k) for k in range(model.cfg.n_layers)]
    logits, cache = model.run_with_cache(ids, names_filter=names)
    return logits[0], [cache[n][0] for n in names]


@contextlib.contextmanager
def _unchecked():
    """Runtime type checks off, to see the library's own error for a value outside a
    Literal (what a user without the test suite's checker gets)."""
    old = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", old)


def _plain_lens(model, h):
    """softmax(ln_final(h) @ W_U + b_U) with plain torch."""
    with torch.no_grad():
        return torch.softmax(model.ln_final(h) @ model.W_U + model.b_U, dim=-1)


# --- logit lens ------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["small_llama", "small_gemma"])
def test_logit_lens_is_final_norm_then_unembed_and_reproduces_the_model(fixture, request):
    model = request.getfixturevalue(fixture)
    logits, resids = _all_resid(model, TEXTS[1])
    for h in resids:
        lens = logit_lens(model, h)
        assert lens.shape == (h.shape[0], model.cfg.d_vocab)
        torch.testing.assert_close(lens, _plain_lens(model, h), atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(
            logit_lens(model, h, return_type="log_probs"), lens.log(), atol=1e-5, rtol=1e-5
        )
        # leading dims are kept
        torch.testing.assert_close(logit_lens(model, h[None])[0], lens, atol=0, rtol=0)
    # the last block through the lens is the model's own next-token distribution
    last = logit_lens(model, resids[-1])
    torch.testing.assert_close(last, torch.softmax(logits, dim=-1), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(
        logit_lens(model, resids[-1], return_type="logits"), logits, atol=1e-5, rtol=1e-5
    )
    # not vacuous: the final norm matters, and an earlier layer reads differently
    no_norm = torch.softmax(resids[-1] @ model.W_U + model.b_U, dim=-1)
    assert not torch.allclose(last, no_norm, atol=1e-6, rtol=1e-3)
    assert not torch.allclose(logit_lens(model, resids[0]), last, atol=1e-6, rtol=1e-3)


def test_logit_lens_rejects_a_wrong_width_and_return_type(small_llama):
    with pytest.raises(ValueError, match="d_model=48"):
        logit_lens(small_llama, torch.randn(3, 40))
    with _unchecked(), pytest.raises(ValueError, match="return_type must be one of"):
        logit_lens(small_llama, torch.randn(3, 48), return_type="prob")


# --- token shifts ----------------------------------------------------------------------


def _check_against_brute_force(model, shifts, before, after, k, measure="probs"):
    """``shifts`` (one TextShifts) equals ranking all deltas of the two states by hand."""
    pb, pa = _plain_lens(model, before), _plain_lens(model, after)
    if measure == "log_probs":
        pb, pa = pb.log(), pa.log()
    delta = pa - pb
    order = torch.argsort(delta, descending=True)
    want_up = [int(t) for t in order[:k] if delta[t] > 0]
    want_down = [int(t) for t in order.flip(0)[:k] if delta[t] < 0]
    for got, want in ((shifts.increased, want_up), (shifts.decreased, want_down)):
        assert len(got) == len(want) >= 1
        # the same deltas in the same order (token ids may swap only between exact ties)
        torch.testing.assert_close(
            torch.tensor([s.delta for s in got]), delta[want].float(), atol=1e-7, rtol=1e-4
        )
        for s in got:
            assert float(delta[s.token_id]) == pytest.approx(s.delta, rel=1e-4, abs=1e-8)
            assert float(pb[s.token_id]) == pytest.approx(s.before, rel=1e-4, abs=1e-8)
            assert float(pa[s.token_id]) == pytest.approx(s.after, rel=1e-4, abs=1e-8)
            assert s.token == model.tokenizer.decode([s.token_id])
    assert all(s.delta > 0 for s in shifts.increased)
    assert all(s.delta < 0 for s in shifts.decreased)


@pytest.mark.parametrize("measure", ["probs", "log_probs"])
def test_direct_token_shifts_equal_brute_force(small_gemma, measure):
    v = _vector(small_gemma, [1, 3])
    alpha, k = 3.0, 6
    out = token_shifts(small_gemma, TEXTS, v, alpha, [1, 3], k=k, measure=measure, batch_size=3)
    assert sorted(out) == [1, 3]
    for layer in (1, 3):
        assert [r.text_index for r in out[layer]] == list(range(len(TEXTS)))
        for i, text in enumerate(TEXTS):
            r = out[layer][i]
            assert (r.text, r.layer) == (text, layer)
            h = _all_resid(small_gemma, text)[1][layer][-1]
            _check_against_brute_force(small_gemma, r, h, h + alpha * v[layer], k, measure)


def test_steered_token_shifts_equal_brute_force_and_direct_for_one_layer(small_llama):
    v = _vector(small_llama, [0, 2], seed=1)
    alpha, k = 2.0, 5
    # full run: the vector is added at layers 0 and 2; states are read at layer 2
    out = token_shifts(small_llama, TEXTS, v, alpha, [2], k=k, mode="steered")
    for i, text in enumerate(TEXTS):
        before = _all_resid(small_llama, text)[1][2][-1]
        with steer(small_llama, v, alpha):
            after = _all_resid(small_llama, text)[1][2][-1]
        _check_against_brute_force(small_llama, out[2][i], before, after, k)
    # the layer-0 addition propagates, so the full run differs from the direct view
    direct = token_shifts(small_llama, TEXTS, v, alpha, [2], k=k)
    assert [s.delta for s in out[2][0].increased] != pytest.approx(
        [s.delta for s in direct[2][0].increased], rel=1e-3
    )
    # steering only the read layer is the direct view
    one = token_shifts(small_llama, TEXTS, v, alpha, [2], k=k, mode="steered", steer_layers=[2])
    for a, b in zip(one[2], direct[2]):
        assert [s.token_id for s in a.increased] == [s.token_id for s in b.increased]
        assert [s.delta for s in a.increased] == pytest.approx(
            [s.delta for s in b.increased], rel=1e-4, abs=1e-9
        )


def test_zero_alpha_shifts_nothing_and_bad_arguments_are_named(small_llama):
    v = _vector(small_llama, [1])
    out = token_shifts(small_llama, TEXTS[:2], v, 0.0, k=3)
    assert all(not r.increased and not r.decreased for r in out[1])
    with pytest.raises(ValueError, match="no vector for layers \\[2\\]"):
        token_shifts(small_llama, TEXTS[:2], v, 1.0, [2])
    with _unchecked(), pytest.raises(ValueError, match="position must be 'last'"):
        token_shifts(small_llama, TEXTS[:2], v, 1.0, position="all")
    with _unchecked(), pytest.raises(ValueError, match="mode must be one of"):
        token_shifts(small_llama, TEXTS[:2], v, 1.0, mode="full")
    with _unchecked(), pytest.raises(TypeError, match="list of texts"):
        token_shifts(small_llama, TEXTS[0], v, 1.0)


def _ts(i, up, down, layer=0):
    return TextShifts(
        text_index=i,
        text=f"text {i}",
        layer=layer,
        increased=[TokenShift(t, name, d, 0.0, d) for t, name, d in up],
        decreased=[TokenShift(t, name, d, -d, 0.0) for t, name, d in down],
    )


def test_aggregate_counts_by_hand():
    results = [
        _ts(0, [(1, "a", 0.3), (2, "b", 0.2)], [(10, "x", -0.3)]),
        _ts(1, [(2, "b", 0.5), (3, "c", 0.1)], [(10, "x", -0.1), (11, "y", -0.2)]),
        _ts(2, [(1, "a", 0.1), (2, "b", 0.1)], [(11, "y", -0.4)]),
    ]
    up, down = aggregate_shifts(results)
    assert up == [("b", 3), ("a", 2), ("c", 1)]
    # x and y both in two texts: y's deltas are larger (0.6 against 0.4)
    assert down == [("y", 2), ("x", 2)]
    assert aggregate_shifts(results, top=1) == ([("b", 3)], [("y", 2)])
    assert aggregate_shifts([]) == ([], [])
    with pytest.raises(ValueError, match="mix layers"):
        aggregate_shifts([*results, _ts(3, [], [], layer=1)])
    with pytest.raises(ValueError, match="more than once"):
        aggregate_shifts([*results, results[0]])


def test_aggregate_of_token_shifts_counts_texts(small_gemma):
    v = _vector(small_gemma, [2], seed=2)
    out = token_shifts(small_gemma, TEXTS, v, 4.0, k=4)[2]
    up, down = aggregate_shifts(out)
    want = {}
    for r in out:
        for s in r.increased:
            want[s.token] = want.get(s.token, 0) + 1
    assert dict(up) == want and sum(n for _, n in up) == sum(len(r.increased) for r in out)
    assert [n for _, n in down] == sorted((n for _, n in down), reverse=True)


# --- geometry --------------------------------------------------------------------------


def _clusters(n=60, d=20, sep=12.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, d))
    centres *= sep / np.linalg.norm(centres, axis=1, keepdims=True)
    return {f"c{i}": c + rng.normal(size=(n, d)) for i, c in enumerate(centres)}


def _means_apart_beyond_spreads(xy, groups):
    labels = sorted(set(groups))
    means = {g: xy[groups == g].mean(0) for g in labels}
    spread = {g: np.sqrt(((xy[groups == g] - means[g]) ** 2).sum(1).mean()) for g in labels}
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            assert np.linalg.norm(means[a] - means[b]) > spread[a] + spread[b]


def test_separated_clusters_come_out_separated():
    by_label = _clusters()
    scores = separation_scores(by_label)
    assert scores["silhouette"] > 0.5
    assert scores["probe_accuracy"] >= 0.99
    assert scores["chance"] == pytest.approx(1 / 3)
    X = np.vstack(list(by_label.values()))
    groups = np.repeat(np.arange(3), 60)
    _means_apart_beyond_spreads(pca_2d(X), groups)
    _means_apart_beyond_spreads(tsne_2d(X, seed=0, perplexity=20.0), groups)
    _means_apart_beyond_spreads(
        tsne_2d(torch.tensor(X), seed=1, perplexity=10.0, pca_dims=5), groups
    )
    # tensors and arrays give the same scores
    as_torch = {k: torch.tensor(x, dtype=torch.float64) for k, x in by_label.items()}
    assert separation_scores(as_torch) == pytest.approx(scores)


def test_random_labels_on_one_gaussian_do_not_separate():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 10))
    labels = rng.permutation(np.repeat([0, 1], 200))
    scores = separation_scores({"a": X[labels == 0], "b": X[labels == 1]}, seed=3)
    assert abs(scores["silhouette"]) < 0.05
    assert abs(scores["probe_accuracy"] - 0.5) < 0.1
    assert scores["chance"] == 0.5


def test_projections_match_sklearn_pca_by_hand():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(50, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    Xc = X - X.mean(0)
    _, _, vt = np.linalg.svd(Xc, full_matrices=False)
    xy = pca_2d(X)
    # same axes up to sign
    np.testing.assert_allclose(np.abs(xy), np.abs(Xc @ vt[:2].T), atol=1e-9)


def test_before_after_pca_shares_one_frame():
    rng = np.random.default_rng(3)
    before = rng.normal(size=(40, 8)) * np.arange(8, 0, -1)
    shift = rng.normal(size=8)
    after = before + shift
    pa = before_after_pca(before, torch.tensor(after))
    assert pa.fit_on == "before" and pa.components.shape == (2, 8)
    np.testing.assert_allclose(pa.before, (before - pa.mean) @ pa.components.T, atol=1e-9)
    np.testing.assert_allclose(pa.before, pca_2d(before), atol=1e-9)
    # a constant shift is the same arrow everywhere: its projection on the axes
    arrows = pa.after - pa.before
    np.testing.assert_allclose(arrows, np.tile(pa.components @ shift, (40, 1)), atol=1e-9)
    both = before_after_pca(before, after, fit_on="both")
    np.testing.assert_allclose(both.mean, np.vstack([before, after]).mean(0), atol=1e-12)
    with _unchecked(), pytest.raises(ValueError, match="same shape"):
        before_after_pca(before, after[:-1])
    with _unchecked(), pytest.raises(ValueError, match="fit_on"):
        before_after_pca(before, after, fit_on="after")


def test_geometry_errors_name_the_problem():
    X = np.zeros((10, 4))
    with pytest.raises(ValueError, match="at least two labels"):
        separation_scores({"a": X})
    with pytest.raises(ValueError, match="at least two states"):
        separation_scores({"a": X, "b": X[:1]})
    with pytest.raises(ValueError, match="one width"):
        separation_scores({"a": X, "b": np.zeros((10, 5))})
    with pytest.raises(ValueError, match="perplexity must be in"):
        tsne_2d(X, perplexity=10.0)
    with _unchecked(), pytest.raises(ValueError, match="2-D"):
        pca_2d(np.zeros(5))


def test_separation_by_layer_scores_last_token_states(small_llama):
    by_label = {"a": TEXTS[:3] + ["The dog ran .", "A bird sang ."], "b": TEXTS[2:]}
    out = separation_by_layer(small_llama, by_label, layers=[0, 2], folds=2)
    assert sorted(out) == [0, 2]
    reads = read_resid_post(small_llama, by_label["a"] + by_label["b"], [0, 2])
    for layer in (0, 2):
        states = reads.states[layer]
        direct = separation_scores({"a": states[:5], "b": states[5:]}, folds=2)
        assert out[layer] == pytest.approx(direct)
