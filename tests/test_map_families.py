"""Map families of issue 17 on synthetic pairs: each recovers a planted map of its own
kind, and a fit over batches equals one over all pairs at once."""

import pytest
import torch

from contrans_tl.maps import LinearMapFitter

D_SRC, D_TGT, N = 11, 17, 900  # distinct, non-square widths


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_SRC, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, D_SRC)
    x = x + torch.randn(D_SRC, generator=g, dtype=torch.float64)  # off-centre
    return g, x


def _fit(x, y, *, chunk=None, target_moment=True):
    fit = LinearMapFitter(x.shape[1], y.shape[1], target_moment=target_moment)
    step = chunk or len(x)
    for i in range(0, len(x), step):
        fit.update(x[i : i + step], y[i : i + step])
    return fit


def _semi_orthogonal(g, rows, cols):
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=g, dtype=torch.float64))
    return q.T  # [rows, cols] with orthonormal rows (rows <= cols)


def test_procrustes_recovers_a_planted_scaled_rotation():
    g, x = _data()
    q = _semi_orthogonal(g, D_SRC, D_TGT)
    bias = torch.randn(D_TGT, generator=g, dtype=torch.float64)
    y = 1.7 * x @ q + bias + 0.01 * torch.randn(N, D_TGT, generator=g, dtype=torch.float64)
    w, b = _fit(x, y).solve("procrustes")
    torch.testing.assert_close(w.double(), 1.7 * q, atol=2e-3, rtol=0)
    torch.testing.assert_close(b.double(), bias, atol=1e-2, rtol=0)
    # the solution is a rotation and one scale: W Wᵀ = s² I, whatever the data
    noise_w, _ = _fit(x, torch.randn(N, D_TGT, generator=g, dtype=torch.float64)).solve(
        "procrustes"
    )
    gram = noise_w.double() @ noise_w.double().T
    torch.testing.assert_close(gram, gram[0, 0] * torch.eye(D_SRC, dtype=torch.float64))


def test_procrustes_is_not_least_squares_on_a_general_map():
    """A planted map that is no rotation: ridge recovers it, Procrustes cannot."""
    g, x = _data(1)
    a = torch.randn(D_SRC, D_TGT, generator=g, dtype=torch.float64)
    fit = _fit(x, x @ a)
    ridge, _ = fit.solve("ridge", ridge=0.0)
    procrustes, _ = fit.solve("procrustes")
    assert float((ridge.double() - a).norm()) < 1e-3
    assert float((procrustes.double() - a).norm()) > 0.3 * float(a.norm())


def test_whitened_procrustes_ignores_a_linear_change_of_source_coordinates():
    g, x = _data(2)
    a = torch.randn(D_SRC, D_TGT, generator=g, dtype=torch.float64)
    y = x @ a + 0.3 * torch.randn(N, D_TGT, generator=g, dtype=torch.float64)
    change = torch.randn(D_SRC, D_SRC, generator=g, dtype=torch.float64) + 3 * torch.eye(D_SRC)
    w1, b1 = _fit(x, y).solve("whitened_procrustes", ridge=0.0)
    w2, b2 = _fit(x @ change, y).solve("whitened_procrustes", ridge=0.0)
    pred1 = x @ w1.double() + b1.double()
    pred2 = (x @ change) @ w2.double() + b2.double()
    torch.testing.assert_close(pred1, pred2, atol=1e-3, rtol=1e-3)
    # plain Procrustes is not invariant to it
    p1, c1 = _fit(x, y).solve("procrustes")
    p2, c2 = _fit(x @ change, y).solve("procrustes")
    gap = (x @ p1.double() + c1.double()) - ((x @ change) @ p2.double() + c2.double())
    assert float(gap.abs().max()) > 0.1
    with pytest.raises(ValueError, match="target_moment"):
        _fit(x, y, target_moment=False).solve("whitened_procrustes")


def test_reduced_rank_recovers_a_planted_low_rank_map():
    g, x = _data(3)
    planted = torch.randn(D_SRC, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, D_TGT, generator=g, dtype=torch.float64
    )
    y = x @ planted + 0.05 * torch.randn(N, D_TGT, generator=g, dtype=torch.float64)
    fit = _fit(x, y)
    w3, _ = fit.solve("reduced_rank", rank=3, ridge=0.0)
    assert torch.linalg.matrix_rank(w3.double(), rtol=1e-5) == 3
    ridge, _ = fit.solve("ridge", ridge=0.0)
    # the rank constraint removes noise directions: closer to the planted map than ridge
    assert float((w3.double() - planted).norm()) < float((ridge.double() - planted).norm())
    assert float((w3.double() - planted).norm()) < 0.02 * float(planted.norm())
    # at full rank it is the ridge solution
    full, _ = fit.solve("reduced_rank", rank=D_SRC, ridge=0.0)
    torch.testing.assert_close(full, ridge, atol=1e-4, rtol=1e-4)
    for bad in (None, 0, D_SRC + 1):
        with pytest.raises(ValueError, match="rank"):
            fit.solve("reduced_rank", rank=bad)


@pytest.mark.parametrize(
    "method", ["svd", "ridge", "procrustes", "whitened_procrustes", "reduced_rank"]
)
def test_streaming_equals_full_batch_for_every_linear_family(method):
    g, x = _data(4)
    y = x @ torch.randn(D_SRC, D_TGT, generator=g, dtype=torch.float64) + torch.randn(
        N, D_TGT, generator=g, dtype=torch.float64
    )
    rank = 4 if method == "reduced_rank" else None
    w_full, b_full = _fit(x, y).solve(method, rank=rank)
    w_stream, b_stream = _fit(x, y, chunk=37).solve(method, rank=rank)
    torch.testing.assert_close(w_stream, w_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b_stream, b_full, atol=1e-5, rtol=1e-5)
