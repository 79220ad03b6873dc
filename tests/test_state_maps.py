"""Nonlinear map families (issue 17): the MLP beats a linear fit on a planted nonlinear
map, the anchor map ignores a rotation of the source space, and the transplant from
mapped states equals ``v F`` for a linear map."""

import pytest
import torch

from contrans_tl.activations import read_resid_post
from contrans_tl.concepts import mean_difference
from contrans_tl.maps import fit_residual_map
from contrans_tl.state_maps import (
    StateMap,
    fit_anchor_layer,
    fit_mlp_layer,
    fit_state_map,
    r2_score,
    transplant_states,
)

POS = ["I love this sunny day", "What a happy time we had", "Joy fills the room"]
NEG = ["I hate this rainy day", "What a sad time we had", "Grief fills the room"]
TEXTS = [f"{a} and {b} ." for a in POS + NEG for b in POS + NEG] * 2


def _planted_nonlinear(seed: int, n: int):
    """``n`` pairs of one planted map ``y = tanh(2xA) B`` (the map is the same for every
    ``seed``; the seed draws the inputs and the noise)."""
    fixed = torch.Generator().manual_seed(100)
    a = torch.randn(9, 13, generator=fixed) / 3
    b = torch.randn(13, 7, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 9, generator=g)
    return x, torch.tanh(2 * x @ a) @ b + 0.01 * torch.randn(n, 7, generator=g)


def test_mlp_fits_a_planted_nonlinear_map_better_than_the_linear_fit():
    x, y = _planted_nonlinear(0, 3000)
    xh, yh = x[2500:], y[2500:]
    model, info = fit_mlp_layer(x[:2500], y[:2500], xh, yh, hidden=64)
    xt, yt = _planted_nonlinear(1, 500)  # fresh data from the same planted map
    mlp_r2 = r2_score(model(xt), yt)
    linear = model.weight, model.bias  # the ridge map the MLP starts from
    linear_r2 = r2_score(xt @ linear[0] + linear[1], yt)
    assert mlp_r2 > linear_r2 + 0.1, (mlp_r2, linear_r2)
    assert info["held_out_mse"] < info["held_out_mse_ridge"]
    assert info["best_epoch"] >= 0


def test_mlp_on_a_linear_map_stays_as_good_as_ridge():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1200, 9, generator=g)
    y = x @ torch.randn(9, 7, generator=g)
    model, info = fit_mlp_layer(x[:1000], y[:1000], x[1000:], y[1000:], hidden=32, epochs=5)
    assert info["held_out_mse"] <= info["held_out_mse_ridge"]  # epoch -1 is the floor
    assert r2_score(model(x[1000:]), y[1000:]) > 0.999


def test_anchor_map_ignores_a_rotation_of_the_source_space():
    x, y = _planted_nonlinear(3, 800)
    x = x + 0.5
    rotation, _ = torch.linalg.qr(torch.randn(9, 9, generator=torch.Generator().manual_seed(4)))
    plain = fit_anchor_layer(x, y, n_anchors=40, ridge=1e-6, seed=0)
    rotated = fit_anchor_layer(x @ rotation, y, n_anchors=40, ridge=1e-6, seed=0)
    xt, _ = _planted_nonlinear(5, 100)
    torch.testing.assert_close(plain(xt), rotated(xt @ rotation), atol=1e-3, rtol=1e-3)
    # a fit that is not relative would change: ridge on raw coordinates of a scaled space
    assert plain.relative(xt).abs().max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="n_anchors"):
        fit_anchor_layer(x[:5], y[:5], n_anchors=6)


def test_transplant_from_mapped_states_equals_v_times_f_for_a_linear_map(small_llama, wide_llama):
    layers = [0, 2]
    for method in ("svd", "ridge"):  # without and with a bias: the bias cancels
        rmap = fit_residual_map(
            small_llama, wide_llama, TEXTS, layer_pairs=[(0, 1), (2, 3)], method=method
        )
        v = mean_difference(small_llama, POS, NEG, layers=layers, concept="joy")
        pos = read_resid_post(small_llama, POS, layers).states
        neg = read_resid_post(small_llama, NEG, layers).states
        from_states = transplant_states(rmap, pos, neg, concept="joy")
        direct = rmap.transplant(v)
        assert from_states.layers == direct.layers == (1, 3)
        torch.testing.assert_close(from_states.vectors, direct.vectors, atol=1e-4, rtol=1e-4)
        if method == "ridge":
            assert float(rmap.biases[1].abs().max()) > 1e-3  # the bias was there to cancel


@pytest.mark.parametrize("family", ["mlp", "anchor"])
def test_fit_state_map_on_tiny_models_round_trips(small_llama, wide_llama, family, tmp_path):
    smap = fit_state_map(
        small_llama,
        wide_llama,
        TEXTS,
        family=family,
        layer_pairs=[(1, 2)],
        max_pairs=150,
        n_anchors=16,
        hidden=16,
        heldout_fraction=0.25,
    )
    assert smap.info["n_pairs_train"] == 150  # the reservoir cap binds
    assert set(smap.metrics[2]) >= {"r2", "r2_last", "n", "n_last"}
    assert smap.metrics[2]["r2"] > 0.0  # better than predicting the mean
    smap.save(tmp_path / "m")
    back = StateMap.load(tmp_path / "m")
    states = read_resid_post(small_llama, POS, [1]).states[1]
    torch.testing.assert_close(back.map_states(states, 2), smap.map_states(states, 2))
    assert back.map_states(states, 2).shape == (len(POS), wide_llama.cfg.d_model)
    with pytest.raises(TypeError, match="transplant_states"):
        smap.transplant(mean_difference(small_llama, POS, NEG, layers=[1], concept="joy"))
    with pytest.raises(KeyError, match="not mapped"):
        smap.map_states(states, 0)
    v = transplant_states(
        smap, {1: states}, read_resid_post(small_llama, NEG, [1]).states, concept="joy"
    )
    assert v.layers == (2,) and v.d_model == wide_llama.cfg.d_model


def test_state_map_transplant_carries_the_target_norms_for_relative_steering(
    small_llama, wide_llama
):
    smap = fit_state_map(
        small_llama, wide_llama, TEXTS, family="anchor", layer_pairs=[(1, 2)], n_anchors=8
    )
    assert smap.target_resid_norms[2] > 0
    pos = read_resid_post(small_llama, POS, [1]).states
    neg = read_resid_post(small_llama, NEG, [1]).states
    v = transplant_states(smap, pos, neg, concept="joy")
    assert v.metadata["resid_norms"] == {"2": pytest.approx(smap.target_resid_norms[2])}
    from contrans_tl.steering import make_steering

    make_steering(wide_llama, v, 0.5, scale="relative")  # would raise without the norms
