"""Tokenization with character offsets, word ends, and left padding.

Pairing hidden states of two models that use different tokenizers needs a position that
means the same thing in both: the end of a word. In a causal model the state at a word's
last token depends only on the text up to that word, so the states of the two models at
the same word end describe the same prefix of text.

Example:
    >>> enc = encode(tokenizer, ["Bob 's house , built in 1890 ."])[0]
    >>> word_end_positions(enc)  # word index -> token index of the word's last token
    {0: 0, 1: 2, 2: 3, ...}
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

__all__ = [
    "Encoding",
    "encode",
    "word_spans",
    "word_end_positions",
    "pad_left",
    "pad_token_id",
    "check_texts",
    "check_max_length",
]

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Encoding:
    """One text, tokenized, with the character span of each token.

    Attributes:
        text: the text as given.
        ids: token ids, special tokens the tokenizer adds (BOS) included.
        offsets: ``(start, end)`` character span of each token; ``(0, 0)`` for special tokens.
        special: True where the tokenizer added the token (BOS/EOS), not the text.
    """

    text: str
    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    special: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def last_text_position(self) -> int:
        """Index of the last token that comes from the text (not a special token)."""
        for i in range(len(self.ids) - 1, -1, -1):
            if not self.special[i]:
                return i
        raise ValueError(f"text {self.text!r} has no tokens of its own")

    def text_positions(self) -> list[int]:
        """Indices of every token that comes from the text (special tokens left out)."""
        return [i for i, s in enumerate(self.special) if not s]


def check_texts(texts: object, what: str = "texts") -> None:
    """Refuse anything but a sequence of strings where a list of texts is expected.

    A bare ``str`` is a sequence of characters, so without this check a function that
    takes texts would silently work on one-character texts.

    Raises:
        TypeError: ``texts`` is a string, not a sequence, or holds a non-string.
    """
    if isinstance(texts, str):
        raise TypeError(
            f"{what} must be a list of texts, got one str ({texts[:40]!r}); wrap it in a list"
        )
    if isinstance(texts, bytes) or not isinstance(texts, Sequence):
        raise TypeError(f"{what} must be a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, expected str")


def check_max_length(max_length: object) -> None:
    """``max_length`` must be ``None`` (no truncation) or an int of at least 1.

    Raises:
        TypeError, ValueError: naming the value given.
    """
    if max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(
            f"max_length must be an int >= 1 or None (no truncation), got {max_length!r}"
        )
    if max_length < 1:
        raise ValueError(
            f"max_length must be >= 1 (tokens kept per text) or None (no truncation), "
            f"got {max_length}"
        )


def encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
) -> list[Encoding]:
    """Tokenize ``texts`` one by one (no padding) and keep character offsets.

    Args:
        tokenizer: a fast Hugging Face tokenizer (offsets need the Rust backend).
        texts: the texts; each must be a non-empty string.
        max_length: if given, texts longer than this many tokens are truncated on the
            right (the end of the text is lost, never the BOS token).

    Returns:
        One :class:`Encoding` per text, in the order given.

    Raises:
        TypeError: a text is not a string, or the tokenizer gives no offsets.
        ValueError: a text is empty.
    """
    check_texts(texts)
    check_max_length(max_length)
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty or whitespace only")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets need a "
            "tokenizers-backed (fast) tokenizer"
        )
    out = []
    batch = tokenizer(
        list(texts),
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    for text, ids, offs, special in zip(
        texts, batch["input_ids"], batch["offset_mapping"], batch["special_tokens_mask"]
    ):
        out.append(
            Encoding(
                text=text,
                ids=tuple(int(i) for i in ids),
                offsets=tuple((int(a), int(b)) for a, b in offs),
                special=tuple(bool(s) for s in special),
            )
        )
    return out


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the words of ``text`` (maximal non-space runs)."""
    return [(m.start(), m.end()) for m in _WORD.finditer(text)]


def word_end_positions(enc: Encoding) -> dict[int, int]:
    """Map each word of the text to the index of its last token.

    A word counts only if one token ends exactly at the word's last character and that
    token does not reach back into the previous word; words glued to a neighbour by a
    token that spans both have no clean end and are left out. Two tokenizations of the
    same text therefore pair up by word index (see :func:`contrans_tl.activations`).

    Args:
        enc: an encoding from :func:`encode`.

    Returns:
        ``{word_index: token_index}`` for every word with a clean end.
    """
    spans = word_spans(enc.text)
    end_to_token: dict[int, int] = {}
    start_of: dict[int, int] = {}
    for i, ((a, b), sp) in enumerate(zip(enc.offsets, enc.special)):
        if sp or b <= a:
            continue
        end_to_token[b] = i
        start_of[i] = a
    out: dict[int, int] = {}
    prev_end = 0
    for w, (_ws, we) in enumerate(spans):
        tok = end_to_token.get(we)
        if tok is not None and start_of[tok] >= prev_end:
            out[w] = tok
        prev_end = we
    return out


def pad_left(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Stack token id sequences into one left-padded batch.

    Returns:
        ``(ids, mask)``, both ``[batch, max_len]``; ``mask`` is True on real tokens.
    """
    if not sequences:
        raise ValueError("pad_left() needs at least one sequence")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for r, s in enumerate(sequences):
        if len(s) == 0:
            raise ValueError(f"sequence {r} is empty")
        ids[r, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[r, width - len(s) :] = True
    return ids, mask


def pad_token_id(tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None) -> int:
    """The id to pad with: the pad token, else EOS, else BOS, else 0.

    Padded positions are always masked out, so any id the embedding has works. With
    ``vocab_size`` (the model's ``cfg.d_vocab``), ids outside ``[0, vocab_size)`` are
    skipped: TransformerLens gives a tokenizer that has no pad, EOS or BOS token an added
    ``<|endoftext|>`` whose id the model's embedding may not have.
    """
    for cand in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(tokenizer, "bos_token_id", None),
    ):
        if cand is not None and (vocab_size is None or 0 <= int(cand) < vocab_size):
            return int(cand)
    return 0
