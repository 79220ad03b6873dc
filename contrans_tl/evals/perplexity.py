"""Perplexity on held-out text: the fluency side of a steering strength sweep.

Steering that moves a concept also costs fluency; the paper checks perplexity next to
toxicity (§5.2, Table 2). :func:`perplexity` measures a (steered) model's perplexity
on plain text, batched with left padding; :func:`heldout_wikisplit` gives WikiSplit
sentences that the residual maps were *not* fitted on.

Example:
    >>> texts = heldout_wikisplit(200)
    >>> base = perplexity(tgt, texts)["ppl"]
    >>> steered = perplexity(tgt, texts, intervention=make_steering(tgt, v_tgt, alpha=4.0))["ppl"]
"""

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from contrans_tl.data import wikisplit_sentences
from contrans_tl.forward import Forward, padded_batches
from contrans_tl.interventions.base import Intervention
from contrans_tl.sites import check_context, model_device
from contrans_tl.tokens import check_texts, pad_token_id

__all__ = ["perplexity", "heldout_wikisplit"]


@torch.no_grad()
def perplexity(
    model: Any,
    texts: Sequence[str],
    *,
    intervention: Intervention | None = None,
    batch_size: int = 8,
    max_length: int = 128,
) -> dict[str, Any]:
    """Token-level perplexity of ``model`` on ``texts``.

    Each text is tokenized as the model's tokenizer does by default (BOS where it adds
    one) and truncated to its first ``max_length`` tokens. Every token but the first of
    each text is predicted (so a BOS is never predicted, and without a BOS the first
    word is not either); ``ppl = exp(nll_sum / n_tokens)`` over all texts together.
    Texts are batched by length with left padding; padding is masked out of attention
    and of the loss, and only the predicting positions are unembedded
    (:func:`contrans_tl.forward.token_logprobs`).

    Args:
        model: the TransformerLens model (``TransformerBridge``) with a tokenizer.
        texts: the texts.
        intervention: in force for the call (left in force if the caller entered it); its
            hooks get the attention mask, so padding is never steered. Every position is
            a prompt position (``positions="generated"`` steers nothing here).
        batch_size: texts per forward pass.
        max_length: tokens kept per text, special tokens included (at least 2).

    Returns:
        ``{"ppl": float, "nll_sum": float, "n_tokens": int, "n_texts": int,
        "per_text_nll": [float, ...], "per_text_tokens": [int, ...]}`` (per text in the
        order given; ``nll`` is the sum over the text's predicted tokens, in nats).

    Raises:
        TypeError: ``texts`` is one string.
        ValueError: no texts, an empty text, ``batch_size < 1``, ``max_length < 2``, or
            no text has two tokens (nothing to predict).

    Example:
        >>> perplexity(model, ["The cat sat on the mat.", "It rained all day."])["ppl"]
        412.7
    """
    check_texts(texts)
    if not texts:
        raise ValueError("no texts given")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"texts {empty[:5]} are empty or whitespace only")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one token predicts the next), got {max_length}")
    tok = model.tokenizer
    encoded = [
        [int(i) for i in tok(t, truncation=True, max_length=max_length)["input_ids"]] for t in texts
    ]
    check_context(
        model,
        [len(e) for e in encoded],
        what="text",
        hint=f"lower max_length (now {max_length}) to at most that",
    )
    if all(len(e) < 2 for e in encoded):
        raise ValueError("no text has two tokens; there is nothing to predict")
    dev = model_device(model)
    pad = pad_token_id(tok, model.cfg.d_vocab)
    nll = [0.0] * len(texts)
    counts = [max(len(e) - 1, 0) for e in encoded]
    kept = [i for i in range(len(texts)) if counts[i] > 0]
    with Forward(model, intervention) as fwd:
        for batch in padded_batches([encoded[i] for i in kept], batch_size, pad, device=dev):
            # every real position but the last predicts the token after it
            at = batch.mask.bool()
            at[:, -1] = False
            lp = fwd.token_logprobs(batch.ids, batch.mask, at, batch.ids.roll(-1, dims=1))
            per_row = lp.double().cpu().split([n - 1 for n in batch.lengths])
            for j, row in zip(batch.index, per_row):
                nll[kept[j]] = -float(row.sum())
    total = sum(nll)
    n_tokens = sum(counts)
    return {
        "ppl": float(torch.tensor(total / n_tokens, dtype=torch.float64).exp()),
        "nll_sum": total,
        "n_tokens": n_tokens,
        "n_texts": len(texts),
        "per_text_nll": nll,
        "per_text_tokens": counts,
    }


def heldout_wikisplit(n: int = 200, *, exclude: Iterable[str] | None = None) -> list[str]:
    """WikiSplit sentences for a fluency check, none of them used to fit the maps.

    Sentences of the ``first2000`` subset in file order, duplicates dropped, minus every
    sentence in ``exclude``. The residual maps are fitted on the ``random2000_seed0``
    subset (:func:`contrans_tl.data.wikisplit_sentences`'s default), and the two files
    share 796 sentences, so by default (``exclude=None``) that whole subset is left out;
    pass the sentences you fitted on if they came from elsewhere, or ``exclude=()`` to
    leave nothing out. Sentences are compared after stripping surrounding whitespace.

    Args:
        n: how many sentences.
        exclude: sentences not to return; ``None``: the ``random2000_seed0`` subset.

    Returns:
        ``n`` distinct sentences.

    Raises:
        TypeError: ``exclude`` is one string.
        ValueError: ``n < 1`` or fewer than ``n`` sentences remain.

    Example:
        >>> fit = wikisplit_sentences(500)
        >>> held = heldout_wikisplit(200, exclude=fit)
        >>> set(held) & set(fit)
        set()
    """
    if isinstance(exclude, str):
        raise TypeError("exclude must be a collection of sentences, got one str")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    banned = {
        s.strip()
        for s in (wikisplit_sentences(subset="random2000_seed0") if exclude is None else exclude)
    }
    out: list[str] = []
    seen: set[str] = set()
    for s in wikisplit_sentences(subset="first2000"):
        key = s.strip()
        if key in banned or key in seen:
            continue
        seen.add(key)
        out.append(s)
        if len(out) == n:
            return out
    raise ValueError(
        f"only {len(out)} held-out sentences remain after excluding {len(banned)}; asked for {n}"
    )
