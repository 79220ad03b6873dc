"""Maps that are not one matrix (issue 17), and the transplant defined from mapped states.

Two families beside the linear ones of :mod:`contrans_tl.maps`:

``"mlp"``: ``f(h) = hF + b + τ g((h − μ) / σ)`` with ``F, b`` the centred ridge map,
    ``τ`` the RMS of what ridge leaves, and ``g`` a one-hidden-layer GELU network whose
    output layer starts near zero (``τ`` makes learning rates independent of the states'
    scale), trained on minibatches with MSE and stopped early on held-out pairs. It
    starts as the ridge map and learns only what that leaves; the kept epoch is the one
    with the lowest held-out error, the ridge map itself included.
``"anchor"``: relative coordinates (Moschella et al. 2023): a source state is described by
    its cosines to ``K`` anchor states of the source, ``r(h)_k = cos(h − μ, a_k − μ)``,
    and the target state is predicted from them by ridge, ``f(h) = r(h) W + b``. A
    rotation of the source space (states and anchors together) leaves ``r`` and so the
    map's output unchanged.

Neither has an image of a vector, so a concept vector is transplanted from the states it
was refined from (Eq. 1 after the map):

    ``v̂ = mean_i f(h⁺_i) − mean_j f(h⁻_j)``

For an affine map ``f(h) = hF + b`` this is ``(mean h⁺ − mean h⁻) F = v F``, the paper's
Eq. 2 transplant (:func:`transplant_states` works with a :class:`~contrans_tl.maps.
ResidualMap` too; the tests check the identity).

Example:
    >>> smap = fit_state_map(small, big, texts, family="mlp", layer_pairs=[(20, 12)])
    >>> pos = read_resid_post(small, positives, [20]).states
    >>> neg = read_resid_post(small, negatives, [20]).states
    >>> v_big = transplant_states(smap, pos, neg, concept="happiness")
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from contrans_tl.concepts import ConceptVector
from contrans_tl.io import load_artifact, save_artifact
from contrans_tl.maps import (
    LinearMapFitter,
    Pairing,
    iter_paired_states,
    resolve_pairing,
    split_texts,
)
from contrans_tl.provenance import ModelProvenance, as_provenance, model_provenance
from contrans_tl.sites import check_layers, match_layers_by_depth
from contrans_tl.tokens import check_texts

__all__ = [
    "StateMapLike",
    "MLPLayerMap",
    "AnchorLayerMap",
    "StateMap",
    "FAMILIES",
    "fit_mlp_layer",
    "fit_anchor_layer",
    "fit_state_map",
    "transplant_states",
    "r2_score",
    "mean_cosine",
]

Family = Literal["mlp", "anchor"]
FAMILIES = ("mlp", "anchor")


@runtime_checkable
class StateMapLike(Protocol):
    """What :func:`transplant_states` needs: a :class:`StateMap` or a ResidualMap."""

    layer_pairs: list[tuple[int, int]]
    target: ModelProvenance
    method: str

    def map_states(self, states: Tensor, target_layer: int) -> Tensor: ...


class MLPLayerMap(nn.Module):
    """``f(h) = hF + b + τ g((h − μ)/σ)``: the ridge map plus a small learnt correction."""

    mu: Tensor
    sigma: Tensor
    tau: Tensor

    def __init__(self, d_src: int, d_tgt: int, hidden: int) -> None:
        super().__init__()
        self.d_src, self.d_tgt, self.hidden = d_src, d_tgt, hidden
        self.weight = nn.Parameter(torch.zeros(d_src, d_tgt), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_tgt), requires_grad=False)
        self.register_buffer("mu", torch.zeros(d_src))
        self.register_buffer("sigma", torch.ones(d_src))
        self.register_buffer("tau", torch.ones(()))
        self.inp, self.out = nn.Linear(d_src, hidden), nn.Linear(hidden, d_tgt)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def correction(self, h: Float[Tensor, "n d_src"]) -> Float[Tensor, "n d_tgt"]:
        """``τ g((h − μ)/σ)``: what the network adds to the ridge map."""
        z = nn.functional.gelu(self.inp((h.float() - self.mu) / self.sigma))
        return self.tau * self.out(z)

    def forward(self, h: Float[Tensor, "n d_src"]) -> Float[Tensor, "n d_tgt"]:
        return h.float() @ self.weight + self.bias + self.correction(h)

    def spec(self) -> dict[str, Any]:
        return {"family": "mlp", "d_src": self.d_src, "d_tgt": self.d_tgt, "hidden": self.hidden}


class AnchorLayerMap(nn.Module):
    """``f(h) = r(h) W + b`` with ``r(h)_k = cos(h − μ, a_k − μ)`` for ``K`` anchors."""

    anchors: Tensor
    mu: Tensor
    weight: Tensor
    bias: Tensor

    def __init__(self, d_src: int, d_tgt: int, n_anchors: int) -> None:
        super().__init__()
        self.d_src, self.d_tgt, self.n_anchors = d_src, d_tgt, n_anchors
        self.register_buffer("anchors", torch.zeros(n_anchors, d_src))
        self.register_buffer("mu", torch.zeros(d_src))
        self.register_buffer("weight", torch.zeros(n_anchors, d_tgt))
        self.register_buffer("bias", torch.zeros(d_tgt))

    def relative(self, h: Float[Tensor, "n d_src"]) -> Float[Tensor, "n k"]:
        """The relative coordinates ``r(h)``: cosines to the (centred) anchors."""
        a = nn.functional.normalize(self.anchors - self.mu, dim=-1)
        return nn.functional.normalize(h.float() - self.mu, dim=-1) @ a.T

    def forward(self, h: Float[Tensor, "n d_src"]) -> Float[Tensor, "n d_tgt"]:
        return self.relative(h) @ self.weight + self.bias

    def spec(self) -> dict[str, Any]:
        return {
            "family": "anchor",
            "d_src": self.d_src,
            "d_tgt": self.d_tgt,
            "n_anchors": self.n_anchors,
        }


def mean_cosine(pred: Float[Tensor, "n d"], y: Float[Tensor, "n d"]) -> float:
    """Mean cosine between each prediction and its true state."""
    return float(nn.functional.cosine_similarity(pred.double(), y.double(), dim=-1).mean())


def r2_score(pred: Float[Tensor, "n d"], y: Float[Tensor, "n d"]) -> float:
    """``1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖²`` (as :class:`~contrans_tl.maps.MapScorer` computes it)."""
    y64, p64 = y.double(), pred.double()
    sst = float(((y64 - y64.mean(0)) ** 2).sum())
    return 1.0 - float(((y64 - p64) ** 2).sum()) / sst if sst > 0 else float("nan")


def _ridge_fit(x: Tensor, y: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    fit = LinearMapFitter(x.shape[1], y.shape[1])
    for i in range(0, len(x), 4096):
        fit.update(x[i : i + 4096], y[i : i + 4096])
    return fit.solve("ridge", ridge=ridge)


def _trainable_state(model: MLPLayerMap) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("inp.", "out."))}


def fit_mlp_layer(
    x: Float[Tensor, "n d_src"],
    y: Float[Tensor, "n d_tgt"],
    x_held: Float[Tensor, "m d_src"],
    y_held: Float[Tensor, "m d_tgt"],
    *,
    hidden: int = 256,
    ridge: float = 1e-3,
    epochs: int = 60,
    learning_rate: float = 3e-3,
    batch_size: int = 128,
    patience: int = 10,
    seed: int = 0,
) -> tuple[MLPLayerMap, dict[str, Any]]:
    """Fit one :class:`MLPLayerMap`: the ridge map, then ``g`` by Adam on minibatches of
    the training pairs, keeping the epoch with the lowest held-out MSE (the ridge map
    itself counts as epoch ``-1``: if no epoch beats it, ``g`` stays zero).

    Returns:
        The map (eval mode, no gradients) and ``{"history", "best_epoch",
        "held_out_mse", "held_out_mse_ridge"}``.
    """
    if len(x) == 0 or len(x_held) == 0:
        raise ValueError(f"need training and held-out pairs, got {len(x)} and {len(x_held)}")
    torch.manual_seed(seed)
    model = MLPLayerMap(x.shape[1], y.shape[1], hidden)
    w, b = _ridge_fit(x, y, ridge)
    model.weight.data, model.bias.data = w.contiguous(), b.contiguous()  # as a reload has them
    model.mu.copy_(x.float().mean(0))
    model.sigma.copy_(x.float().std(0).clamp_min(1e-6))
    with torch.no_grad():
        model.tau.copy_(((y.float() - model(x)) ** 2).mean().sqrt().clamp_min(1e-6))

    def held_mse() -> float:
        with torch.no_grad():
            return float(((model(x_held) - y_held.float()) ** 2).mean())

    best, best_epoch, history = held_mse(), -1, []  # g = 0: the ridge map
    ridge_mse = best
    best_state = _trainable_state(model)
    with torch.no_grad():  # a small random output layer: from exactly zero, g learns slowly
        model.out.weight.normal_(0.0, 0.1 / hidden**0.5)
    trainable = [*model.inp.parameters(), *model.out.parameters()]
    opt = torch.optim.Adam(trainable, lr=learning_rate)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = ((model(x[idx]) - y[idx].float()) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        mse = held_mse()
        history.append({"epoch": epoch, "held_out_mse": mse})
        if mse < best:
            best, best_epoch = mse, epoch
            best_state = _trainable_state(model)
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state, strict=False)
    model.eval().requires_grad_(False)
    info = {
        "history": history,
        "best_epoch": best_epoch,
        "held_out_mse": best,
        "held_out_mse_ridge": ridge_mse,
    }
    return model, info


def fit_anchor_layer(
    x: Float[Tensor, "n d_src"],
    y: Float[Tensor, "n d_tgt"],
    *,
    n_anchors: int = 256,
    ridge: float = 1e-3,
    seed: int = 0,
) -> AnchorLayerMap:
    """Fit one :class:`AnchorLayerMap`: ``n_anchors`` training source states drawn at
    random (seeded) as anchors, then ridge from relative coordinates to target states."""
    if not 1 <= n_anchors <= len(x):
        raise ValueError(f"n_anchors must be in 1..{len(x)} (the training pairs), got {n_anchors}")
    g = torch.Generator().manual_seed(seed)
    model = AnchorLayerMap(x.shape[1], y.shape[1], n_anchors)
    model.anchors.copy_(x[torch.randperm(len(x), generator=g)[:n_anchors]].float())
    model.mu.copy_(x.float().mean(0))
    w, b = _ridge_fit(model.relative(x), y.float(), ridge)
    model.weight.copy_(w)
    model.bias.copy_(b)
    return model.eval()


@dataclass
class StateMap:
    """Frozen per-layer maps of one family (``"mlp"`` or ``"anchor"``), in the shape of a
    :class:`~contrans_tl.maps.ResidualMap`: ``layer_pairs``, ``map_states``, provenance,
    held-out ``metrics`` per target layer. No :meth:`transplant` of a vector: use
    :func:`transplant_states`.

    Example:
        >>> smap = fit_state_map(source, target, texts, family="mlp", pairing="word_ends")
        >>> smap.metrics[17]["r2_last"]               # held-out R² at last tokens, target layer 17
        >>> smap.save("maps/smol_gemma_mlp")
        >>> StateMap.load("maps/smol_gemma_mlp").family
        'mlp'
    """

    layer_pairs: list[tuple[int, int]]
    layers: dict[int, nn.Module]
    source: ModelProvenance
    target: ModelProvenance
    method: str
    pairing: str
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    target_resid_norms: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.source = as_provenance(self.source, "StateMap.source")
        self.target = as_provenance(self.target, "StateMap.target")
        if self.method not in FAMILIES:
            raise ValueError(f"method must be one of {FAMILIES}, got {self.method!r}")
        missing = [t for _, t in self.layer_pairs if t not in self.layers]
        if missing:
            raise ValueError(f"no map for target layers {missing}")

    def source_layer(self, target_layer: int) -> int:
        for s, t in self.layer_pairs:
            if t == target_layer:
                return s
        raise KeyError(
            f"target layer {target_layer} is not mapped; mapped: {[t for _, t in self.layer_pairs]}"
        )

    def map_states(
        self, states: Float[Tensor, "... d_src"], target_layer: int
    ) -> Float[Tensor, "... d_tgt"]:
        """Map source states (of the paired source layer) into ``target_layer``'s space."""
        self.source_layer(target_layer)
        flat = states.reshape(-1, states.shape[-1])
        with torch.no_grad():
            out = self.layers[target_layer](flat)
        return out.reshape(*states.shape[:-1], out.shape[-1])

    def transplant(self, vector: ConceptVector, **_: Any) -> ConceptVector:
        raise TypeError(
            f"a {self.method!r} map is not linear, so a vector has no image under it: "
            "transplant the states the vector was refined from with "
            "contrans_tl.state_maps.transplant_states(map, positive_states, negative_states)"
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``path.safetensors`` and ``path.json``."""
        tensors = {
            f"{t}.{k}": v.detach().float().contiguous()
            for _, t in self.layer_pairs
            for k, v in self.layers[t].state_dict().items()
        }
        meta = {
            "kind": "state_map",
            "method": self.method,
            "pairing": self.pairing,
            "layer_pairs": [list(p) for p in self.layer_pairs],
            "specs": {str(t): self.layers[t].spec() for _, t in self.layer_pairs},  # type: ignore[operator]
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "metrics": {str(k): v for k, v in self.metrics.items()},
            "info": self.info,
            "target_resid_norms": {str(k): v for k, v in self.target_resid_norms.items()},
        }
        save_artifact(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "StateMap":
        """Read a map written by :meth:`save` (safetensors + JSON; no pickle)."""
        tensors, meta = load_artifact(path, kind="state_map")
        pairs = [(int(s), int(t)) for s, t in meta["layer_pairs"]]
        layers: dict[int, nn.Module] = {}
        for _, t in pairs:
            spec = meta["specs"][str(t)]
            module: nn.Module
            if spec["family"] == "mlp":
                module = MLPLayerMap(spec["d_src"], spec["d_tgt"], spec["hidden"])
            else:
                module = AnchorLayerMap(spec["d_src"], spec["d_tgt"], spec["n_anchors"])
            prefix = f"{t}."
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
            layers[t] = module.eval().requires_grad_(False)
        return cls(
            layer_pairs=pairs,
            layers=layers,
            source=as_provenance(meta["source"], "the map's source"),
            target=as_provenance(meta["target"], "the map's target"),
            method=meta["method"],
            pairing=meta["pairing"],
            metrics={int(k): v for k, v in meta.get("metrics", {}).items()},
            info=meta.get("info", {}),
            target_resid_norms={
                int(k): float(v) for k, v in meta.get("target_resid_norms", {}).items()
            },
        )


def transplant_states(
    state_map: StateMapLike,
    positive: Mapping[int, Float[Tensor, "n d_src"]],
    negative: Mapping[int, Float[Tensor, "m d_src"]],
    *,
    concept: str,
) -> ConceptVector:
    """``v̂ = mean f(h⁺) − mean f(h⁻)`` per mapped layer, from source states.

    Args:
        state_map: a :class:`StateMap` or a :class:`~contrans_tl.maps.ResidualMap`.
        positive, negative: ``{source_layer: states}`` of the refinement prompts (e.g.
            ``read_resid_post(source, texts, layers).states``).
        concept: the vector's concept name.

    Raises:
        ValueError: no source layer of the map is in both ``positive`` and ``negative``.

    Example:
        >>> layers = sorted({s for s, _ in smap.layer_pairs})
        >>> pos = read_resid_post(source, positive, layers).states    # last-token states
        >>> neg = read_resid_post(source, negative, layers).states
        >>> v_tgt = transplant_states(smap, pos, neg, concept="fear")  # v F if linear
    """
    pairs = [(s, t) for s, t in state_map.layer_pairs if s in positive and s in negative]
    if not pairs:
        raise ValueError(
            f"the states cover source layers {sorted(positive)} / {sorted(negative)}, none "
            f"of the map's ({sorted({s for s, _ in state_map.layer_pairs})})"
        )
    norms = getattr(state_map, "target_resid_norms", {}) or {}
    rows = [
        state_map.map_states(positive[s].float(), t).float().mean(0)
        - state_map.map_states(negative[s].float(), t).float().mean(0)
        for s, t in pairs
    ]
    return ConceptVector(
        vectors=torch.stack(rows),
        layers=tuple(t for _, t in pairs),
        model=state_map.target,
        concept=concept,
        method="transplanted",
        metadata={
            "layer_pairs": [list(p) for p in pairs],
            "map_method": state_map.method,
            "from": "mapped states",
            "n_positive": int(next(iter(positive.values())).shape[0]),
            "n_negative": int(next(iter(negative.values())).shape[0]),
            "resid_norms": {str(t): float(norms[t]) for _, t in pairs if t in norms},
        },
    )


def _collect_pairs(
    source: Any,
    target: Any,
    texts: Sequence[str],
    pairs: list[tuple[int, int]],
    pairing: str,
    *,
    max_pairs: int,
    seed: int,
    batch_size: int,
    max_length: int | None,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Paired states of ``texts``, at most ``max_pairs`` rows kept by reservoir sampling
    (uniform over every pair read, whatever the order the texts are read in)."""
    g = torch.Generator().manual_seed(seed)
    xs: dict[int, Tensor] = {}
    ys: dict[int, Tensor] = {}
    seen = 0
    for x, y in iter_paired_states(
        source,
        target,
        texts,
        pairs,
        pairing,  # type: ignore[arg-type]
        batch_size=batch_size,
        max_length=max_length,
        desc="pairing states",
    ):
        n = next(iter(x.values())).shape[0]
        if not xs:
            xs = {s: torch.empty(0, v.shape[1]) for s, v in x.items()}
            ys = {t: torch.empty(0, v.shape[1]) for t, v in y.items()}
        room = max(0, max_pairs - next(iter(xs.values())).shape[0])
        take = min(room, n)
        for d, new in ((xs, x), (ys, y)):
            for k in d:
                d[k] = torch.cat([d[k], new[k][:take].float()])
        if take < n:  # reservoir: row i (0-based, over all rows) replaces a kept one w.p. M/(i+1)
            idx = torch.arange(seen + take, seen + n)
            slot = (torch.rand(len(idx), generator=g) * (idx + 1)).long()
            keep = slot < max_pairs
            for d, new in ((xs, x), (ys, y)):
                for k in d:
                    d[k][slot[keep]] = new[k][take:][keep].float()
        seen += n
    return xs, ys


def _check_fit_settings(
    texts: Sequence[str], family: str, heldout_fraction: float, max_pairs: int
) -> None:
    """:func:`fit_state_map`'s settings, refused by name before any model runs."""
    check_texts(texts)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if max_pairs < 2:
        raise ValueError(f"max_pairs must be >= 2, got {max_pairs}")


def fit_state_map(
    source: Any,
    target: Any,
    texts: Sequence[str],
    *,
    family: Family = "mlp",
    layer_pairs: Sequence[tuple[int, int]] | None = None,
    pairing: Pairing = "auto",
    heldout_fraction: float = 0.1,
    max_pairs: int = 20000,
    hidden: int = 256,
    n_anchors: int = 256,
    ridge: float = 1e-3,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int | None = 128,
) -> StateMap:
    """Fit a :class:`StateMap` of ``family`` from ``source``'s to ``target``'s states.

    As :func:`~contrans_tl.maps.fit_residual_map`: the same texts through both models,
    states paired by ``pairing``, a held-out share of the texts for the metrics (here
    also for the MLP's early stopping). Paired states are held in memory, at most
    ``max_pairs`` rows per layer (a uniform sample of all the pairs read).

    Returns:
        A :class:`StateMap` with ``metrics[t] = {"r2", "r2_last", "n", "n_last", ...}`` on
        the held-out texts (``r2_last``: at last tokens, where vectors are read).

    Example:
        >>> smap = fit_state_map(source, target, fitting_texts("mixed", 2000), family="anchor")
        >>> v_tgt = transplant_states(smap, pos_states, neg_states, concept="fear")
    """
    _check_fit_settings(texts, family, heldout_fraction, max_pairs)
    kind = resolve_pairing(source, target, pairing)
    if layer_pairs is None:
        layer_pairs = match_layers_by_depth(source.cfg.n_layers, target.cfg.n_layers)
    pairs = [(check_layers(source, [s])[0], check_layers(target, [t])[0]) for s, t in layer_pairs]
    train, held = split_texts(list(texts), heldout_fraction, seed)
    if not train or not held:
        raise ValueError(f"{len(texts)} texts leave no training or no held-out text")

    def collect(texts: list[str], kind: str) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        return _collect_pairs(
            source,
            target,
            texts,
            pairs,
            kind,
            max_pairs=max_pairs,
            seed=seed,
            batch_size=batch_size,
            max_length=max_length,
        )

    (x, y), (xh, yh), (xl, yl) = collect(train, kind), collect(held, kind), collect(held, "last")
    layers: dict[int, nn.Module] = {}
    metrics: dict[int, dict[str, Any]] = {}
    for s, t in pairs:
        module: MLPLayerMap | AnchorLayerMap
        if family == "mlp":
            module, info = fit_mlp_layer(x[s], y[t], xh[s], yh[t], hidden=hidden, ridge=ridge)
            extra = {k: v for k, v in info.items() if k != "history"}
        else:
            module = fit_anchor_layer(x[s], y[t], n_anchors=min(n_anchors, len(x[s])), seed=seed)
            extra = {}
        with torch.no_grad():
            held, last = module(xh[s]), module(xl[s])
            metrics[t] = {
                "r2": r2_score(held, yh[t]),
                "r2_last": r2_score(last, yl[t]),
                "cosine": mean_cosine(held, yh[t]),
                "cosine_last": mean_cosine(last, yl[t]),
                "n": len(xh[s]),
                "n_last": len(xl[s]),
                **extra,
            }
        layers[t] = module
    return StateMap(
        layer_pairs=pairs,
        layers=layers,
        source=model_provenance(source),
        target=model_provenance(target),
        method=family,
        pairing=kind,
        metrics=metrics,
        target_resid_norms={t: float(y[t].norm(dim=-1).mean()) for _, t in pairs},
        info={
            "n_texts_train": len(train),
            "n_texts_heldout": len(held),
            "n_pairs_train": len(next(iter(x.values()))),
            "hidden": hidden if family == "mlp" else None,
            "n_anchors": n_anchors if family == "anchor" else None,
            "ridge": ridge,
            "seed": seed,
        },
    )
