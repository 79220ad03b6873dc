"""Diagnostics for choosing layers and strengths: how alike two residual streams are.

* :func:`linear_cka`: linear centred kernel alignment of two activation matrices whose
  rows are the same inputs (Kornblith et al. 2019), in float64.
* :func:`layer_similarity`: a source-layer x target-layer matrix of linear CKA or of the
  held-out R² of a least-squares map, read from paired states of two models (each model
  reads each text once, whatever the number of layer pairs); :func:`similarity_from_states`
  computes the same matrix from states already in memory. Both return a
  :class:`LayerSimilarity`, whose :meth:`LayerSimilarity.best_pairs` suggests a layer
  matching, and :func:`layer_pairs_from_similarity` turns it into the ``layer_pairs`` of
  :func:`contrans_tl.maps.fit_residual_map` (whose default, matching by relative depth,
  is unchanged).
* :func:`cosine_per_layer`: cosine between two concept vectors of one model, layer by
  layer (e.g. a transplanted vector against the target's own Self vector).
* :func:`residual_norm_profile`: mean residual-stream norm per layer, the yardstick for
  a strength ``α`` stated relative to the stream.

The matrix is built from streamed float64 moments, never from all states at once: for
CKA, ``Σx, Σy, XᵀX, YᵀY`` per layer and ``XᵀY`` for every layer pair; for R², the
statistics of :class:`contrans_tl.maps.LinearMapFitter` on the training texts and the
same moments on the held-out texts, from which the held-out error of each map follows
in closed form. Memory is ``8 · (S·d_src) · (T·d_tgt)`` bytes for ``S`` source and ``T``
target layers (30 x 18 layers of widths 576 and 640: 1.6 GB), twice that for R² (training
and held-out moments); pass ``source_layers`` and ``target_layers`` to look at fewer.

Example:
    >>> sim = layer_similarity(small, big, wikisplit_sentences(500), metric="cka")
    >>> sim.scores.shape                      # [n_source_layers, n_target_layers]
    >>> pairs = layer_pairs_from_similarity(sim, monotone=True)
    >>> rmap = fit_residual_map(small, big, texts, layer_pairs=pairs)
    >>> cosine_per_layer(rmap.transplant(v_small), v_self_big)
    {0: 0.12, 1: 0.31, ...}
"""

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.activations import Positions, read_resid_post
from contrans_tl.concepts import ConceptVector
from contrans_tl.io import load_artifact, save_artifact
from contrans_tl.maps import (
    LinearMapFitter,
    MapMethod,
    Pairing,
    iter_paired_states,
    resolve_pairing,
    split_texts,
)
from contrans_tl.provenance import (
    ModelProvenance,
    as_provenance,
    check_compatible,
    model_provenance,
)
from contrans_tl.sites import check_layers

__all__ = [
    "Metric",
    "METRICS",
    "LayerSimilarity",
    "linear_cka",
    "layer_similarity",
    "similarity_from_states",
    "layer_pairs_from_similarity",
    "cosine_per_layer",
    "residual_norm_profile",
]

Metric = Literal["cka", "r2"]
METRICS = ("cka", "r2")
_METHODS = ("svd", "ridge")
_ROW_BLOCK = 1024  # rows per moment update: bounds the float64 copies of a chunk


def linear_cka(X: Float[Tensor, "n d_x"], Y: Float[Tensor, "n d_y"]) -> float:
    """Linear CKA of two activation matrices whose row ``i`` is the same input.

    ``CKA = ‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F · ‖ỸᵀỸ‖_F)`` with ``X̃, Ỹ`` the column-centred
    matrices; this equals the HSIC form ``tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))``
    with ``K = XXᵀ``, ``L = YYᵀ`` and ``H`` the centring matrix. The value lies in
    ``[0, 1]``, is 1 for ``X`` against itself, and does not change when either matrix is
    rotated (orthogonal transform), scaled by a number, or translated. Computed in
    float64, through whichever of the two forms is cheaper for the shapes.

    Args:
        X: ``[n, d_x]`` states of one model (or layer).
        Y: ``[n, d_y]`` states of another, same rows.

    Returns:
        The CKA as a Python float.

    Raises:
        ValueError: the row counts differ, fewer than 2 rows, values are not finite, or
            one matrix has no variance (all rows equal), where CKA is undefined.

    Example:
        >>> reads = read_resid_post(model, texts, layers=[3, 7])
        >>> linear_cka(reads.states[3], reads.states[7])
        0.83
    """
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"need X [n, d_x] and Y [n, d_y] with the same rows, got {tuple(X.shape)} and "
            f"{tuple(Y.shape)}"
        )
    if X.shape[0] < 2:
        raise ValueError(f"CKA needs at least 2 rows, got {X.shape[0]}")
    x = X.detach().double().cpu()
    y = Y.detach().double().cpu()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("X or Y contains NaN or inf")
    x = x - x.mean(0)
    y = y - y.mean(0)
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    if n < max(dx, dy):  # Gram form: n x n matrices
        k, ell = x @ x.T, y @ y.T
        hsic, norm_x, norm_y = (k * ell).sum(), k.norm(), ell.norm()
    else:  # feature form: d x d matrices
        hsic = ((x.T @ y) ** 2).sum()
        norm_x, norm_y = (x.T @ x).norm(), (y.T @ y).norm()
    for name, norm in (("X", norm_x), ("Y", norm_y)):
        if float(norm) == 0.0:
            raise ValueError(f"{name} has no variance (all rows are equal); CKA is undefined")
    return float(hsic / (norm_x * norm_y))


@dataclass
class LayerSimilarity:
    """How alike each source layer is to each target layer, as a matrix.

    Attributes:
        scores: ``[n_source_layers, n_target_layers]`` float64; ``scores[i, j]`` compares
            ``source_layers[i]`` with ``target_layers[j]``. NaN where undefined (a layer
            without variance).
        source_layers: source block indices, ascending, one per row.
        target_layers: target block indices, ascending, one per column.
        metric: ``"cka"`` (linear CKA) or ``"r2"`` (held-out R² of a least-squares map
            from the source layer to the target layer; may be negative).
        source, target: the two models' :class:`~contrans_tl.provenance.ModelProvenance`
            (``None`` when computed from states alone).
        pairing: how states were paired (``"last"``, ``"all"``, ``"word_ends"``), if known.
        info: counts and settings (texts, pairs, map method, split, seed).

    Example:
        >>> sim.best_pairs(monotone=True)[:3]   # (source_layer, target_layer)
        [(0, 0), (2, 1), (3, 2)]
        >>> sim.save("results/similarity_cka")  # .safetensors + .json
    """

    scores: Float[Tensor, "n_src n_tgt"]
    source_layers: tuple[int, ...]
    target_layers: tuple[int, ...]
    metric: str
    source: ModelProvenance | None = None
    target: ModelProvenance | None = None
    pairing: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.source_layers = tuple(int(k) for k in self.source_layers)
        self.target_layers = tuple(int(k) for k in self.target_layers)
        self.source = _saved_provenance(self.source, "LayerSimilarity.source")
        self.target = _saved_provenance(self.target, "LayerSimilarity.target")
        for name, layers in (("source", self.source_layers), ("target", self.target_layers)):
            if not layers or list(layers) != sorted(set(layers)):
                raise ValueError(
                    f"{name}_layers must be non-empty, ascending and distinct, got {layers}"
                )
        shape = (len(self.source_layers), len(self.target_layers))
        if self.scores.ndim != 2 or tuple(self.scores.shape) != shape:
            raise ValueError(
                f"scores must be [n_source_layers, n_target_layers] = {list(shape)}, got "
                f"{list(self.scores.shape)}"
            )
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        self.scores = self.scores.detach().double().cpu()

    def score(self, source_layer: int, target_layer: int) -> float:
        """The score of one layer pair.

        Raises:
            KeyError: a layer that is not in the matrix.
        """
        if source_layer not in self.source_layers:
            raise KeyError(f"source layer {source_layer} not in {list(self.source_layers)}")
        if target_layer not in self.target_layers:
            raise KeyError(f"target layer {target_layer} not in {list(self.target_layers)}")
        i = self.source_layers.index(source_layer)
        j = self.target_layers.index(target_layer)
        return float(self.scores[i, j])

    def best_pairs(self, monotone: bool = True) -> list[tuple[int, int]]:
        """Suggest a source layer for every target layer.

        Without ``monotone``, each target layer gets its highest-scoring source layer.
        With it, the source layers must not decrease as the target layers deepen, and
        the matching with the largest total score is chosen (dynamic programming over
        the matrix, ``O(n_source · n_target)``). Ties go to the shallower source layer.
        NaN scores are never chosen.

        Args:
            monotone: require source depth to be non-decreasing in target depth.

        Returns:
            ``[(source_layer, target_layer), ...]`` for every target layer, ascending:
            the ``layer_pairs`` format of :func:`contrans_tl.maps.fit_residual_map`.

        Raises:
            ValueError: a target layer has no finite score, or (monotone) no
                non-decreasing matching avoids NaN scores.

        Example:
            >>> sim.best_pairs(monotone=False)
            [(0, 0), (2, 1), (1, 2)]
        """
        m = torch.nan_to_num(self.scores, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        n_s, n_t = m.shape
        for j in range(n_t):
            if not bool(torch.isfinite(m[:, j]).any()):
                raise ValueError(
                    f"target layer {self.target_layers[j]} has no finite score against any "
                    f"source layer {list(self.source_layers)}"
                )
        rows: list[int] | None
        if not monotone:
            rows = [int(i) for i in m.argmax(0)]  # first maximum: shallower on ties
        else:
            rows = _monotone_argmax([[float(m[i, j]) for j in range(n_t)] for i in range(n_s)])
            if rows is None:
                raise ValueError(
                    "no non-decreasing matching avoids undefined (NaN) scores; use "
                    "monotone=False or drop the layers without variance"
                )
        return [(self.source_layers[i], t) for i, t in zip(rows, self.target_layers)]

    def check_models(self, source: Any, target: Any, *, strict: bool = True) -> None:
        """Raise if ``source``/``target`` are not the models the matrix was computed on.

        Skipped for a side without provenance (a matrix computed from states alone).

        Raises:
            ValueError: width, layer count or (``strict``) model id / weight processing
                differ.
        """
        if self.source is not None:
            check_compatible(self.source, source, what="this similarity's source", strict=strict)
        if self.target is not None:
            check_compatible(self.target, target, what="this similarity's target", strict=strict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: layers, metric, scores as nested lists (NaN as ``None``)."""
        return {
            "metric": self.metric,
            "source_layers": list(self.source_layers),
            "target_layers": list(self.target_layers),
            "scores": [[None if math.isnan(v) else v for v in row] for row in self.scores.tolist()],
            "pairing": self.pairing,
            "source_model": None if self.source is None else self.source.model_id,
            "target_model": None if self.target is None else self.target.model_id,
            "info": self.info,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``path.safetensors`` (the float64 scores) and ``path.json``."""
        meta = {
            "kind": "layer_similarity",
            "metric": self.metric,
            "source_layers": list(self.source_layers),
            "target_layers": list(self.target_layers),
            "source": None if self.source is None else self.source.to_dict(),
            "target": None if self.target is None else self.target.to_dict(),
            "pairing": self.pairing,
            "info": self.info,
        }
        save_artifact(path, {"scores": self.scores.double()}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LayerSimilarity":
        """Read a matrix written by :meth:`save`."""
        tensors, meta = load_artifact(path, kind="layer_similarity")
        return cls(
            scores=tensors["scores"],
            source_layers=tuple(meta["source_layers"]),
            target_layers=tuple(meta["target_layers"]),
            metric=meta["metric"],
            source=_saved_provenance(meta.get("source"), "the similarity's source"),
            target=_saved_provenance(meta.get("target"), "the similarity's target"),
            pairing=meta.get("pairing"),
            info=meta.get("info", {}),
        )


def _monotone_argmax(m: list[list[float]]) -> list[int] | None:
    """Rows ``r_0 <= r_1 <= ...`` (one per column) maximising ``Σ_j m[r_j][j]``.

    ``best[i]`` after column ``j`` is the best total of a path ending in row ``i``;
    ``back[j][i]`` is the row of column ``j - 1`` it came from (the first best row
    ``<= i``, so ties go shallow). ``None`` when every path meets ``-inf``.
    """
    n_s, n_t = len(m), len(m[0])
    best = [m[i][0] for i in range(n_s)]
    back: list[list[int]] = [[0] * n_s]
    for j in range(1, n_t):
        prev_arg, prev_val = 0, best[0]
        new, ptr = [], []
        for i in range(n_s):
            if best[i] > prev_val:
                prev_arg, prev_val = i, best[i]
            new.append(prev_val + m[i][j])
            ptr.append(prev_arg)
        best, back = new, [*back, ptr]
    end = max(range(n_s), key=lambda i: (best[i], -i))
    if best[end] == -math.inf:
        return None
    rows = [end]
    for j in range(n_t - 1, 0, -1):
        rows.append(back[j][rows[-1]])
    return rows[::-1]


class _Moments:
    """Streamed float64 moments of paired states of several source and target layers.

    With ``shift``, every state is first moved by its layer's mean over the first
    update (centred statistics do not change, and they lose fewer digits when the
    residual stream has a large mean). Without it, the moments are exactly those a
    :class:`LinearMapFitter` accumulates (the paper's map has no bias, so it is not
    shift-invariant).
    """

    def __init__(
        self,
        src_layers: Sequence[int],
        tgt_layers: Sequence[int],
        d_src: int,
        d_tgt: int,
        *,
        shift: bool,
        target_gram: bool,
    ) -> None:
        self.src_layers, self.tgt_layers = list(src_layers), list(tgt_layers)
        self.d_src, self.d_tgt = d_src, d_tgt
        n_s, n_t = len(self.src_layers), len(self.tgt_layers)
        f64 = torch.float64
        self.shift = shift
        self.shift_x = torch.zeros(n_s, d_src, dtype=f64)
        self.shift_y = torch.zeros(n_t, d_tgt, dtype=f64)
        self.n = 0
        self.sum_x = torch.zeros(n_s, d_src, dtype=f64)
        self.sum_y = torch.zeros(n_t, d_tgt, dtype=f64)
        self.sum_y2 = torch.zeros(n_t, dtype=f64)
        self.xtx = torch.zeros(n_s, d_src, d_src, dtype=f64)
        self.yty = torch.zeros(n_t, d_tgt, d_tgt, dtype=f64) if target_gram else None
        self.cross = torch.zeros(n_s * d_src, n_t * d_tgt, dtype=f64)

    def update(self, xs: Mapping[int, Tensor], ys: Mapping[int, Tensor]) -> None:
        counts = {int(v.shape[0]) for v in [*xs.values(), *ys.values()]}
        if len(counts) != 1:
            raise ValueError(f"paired states must all have the same rows, got counts {counts}")
        n = counts.pop()
        for start in range(0, n, _ROW_BLOCK):
            rows = slice(start, start + _ROW_BLOCK)
            x = torch.stack([xs[k][rows].double().cpu() for k in self.src_layers])
            y = torch.stack([ys[k][rows].double().cpu() for k in self.tgt_layers])
            self._update(x, y)

    def _update(self, x: Tensor, y: Tensor) -> None:
        n = x.shape[1]
        if n == 0:
            return
        if self.shift and self.n == 0:
            self.shift_x, self.shift_y = x.mean(1), y.mean(1)
        if self.shift:
            x = x - self.shift_x[:, None]
            y = y - self.shift_y[:, None]
        self.n += n
        self.sum_x += x.sum(1)
        self.sum_y += y.sum(1)
        self.sum_y2 += (y**2).sum((1, 2))
        self.xtx += x.mT @ x
        if self.yty is not None:
            self.yty += y.mT @ y
        flat_x = x.transpose(0, 1).reshape(n, -1)  # [n, S·d_src], layer-major columns
        flat_y = y.transpose(0, 1).reshape(n, -1)
        self.cross += flat_x.T @ flat_y

    def cross_block(self, i: int, j: int) -> Tensor:
        ds, dt = self.d_src, self.d_tgt
        return self.cross[i * ds : (i + 1) * ds, j * dt : (j + 1) * dt]

    def cka(self) -> Tensor:
        """``[S, T]`` linear CKA from the centred moments (NaN for a layer without variance)."""
        assert self.yty is not None
        n = self.n
        cxx = [
            (self.xtx[i] - torch.outer(self.sum_x[i], self.sum_x[i]) / n).norm()
            for i in range(len(self.src_layers))
        ]
        cyy = [
            (self.yty[j] - torch.outer(self.sum_y[j], self.sum_y[j]) / n).norm()
            for j in range(len(self.tgt_layers))
        ]
        out = torch.full((len(cxx), len(cyy)), math.nan, dtype=torch.float64)
        for i, j in itertools.product(range(len(cxx)), range(len(cyy))):
            if float(cxx[i]) > 0 and float(cyy[j]) > 0:
                cxy = self.cross_block(i, j) - torch.outer(self.sum_x[i], self.sum_y[j]) / n
                out[i, j] = (cxy**2).sum() / (cxx[i] * cyy[j])
        return out

    def fitter(self, i: int) -> LinearMapFitter:
        """A :class:`LinearMapFitter` from source layer ``i`` to all target layers at once.

        Its columns are the target layers side by side; both of its solutions act column
        by column, so each target's block is the map that a fitter of that pair alone
        would give.
        """
        if self.shift:
            raise RuntimeError("fitters need unshifted moments")
        return LinearMapFitter.from_moments(
            self.n,
            self.sum_x[i],
            self.sum_y.reshape(-1),
            self.xtx[i],
            self.cross[i * self.d_src : (i + 1) * self.d_src],
        )

    def r2(self, i: int, j: int, weight: Tensor, bias: Tensor) -> float:
        """Held-out R² of ``y ≈ x W + b`` (source layer ``i`` to target layer ``j``).

        ``SSE = Σ‖y' - x'W - b'‖²`` in the shifted coordinates, with
        ``b' = b + c_x W - c_y``, expanded into the accumulated moments.
        """
        n = self.n
        w, b = weight.double(), bias.double()
        b_shift = b + self.shift_x[i] @ w - self.shift_y[j]
        sum_x, sum_y, sum_y2 = self.sum_x[i], self.sum_y[j], float(self.sum_y2[j])
        sse = (
            sum_y2
            - 2 * float((w * self.cross_block(i, j)).sum())
            - 2 * float(b_shift @ sum_y)
            + float((w * (self.xtx[i] @ w)).sum())
            + 2 * float((sum_x @ w) @ b_shift)
            + n * float(b_shift @ b_shift)
        )
        sst = sum_y2 - float(sum_y @ sum_y) / n
        return 1.0 - sse / sst if sst > 0 else math.nan


def _r2_matrix(
    train: _Moments, held: _Moments, method: MapMethod, ridge: float
) -> Float[Tensor, "n_src n_tgt"]:
    n_t, d_t = len(train.tgt_layers), train.d_tgt
    out = torch.full((len(train.src_layers), n_t), math.nan, dtype=torch.float64)
    for i in range(len(train.src_layers)):
        weight, bias = train.fitter(i).solve(method, ridge=ridge)  # float32, as fitted maps
        for j in range(n_t):
            cols = slice(j * d_t, (j + 1) * d_t)
            out[i, j] = held.r2(i, j, weight[:, cols], bias[cols])
    return out


def _check_metric(metric: str, method: str, ridge: float, heldout_fraction: float) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "r2":
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if not 0 < heldout_fraction < 1:
            raise ValueError(
                f"metric='r2' needs a held-out share in (0, 1), got heldout_fraction="
                f"{heldout_fraction}"
            )


def _widths(states: Mapping[int, Tensor], name: str) -> tuple[list[int], int, int]:
    """Sorted layers, row count and width of a ``{layer: [n, d]}`` dict (all checked)."""
    if not states:
        raise ValueError(f"{name} is empty; give {{layer: [n, d] states}}")
    layers = sorted(int(k) for k in states)
    shapes = {k: tuple(states[k].shape) for k in layers}
    if any(len(s) != 2 for s in shapes.values()) or len({s for s in shapes.values()}) != 1:
        raise ValueError(f"{name} must hold [n, d] states of one shape per layer, got {shapes}")
    n, d = shapes[layers[0]]
    return layers, n, d


def similarity_from_states(
    source_states: Mapping[int, Tensor],
    target_states: Mapping[int, Tensor],
    *,
    metric: Metric = "cka",
    method: MapMethod = "svd",
    ridge: float = 1e-3,
    heldout_fraction: float = 0.1,
    seed: int = 0,
) -> LayerSimilarity:
    """The layer-similarity matrix of states already paired and in memory.

    Row ``r`` of every source layer and row ``r`` of every target layer must come from
    the same input (as :func:`contrans_tl.maps.iter_paired_states` yields them).

    Args:
        source_states: ``{source_layer: [n, d_src]}`` (floating tensors).
        target_states: ``{target_layer: [n, d_tgt]}``, the same ``n``.
        metric: ``"cka"`` (all rows) or ``"r2"`` (a least-squares map per pair, fitted on
            the rows outside a seeded held-out share and scored on that share).
        method: map for ``"r2"``: ``"svd"`` (paper, no bias) or ``"ridge"`` (centred).
        ridge: ridge strength for ``"ridge"`` (relative to the mean eigenvalue).
        heldout_fraction: share of rows held out for ``"r2"``.
        seed: seeds the held-out split of rows.

    Returns:
        A :class:`LayerSimilarity` without model provenance.

    Raises:
        ValueError: empty dicts, states that are not ``[n, d]`` of one shape per model,
            different row counts, an unknown metric or method, or a held-out share
            that leaves fewer than 2 rows on either side.

    Example:
        >>> for xs, ys in iter_paired_states(src, tgt, texts, pairs, "all"):
        ...     sim = similarity_from_states(xs, ys, metric="cka")
    """
    _check_metric(metric, method, ridge, heldout_fraction)
    src_layers, n, d_src = _widths(source_states, "source_states")
    tgt_layers, n_t, d_tgt = _widths(target_states, "target_states")
    if n != n_t:
        raise ValueError(
            f"source states have {n} rows but target states {n_t}; row i of both must be "
            "the same input"
        )
    if metric == "cka":
        if n < 2:
            raise ValueError(f"CKA needs at least 2 rows, got {n}")
        mom = _Moments(src_layers, tgt_layers, d_src, d_tgt, shift=True, target_gram=True)
        mom.update(source_states, target_states)
        scores = mom.cka()
        info: dict[str, Any] = {"n_pairs": n}
    else:
        held_idx, train_idx = _heldout_rows(n, heldout_fraction, seed)
        train = _Moments(src_layers, tgt_layers, d_src, d_tgt, shift=False, target_gram=False)
        held = _Moments(src_layers, tgt_layers, d_src, d_tgt, shift=True, target_gram=False)
        train.update(
            {k: v[train_idx] for k, v in source_states.items()},
            {k: v[train_idx] for k, v in target_states.items()},
        )
        held.update(
            {k: v[held_idx] for k, v in source_states.items()},
            {k: v[held_idx] for k, v in target_states.items()},
        )
        scores = _r2_matrix(train, held, method, ridge)
        info = {
            "n_pairs_train": train.n,
            "n_pairs_heldout": held.n,
            **_r2_settings(method, ridge, heldout_fraction, seed),
        }
    return LayerSimilarity(
        scores=scores,
        source_layers=tuple(src_layers),
        target_layers=tuple(tgt_layers),
        metric=metric,
        info=info,
    )


def _heldout_rows(n: int, heldout_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded ``(held_out, training)`` row indices, each ascending.

    Raises:
        ValueError: the share leaves fewer than 2 held-out or no training rows.
    """
    n_held = int(round(n * heldout_fraction))
    if n_held < 2 or n - n_held < 1:
        raise ValueError(
            f"{n} rows with heldout_fraction={heldout_fraction} leave {n_held} held-out "
            f"and {n - n_held} training rows; need at least 2 and 1"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_held].sort().values, perm[n_held:].sort().values


def _r2_settings(method: str, ridge: float, heldout_fraction: float, seed: int) -> dict[str, Any]:
    """The settings an ``"r2"`` matrix records in its ``info``."""
    return {
        "method": method,
        "ridge": ridge if method == "ridge" else None,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
    }


def _saved_provenance(value: Any, what: str) -> ModelProvenance | None:
    """A provenance as stored, or ``None`` for a side not known (``{}`` in older files)."""
    return as_provenance(value, what) if value else None


def layer_similarity(
    source: Any,
    target: Any,
    texts: Sequence[str],
    *,
    pairing: Pairing = "auto",
    metric: Metric = "cka",
    source_layers: Sequence[int] | None = None,
    target_layers: Sequence[int] | None = None,
    method: MapMethod = "svd",
    ridge: float = 1e-3,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 16,
    chunk_texts: int = 128,
    max_length: int | None = 128,
    progress: bool | None = None,
) -> LayerSimilarity:
    """Compare every source layer with every target layer on the same plain text.

    Both models read the texts once (every requested layer is captured in the same
    forward pass); states are paired as in :func:`contrans_tl.maps.fit_residual_map`
    and streamed into float64 moments, from which the whole matrix follows.

    With ``metric="r2"``, the texts are split exactly as ``fit_residual_map`` splits
    them (same ``seed`` and ``heldout_fraction``): each pair's map is fitted on the
    training texts with :class:`contrans_tl.maps.LinearMapFitter` and scored on the
    held-out texts, so entry ``(s, t)`` is the held-out ``r2`` that
    ``fit_residual_map(..., layer_pairs=[(s, t)])`` would report.

    Args:
        source: the model concept vectors come from.
        target: the model they go to.
        texts: plain text (e.g. WikiSplit sentences).
        pairing: ``"last"``, ``"all"`` (same tokenizer), ``"word_ends"``, or ``"auto"``
            (``"all"`` if the vocabularies match, else ``"word_ends"``).
        metric: ``"cka"`` (linear CKA, on all texts) or ``"r2"`` (held-out R² of a
            least-squares map source → target).
        source_layers: source blocks to compare; ``None``: all.
        target_layers: target blocks to compare; ``None``: all.
        method: map for ``"r2"``: ``"svd"`` (paper) or ``"ridge"`` (centred; steadier
            when there are fewer pairs than ``d_src``).
        ridge: ridge strength for ``"ridge"``.
        heldout_fraction: share of texts held out for ``"r2"``.
        seed: seeds the held-out split.
        batch_size: texts per forward pass.
        chunk_texts: texts per chunk of paired states held at once.
        max_length: truncate texts to this many tokens.
        progress: progress bars (``None``: automatic).

    Returns:
        A :class:`LayerSimilarity` with both models' provenance.

    Raises:
        TypeError: ``texts`` is a single string.
        ValueError: no texts, a layer out of range, an unknown pairing, metric or method,
            a held-out share that leaves no texts on one side, or too few paired states.

    Example:
        >>> sim = layer_similarity(small, big, texts, metric="r2", method="ridge")
        >>> sim.best_pairs(monotone=True)
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts given")
    _check_metric(metric, method, ridge, heldout_fraction)
    kind = resolve_pairing(source, target, pairing)
    src, tgt = _layers_or_all(source, source_layers), _layers_or_all(target, target_layers)
    reader = _PairedReader(
        source, target, src, tgt, kind, batch_size, chunk_texts, max_length, progress
    )
    info: dict[str, Any] = {"n_texts": len(texts), "max_length": max_length}
    if metric == "cka":
        scores, more = _cka_of_texts(reader, texts)
    else:
        scores, more = _r2_of_texts(reader, texts, method, ridge, heldout_fraction, seed)
    info.update(more)
    return LayerSimilarity(
        scores=scores,
        source_layers=tuple(src),
        target_layers=tuple(tgt),
        metric=metric,
        source=model_provenance(source),
        target=model_provenance(target),
        pairing=kind,
        info=info,
    )


def _layers_or_all(model: Any, layers: Sequence[int] | None) -> list[int]:
    """``layers`` checked against ``model`` and sorted; ``None``: all of its layers."""
    return check_layers(model, range(model.cfg.n_layers) if layers is None else layers)


@dataclass(frozen=True)
class _PairedReader:
    """Streams the paired states of two models' layers into :class:`_Moments`.

    Every layer of both lists is captured in one read per model (the pairs read are
    each source layer with the first target layer, and the first source layer with each
    target layer).
    """

    source: Any
    target: Any
    src_layers: list[int]
    tgt_layers: list[int]
    pairing: str
    batch_size: int
    chunk_texts: int
    max_length: int | None
    progress: bool | None

    def moments(self, *, shift: bool, target_gram: bool) -> _Moments:
        """Empty moments of this reader's layers and widths."""
        return _Moments(
            self.src_layers,
            self.tgt_layers,
            int(self.source.cfg.d_model),
            int(self.target.cfg.d_model),
            shift=shift,
            target_gram=target_gram,
        )

    def stream(self, texts: list[str], moments: _Moments, desc: str) -> None:
        """Read ``texts`` with both models and add their paired states to ``moments``."""
        src, tgt = self.src_layers, self.tgt_layers
        read_pairs = [(s, tgt[0]) for s in src] + [(src[0], t) for t in tgt]
        for xs, ys in iter_paired_states(
            self.source,
            self.target,
            texts,
            read_pairs,
            self.pairing,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            chunk_texts=self.chunk_texts,
            max_length=self.max_length,
            progress=self.progress,
            desc=desc,
        ):
            moments.update(xs, ys)


def _cka_of_texts(reader: _PairedReader, texts: list[str]) -> tuple[Tensor, dict[str, Any]]:
    """The CKA matrix of all ``texts`` and the count it records."""
    mom = reader.moments(shift=True, target_gram=True)
    reader.stream(texts, mom, "layer similarity")
    if mom.n < 2:
        raise ValueError(f"the texts gave {mom.n} paired states; CKA needs at least 2")
    return mom.cka(), {"n_pairs": mom.n}


def _r2_of_texts(
    reader: _PairedReader,
    texts: list[str],
    method: MapMethod,
    ridge: float,
    heldout_fraction: float,
    seed: int,
) -> tuple[Tensor, dict[str, Any]]:
    """The held-out R² matrix, split as :func:`contrans_tl.maps.fit_residual_map` splits.

    Returns:
        The scores and what they record: text and pair counts on each side, settings.

    Raises:
        ValueError: the split leaves no texts on one side, or too few paired states.
    """
    train_texts, held_texts = split_texts(texts, heldout_fraction, seed)
    if not held_texts or not train_texts:
        raise ValueError(
            f"{len(texts)} texts with heldout_fraction={heldout_fraction} leave "
            f"{len(held_texts)} held-out and {len(train_texts)} training texts; need >= 1 each"
        )
    train = reader.moments(shift=False, target_gram=False)
    held = reader.moments(shift=True, target_gram=False)
    reader.stream(train_texts, train, "layer similarity (fit)")
    reader.stream(held_texts, held, "layer similarity (held out)")
    if train.n < 1 or held.n < 2:
        raise ValueError(
            f"the texts gave {train.n} training and {held.n} held-out paired states; "
            "need at least 1 and 2 (use more texts or another pairing)"
        )
    info = {
        "n_texts_train": len(train_texts),
        "n_texts_heldout": len(held_texts),
        "n_pairs_train": train.n,
        "n_pairs_heldout": held.n,
        **_r2_settings(method, ridge, heldout_fraction, seed),
    }
    return _r2_matrix(train, held, method, ridge), info


def layer_pairs_from_similarity(
    sim: LayerSimilarity,
    monotone: bool = True,
    *,
    source: Any = None,
    target: Any = None,
    strict: bool = True,
) -> list[tuple[int, int]]:
    """Layer pairs for :func:`contrans_tl.maps.fit_residual_map` chosen by similarity.

    ``fit_residual_map`` matches layers by relative depth unless given ``layer_pairs``;
    this gives it the matching :meth:`LayerSimilarity.best_pairs` suggests instead.

    Args:
        sim: a similarity matrix of the two models.
        monotone: keep source depth non-decreasing in target depth.
        source, target: the models the map will be fitted on; when given, the matrix
            must have been computed on them (see :meth:`LayerSimilarity.check_models`).
        strict: also compare model ids and weight processing.

    Returns:
        ``[(source_layer, target_layer), ...]``, one per target layer of ``sim``.

    Raises:
        ValueError: the models do not fit the matrix, or no matching exists
            (see :meth:`LayerSimilarity.best_pairs`).

    Example:
        >>> sim = layer_similarity(small, big, texts, metric="cka")
        >>> pairs = layer_pairs_from_similarity(sim, source=small, target=big)
        >>> rmap = fit_residual_map(small, big, texts, layer_pairs=pairs)
    """
    if (source is None) != (target is None):
        raise ValueError("give both source and target to check them, or neither")
    if source is not None:
        sim.check_models(source, target, strict=strict)
    return sim.best_pairs(monotone=monotone)


def cosine_per_layer(
    a: ConceptVector, b: ConceptVector, *, strict: bool = True
) -> dict[int, float]:
    """Cosine between two concept vectors of the same model, for each layer both have.

    Typical use: a vector transplanted into the target against the target's own
    ("Self") vector refined from the same prompts.

    Args:
        a: one concept vector.
        b: another, of the same model.
        strict: also require the same model id and weight processing (not only the
            same width and layer count).

    Returns:
        ``{layer: cosine}`` for the layers present in both, ascending; NaN for a layer
        where either vector is zero.

    Raises:
        ValueError: the vectors differ in width or layer count, (``strict``) in model
            id or weight processing, or share no layer.

    Example:
        >>> cosine_per_layer(rmap.transplant(v_small), v_self)
        {0: 0.05, 1: 0.22, 2: 0.41}
    """
    try:
        check_compatible(a.model, b.model, what=f"vector {a.concept!r}", strict=strict)
    except ValueError as e:
        raise ValueError(
            f"{e} (vector {b.concept!r} lives in {b.model.model_id!r}; cosines need two "
            "vectors of one model: transplant one first)"
        ) from None
    common = sorted(set(a.layers) & set(b.layers))
    if not common:
        raise ValueError(
            f"the vectors share no layer: {a.concept!r} has {list(a.layers)}, "
            f"{b.concept!r} has {list(b.layers)}"
        )
    out = {}
    for k in common:
        u, v = a[k].double(), b[k].double()
        denom = float(u.norm() * v.norm())
        out[k] = float(u @ v) / denom if denom > 0 else math.nan
    return out


def residual_norm_profile(
    model: Any,
    texts: Sequence[str],
    layers: Sequence[int] | None = None,
    *,
    positions: Positions = "last",
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool | None = None,
) -> dict[int, float]:
    """Mean L2 norm of ``resid_post`` per layer: the scale a strength ``α`` acts against.

    With ``positions="last"`` (the default) this is the norm at the token where concept
    vectors are read, the same number :func:`contrans_tl.concepts.mean_difference`
    stores in ``metadata["resid_norms"]`` (over its prompts). Adding ``α · v`` at layer
    ``k`` is a nudge of ``α‖v‖ / profile[k]`` of the stream.

    Args:
        model: a TransformerLens model with a tokenizer.
        texts: the texts to average over.
        layers: blocks to measure; ``None``: all.
        positions: ``"last"``, ``"all"`` or ``"word_ends"`` (see
            :func:`contrans_tl.activations.read_resid_post`).
        batch_size: texts per forward pass.
        max_length: truncate texts to this many tokens.
        progress: progress bar (``None``: automatic).

    Returns:
        ``{layer: mean norm}``, ascending layers.

    Raises:
        TypeError: ``texts`` is a single string.
        ValueError: no texts, or a layer out of range.

    Example:
        >>> norms = residual_norm_profile(model, texts)
        >>> v.replace(metadata={**v.metadata, "resid_norms": {str(k): x for k, x in norms.items()}})
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if len(texts) == 0:
        raise ValueError("no texts given")
    reads = read_resid_post(
        model,
        list(texts),
        layers,
        positions=positions,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    if len(reads) == 0:
        raise ValueError(f"the texts have no positions of kind {positions!r}")
    return {k: float(reads.states[k].double().norm(dim=-1).mean()) for k in reads.layers}
