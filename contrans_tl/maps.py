"""Per-layer linear maps from one model's residual stream to another's (paper Eq. 2).

Fitting is split in two, as in concept-erasure's ``LeaceFitter``: a
:class:`LinearMapFitter` accumulates sufficient statistics batch by batch (memory does
not grow with the number of pairs), and :meth:`LinearMapFitter.solve` freezes them into
a weight and bias. :func:`fit_residual_map` runs both models over the same plain text,
pairs their states, fits one map per layer pair and measures each on held-out text.

Methods (``X̃, Ỹ``: the centred states; every method is solved from the streamed
moments, so a fit over batches equals one over all pairs at once):
    ``"svd"``: the paper's solution ``F = V Σ⁻¹ Uᵀ Y`` for ``h_src F ≈ h_tgt``, no bias
        (the minimum-norm least-squares solution, computed from the Gram matrix).
    ``"ridge"``: centred affine least squares with a ridge penalty,
        ``F = (X̃ᵀX̃ + λI)⁻¹ X̃ᵀỸ``, ``b = ȳ - x̄F``, ``λ = ridge · tr(X̃ᵀX̃) / d_src``.
    ``"procrustes"``: scaled orthogonal Procrustes after centring, ``F = s Q`` with
        ``Q = U Vᵀ`` from ``X̃ᵀỸ = U S Vᵀ`` (orthonormal rows or columns, whichever side is
        narrower) and ``s = tr S / tr X̃ᵀX̃``: a rotation and one scale, nothing else.
    ``"whitened_procrustes"``: the same between whitened spaces,
        ``F = s C_x^{-1/2} Q C_y^{1/2}`` with ``Q`` from ``C_x^{-1/2} C_xy C_y^{-1/2}``
        (covariances regularised by ``ridge``); unchanged by an invertible linear
        change of the source coordinates.
    ``"reduced_rank"``: the ridge solution projected onto the ``rank`` leading directions
        of its fitted values, ``F_r = F V_r V_rᵀ`` with ``V_r`` the top eigenvectors of
        ``Fᵀ X̃ᵀX̃ F`` (reduced-rank regression).

A concept vector is a difference of states, so only ``F`` acts on it: ``v̂ = v F``.

Example:
    >>> m = fit_residual_map(small, big, wikisplit_sentences, pairing="word_ends")
    >>> m.metrics[17]["r2_last"]          # held-out R² at last tokens, target layer 17
    >>> v_big = m.transplant(v_small)     # a ConceptVector for `big`
"""

import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.activations import iter_resid_post
from contrans_tl.concepts import ConceptVector
from contrans_tl.io import load_artifact, save_artifact
from contrans_tl.provenance import (
    ModelProvenance,
    as_provenance,
    check_compatible,
    model_provenance,
)
from contrans_tl.sites import check_layers, layer_index, match_layers_by_depth
from contrans_tl.tokens import (
    Encoding,
    check_max_length,
    check_texts,
    encode,
    word_end_positions,
)

__all__ = [
    "Pairing",
    "PAIRINGS",
    "MapMethod",
    "NEEDS_TARGET_MOMENT",
    "LinearMapFitter",
    "MapScorer",
    "ResidualMap",
    "paired_positions",
    "resolve_pairing",
    "split_texts",
    "iter_paired_states",
    "fit_residual_map",
    "evaluate_map",
]

Pairing = Literal["auto", "last", "all", "word_ends"]
MapMethod = Literal["svd", "ridge", "procrustes", "whitened_procrustes", "reduced_rank"]
PAIRINGS = ("auto", "last", "all", "word_ends")
_PAIRINGS = PAIRINGS
_METHODS = ("svd", "ridge", "procrustes", "whitened_procrustes", "reduced_rank")
#: Methods that read the target states' second moment ``YᵀY`` (accumulated only for them).
NEEDS_TARGET_MOMENT = ("whitened_procrustes",)


class LinearMapFitter:
    """Accumulates ``Σx, Σy, XᵀX, XᵀY`` (float64) for one map ``d_src → d_tgt``.

    Example:
        >>> fitter = LinearMapFitter(576, 640)
        >>> for x, y in batches:
        ...     fitter.update(x, y)
        >>> weight, bias = fitter.solve("svd")
    """

    def __init__(self, d_src: int, d_tgt: int, *, target_moment: bool = False) -> None:
        """``target_moment``: also accumulate ``YᵀY`` (``d_tgt²`` floats; only
        ``"whitened_procrustes"`` reads it)."""
        if d_src < 1 or d_tgt < 1:
            raise ValueError(f"widths must be positive, got {d_src} and {d_tgt}")
        self.d_src, self.d_tgt = d_src, d_tgt
        self.n = 0
        self.sum_x = torch.zeros(d_src, dtype=torch.float64)
        self.sum_y = torch.zeros(d_tgt, dtype=torch.float64)
        self.xtx = torch.zeros(d_src, d_src, dtype=torch.float64)
        self.xty = torch.zeros(d_src, d_tgt, dtype=torch.float64)
        self.yty = torch.zeros(d_tgt, d_tgt, dtype=torch.float64) if target_moment else None
        self.sum_y_norm = 0.0

    @classmethod
    def from_moments(
        cls,
        n: int,
        sum_x: Float[Tensor, " d_src"],
        sum_y: Float[Tensor, " d_tgt"],
        xtx: Float[Tensor, "d_src d_src"],
        xty: Float[Tensor, "d_src d_tgt"],
        *,
        sum_y_norm: float = 0.0,
    ) -> "LinearMapFitter":
        """A fitter holding statistics accumulated elsewhere, as :meth:`update` would.

        The tensors are copied (as float64, on the CPU), so the fitter can be updated
        further without changing them. Use it to solve a map from moments streamed by
        other code (e.g. several layer pairs accumulated in one matrix).

        Args:
            n: number of paired rows the statistics cover.
            sum_x: ``Σx`` over those rows, ``[d_src]``.
            sum_y: ``Σy``, ``[d_tgt]``.
            xtx: ``XᵀX``, ``[d_src, d_src]``.
            xty: ``XᵀY``, ``[d_src, d_tgt]``.
            sum_y_norm: ``Σ‖y‖`` (only :attr:`mean_target_norm` reads it; 0 if unknown).

        Returns:
            A :class:`LinearMapFitter` from ``d_src`` to ``d_tgt``.

        Raises:
            ValueError: a negative ``n`` or shapes that do not agree.

        Example:
            >>> fit = LinearMapFitter.from_moments(n, sx, sy, xtx, xty)
            >>> weight, bias = fit.solve("ridge", ridge=1e-3)
        """
        if n < 0:
            raise ValueError(f"n must be >= 0 (rows covered), got {n}")
        if sum_x.ndim != 1 or sum_y.ndim != 1:
            raise ValueError(
                f"sum_x and sum_y must be vectors, got shapes {tuple(sum_x.shape)} and "
                f"{tuple(sum_y.shape)}"
            )
        d_src, d_tgt = int(sum_x.shape[0]), int(sum_y.shape[0])
        if tuple(xtx.shape) != (d_src, d_src) or tuple(xty.shape) != (d_src, d_tgt):
            raise ValueError(
                f"with sum_x [{d_src}] and sum_y [{d_tgt}], xtx must be [{d_src}, {d_src}] and "
                f"xty [{d_src}, {d_tgt}], got {tuple(xtx.shape)} and {tuple(xty.shape)}"
            )
        fit = cls(d_src, d_tgt)
        fit.n = int(n)
        fit.sum_x = sum_x.detach().to("cpu", torch.float64, copy=True)
        fit.sum_y = sum_y.detach().to("cpu", torch.float64, copy=True)
        fit.xtx = xtx.detach().to("cpu", torch.float64, copy=True)
        fit.xty = xty.detach().to("cpu", torch.float64, copy=True)
        fit.sum_y_norm = float(sum_y_norm)
        return fit

    def update(self, x: Float[Tensor, "n d_src"], y: Float[Tensor, "n d_tgt"]) -> None:
        """Add paired rows: ``x[i]`` (source state) goes with ``y[i]`` (target state)."""
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"need x [n, {self.d_src}] and y [n, {self.d_tgt}] with the same n, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.shape[1] != self.d_src or y.shape[1] != self.d_tgt:
            raise ValueError(
                f"this fitter maps {self.d_src} -> {self.d_tgt}, got x width {x.shape[1]} and "
                f"y width {y.shape[1]} (is the source/target order swapped?)"
            )
        x64, y64 = x.double().cpu(), y.double().cpu()
        self.n += x64.shape[0]
        self.sum_x += x64.sum(0)
        self.sum_y += y64.sum(0)
        self.xtx += x64.T @ x64
        self.xty += x64.T @ y64
        if self.yty is not None:
            self.yty += y64.T @ y64
        self.sum_y_norm += float(y64.norm(dim=-1).sum())

    @property
    def mean_target_norm(self) -> float:
        """Mean L2 norm of the target rows seen so far."""
        return self.sum_y_norm / max(self.n, 1)

    def solve(
        self,
        method: MapMethod = "svd",
        *,
        ridge: float = 1e-3,
        rcond: float = 1e-12,
        rank: int | None = None,
    ) -> tuple[Float[Tensor, "d_src d_tgt"], Float[Tensor, " d_tgt"]]:
        """Freeze the statistics into ``(weight, bias)`` with ``y ≈ x @ weight + bias``.

        Args:
            method: one of the module's methods (``"svd"``: the paper, no bias; the others
                are centred, with a bias).
            ridge: penalty for ``"ridge"`` and ``"reduced_rank"`` (relative to the mean
                eigenvalue of X̃ᵀX̃), and the regulariser of the covariances that
                ``"whitened_procrustes"`` inverts.
            rcond: for ``"svd"``, eigenvalues of XᵀX below ``rcond · max`` are dropped
                (singular values below ``sqrt(rcond) · max``), as a pseudo-inverse does.
            rank: for ``"reduced_rank"``, the rank of the map (1 .. min(d_src, d_tgt)).

        Returns:
            float32 ``weight [d_src, d_tgt]`` and ``bias [d_tgt]`` (zero for ``"svd"``).

        Raises:
            ValueError: no pairs yet, an unknown method, a bad ``ridge`` or ``rank``, or
                ``"whitened_procrustes"`` on a fitter made without ``target_moment``.
        """
        if self.n == 0:
            raise ValueError("no pairs were added; call update() before solve()")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if method == "svd":
            evals, evecs = torch.linalg.eigh(self.xtx)
            keep = evals > rcond * evals.max().clamp_min(1e-300)
            v = evecs[:, keep]
            weight = v @ ((v.T @ self.xty) / evals[keep, None])
            return weight.float(), torch.zeros(self.d_tgt)
        _check_ridge(ridge)
        mx, my = self.sum_x / self.n, self.sum_y / self.n
        cxx = self.xtx - self.n * torch.outer(mx, mx)
        cxy = self.xty - self.n * torch.outer(mx, my)
        if method == "ridge":
            weight = _ridge_solution(cxx, cxy, ridge)
        elif method == "reduced_rank":
            weight = _reduced_rank(cxx, cxy, ridge, _check_rank(rank, self.d_src, self.d_tgt))
        elif method == "procrustes":
            u, sv, vh = torch.linalg.svd(cxy, full_matrices=False)
            weight = (sv.sum() / torch.trace(cxx).clamp_min(1e-300)) * (u @ vh)
        else:
            if self.yty is None:
                raise ValueError(
                    "whitened_procrustes needs the target moment YᵀY: make the fitter with "
                    "LinearMapFitter(d_src, d_tgt, target_moment=True)"
                )
            cyy = self.yty - self.n * torch.outer(my, my)
            weight = _whitened_procrustes(cxx, cxy, cyy, ridge)
        return weight.float(), (my - mx @ weight).float()


def _ridge_solution(cxx: Tensor, cxy: Tensor, ridge: float) -> Tensor:
    """``(C_xx + λI)⁻¹ C_xy`` with ``λ = ridge · tr C_xx / d_src``."""
    lam = ridge * float(torch.trace(cxx)) / cxx.shape[0]
    eye = torch.eye(cxx.shape[0], dtype=cxx.dtype)
    return torch.linalg.lstsq(cxx + lam * eye, cxy).solution


def _reduced_rank(cxx: Tensor, cxy: Tensor, ridge: float, rank: int) -> Tensor:
    """The ridge solution restricted to the top-``rank`` directions of its fitted values."""
    full = _ridge_solution(cxx, cxy, ridge)
    _, evecs = torch.linalg.eigh(full.T @ cxx @ full)  # ascending eigenvalues
    top = evecs[:, -rank:]
    return full @ top @ top.T


def _inverse_sqrt_and_sqrt(c: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """``(C + λI)^{-1/2}`` and ``(C + λI)^{1/2}``, ``λ = ridge · tr C / d`` (at least a
    tiny floor, so that a rank-deficient covariance stays invertible)."""
    lam = max(ridge * float(torch.trace(c)) / c.shape[0], 1e-12 * float(torch.trace(c)) + 1e-300)
    evals, evecs = torch.linalg.eigh(c)
    evals = evals.clamp_min(0) + lam
    return (evecs / evals.sqrt()) @ evecs.T, (evecs * evals.sqrt()) @ evecs.T


def _whitened_procrustes(cxx: Tensor, cxy: Tensor, cyy: Tensor, ridge: float) -> Tensor:
    """``s C_x^{-1/2} Q C_y^{1/2}``: Procrustes between the whitened spaces."""
    wx, _ = _inverse_sqrt_and_sqrt(cxx, ridge)
    wy, sy = _inverse_sqrt_and_sqrt(cyy, ridge)
    u, sv, vh = torch.linalg.svd(wx @ cxy @ wy, full_matrices=False)
    # the scale is Σσ over the whitened source's total variance (≈ d_src: its Gram ≈ I)
    spread = float(torch.trace(wx @ cxx @ wx))
    return (sv.sum() / max(spread, 1e-300)) * (wx @ (u @ vh) @ sy)


def _check_rank(rank: object, d_src: int, d_tgt: int) -> int:
    limit = min(d_src, d_tgt)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"reduced_rank needs rank, an int in 1..{limit} (min of the widths "
            f"{d_src} and {d_tgt}), e.g. rank=32; got {rank!r}"
        )
    return rank


def _check_ridge(ridge: object) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"ridge must be a real number >= 0, got {type(ridge).__name__} {ridge!r}")
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(
            f"ridge must be a finite number >= 0 (a penalty relative to the mean eigenvalue, "
            f"e.g. 1e-3), got {ridge}"
        )


class MapScorer:
    """Streams held-out ``R²`` and mean cosine of a map's predictions.

    ``R² = 1 - Σ‖y - ŷ‖² / Σ‖y - ȳ‖²`` (ȳ: mean of the held-out targets), and the mean
    cosine between each prediction ``ŷ`` and its true target ``y``.
    """

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        self.weight, self.bias = weight.double(), bias.double()
        self.n = 0
        self.sse = 0.0
        self.sum_y = torch.zeros(weight.shape[1], dtype=torch.float64)
        self.sum_y2 = 0.0
        self.sum_cos = 0.0

    def update(self, x: Tensor, y: Tensor) -> None:
        x64, y64 = x.double(), y.double()
        pred = x64 @ self.weight + self.bias
        self.n += x64.shape[0]
        self.sse += float(((y64 - pred) ** 2).sum())
        self.sum_y += y64.sum(0)
        self.sum_y2 += float((y64**2).sum())
        self.sum_cos += float(torch.nn.functional.cosine_similarity(pred, y64, dim=-1).sum())

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {"r2": float("nan"), "cosine": float("nan"), "n": 0}
        sst = self.sum_y2 - float(self.sum_y @ self.sum_y) / self.n
        # one held-out target (or all identical) has no variance: R² is undefined there
        r2 = 1.0 - self.sse / sst if sst > 1e-12 * max(self.sum_y2, 1.0) else float("nan")
        return {"r2": r2, "cosine": self.sum_cos / self.n, "n": self.n}


def paired_positions(
    src: Encoding, tgt: Encoding, pairing: Literal["last", "all", "word_ends"]
) -> tuple[list[int], list[int]]:
    """Token positions of the same text in two tokenizations that carry the same meaning.

    ``"last"``: the last token of each. ``"all"``: every text token, which needs the two
    tokenizations to agree token for token. ``"word_ends"``: the last token of every
    word that has a clean end in both (see :func:`contrans_tl.tokens.word_end_positions`).

    Raises:
        ValueError: ``"all"`` on two tokenizations that differ.
    """
    if pairing == "last":
        return [src.last_text_position], [tgt.last_text_position]
    if pairing == "all":
        ps, pt = src.text_positions(), tgt.text_positions()
        if [src.ids[i] for i in ps] != [tgt.ids[i] for i in pt]:
            raise ValueError(
                "pairing='all' needs both models to tokenize the text identically; they "
                f"differ on {src.text[:60]!r}. Use pairing='word_ends' across tokenizers."
            )
        return ps, pt
    if pairing == "word_ends":
        ws, wt = word_end_positions(src), word_end_positions(tgt)
        common = sorted(set(ws) & set(wt))
        return [ws[w] for w in common], [wt[w] for w in common]
    raise ValueError(f"pairing must be one of {_PAIRINGS}, got {pairing!r}")


def resolve_pairing(source: Any, target: Any, pairing: Pairing) -> str:
    """The pairing :func:`fit_residual_map` uses for ``pairing`` on these two models.

    ``"auto"`` becomes ``"all"`` when the two tokenizers have the same vocabulary (so
    every token can be paired) and ``"word_ends"`` otherwise; any other valid pairing is
    returned as it is.

    Args:
        source: the source model (with a ``tokenizer``).
        target: the target model (with a ``tokenizer``).
        pairing: ``"auto"``, ``"last"``, ``"all"`` or ``"word_ends"``.

    Returns:
        ``"last"``, ``"all"`` or ``"word_ends"``.

    Raises:
        ValueError: an unknown pairing.

    Example:
        >>> resolve_pairing(smollm2, gemma, "auto")
        'word_ends'
    """
    if pairing not in _PAIRINGS:
        raise ValueError(f"pairing must be one of {_PAIRINGS}, got {pairing!r}")
    if pairing != "auto":
        return pairing
    same = source.tokenizer.get_vocab() == target.tokenizer.get_vocab()
    return "all" if same else "word_ends"


def split_texts(
    texts: Sequence[str], heldout_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """The seeded split of texts into training and held-out texts that maps are fitted on.

    ``round(len(texts) · heldout_fraction)`` texts are held out, chosen by a
    ``random.Random(seed)`` shuffle; both parts keep the texts' order. This is the split
    :func:`fit_residual_map` makes (and
    :func:`contrans_tl.analysis.layer_similarity` with ``metric="r2"``), so the held-out
    numbers of the two can be compared.

    Args:
        texts: the texts.
        heldout_fraction: share held out, in ``[0, 1]``.
        seed: seeds the shuffle.

    Returns:
        ``(train_texts, heldout_texts)``; either may be empty.

    Raises:
        ValueError: ``heldout_fraction`` outside ``[0, 1]``.

    Example:
        >>> train, held = split_texts(wikisplit_sentences(2000), 0.1, seed=0)
        >>> len(train), len(held)
        (1800, 200)
    """
    if not 0 <= heldout_fraction <= 1:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    n_held = int(round(len(texts) * heldout_fraction))
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held = [texts[i] for i in sorted(order[:n_held])]
    train = [texts[i] for i in sorted(order[n_held:])]
    return train, held


def iter_paired_states(
    source: Any,
    target: Any,
    texts: Sequence[str],
    layer_pairs: Sequence[tuple[int, int]],
    pairing: Literal["last", "all", "word_ends"],
    *,
    batch_size: int = 16,
    chunk_texts: int = 128,
    max_length: int | None = 128,
    progress: bool | None = None,
    desc: str = "pairing states",
) -> Iterator[tuple[dict[int, Tensor], dict[int, Tensor]]]:
    """Yield ``({src_layer: [n, d_src]}, {tgt_layer: [n, d_tgt]})`` for chunks of texts.

    Rows of the two dicts are paired: row ``i`` of every source layer and row ``i`` of
    every target layer come from the same text position. Texts are sorted by length and
    read ``chunk_texts`` at a time, so memory stays bounded.
    """
    src_layers = sorted({s for s, _ in layer_pairs})
    tgt_layers = sorted({t for _, t in layer_pairs})
    enc_s = encode(source.tokenizer, texts, max_length=max_length)
    enc_t = encode(target.tokenizer, texts, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: -len(enc_s[i]))
    from tqdm.auto import tqdm

    show = len(texts) > 256 if progress is None else progress
    bar = tqdm(total=len(texts), desc=desc, disable=not show, leave=False)
    try:
        for start in range(0, len(order), chunk_texts):
            idx = order[start : start + chunk_texts]
            pos = [paired_positions(enc_s[i], enc_t[i], pairing) for i in idx]
            xs = _read_chunk(
                source, [enc_s[i] for i in idx], [p[0] for p in pos], src_layers, batch_size
            )
            ys = _read_chunk(
                target, [enc_t[i] for i in idx], [p[1] for p in pos], tgt_layers, batch_size
            )
            bar.update(len(idx))
            if next(iter(xs.values())).shape[0]:
                yield xs, ys
    finally:
        bar.close()


def _read_chunk(
    model: Any,
    encs: list[Encoding],
    positions: list[list[int]],
    layers: list[int],
    batch_size: int,
) -> dict[int, Tensor]:
    per_text: list[dict[int, Tensor]] = [{} for _ in encs]
    for idx, states in iter_resid_post(
        model, encs, positions, layers, batch_size=batch_size, progress=False
    ):
        for j, i in enumerate(idx):
            per_text[i] = {k: states[k][j] for k in layers}
    d = model.cfg.d_model
    return {k: torch.cat([p[k].reshape(-1, d) for p in per_text]) for k in layers}


@dataclass
class ResidualMap:
    """Frozen per-layer maps from a source model's residual stream to a target's.

    Attributes:
        layer_pairs: ``[(source_layer, target_layer), ...]``, one per target layer mapped.
        weights: ``{target_layer: [d_src, d_tgt]}``.
        biases: ``{target_layer: [d_tgt]}`` (zero for the paper's ``"svd"`` method).
        source, target: the :class:`~contrans_tl.provenance.ModelProvenance` of the two
            models (given as provenances or their ``to_dict()``).
        method, pairing: how it was fitted.
        metrics: ``{target_layer: {...}}``: held-out ``r2``/``cosine`` on the fitted
            pairing, ``r2_last``/``cosine_last`` at last tokens, counts.
        target_resid_norms: ``{target_layer: mean ‖h_tgt‖}`` over the training pairs.
        info: texts used, ridge, anything else recorded at fit time.

    Example:
        >>> rmap = fit_residual_map(source, target, wikisplit_sentences(500), pairing="word_ends")
        >>> rmap.layer_pairs[:3]           # smollm2 (30 blocks) -> gemma-3 (18): by depth
        [(1, 0), (2, 1), (4, 2)]
        >>> v_tgt = rmap.transplant(v)                # Eq. 3: v F, a ConceptVector of the target
        >>> rmap.save("maps/smol_gemma")              # and ResidualMap.load("maps/smol_gemma")
    """

    layer_pairs: list[tuple[int, int]]
    weights: dict[int, Tensor]
    biases: dict[int, Tensor]
    source: ModelProvenance
    target: ModelProvenance
    method: str
    pairing: str
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    target_resid_norms: dict[int, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.source = as_provenance(self.source, "ResidualMap.source")
        self.target = as_provenance(self.target, "ResidualMap.target")
        self.layer_pairs = [(layer_index(s), layer_index(t)) for s, t in self.layer_pairs]
        targets = [t for _, t in self.layer_pairs]
        if len(set(targets)) != len(targets):
            raise ValueError(f"each target layer may be mapped once, got {self.layer_pairs}")
        for _, t in self.layer_pairs:
            w = self.weights.get(t)
            if w is None:
                raise ValueError(f"no weight for target layer {t}")
            shape = (self.source.d_model, self.target.d_model)
            if tuple(w.shape) != shape:
                raise ValueError(
                    f"weight of target layer {t} has shape {tuple(w.shape)}, "
                    f"expected {shape} (d_src, d_tgt)"
                )

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
        """Map source states (of the paired source layer) into ``target_layer``'s space.

        Raises:
            KeyError: ``target_layer`` is not mapped (the message lists those that are).
        """
        self.source_layer(target_layer)  # raises, naming the mapped layers
        w, b = self.weights[target_layer], self.biases[target_layer]
        return states.to(w.dtype) @ w + b

    def transplant(self, vector: ConceptVector, *, strict: bool = True) -> ConceptVector:
        """Carry a source-model concept vector into the target model (``v̂ = v F``).

        Every target layer whose source layer has a vector gets one.

        Raises:
            ValueError: the vector belongs to another model than the map's source, or
                none of its layers is a source layer of this map.
        """
        if vector.d_model != self.source.d_model:
            raise ValueError(
                f"the vector has width {vector.d_model} but this map's source "
                f"{self.source.model_id!r} has d_model {self.source.d_model}; is it "
                "a vector of the target model, or of another model?"
            )
        check_compatible(
            vector.model,
            self.source,
            what="the concept vector (for this map's source)",
            strict=strict,
        )
        pairs = [(s, t) for s, t in self.layer_pairs if s in vector.layers]
        if not pairs:
            raise ValueError(
                f"the vector has layers {vector.layers}, none of which is a source layer of "
                f"this map ({sorted({s for s, _ in self.layer_pairs})})"
            )
        rows = torch.stack([vector[s].float() @ self.weights[t] for s, t in pairs])
        meta = {
            "source_concept": vector.concept,
            "source_model": vector.model.model_id,
            "source_method": vector.method,
            "layer_pairs": [list(p) for p in pairs],
            "map_method": self.method,
            "map_pairing": self.pairing,
            "resid_norms": {
                str(t): self.target_resid_norms[t] for _, t in pairs if t in self.target_resid_norms
            },
            "source_metadata": {k: v for k, v in vector.metadata.items() if k != "resid_norms"},
        }
        return ConceptVector(
            vectors=rows,
            layers=tuple(t for _, t in pairs),
            model=self.target,
            concept=vector.concept,
            method="transplanted",
            metadata=meta,
        )

    def check_models(self, source: Any, target: Any, *, strict: bool = True) -> None:
        """Raise if ``source``/``target`` are not the models this map was fitted on."""
        check_compatible(self.source, source, what="this map's source side", strict=strict)
        check_compatible(self.target, target, what="this map's target side", strict=strict)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``path.safetensors`` and ``path.json``."""
        tensors = {}
        for _, t in self.layer_pairs:
            tensors[f"weight.{t}"] = self.weights[t].float()
            tensors[f"bias.{t}"] = self.biases[t].float()
        meta = {
            "kind": "residual_map",
            "layer_pairs": [list(p) for p in self.layer_pairs],
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "method": self.method,
            "pairing": self.pairing,
            "metrics": {str(k): v for k, v in self.metrics.items()},
            "target_resid_norms": {str(k): v for k, v in self.target_resid_norms.items()},
            "info": self.info,
        }
        save_artifact(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ResidualMap":
        """Read a map written by :meth:`save`."""
        tensors, meta = load_artifact(path, kind="residual_map")
        pairs = [(int(s), int(t)) for s, t in meta["layer_pairs"]]
        return cls(
            layer_pairs=pairs,
            weights={t: tensors[f"weight.{t}"] for _, t in pairs},
            biases={t: tensors[f"bias.{t}"] for _, t in pairs},
            source=as_provenance(meta["source"], "the map's source"),
            target=as_provenance(meta["target"], "the map's target"),
            method=meta["method"],
            pairing=meta["pairing"],
            metrics={int(k): v for k, v in meta.get("metrics", {}).items()},
            target_resid_norms={int(k): v for k, v in meta.get("target_resid_norms", {}).items()},
            info=meta.get("info", {}),
        )


def fit_residual_map(
    source: Any,
    target: Any,
    texts: Sequence[str],
    *,
    layer_pairs: Sequence[tuple[int, int]] | None = None,
    pairing: Pairing = "auto",
    method: MapMethod = "svd",
    ridge: float = 1e-3,
    rank: int | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int | None = 128,
    progress: bool | None = None,
) -> ResidualMap:
    """Fit one linear map per layer pair from ``source``'s to ``target``'s residual stream.

    Both models read the same texts; their states are paired (see ``pairing``) and the
    maps are fitted on all but a held-out fraction of the texts, which then measures each
    map twice: on pairs of the fitted kind, and at last tokens (where concept vectors are
    read, so ``r2_last`` is the number that predicts whether a transplant can work).

    Args:
        source: the model the concept vectors come from.
        target: the model they go to.
        texts: plain text (the paper: 2,000 WikiSplit sentences).
        layer_pairs: ``[(source_layer, target_layer)]``; ``None`` pairs every target
            layer with the source layer of the same relative depth.
        pairing: ``"last"`` (one pair per text, the paper's choice), ``"all"`` (every token;
            same tokenizer only), ``"word_ends"`` (every word's last token), or ``"auto"``
            (``"all"`` if the vocabularies match, else ``"word_ends"``).
        method: ``"svd"`` (paper), ``"ridge"``, ``"procrustes"``,
            ``"whitened_procrustes"`` or ``"reduced_rank"`` (see the module docstring).
        ridge: ridge strength (relative to the mean eigenvalue) for the centred methods.
        rank: the map's rank, for ``"reduced_rank"`` only.
        heldout_fraction: share of texts kept out of the fit for the metrics (0 skips them).
        seed: seeds the held-out split.
        batch_size: texts per forward pass.
        max_length: truncate texts to this many tokens.
        progress: progress bars (``None``: automatic).

    Returns:
        A :class:`ResidualMap` with held-out metrics per target layer.

    Example:
        >>> rmap = fit_residual_map(source, target, wikisplit_sentences(500), method="ridge")
        >>> rmap.metrics[17]["r2"], rmap.metrics[17]["r2_last"]  # held out: own pairs, last tokens
    """
    check_texts(texts)
    _check_fit_settings(heldout_fraction, method, ridge, batch_size, max_length)
    if method == "reduced_rank":
        _check_rank(rank, source.cfg.d_model, target.cfg.d_model)
    kind = resolve_pairing(source, target, pairing)
    if layer_pairs is None:
        layer_pairs = match_layers_by_depth(source.cfg.n_layers, target.cfg.n_layers)
    pairs = [(check_layers(source, [s])[0], check_layers(target, [t])[0]) for s, t in layer_pairs]
    train, held = split_texts(list(texts), heldout_fraction, seed)
    if not train:
        raise ValueError(f"{len(texts)} texts leave none to fit on")
    fitters = _accumulate_fitters(
        source,
        target,
        train,
        pairs,
        kind,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
        target_moment=method in NEEDS_TARGET_MOMENT,
    )
    weights, biases = {}, {}
    for _, t in pairs:
        weights[t], biases[t] = fitters[t].solve(method, ridge=ridge, rank=rank)
    result = ResidualMap(
        layer_pairs=pairs,
        weights=weights,
        biases=biases,
        source=model_provenance(source),
        target=model_provenance(target),
        method=method,
        pairing=kind,
        target_resid_norms={t: fitters[t].mean_target_norm for _, t in pairs},
        info={
            "n_texts_train": len(train),
            "n_texts_heldout": len(held),
            "n_pairs_train": fitters[pairs[0][1]].n,
            "ridge": None if method in ("svd", "procrustes") else ridge,
            "rank": rank if method == "reduced_rank" else None,
            "max_length": max_length,
            "seed": seed,
        },
    )
    if held:
        result.metrics = evaluate_map(
            result, source, target, held, batch_size=batch_size, max_length=max_length
        )
    return result


def _check_fit_settings(
    heldout_fraction: float,
    method: str,
    ridge: float,
    batch_size: int,
    max_length: int | None,
) -> None:
    """Refuse, by name, settings of :func:`fit_residual_map` it cannot use."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method != "svd":
        _check_ridge(ridge)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_max_length(max_length)


def _accumulate_fitters(
    source: Any,
    target: Any,
    texts: list[str],
    pairs: list[tuple[int, int]],
    pairing: str,
    *,
    batch_size: int,
    max_length: int | None,
    progress: bool | None,
    target_moment: bool = False,
) -> dict[int, LinearMapFitter]:
    """One :class:`LinearMapFitter` per target layer, fed the paired states of ``texts``."""
    d_s, d_t = source.cfg.d_model, target.cfg.d_model
    fitters = {t: LinearMapFitter(d_s, d_t, target_moment=target_moment) for _, t in pairs}
    for xs, ys in iter_paired_states(
        source,
        target,
        texts,
        pairs,
        pairing,  # type: ignore[arg-type]
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
        desc="fitting maps",
    ):
        for s, t in pairs:
            fitters[t].update(xs[s], ys[t])
    return fitters


def evaluate_map(
    rmap: ResidualMap,
    source: Any,
    target: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int | None = 128,
) -> dict[int, dict[str, float]]:
    """Held-out ``R²`` and cosine per target layer, on the map's pairing and at last tokens.

    Returns:
        ``{target_layer: {"r2", "cosine", "n", "r2_last", "cosine_last", "n_last"}}``.
    """
    check_texts(texts)
    kinds = [rmap.pairing] if rmap.pairing == "last" else [rmap.pairing, "last"]
    out: dict[int, dict[str, float]] = {t: {} for _, t in rmap.layer_pairs}
    for kind in kinds:
        scorers = {t: MapScorer(rmap.weights[t], rmap.biases[t]) for _, t in rmap.layer_pairs}
        for xs, ys in iter_paired_states(
            source,
            target,
            texts,
            rmap.layer_pairs,
            kind,  # type: ignore[arg-type]
            batch_size=batch_size,
            max_length=max_length,
            desc="scoring maps",
        ):
            for s, t in rmap.layer_pairs:
                scorers[t].update(xs[s], ys[t])
        suffix = "" if kind == rmap.pairing else "_last"
        for t, sc in scorers.items():
            for k, v in sc.result().items():
                out[t][k + suffix] = v
    if rmap.pairing == "last":
        for t in out:
            out[t].update({k + "_last": v for k, v in list(out[t].items())})
    return out
