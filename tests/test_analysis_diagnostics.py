"""Layer-similarity diagnostics, concept-vector cosines and residual norms, each checked
against a direct computation (synthetic states where no model is needed)."""

import contextlib
import dataclasses
import itertools
import math

import jaxtyping
import pytest
import torch

from contrans_tl.analysis.diagnostics import (
    LayerSimilarity,
    cosine_per_layer,
    layer_pairs_from_similarity,
    layer_similarity,
    linear_cka,
    residual_norm_profile,
    similarity_from_states,
)
from contrans_tl.concepts import ConceptVector
from contrans_tl.data import wikisplit_sentences
from contrans_tl.maps import fit_residual_map, iter_paired_states
from contrans_tl.provenance import ModelProvenance
from contrans_tl.sites import resid_post_name

TEXTS = wikisplit_sentences(24)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@contextlib.contextmanager
def _unchecked():
    """Runtime type checks off, to see the library's own error (what a user without the
    test suite's checker gets) for shapes or values the annotations already exclude."""
    old = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", old)


def cka_hsic(X: torch.Tensor, Y: torch.Tensor) -> float:
    """The HSIC form with explicit Gram and centring matrices (Kornblith et al. Eq. 3)."""
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T
    hsic = torch.trace(K @ H @ L @ H)
    return float(hsic / torch.sqrt(torch.trace(K @ H @ K @ H) * torch.trace(L @ H @ L @ H)))


def cka_frobenius(X: torch.Tensor, Y: torch.Tensor) -> float:
    """The feature-space form on column-centred matrices."""
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    return float(
        torch.linalg.matrix_norm(Yc.T @ Xc) ** 2
        / (torch.linalg.matrix_norm(Xc.T @ Xc) * torch.linalg.matrix_norm(Yc.T @ Yc))
    )


# --- linear CKA ------------------------------------------------------------------------


@pytest.mark.parametrize("n, dx, dy", [(40, 7, 5), (6, 20, 11)])  # feature form, Gram form
def test_linear_cka_equals_hsic_and_frobenius_forms(n, dx, dy):
    X = _randn(n, dx, seed=1)
    Y = X[:, :3].repeat(1, 4)[:, :dy] ** 2 + _randn(n, dy, seed=2)  # related, not identical
    want = cka_hsic(X, Y)
    assert cka_frobenius(X, Y) == pytest.approx(want, rel=1e-10)
    assert linear_cka(X, Y) == pytest.approx(want, rel=1e-10)
    assert linear_cka(X.float(), Y.float()) == pytest.approx(want, rel=1e-5)
    assert 0.05 < want < 0.95


def test_linear_cka_invariances_and_identity():
    X, Y = _randn(50, 8, seed=3), _randn(50, 6, seed=4)
    Y = Y + X[:, :6]
    base = linear_cka(X, Y)
    Q, _ = torch.linalg.qr(_randn(8, 8, seed=5))
    assert linear_cka(X @ Q, Y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * X + 5.0, Y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X, -0.2 * Y - 1.0) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, X @ Q * 2.0) == pytest.approx(1.0, abs=1e-12)
    # not vacuous: an anisotropic scaling does change it
    D = torch.diag(torch.linspace(0.1, 10.0, 8, dtype=torch.float64))
    assert abs(linear_cka(X @ D, Y) - base) > 1e-3


def test_linear_cka_errors():
    with _unchecked(), pytest.raises(ValueError, match="same rows"):
        linear_cka(_randn(5, 3, seed=0), _randn(6, 3, seed=0))
    with pytest.raises(ValueError, match="no variance"):
        linear_cka(torch.ones(5, 3), _randn(5, 3, seed=0))


# --- the similarity matrix on synthetic states -----------------------------------------


def planted_states(p: list[int], *, n: int = 400, n_src: int = 4, seed: int = 0):
    """Independent source layers; target layer j is a linear map of source layer p[j]."""
    xs = {s: _randn(n, 6, seed=seed + s) * (1 + s) + 3.0 for s in range(n_src)}
    ys = {}
    for j, s in enumerate(p):
        A = _randn(6, 9, seed=100 + seed + j)
        ys[j] = xs[s] @ A + 0.01 * _randn(n, 9, seed=200 + seed + j) - 2.0
    return xs, ys


@pytest.mark.parametrize("metric", ["cka", "r2"])
def test_best_pairs_recover_a_planted_matching(metric):
    p = [2, 0, 3]  # not monotone
    xs, ys = planted_states(p)
    # ridge: centred with a bias, so the planted offsets are absorbed (the paper's "svd"
    # map has no bias and cannot fit them exactly)
    sim = similarity_from_states(xs, ys, metric=metric, method="ridge", heldout_fraction=0.25)
    assert sim.scores.shape == (4, 3) and sim.scores.dtype == torch.float64
    assert sim.best_pairs(monotone=False) == [(2, 0), (0, 1), (3, 2)]
    planted = torch.tensor([sim.score(s, j) for j, s in enumerate(p)])
    others = [sim.score(s, j) for j in range(3) for s in range(4) if s != p[j]]
    assert planted.min() > 0.6 and max(others) < 0.2
    if metric == "r2":
        assert planted.min() > 0.999  # a linear map with 1% noise, on held-out rows
    # monotone: the constrained optimum differs, and is non-decreasing
    mono = [s for s, _ in sim.best_pairs(monotone=True)]
    assert mono == sorted(mono) and mono != p
    # a monotone plant is recovered either way
    sim2 = similarity_from_states(*planted_states([0, 2, 3], seed=7), metric=metric)
    assert sim2.best_pairs(monotone=True) == [(0, 0), (2, 1), (3, 2)]
    assert sim2.best_pairs(monotone=False) == [(0, 0), (2, 1), (3, 2)]


def test_cka_matrix_equals_linear_cka_of_each_pair():
    xs, ys = planted_states([1, 1, 0])
    sim = similarity_from_states(xs, ys, metric="cka")
    for s, t in itertools.product(xs, ys):
        assert sim.score(s, t) == pytest.approx(linear_cka(xs[s], ys[t]), rel=1e-9)


def test_similarity_from_states_errors():
    xs, ys = planted_states([0, 1, 2])
    with pytest.raises(ValueError, match="rows"):
        similarity_from_states(xs, {0: ys[0][:10]})
    with _unchecked(), pytest.raises(ValueError, match="metric"):
        similarity_from_states(xs, ys, metric="cca")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="held-out"):
        similarity_from_states(xs, ys, metric="r2", heldout_fraction=0.0)
    with pytest.raises(ValueError, match="empty"):
        similarity_from_states({}, ys)


def _brute_force(m: torch.Tensor) -> tuple[float, list[int]]:
    n_s, n_t = m.shape
    best = max(
        itertools.combinations_with_replacement(range(n_s), n_t),  # all non-decreasing
        key=lambda rows: sum(float(m[r, j]) for j, r in enumerate(rows)),
    )
    return sum(float(m[r, j]) for j, r in enumerate(best)), list(best)


@pytest.mark.parametrize("seed", range(8))
def test_monotone_dp_equals_brute_force(seed):
    n_s, n_t = 5 + seed % 2, 4 + seed % 3
    m = _randn(n_s, n_t, seed=seed)
    sim = LayerSimilarity(m, tuple(range(0, 2 * n_s, 2)), tuple(range(n_t)), "cka")
    want_total, want_rows = _brute_force(m)
    pairs = sim.best_pairs(monotone=True)
    assert [t for _, t in pairs] == list(range(n_t))
    assert [s for s, _ in pairs] == [2 * r for r in want_rows]
    assert sum(sim.score(s, t) for s, t in pairs) == pytest.approx(want_total)
    free = sim.best_pairs(monotone=False)
    assert [s for s, _ in free] == [2 * int(r) for r in m.argmax(0)]


def test_best_pairs_never_choose_nan():
    m = torch.tensor([[0.9, math.nan], [0.1, 0.2], [math.nan, 0.3]], dtype=torch.float64)
    sim = LayerSimilarity(m, (0, 1, 2), (0, 1), "cka")
    assert sim.best_pairs(monotone=False) == [(0, 0), (2, 1)]
    assert sim.best_pairs(monotone=True) == [(0, 0), (2, 1)]
    bad = LayerSimilarity(torch.full((2, 2), math.nan), (0, 1), (0, 1), "r2")
    with pytest.raises(ValueError, match="no finite score"):
        bad.best_pairs()
    with pytest.raises(ValueError, match="n_source_layers"):
        LayerSimilarity(torch.zeros(3, 2), (0, 1), (0, 1), "cka")


# --- on tiny models --------------------------------------------------------------------


def test_layer_similarity_streams_to_the_full_batch_matrix(small_llama, wide_llama):
    sim = layer_similarity(
        small_llama, wide_llama, TEXTS, metric="cka", batch_size=1, chunk_texts=5
    )
    assert sim.pairing == "all" and sim.scores.shape == (3, 4)
    assert sim.source.model_id == "tiny-llama-48"
    pairs = [(s, t) for s in range(3) for t in range(4)]
    (xs, ys), *rest = iter_paired_states(
        small_llama, wide_llama, TEXTS, pairs, "all", batch_size=1, chunk_texts=len(TEXTS)
    )
    assert not rest and sim.info["n_pairs"] == xs[0].shape[0]
    for s, t in pairs:
        assert sim.score(s, t) == pytest.approx(linear_cka(xs[s], ys[t]), rel=1e-8)
    full = similarity_from_states(xs, ys)
    torch.testing.assert_close(sim.scores, full.scores, rtol=1e-8, atol=0)


@pytest.mark.parametrize("metric", ["cka", "r2"])
def test_layer_similarity_reads_each_text_once_per_model(small_llama, wide_llama, metric):
    calls = {"src": 0, "tgt": 0}
    points = {
        "src": small_llama.hook_dict["blocks.0.hook_resid_pre"],
        "tgt": wide_llama.hook_dict["blocks.0.hook_resid_pre"],
    }
    for side, point in points.items():
        point.add_hook(lambda x, hook, side=side: calls.__setitem__(side, calls[side] + 1))
    try:
        layer_similarity(
            small_llama, wide_llama, TEXTS, metric=metric, batch_size=6, heldout_fraction=0.25
        )
    finally:
        for point in points.values():
            point.remove_hooks("fwd")
    # 24 texts in batches of 6 (18 + 6 when split): 4 forward passes per model for all
    # 3 x 4 layer pairs
    assert calls == {"src": 4, "tgt": 4}


@pytest.mark.parametrize("method", ["svd", "ridge"])
def test_r2_matrix_equals_fit_residual_map_heldout_r2(small_llama, wide_llama, method):
    sim = layer_similarity(
        small_llama, wide_llama, TEXTS, metric="r2", method=method, heldout_fraction=0.25
    )
    assert sim.info["n_texts_heldout"] == 6
    for s in range(3):
        rmap = fit_residual_map(
            small_llama,
            wide_llama,
            TEXTS,
            layer_pairs=[(s, t) for t in range(4)],
            method=method,
            heldout_fraction=0.25,
        )
        for t in range(4):
            assert sim.score(s, t) == pytest.approx(rmap.metrics[t]["r2"], rel=1e-6, abs=1e-8)


def test_similarity_pairs_feed_fit_residual_map_across_tokenizers(
    small_llama, small_gemma, tmp_path
):
    sim = layer_similarity(small_llama, small_gemma, TEXTS[:10], target_layers=[1, 2, 4])
    assert sim.pairing == "word_ends" and sim.scores.shape == (3, 3)
    assert bool(((sim.scores > 0) & (sim.scores <= 1 + 1e-12)).all())
    pairs = layer_pairs_from_similarity(sim, source=small_llama, target=small_gemma)
    assert [t for _, t in pairs] == [1, 2, 4]
    assert [s for s, _ in pairs] == sorted(s for s, _ in pairs)
    rmap = fit_residual_map(
        small_llama, small_gemma, TEXTS, layer_pairs=pairs, heldout_fraction=0.25
    )
    assert rmap.layer_pairs == pairs
    with pytest.raises(ValueError, match="does not fit"):
        layer_pairs_from_similarity(sim, source=small_gemma, target=small_llama)
    sim.save(tmp_path / "sim")
    back = LayerSimilarity.load(tmp_path / "sim")
    assert torch.equal(back.scores, sim.scores) and back.target_layers == (1, 2, 4)
    assert back.source == sim.source and back.info == sim.info and back.pairing == "word_ends"
    assert back.to_dict()["scores"] == sim.scores.tolist()


def test_residual_norm_profile_matches_run_with_cache(small_llama):
    texts = TEXTS[:5]
    prof = residual_norm_profile(small_llama, texts, batch_size=2)
    assert list(prof) == [0, 1, 2]
    for k in prof:
        norms = []
        for text in texts:
            ids = torch.tensor([small_llama.tokenizer(text)["input_ids"]])
            _, cache = small_llama.run_with_cache(ids, names_filter=[resid_post_name(k)])
            norms.append(float(cache[resid_post_name(k)][0, -1].norm()))
        assert prof[k] == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    assert list(residual_norm_profile(small_llama, texts, layers=[-1])) == [2]
    with pytest.raises(TypeError, match="one string"):
        residual_norm_profile(small_llama, "one text")


# --- cosines between concept vectors ---------------------------------------------------

MODEL = ModelProvenance.from_dict(
    {
        "model_id": "m",
        "d_model": 4,
        "n_layers": 3,
        "weight_processing": "none",
        "source": "object",
        "revision": None,
        "file_sha256": None,
        "dtype": "float32",
        "architecture": "LlamaForCausalLM",
        "d_vocab": 300,
    }
)


def test_cosine_per_layer_by_hand():
    a = ConceptVector(
        torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [1.0, 1.0, 1.0, 1.0]]), (0, 1, 2), MODEL, "a"
    )
    b = ConceptVector(torch.tensor([[1.0, 1.0, 0, 0], [0, -3.0, 0, 0]]), (0, 2), MODEL, "b")
    got = cosine_per_layer(a, b)
    assert list(got) == [0, 2]
    assert got[0] == pytest.approx(1 / math.sqrt(2))
    assert got[2] == pytest.approx(-3.0 / (2.0 * 3.0))
    zero = b.replace(vectors=torch.zeros(2, 4))
    assert math.isnan(cosine_per_layer(a, zero)[0])


def test_cosine_per_layer_refuses_other_models():
    a = ConceptVector(torch.ones(1, 4), (0,), MODEL, "a")
    wide = ConceptVector(torch.ones(1, 5), (0,), dataclasses.replace(MODEL, d_model=5), "b")
    with pytest.raises(ValueError, match="one model"):
        cosine_per_layer(a, wide)
    other = ConceptVector(torch.ones(1, 4), (0,), dataclasses.replace(MODEL, model_id="n"), "c")
    with pytest.raises(ValueError, match="strict=False"):
        cosine_per_layer(a, other)
    assert cosine_per_layer(a, other, strict=False) == {0: pytest.approx(1.0)}
    with pytest.raises(ValueError, match="share no layer"):
        cosine_per_layer(a, ConceptVector(torch.ones(1, 4), (1,), MODEL, "d"))
