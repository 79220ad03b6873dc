"""Batched, padding-aware reads of the residual stream at chosen layers and positions.

Only the requested hook points are hooked, only the requested positions are copied out,
and the forward pass stops right after the deepest requested block (not even the
unembedding runs). Texts are sorted by length and batched with left padding, so a batch
wastes little compute on padding. The batching and the early stop are
:mod:`contrans_tl.forward`'s (:func:`forward_until` is re-exported here).

Example:
    >>> reads = read_resid_post(model, ["The cat sat .", "Hello there"], layers=[3, 7])
    >>> reads.states[7].shape  # one row per text: the last token
    torch.Size([2, 640])
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from contrans_tl.forward import forward_until, padded_batches
from contrans_tl.sites import check_context, check_layers, model_device, resid_post_name
from contrans_tl.tokens import Encoding, encode, pad_token_id, word_end_positions

__all__ = [
    "Positions",
    "ResidReads",
    "read_resid_post",
    "iter_resid_post",
    "select_positions",
    "forward_until",
]

Positions = Literal["last", "all", "word_ends"]
_POSITIONS = ("last", "all", "word_ends")


@dataclass
class ResidReads:
    """Residual-stream states read at selected positions of a list of texts.

    Attributes:
        layers: the layers read, ascending.
        states: ``{layer: [n_states, d_model]}``, float32 on the CPU, rows in text order
            and, within a text, in token order.
        text_index: ``[n_states]`` index of the text each row comes from.
        token_index: ``[n_states]`` token position of each row within its text's encoding.
        word_index: ``[n_states]`` word index for ``word_ends`` reads, -1 otherwise.

    Example:
        >>> reads = read_resid_post(model, ["The cat sat.", "A dog ran."], [3, 7], positions="all")
        >>> reads.layers
        (3, 7)
        >>> reads.states[7].shape[1] == model.cfg.d_model  # one row per token, texts in order
        True
    """

    layers: tuple[int, ...]
    states: dict[int, Float[Tensor, "n d_model"]]
    text_index: Int[Tensor, " n"]
    token_index: Int[Tensor, " n"]
    word_index: Int[Tensor, " n"]

    def __len__(self) -> int:
        return int(self.text_index.numel())


def select_positions(enc: Encoding, positions: Positions) -> tuple[list[int], list[int]]:
    """Token positions of one encoding for a position rule.

    Returns:
        ``(token_positions, word_indices)``; word indices are -1 unless ``word_ends``.
    """
    if positions == "last":
        return [enc.last_text_position], [-1]
    if positions == "all":
        pos = enc.text_positions()
        return pos, [-1] * len(pos)
    if positions == "word_ends":
        ends = word_end_positions(enc)
        words = sorted(ends)
        return [ends[w] for w in words], words
    raise ValueError(f"positions must be one of {_POSITIONS}, got {positions!r}")


Capture = Callable[[list[int], int, Tensor], None]


def _forward_batches(
    model: Any,
    encodings: Sequence[Encoding],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int],
    capture: Capture,
    *,
    batch_size: int,
    progress: bool | None,
    desc: str,
) -> Iterator[tuple[list[int], list[int]]]:
    """Run the batches; for each, call ``capture(text_indices, layer, rows)`` from the hook.

    ``rows`` is ``[sum of counts, d_model]`` on the model's device: the states of the
    batch's texts at their positions, text after text, in ``text_indices`` order. Yields
    ``(text_indices, counts)`` after each batch. Validation as in :func:`iter_resid_post`.
    """
    if len(encodings) != len(positions):
        raise ValueError(
            f"got {len(encodings)} encodings but {len(positions)} position lists; "
            "they must match one to one"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layer_list = check_layers(model, layers)
    deepest = layer_list[-1]
    for i, (enc, pos) in enumerate(zip(encodings, positions)):
        bad = [p for p in pos if not 0 <= p < len(enc)]
        if bad:
            raise ValueError(f"text {i} has {len(enc)} tokens; positions {bad} are out of range")
    check_context(
        model,
        [len(e) for e in encodings],
        what="text",
        hint="pass max_length (at most that) to truncate texts; their end is lost",
    )
    pad = pad_token_id(model.tokenizer, model.cfg.d_vocab)
    device = model_device(model)
    stop = resid_post_name(deepest)
    show = len(encodings) > 256 if progress is None else progress
    bar = tqdm(total=len(encodings), desc=desc, disable=not show, leave=False)
    try:
        for batch in padded_batches([e.ids for e in encodings], batch_size, pad):
            idx = batch.index
            rows = [r for r, i in enumerate(idx) for _ in positions[i]]
            cols = [p + batch.offsets[r] for r, i in enumerate(idx) for p in positions[i]]
            counts = [len(positions[i]) for i in idx]
            if rows:
                row_t = torch.tensor(rows, dtype=torch.long, device=device)
                col_t = torch.tensor(cols, dtype=torch.long, device=device)
                hooks = [
                    (resid_post_name(k), _capture_hook(capture, k, idx, row_t, col_t))
                    for k in layer_list
                ]
                forward_until(model, batch.ids, batch.mask, hooks, stop_after=stop)
            yield idx, counts
            bar.update(len(idx))
    finally:
        bar.close()


def _capture_hook(
    capture: Capture, layer: int, idx: list[int], rows: Tensor, cols: Tensor
) -> Callable[..., None]:
    """A hook handing ``capture`` the states of the batch's texts at their positions."""

    def hook(resid: Tensor, *, hook: Any) -> None:
        capture(idx, layer, resid[rows, cols].detach())

    return hook


def iter_resid_post(
    model: Any,
    encodings: Sequence[Encoding],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    progress: bool | None = None,
    desc: str = "reading activations",
) -> Iterator[tuple[list[int], dict[int, list[Float[Tensor, "n_i d_model"]]]]]:
    """Yield the residual stream after chosen blocks at chosen token positions.

    The encodings are processed longest first, ``batch_size`` at a time, left-padded.
    Each yielded item is ``(text_indices, {layer: [states of text i for i in batch]})``,
    where ``states of text i`` is ``[len(positions[i]), d_model]`` float32 on the CPU.

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``)
            with a tokenizer.
        encodings: tokenized texts (:func:`contrans_tl.tokens.encode`).
        positions: for each encoding, the token positions to keep (may be empty).
        layers: block indices whose ``hook_resid_post`` is read.
        batch_size: texts per forward pass.
        progress: show a progress bar; ``None`` shows one for more than 256 texts.
        desc: progress bar label.
    """
    layer_list = check_layers(model, layers)
    captured: dict[int, Tensor] = {}

    def capture(_idx: list[int], layer: int, rows: Tensor) -> None:
        captured[layer] = rows.float().cpu()

    for idx, counts in _forward_batches(
        model,
        encodings,
        positions,
        layer_list,
        capture,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    ):
        out: dict[int, list[Tensor]] = {}
        for k in layer_list:
            flat = captured.pop(k, None)
            out[k] = list(flat.split(counts)) if flat is not None else [torch.empty(0)] * len(idx)
        yield list(idx), out
        del out  # the consumer's copy is the only one left during the next batch


def read_resid_post(
    model: Any,
    texts: Sequence[str],
    layers: Sequence[int] | None = None,
    *,
    positions: Positions = "last",
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool | None = None,
) -> ResidReads:
    """Read ``blocks.{k}.hook_resid_post`` for ``layers`` at ``positions`` of ``texts``.

    Args:
        model: a TransformerLens model with a tokenizer.
        texts: the texts; each is tokenized as the model's tokenizer does by default
            (BOS included where the tokenizer adds one).
        layers: block indices to read; ``None`` reads every block.
        positions: ``"last"`` (each text's last token), ``"all"`` (every token of the
            text, special tokens left out), or ``"word_ends"`` (each word's last token).
        batch_size: texts per forward pass.
        max_length: truncate texts to this many tokens (``None``: no truncation).
        progress: progress bar on or off; ``None``: on for more than 256 texts.

    Returns:
        A :class:`ResidReads` with rows in text order.

    Raises:
        TypeError: ``texts`` is one string, or ``layers`` holds a non-integer.
        ValueError: a text is longer than the model's context (``cfg.n_ctx``): it is
            refused, not silently read past the positions the model was trained on; pass
            ``max_length`` to truncate instead. Also ``max_length < 1``.

    Example:
        >>> reads = read_resid_post(model, texts, layers=[5], positions="word_ends")
        >>> reads.states[5].shape, reads.word_index[:4]
    """
    if layers is None:
        layers = range(model.cfg.n_layers)
    layer_list = check_layers(model, layers)
    encs = encode(model.tokenizer, texts, max_length=max_length)
    sel = [select_positions(e, positions) for e in encs]
    # Each text's rows go straight to their final place in one preallocated tensor per
    # layer, so the states are held once (no per-text pieces concatenated at the end).
    counts = [len(s[0]) for s in sel]
    starts = [0] * len(counts)
    for i in range(1, len(counts)):
        starts[i] = starts[i - 1] + counts[i - 1]
    total = sum(counts)
    d_model = int(model.cfg.d_model)
    stacked = {k: torch.empty(total, d_model, dtype=torch.float32) for k in layer_list}
    dest: dict[str, Any] = {"idx": None, "rows": None}

    def capture(idx: list[int], layer: int, rows: Tensor) -> None:
        # the hook's rows go straight to their final place: no per-batch copies kept
        if dest["idx"] is not idx:
            dest["idx"] = idx
            dest["rows"] = torch.tensor(
                [r for i in idx for r in range(starts[i], starts[i] + counts[i])],
                dtype=torch.long,
            )
        stacked[layer].index_copy_(0, dest["rows"], rows.float().cpu())

    for _ in _forward_batches(
        model,
        encs,
        [s[0] for s in sel],
        layer_list,
        capture,
        batch_size=batch_size,
        progress=progress,
        desc="reading activations",
    ):
        pass
    text_index = torch.cat(
        [torch.full((len(s[0]),), i, dtype=torch.long) for i, s in enumerate(sel)]
    )
    token_index = torch.cat([torch.tensor(s[0], dtype=torch.long) for s in sel])
    word_index = torch.cat([torch.tensor(s[1], dtype=torch.long) for s in sel])
    return ResidReads(tuple(layer_list), stacked, text_index, token_index, word_index)
