"""EFT / proxy-tuning: steer a strong model with the logit difference of two weak ones.

The baseline of the ConTrans paper (§5, "EFT/proxy-tune"): Mitchell et al. 2023
(emulated fine-tuning, EFT) and Liu et al. 2024 (proxy-tuning). At every decoding step
the next-token scores of the strong (base) model are shifted by what alignment did to a
weak model::

    z = log p_strong + β · (log p_weak_aligned − log p_weak_base)
    p_proxy = softmax(z)

All three models must share one vocabulary, since the scores are added token by token;
:func:`check_same_vocabulary` refuses anything else.

**Logits or log-probabilities?** Proxy-tuning adds raw logits ``s + β(a − b)``; EFT adds
log-probabilities. Since ``log_softmax(x) = x − logsumexp(x)``, the two sums differ by
``c = logsumexp(s) + β · (logsumexp(a) − logsumexp(b))``, one number per position
(per row of the batch and per token position), the same for every token of the
vocabulary. A shift shared by all tokens cancels in the softmax, so both give exactly the
same next-token distribution, the same greedy token and the same sequence log-probability,
for every β (up to float rounding). :func:`proxy_logits` uses the log-probability form
(EFT): its values are then log-probabilities of an unnormalised distribution whose scale
does not depend on the arbitrary logit offset of each model, which keeps them comparable
across positions and models; :func:`proxy_sequence_logprob` normalises with one more
``log_softmax``. The identity holds only because the constant is shared across the
vocabulary: it would break if the three models were compared on different vocabulary
slices, or if a per-model transformation that is not a shift (a temperature, top-k
filtering) were applied before the sum.

**Testing.** The offline model set (``contrans_tl.models.ZOO``) has no triple of strong
base, weak aligned and weak base models with one vocabulary: SmolLM2 ships as the instruct
model only, both Qwen2.5-Coder models are instruct models, and Gemma-3-270m (the only base
model) has its own tokenizer. The tests therefore run on tiny random Llama models that
share one tokenizer.

Example:
    >>> strong = load_model("Qwen/Qwen2.5-1.5B")          # hub ids: not available offline
    >>> aligned = load_model("Qwen/Qwen2.5-0.5B-Instruct")
    >>> base = load_model("Qwen/Qwen2.5-0.5B")
    >>> proxy_generate(strong, aligned, base, ["Tell me about"], max_new_tokens=20)
    [' the history of ...']
    >>> proxy_sequence_logprob(strong, aligned, base, [9707, 11], [1879])
    -3.21
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from contrans_tl.forward import Forward, padded_batches
from contrans_tl.sites import context_length, model_device
from contrans_tl.steering import greedy_decode
from contrans_tl.tokens import check_texts, pad_token_id

__all__ = [
    "proxy_logits",
    "check_same_vocabulary",
    "proxy_generate",
    "proxy_sequence_logprobs",
    "proxy_sequence_logprob",
]

_ROLES = ("strong", "weak_aligned", "weak_base")


def proxy_logits(
    strong_logits: Float[Tensor, "*batch d_vocab"],
    weak_aligned_logits: Float[Tensor, "*batch d_vocab"],
    weak_base_logits: Float[Tensor, "*batch d_vocab"],
    *,
    beta: float = 1.0,
) -> Float[Tensor, "*batch d_vocab"]:
    """Combined next-token scores ``log p_s + β · (log p_wa − log p_wb)``.

    Each input is turned into log-probabilities (``log_softmax`` over the last axis) in at
    least float32 before the sum. The result is not normalised; ``softmax`` of it is the
    proxy distribution, identical to proxy-tuning's ``softmax(s + β(a − b))`` on raw logits
    (the two sums differ by one constant per position; see the module docstring).

    Args:
        strong_logits: logits of the strong (base) model.
        weak_aligned_logits: logits of the weak aligned (instruct) model, same shape.
        weak_base_logits: logits of the weak base model, same shape.
        beta: strength of the shift; ``0`` gives the strong model's log-probabilities,
            ``1`` is EFT / proxy-tuning.

    Returns:
        The combined scores, same shape, float32 (float64 if an input is float64).

    Raises:
        ValueError: the shapes differ, or ``beta`` is not finite.

    Example:
        >>> z = proxy_logits(strong(ids)[:, -1], aligned(ids)[:, -1], base(ids)[:, -1])
        >>> next_token = z.argmax(-1)
    """
    shapes = [tuple(t.shape) for t in (strong_logits, weak_aligned_logits, weak_base_logits)]
    if len(set(shapes)) != 1:
        raise ValueError(
            "proxy_logits needs three logit tensors of one shape (one vocabulary); got "
            + ", ".join(f"{r}={s}" for r, s in zip(_ROLES, shapes))
        )
    if not math.isfinite(float(beta)):
        raise ValueError(f"beta must be a finite number, got {beta!r}")
    dtype = torch.promote_types(strong_logits.dtype, torch.float32)
    for t in (weak_aligned_logits, weak_base_logits):
        dtype = torch.promote_types(dtype, t.dtype)
    s = torch.log_softmax(strong_logits.to(dtype), dim=-1)
    if beta == 0:
        return s
    a = torch.log_softmax(weak_aligned_logits.to(dtype), dim=-1)
    b = torch.log_softmax(weak_base_logits.to(dtype), dim=-1)
    return s + float(beta) * (a - b)


def _vocab_size(model: Any, role: str) -> int:
    cfg = getattr(model, "cfg", None)
    d_vocab = getattr(cfg, "d_vocab", None)
    if d_vocab is None:
        raise TypeError(
            f"the {role} model ({type(model).__name__}) has no cfg.d_vocab; proxy-tuning "
            "needs TransformerLens models (TransformerBridge or HookedTransformer)"
        )
    return int(d_vocab)


def _model_name(model: Any) -> str:
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or type(model).__name__)


def check_same_vocabulary(*models: Any) -> None:
    """Refuse models that do not share one vocabulary.

    Two models share a vocabulary when their tokenizers map the same strings to the same
    ids (``tokenizer.get_vocab()`` equal) and their unembeddings have the same width
    (``cfg.d_vocab``). Proxy-tuning adds scores token id by token id, so anything less
    would add the scores of unrelated tokens.

    Args:
        *models: two or more TransformerLens models with tokenizers; in proxy-tuning,
            strong, weak aligned and weak base, in that order.

    Raises:
        ValueError: fewer than two models, or two models whose vocabularies differ (the
            message names both models and both vocabulary sizes).
        TypeError: a model has no tokenizer or no ``cfg.d_vocab``.

    Example:
        >>> check_same_vocabulary(qwen_15b, qwen_05b_instruct, qwen_05b)   # passes
        >>> check_same_vocabulary(smollm2, gemma)
        ValueError: proxy-tuning needs one vocabulary, ...
    """
    if len(models) < 2:
        raise ValueError(f"check_same_vocabulary needs at least two models, got {len(models)}")
    roles = list(_ROLES) if len(models) == 3 else [f"model {i}" for i in range(len(models))]
    first, first_role = models[0], roles[0]
    first_tok = getattr(first, "tokenizer", None)
    if first_tok is None:
        raise TypeError(f"the {first_role} model has no tokenizer; proxy-tuning needs one")
    first_vocab = first_tok.get_vocab()
    first_width = _vocab_size(first, first_role)
    for model, role in zip(models[1:], roles[1:]):
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise TypeError(f"the {role} model has no tokenizer; proxy-tuning needs one")
        width = _vocab_size(model, role)
        vocab = tok.get_vocab()
        what = None
        if vocab != first_vocab:
            only_a = sorted(set(first_vocab.items()) - set(vocab.items()))[:3]
            only_b = sorted(set(vocab.items()) - set(first_vocab.items()))[:3]
            what = (
                f"their tokenizers differ ({len(first_vocab):,} vs {len(vocab):,} tokens; "
                f"e.g. (token, id) only in the {first_role} model: {only_a}, only in the "
                f"{role} model: {only_b})"
            )
        elif width != first_width:
            what = f"their unembeddings differ in width (cfg.d_vocab {first_width:,} vs {width:,})"
        if what is not None:
            raise ValueError(
                f"proxy-tuning needs one vocabulary shared by all models, but the "
                f"{first_role} model {_model_name(first)!r} (vocabulary {len(first_vocab):,} "
                f"tokens, d_vocab {first_width:,}) and the {role} model {_model_name(model)!r} "
                f"(vocabulary {len(vocab):,} tokens, d_vocab {width:,}) do not share one: "
                f"{what}. Use models of one family with the same tokenizer (e.g. Qwen2.5 "
                "0.5B/1.5B base and instruct)."
            )


@torch.no_grad()
def proxy_generate(
    strong: Any,
    weak_aligned: Any,
    weak_base: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    beta: float = 1.0,
    batch_size: int = 8,
    stop_at_eos: bool = True,
    decode: bool = True,
) -> list[str] | list[list[int]]:
    """Greedy decoding from the proxy distribution, batched with left padding.

    Prompts are tokenized once with the strong model's tokenizer (the vocabularies are
    checked to be one) and the same ids go to all three models. Each model keeps its own
    KV cache: the prompt is run once, then each step feeds only the new token with the
    attention mask extended by one column.

    Args:
        strong: the strong (base) model to steer.
        weak_aligned: the weak aligned (instruct) model.
        weak_base: the weak base model the aligned one was tuned from.
        prompts: the prompts.
        max_new_tokens: tokens to generate per prompt.
        beta: strength of the shift (see :func:`proxy_logits`); ``0``: the strong model.
        batch_size: prompts per batch (sorted by length to limit padding).
        stop_at_eos: stop a row at the strong tokenizer's EOS token (kept out of the output).
        decode: return strings (``True``) or lists of new token ids.

    Returns:
        The continuations, in the order of ``prompts``.

    Raises:
        ValueError: the vocabularies differ, or ``max_new_tokens``/``batch_size`` < 1.
        TypeError: ``prompts`` is a single string.

    Example:
        >>> proxy_generate(strong, aligned, base, ["- statement\\n-"], max_new_tokens=30)
        [' ...']
    """
    check_texts(prompts, "prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    models = (strong, weak_aligned, weak_base)
    check_same_vocabulary(*models)
    devices = [model_device(m) for m in models]

    def start_batch(ids: Tensor, mask: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        # one KV-cached decoder per model: the prompt once, then only the new token
        steps = [Forward(model).decoder(ids.shape[1]) for model in models]

        def step(ids: Tensor, mask: Tensor) -> Tensor:
            last = [next_logits(ids, mask).to(devices[0]) for next_logits in steps]
            return proxy_logits(last[0], last[1], last[2], beta=beta)

        return step

    return greedy_decode(
        strong.tokenizer,
        prompts,
        start_batch,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_at_eos=stop_at_eos,
        decode=decode,
        device=devices[0],
        vocab_size=_vocab_size(strong, "strong"),
        n_ctx=min((n for n in map(context_length, models) if n is not None), default=None),
    )


def _as_ids(x: Sequence[int] | Tensor, what: str, i: int) -> list[int]:
    if isinstance(x, Tensor):
        if x.ndim != 1 or x.is_floating_point() or x.is_complex():
            raise ValueError(
                f"{what}[{i}] must be a 1-D integer tensor or a list of ints, got a "
                f"{x.dtype} tensor of shape {tuple(x.shape)}"
            )
        ids = [int(t) for t in x.tolist()]
    else:
        ids = [int(t) for t in x]
    if not ids:
        raise ValueError(
            f"{what}[{i}] is empty; the context needs at least one token (e.g. BOS) to "
            "predict the first continuation token, and the continuation at least one token"
        )
    return ids


@torch.no_grad()
def proxy_sequence_logprobs(
    strong: Any,
    weak_aligned: Any,
    weak_base: Any,
    contexts: Sequence[Sequence[int] | Int[Tensor, " ctx"]],
    continuations: Sequence[Sequence[int] | Int[Tensor, " cont"]],
    *,
    beta: float = 1.0,
    batch_size: int = 8,
) -> list[float]:
    """Log-probability of each continuation given its context, under the proxy model.

    For the pair ``(context, continuation)`` the sum over continuation tokens ``t`` of
    ``log_softmax(proxy_logits(...))[t]`` at the position before ``t``. Pairs are run in
    left-padded batches, each model once per batch, without a cache.

    Args:
        strong, weak_aligned, weak_base: as in :func:`proxy_generate`.
        contexts: token ids of each context (BOS included if the tokenizer adds one).
        continuations: token ids of each continuation, one per context.
        beta: strength of the shift.
        batch_size: pairs per forward pass.

    Returns:
        One log-probability (natural log, a sum over tokens) per pair, in order.

    Raises:
        ValueError: the vocabularies differ, lengths differ, or an id list is empty or
            holds an id outside the vocabulary.

    Example:
        >>> ctx = tok("Q: Can you see the Great Wall from space?\\nA:")["input_ids"]
        >>> choices = [tok(" No.")["input_ids"], tok(" Yes.")["input_ids"]]
        >>> proxy_sequence_logprobs(strong, aligned, base, [ctx, ctx], choices)
        [-4.1, -6.3]
    """
    if len(contexts) != len(continuations):
        raise ValueError(
            f"{len(contexts)} contexts but {len(continuations)} continuations; give one "
            "continuation per context (repeat a context for several answers)"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    models = (strong, weak_aligned, weak_base)
    check_same_vocabulary(*models)
    d_vocab = _vocab_size(strong, "strong")
    pairs = [
        (_as_ids(c, "contexts", i), _as_ids(x, "continuations", i))
        for i, (c, x) in enumerate(zip(contexts, continuations))
    ]
    for i, (c, x) in enumerate(pairs):
        bad = [t for t in c + x if not 0 <= t < d_vocab]
        if bad:
            raise ValueError(f"pair {i} holds token ids outside [0, {d_vocab}): {bad[:5]}")
    tok = strong.tokenizer
    pad = pad_token_id(tok, d_vocab)
    out_device = model_device(strong)
    results = [0.0] * len(pairs)
    for batch in padded_batches([c + x for c, x in pairs], batch_size, pad):
        idx, ids, mask = batch.index, batch.ids, batch.mask
        width = ids.shape[1]
        # Row r predicts its continuation from positions [first[r], width - 1).
        n_cont = [len(pairs[i][1]) for i in idx]
        longest = max(n_cont)
        # Gather the last `longest` predicting positions of every row (a right-aligned
        # window); rows with shorter continuations ignore the window's left part.
        pos = torch.arange(width - 1 - longest, width - 1)
        logits = []
        for model in models:
            out = Forward(model).run(ids, mask)
            logits.append(out[:, pos].to(out_device))
        logp = torch.log_softmax(proxy_logits(*logits, beta=beta), dim=-1)
        targets = ids[:, width - longest :].to(out_device)
        picked = logp.gather(-1, targets[..., None])[..., 0].double()
        for r, i in enumerate(idx):
            results[i] = float(picked[r, longest - n_cont[r] :].sum())
    return results


def proxy_sequence_logprob(
    strong: Any,
    weak_aligned: Any,
    weak_base: Any,
    context_ids: Sequence[int] | Int[Tensor, " ctx"],
    continuation_ids: Sequence[int] | Int[Tensor, " cont"],
    *,
    beta: float = 1.0,
) -> float:
    """Log-probability of one continuation given its context, under the proxy model.

    One pair of :func:`proxy_sequence_logprobs`; for TruthfulQA MC1, score each answer
    and pick the highest.

    Args:
        strong, weak_aligned, weak_base: as in :func:`proxy_generate`.
        context_ids: token ids of the context (at least one token).
        continuation_ids: token ids of the continuation (at least one token).
        beta: strength of the shift.

    Returns:
        ``Σ_t log p_proxy(continuation_t | context, continuation_<t)`` (natural log).

    Example:
        >>> proxy_sequence_logprob(strong, aligned, base, ctx_ids, answer_ids)
        -4.1
    """
    return proxy_sequence_logprobs(
        strong, weak_aligned, weak_base, [context_ids], [continuation_ids], beta=beta
    )[0]
