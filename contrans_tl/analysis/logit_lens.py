"""Unembedding analysis: which tokens a concept vector makes more and less likely (Table 8).

The logit lens reads a residual-stream state through the model's own final norm and
unembedding, ``softmax(transform(ln_final(h) @ W_U + b_U))``, as if the model stopped
there. On a :class:`~transformer_lens.model_bridge.TransformerBridge` the final norm is
``model.ln_final`` (wrapping e.g. ``model.norm``), the unembedding ``model.unembed``
(``W_U``, ``b_U``; wrapping ``lm_head``), and ``transform`` is the architecture adapter's
``apply_output_logits_transform`` (Gemma-style soft-capping, Cohere's logit scale; the
identity elsewhere). :func:`logit_lens` goes through TransformerLens' own
``logit_readout``, which applies all three, so at the last block it reproduces the
model's output exactly.

:func:`token_shifts` compares the lens before and after adding ``α · v`` and lists, per
text, the tokens whose probability rose and fell most; :func:`aggregate_shifts` counts
in how many texts each token is among those (the paper's Table 8).

Example:
    >>> shifts = token_shifts(model, negative_scenarios, v_fear, alpha=4.0, layers=[12])
    >>> shifts[12][0].increased[:3]        # first text: three biggest gains
    >>> up, down = aggregate_shifts(shifts[12])
    >>> up[:5]                             # [(" afraid", 41), (" fear", 38), ...]
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jaxtyping import Float
from torch import Tensor
from transformer_lens.tools.analysis import logit_readout

from contrans_tl.activations import read_resid_post
from contrans_tl.concepts import ConceptVector
from contrans_tl.sites import check_layers
from contrans_tl.steering import Scale, make_steering

__all__ = [
    "LensReturn",
    "ShiftMode",
    "TokenShift",
    "TextShifts",
    "logit_lens",
    "token_shifts",
    "aggregate_shifts",
]

LensReturn = Literal["probs", "log_probs", "logits"]
_LENS_RETURNS = ("probs", "log_probs", "logits")
ShiftMode = Literal["direct", "steered"]
_MODES = ("direct", "steered")


def logit_lens(
    model: Any,
    resid: Float[Tensor, "... d_model"],
    *,
    return_type: LensReturn = "probs",
    chunk_size: int = 64,
) -> Float[Tensor, "... d_vocab"]:
    """Read residual-stream states through the model's final norm and unembedding.

    Computes ``softmax(transform(ln_final(resid) @ W_U + b_U))`` over the vocabulary,
    with the final norm's statistics recomputed for every state (so any state, steered
    or not, from any layer, is read the way the model reads its last block). At the last
    block's ``hook_resid_post`` this is the model's own next-token distribution.

    Args:
        model: a TransformerLens ``TransformerBridge`` in eval mode.
        resid: states of the model's residual stream, any leading dims; they are moved
            to the unembedding's device and dtype.
        return_type: ``"probs"`` (softmax), ``"log_probs"`` (log-softmax) or
            ``"logits"`` (before the softmax, after any soft-capping).
        chunk_size: rows unembedded per matrix product (bounds memory to
            ``chunk_size × d_vocab``).

    Returns:
        ``[..., d_vocab]`` float32 (``"logits"``: the unembedding's dtype), on the
        unembedding's device.

    Raises:
        ValueError: ``resid`` does not end in the model's ``d_model``, is empty, or
            ``return_type`` is unknown; TransformerLens refuses models whose output is
            not ``unembed(ln_final(last resid_post))``.

    Example:
        >>> reads = read_resid_post(model, ["The capital of France is"], layers=[5])
        >>> probs = logit_lens(model, reads.states[5])      # [1, d_vocab]
        >>> model.tokenizer.decode(probs[0].argmax())
    """
    if return_type not in _LENS_RETURNS:
        raise ValueError(f"return_type must be one of {_LENS_RETURNS}, got {return_type!r}")
    d_model = int(model.cfg.d_model)
    if resid.ndim == 0 or resid.shape[-1] != d_model:
        raise ValueError(
            f"resid must end in the model's d_model={d_model}, got shape {tuple(resid.shape)}"
        )
    if resid.numel() == 0:
        raise ValueError(f"resid has no states to read (shape {tuple(resid.shape)})")
    return logit_readout(model, resid, return_type=return_type, chunk_size=chunk_size).values


@dataclass(frozen=True)
class TokenShift:
    """One token's change under the logit lens.

    Attributes:
        token_id: vocabulary id.
        token: ``tokenizer.decode([token_id])``.
        delta: ``after - before``.
        before: the token's value before the addition (probability, or log-probability
            when ``measure="log_probs"``).
        after: the value after the addition.
    """

    token_id: int
    token: str
    delta: float
    before: float
    after: float


@dataclass
class TextShifts:
    """The tokens that rose and fell most for one text at one layer.

    Attributes:
        text_index: index of the text in the ``texts`` given to :func:`token_shifts`.
        text: the text.
        layer: the block whose ``resid_post`` was read.
        increased: up to ``k`` tokens with the largest positive ``delta``, largest first.
        decreased: up to ``k`` tokens with the most negative ``delta``, most negative first.
    """

    text_index: int
    text: str
    layer: int
    increased: list[TokenShift] = field(default_factory=list)
    decreased: list[TokenShift] = field(default_factory=list)


def token_shifts(
    model: Any,
    texts: Sequence[str],
    vector: ConceptVector,
    alpha: float,
    layers: Sequence[int] | None = None,
    *,
    k: int = 10,
    position: Literal["last"] = "last",
    mode: ShiftMode = "direct",
    measure: Literal["probs", "log_probs"] = "probs",
    steer_layers: Sequence[int] | None = None,
    scale: Scale = "raw",
    strict: bool = True,
    batch_size: int = 16,
    chunk_size: int = 64,
) -> dict[int, list[TextShifts]]:
    """Per text and layer, the tokens whose logit-lens probability rose and fell most.

    For each text, the residual stream after block ``k`` at the last token is read
    without steering (``before``) and with the concept vector added (``after``); both
    are read through :func:`logit_lens` and ``delta = after - before`` is ranked over
    the whole vocabulary.

    Two views of "with the vector added":

    * ``mode="direct"`` (the logit-lens view of the addition at that layer):
      ``after = before + α · v[k]``, nothing else changes. It answers "what does adding
      ``v[k]`` to this state say about the next token, read through the unembedding?".
      Every read layer needs a vector.
    * ``mode="steered"`` (the full-run view): the model runs with the steering hooks
      on at every layer in ``steer_layers`` (default: every layer the vector has), as
      in a steered generation, and ``after`` is read at layer ``k``: it carries the
      additions at layers ``≤ k`` and their effect on the blocks in between. With
      ``steer_layers=[k]`` it equals the direct view at ``k``.

    Args:
        model: the TransformerLens model the vector belongs to.
        texts: the inputs (e.g. the paper's negative scenarios).
        vector: the concept vector (refined in, or transplanted into, ``model``).
        alpha: strength, as in :func:`contrans_tl.steering.make_steering`.
        layers: blocks to read; ``None``: every layer the vector has.
        k: how many tokens to keep on each side.
        position: where to read; only ``"last"`` (each text's last token).
        mode: ``"direct"`` or ``"steered"``, see above.
        measure: rank changes in probability (``"probs"``, the paper's view) or in
            log-probability (``"log_probs"``, which favours rare tokens).
        steer_layers: layers steered in ``"steered"`` mode; ``None``: all the vector's.
            Ignored in ``"direct"`` mode.
        scale: ``"raw"`` (``α · v``) or ``"relative"`` (``α`` times the layer's mean
            residual norm, along ``v``), as in :func:`make_steering`.
        strict: refuse a vector whose model id or weight processing differ from
            ``model``'s.
        batch_size: texts per forward pass.
        chunk_size: states unembedded at once (memory: ``4 · chunk_size · d_vocab``
            floats).

    Returns:
        ``{layer: [TextShifts for each text, in text order]}``. ``increased`` keeps only
        tokens whose value rose (``delta > 0``), ``decreased`` only those that fell, so
        either may hold fewer than ``k`` (none when ``α = 0``).

    Raises:
        TypeError: ``texts`` is a single string.
        ValueError: no texts, ``k < 1``, an unknown ``position``/``mode``/``measure``,
            a layer out of range, a read layer without a vector in ``"direct"`` mode, or
            a vector that does not fit the model.

    Example:
        >>> shifts = token_shifts(model, texts, v, alpha=4.0, layers=[8, 12], k=10)
        >>> [(s.token, round(s.delta, 4)) for s in shifts[12][0].increased[:3]]
        >>> steered = token_shifts(model, texts, v, 4.0, layers=[12], mode="steered")
    """
    _check_shift_args(texts, k, position, mode, measure, chunk_size)
    read_layers = check_layers(model, vector.layers if layers is None else layers)
    texts = list(texts)
    before, after = _lens_states(
        model,
        texts,
        vector,
        alpha,
        read_layers,
        mode=mode,
        steer_layers=steer_layers,
        scale=scale,
        strict=strict,
        batch_size=batch_size,
    )
    return {
        layer: _rank_shifts(
            model, texts, layer, before[layer], after[layer], k, measure, chunk_size
        )
        for layer in read_layers
    }


def _check_shift_args(
    texts: Sequence[str], k: int, position: str, mode: str, measure: str, chunk_size: int
) -> None:
    """Refuse, by name, the arguments of :func:`token_shifts` it cannot use."""
    if isinstance(texts, str):
        raise TypeError("token_shifts() takes a list of texts, got one str; wrap it in a list")
    if len(texts) == 0:
        raise ValueError("no texts given; pass at least one text")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if position != "last":
        raise ValueError(f"position must be 'last' (each text's last token), got {position!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if measure not in ("probs", "log_probs"):
        raise ValueError(f"measure must be 'probs' or 'log_probs', got {measure!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _lens_states(
    model: Any,
    texts: list[str],
    vector: ConceptVector,
    alpha: float,
    read_layers: list[int],
    *,
    mode: ShiftMode,
    steer_layers: Sequence[int] | None,
    scale: Scale,
    strict: bool,
    batch_size: int,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Last-token ``resid_post`` of the read layers without and with the vector added.

    ``"direct"``: the state plus ``α · v[k]``; ``"steered"``: a second read with the
    steering hooks on (see :func:`token_shifts`).

    Raises:
        ValueError: a read layer without a vector in ``"direct"`` mode, or a vector that
            does not fit the model.
    """
    if mode == "direct":
        missing = [layer for layer in read_layers if layer not in vector.layers]
        if missing:
            raise ValueError(
                f"mode='direct' adds the vector at the read layer, but concept vector "
                f"{vector.concept!r} has no vector for layers {missing} (it has "
                f"{list(vector.layers)}); read other layers or use mode='steered'"
            )
    steering = make_steering(
        model,
        vector,
        alpha,
        layers=read_layers if mode == "direct" else steer_layers,
        scale=scale,
        strict=strict,
    )
    before = read_resid_post(model, texts, read_layers, batch_size=batch_size).states
    if mode == "direct":
        after = {layer: before[layer] + steering.additions[layer] for layer in read_layers}
    else:
        with steering:
            after = read_resid_post(model, texts, read_layers, batch_size=batch_size).states
    return before, after


def _rank_shifts(
    model: Any,
    texts: list[str],
    layer: int,
    before: Tensor,
    after: Tensor,
    k: int,
    measure: Literal["probs", "log_probs"],
    chunk_size: int,
) -> list[TextShifts]:
    """Each text's ``k`` biggest risers and fallers at one layer, ``chunk_size`` at a time.

    Args:
        model: the model whose lens reads the states.
        texts: the texts, one per row of ``before`` and ``after``.
        layer: the block the states were read at (recorded in each row).
        before: ``[n_texts, d_model]`` states without the vector.
        after: the same with the vector added.
        k: tokens kept on each side.
        measure: ``"probs"`` or ``"log_probs"``.
        chunk_size: states read through the lens at once.

    Returns:
        One :class:`TextShifts` per text, in text order.
    """
    decode = model.tokenizer.decode
    rows: list[TextShifts] = []
    for start in range(0, len(texts), chunk_size):
        b = logit_lens(model, before[start : start + chunk_size], return_type=measure)
        a = logit_lens(model, after[start : start + chunk_size], return_type=measure)
        b, a = b.float(), a.float()
        delta = a - b
        n_top = min(k, delta.shape[-1])
        up = delta.topk(n_top, dim=-1)
        down = (-delta).topk(n_top, dim=-1)
        for r in range(delta.shape[0]):
            i = start + r
            rows.append(
                TextShifts(
                    text_index=i,
                    text=texts[i],
                    layer=layer,
                    increased=_shifts(up.indices[r], delta[r], b[r], a[r], decode, +1),
                    decreased=_shifts(down.indices[r], delta[r], b[r], a[r], decode, -1),
                )
            )
    return rows


def _shifts(
    ids: Tensor, delta: Tensor, before: Tensor, after: Tensor, decode: Any, sign: int
) -> list[TokenShift]:
    """TokenShift rows for ``ids``, keeping only deltas of the given sign."""
    ids = ids.cpu()
    d, b, a = delta[ids].cpu(), before[ids].cpu(), after[ids].cpu()
    rows = []
    for j, t in enumerate(ids.tolist()):
        if sign * float(d[j]) <= 0:
            continue
        rows.append(TokenShift(int(t), decode([int(t)]), float(d[j]), float(b[j]), float(a[j])))
    return rows


def aggregate_shifts(
    per_text_results: Sequence[TextShifts],
    *,
    top: int | None = None,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Count in how many texts each token is among the top-``k`` risers and fallers.

    This is the format of the paper's Table 8: for the increased (and the decreased)
    side, each token with the number of inputs that have it in their top-``k`` list.
    Tokens are counted by id; the decoded string names them.

    Args:
        per_text_results: one layer's results, e.g. ``token_shifts(...)[layer]``.
        top: keep only the ``top`` most frequent tokens on each side; ``None``: all.

    Returns:
        ``(increased, decreased)``, each ``[(token, count), ...]`` sorted by count
        (descending), then by the summed size of the token's deltas (descending), then
        by token id.

    Raises:
        ValueError: the results mix layers, or one text appears twice, or ``top < 1``.

    Example:
        >>> up, down = aggregate_shifts(token_shifts(model, texts, v, 4.0, [12])[12])
        >>> up[:3]
        [(' fear', 41), (' afraid', 38), (' scared', 30)]
    """
    if top is not None and top < 1:
        raise ValueError(f"top must be >= 1 or None, got {top}")
    layers = sorted({r.layer for r in per_text_results})
    if len(layers) > 1:
        raise ValueError(
            f"the results mix layers {layers}; aggregate one layer at a time, e.g. "
            "aggregate_shifts(shifts[layer])"
        )
    seen = Counter(r.text_index for r in per_text_results)
    twice = sorted(i for i, n in seen.items() if n > 1)
    if twice:
        raise ValueError(f"texts {twice} appear more than once; each text may count once")

    def count(side: str) -> list[tuple[str, int]]:
        counts: Counter[int] = Counter()
        size: dict[int, float] = {}
        names: dict[int, str] = {}
        for r in per_text_results:
            shifts: list[TokenShift] = getattr(r, side)
            for s in {s.token_id: s for s in shifts}.values():  # a token once per text
                counts[s.token_id] += 1
                size[s.token_id] = size.get(s.token_id, 0.0) + abs(s.delta)
                names[s.token_id] = s.token
        order = sorted(counts, key=lambda t: (-counts[t], -size[t], t))
        if top is not None:
            order = order[:top]
        return [(names[t], counts[t]) for t in order]

    return count("increased"), count("decreased")
