"""The emotion experiment of the paper (§4.1, Fig. 2a): does a transplanted emotion
vector make the target call *other* emotions' scenarios by that emotion?

Protocol:
    * RepE scenarios of six emotions, split per emotion (seeded): few-shot examples,
      refinement scenarios, validation scenarios (pick α), evaluation scenarios. A
      scenario is in exactly one split, so refinement scenarios are never evaluated.
    * Refinement (paper Table 9): ``Scenario: {s}\\nThe emotion of the above scenario is``;
      positives are scenarios of the emotion, negatives an equal number of the others.
    * Evaluation prompt: one solved example per emotion, then the query, in the format
      of the paper's Table 5 (the six options listed in the question).
    * For emotion ``E`` the evaluation set is scenarios of the *other* five emotions
      ("negative scenarios"). **Token Acc**: the greedy next token is the first token of
      `` E``. **Logit Acc**: among the six emotions' first tokens, ``E``'s has the
      highest logit.

The few-shot prefix is the same for every prompt: its KV cache is computed once per
steering configuration (the vector is added at every position, prefix included) and
reused for all queries, which are right-padded behind it.

Example:
    >>> split = split_scenarios(emotion_scenarios())
    >>> task = EmotionTask.build(target, split)
    >>> preds = task.predict(target, task.queries_for("fear"), steering=None)
"""

import contextlib
import copy
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from contrans_tl.activations import _StopForward
from contrans_tl.data import EMOTIONS
from contrans_tl.sites import check_context, model_device
from contrans_tl.steering import Steering, steering_session
from contrans_tl.tokens import pad_token_id

__all__ = [
    "REFINE_TEMPLATE",
    "QUERY_TEMPLATE",
    "EmotionSplit",
    "split_scenarios",
    "refinement_prompts",
    "EmotionTask",
    "Predictions",
    "score",
    "prefill_cache",
]

REFINE_TEMPLATE = "Scenario: {scenario}\nThe emotion of the above scenario is"
QUERY_TEMPLATE = (
    'Scenario: {scenario}\nThe emotion ("happiness", "sadness", "anger", "fear", '
    '"disgust", "surprise") of the above scenario is'
)


@dataclass(frozen=True)
class EmotionSplit:
    """Disjoint per-emotion splits of the scenarios (see :func:`split_scenarios`)."""

    fewshot: dict[str, list[str]]
    refine: dict[str, list[str]]
    validation: dict[str, list[str]]
    evaluation: dict[str, list[str]]
    seed: int

    def sizes(self) -> dict[str, dict[str, int]]:
        return {
            part: {e: len(v) for e, v in getattr(self, part).items()}
            for part in ("fewshot", "refine", "validation", "evaluation")
        }


def split_scenarios(
    scenarios: Mapping[str, Sequence[str]],
    *,
    n_fewshot: int = 3,
    n_refine: int = 100,
    n_validation: int = 20,
    seed: int = 0,
) -> EmotionSplit:
    """Shuffle each emotion's scenarios (seeded) and cut them into four disjoint parts.

    The evaluation part is whatever remains after few-shot, refinement and validation.

    Raises:
        ValueError: an emotion is missing or has too few scenarios for the cuts.
    """
    parts: dict[str, dict[str, list[str]]] = {
        "fewshot": {},
        "refine": {},
        "validation": {},
        "evaluation": {},
    }
    for i, e in enumerate(EMOTIONS):
        if e not in scenarios:
            raise ValueError(f"no scenarios for {e!r}; need all of {EMOTIONS}")
        items = list(dict.fromkeys(scenarios[e]))
        need = n_fewshot + n_refine + n_validation + 1
        if len(items) < need:
            raise ValueError(f"{e!r} has {len(items)} scenarios; the split needs at least {need}")
        random.Random(seed * 1000 + i).shuffle(items)
        a, b, c = n_fewshot, n_fewshot + n_refine, n_fewshot + n_refine + n_validation
        parts["fewshot"][e] = items[:a]
        parts["refine"][e] = items[a:b]
        parts["validation"][e] = items[b:c]
        parts["evaluation"][e] = items[c:]
    return EmotionSplit(seed=seed, **parts)


def _others(part: Mapping[str, Sequence[str]], emotion: str, n: int, seed: int) -> list[str]:
    """``n`` scenarios of the other emotions, round-robin over them, seeded."""
    pools = []
    for j, e in enumerate(EMOTIONS):
        if e == emotion:
            continue
        pool = list(part[e])
        random.Random(seed * 7919 + j).shuffle(pool)
        pools.append(pool)
    out: list[str] = []
    depth = 0
    while len(out) < n:
        added = False
        for pool in pools:
            if depth < len(pool) and len(out) < n:
                out.append(pool[depth])
                added = True
        if not added:
            break
        depth += 1
    return out


def refinement_prompts(
    split: EmotionSplit, emotion: str, n: int | None = None
) -> tuple[list[str], list[str]]:
    """``(positive, negative)`` refinement prompts for ``emotion``.

    Positives: the emotion's refinement scenarios (first ``n``); negatives: as many
    refinement scenarios of the other five, round-robin.
    """
    pos = list(split.refine[emotion])[: n if n is not None else None]
    neg = _others(split.refine, emotion, len(pos), split.seed)
    fmt = REFINE_TEMPLATE.format
    return [fmt(scenario=s) for s in pos], [fmt(scenario=s) for s in neg]


def negatives(split: EmotionSplit, emotion: str, n: int, part: str = "evaluation") -> list[str]:
    """``n`` scenarios of the other emotions from ``part`` (evaluation or validation)."""
    got = _others(getattr(split, part), emotion, n, split.seed + 1)
    if len(got) < n:
        raise ValueError(f"only {len(got)} {part} negatives for {emotion!r}, asked for {n}")
    return got


@dataclass
class Predictions:
    """Next-token predictions for a list of queries."""

    top_token: Tensor  # [n] greedy next token
    emotion_logits: Tensor  # [n, 6] logits of the six emotions' first tokens


def score(pred: Predictions, emotion: str, emotion_ids: Sequence[int]) -> dict[str, float]:
    """Token Acc and Logit Acc of predictions against one target emotion."""
    j = EMOTIONS.index(emotion)
    n = int(pred.top_token.numel())
    tok = float((pred.top_token == emotion_ids[j]).float().mean()) if n else float("nan")
    logit = float((pred.emotion_logits.argmax(-1) == j).float().mean()) if n else float("nan")
    return {"token_acc": tok, "logit_acc": logit, "n": n}


def _logits_at(model: Any, ids: Tensor, mask: Tensor, last: Tensor, **kwargs: Any) -> Tensor:
    """Logits at one position per row, unembedding only those rows.

    The forward pass stops at the final norm (``ln_final.hook_out``); the unembedding is
    applied to the selected rows only. A final logit soft-cap, where a model has one, is
    monotone and does not change which token or emotion wins.
    """
    rows = torch.arange(ids.shape[0], device=ids.device)
    if "ln_final.hook_out" not in model.hook_dict:
        return model(ids, attention_mask=mask, **kwargs)[rows, last].float()
    got: dict[str, Tensor] = {}

    def grab(x: Tensor, *, hook: Any) -> None:
        got["h"] = x[rows, last]
        raise _StopForward

    with model.hooks(fwd_hooks=[("ln_final.hook_out", grab)]), contextlib.suppress(_StopForward):
        model(ids, attention_mask=mask, return_type=None, **kwargs)
    return model.unembed(got["h"][:, None, :])[:, 0].float()


def prefill_cache(model: Any, ids: Tensor, attention_mask: Tensor | None = None) -> Any:
    """The KV cache of ``ids`` without computing any logits.

    An empty Hugging Face ``DynamicCache`` is filled in place by the forward pass, which
    stops at the final norm: the unembedding (262k columns for Gemma) never runs.
    ``attention_mask`` (``[batch, pos]``, 0 at padding) is needed for left-padded rows.
    """
    from transformers import DynamicCache

    kwargs: dict[str, Any] = {} if attention_mask is None else {"attention_mask": attention_mask}
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    if hf_config is None or "ln_final.hook_out" not in model.hook_dict:
        return model(ids, return_type="logits_and_cache", **kwargs)[1]
    cache = DynamicCache(config=hf_config)

    def stop(x: Tensor, *, hook: Any) -> None:
        raise _StopForward

    with model.hooks(fwd_hooks=[("ln_final.hook_out", stop)]), contextlib.suppress(_StopForward):
        model(ids, past_key_values=cache, return_type=None, **kwargs)
    return cache


@dataclass
class EmotionTask:
    """The few-shot prefix and emotion tokens of one model's tokenizer.

    Attributes:
        prefix_ids: token ids of the few-shot prefix (BOS included if the tokenizer adds it).
        emotion_ids: first token id of `` {emotion}`` for each of the six emotions.
        prefix_text: the prefix as text.
    """

    prefix_ids: list[int]
    emotion_ids: list[int]
    prefix_text: str

    @classmethod
    def build(cls, model: Any, split: EmotionSplit) -> "EmotionTask":
        """Build the prefix from the split's few-shot examples (order seeded)."""
        shots = [(s, e) for e in EMOTIONS for s in split.fewshot[e]]
        random.Random(split.seed + 17).shuffle(shots)
        prefix = "".join(QUERY_TEMPLATE.format(scenario=s) + f" {e}.\n\n" for s, e in shots)
        tok = model.tokenizer
        ids = []
        for e in EMOTIONS:
            t = tok(" " + e, add_special_tokens=False)["input_ids"]
            ids.append(int(t[0]))
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"the six emotions' first tokens are not distinct in this tokenizer: "
                f"{dict(zip(EMOTIONS, ids))}; Token/Logit Acc would be ambiguous"
            )
        return cls(prefix_ids=list(tok(prefix)["input_ids"]), emotion_ids=ids, prefix_text=prefix)

    def query_ids(self, model: Any, scenarios: Sequence[str]) -> list[list[int]]:
        """Token ids of each query after the prefix.

        The query is tokenized together with the prefix and the prefix's tokens cut off,
        so the split point is where the tokenizer itself puts it.

        Raises:
            ValueError: the tokenizer merges across the prefix boundary.
        """
        tok = model.tokenizer
        out = []
        p = len(self.prefix_ids)
        for s in scenarios:
            full = tok(self.prefix_text + QUERY_TEMPLATE.format(scenario=s))["input_ids"]
            if list(full[:p]) != self.prefix_ids:
                raise ValueError(
                    "the tokenizer merges tokens across the few-shot prefix boundary for "
                    f"{s[:50]!r}; the prefix cache cannot be reused"
                )
            out.append(list(full[p:]))
        return out

    @torch.no_grad()
    def predict(
        self,
        model: Any,
        queries: Sequence[Sequence[int]],
        *,
        steering: Steering | None = None,
        batch_size: int = 16,
        reuse_prefix: bool = True,
    ) -> Predictions:
        """Greedy next token and the six emotion logits after prefix + each query.

        Args:
            model: the TransformerLens model.
            queries: token ids from :meth:`query_ids`.
            steering: attached for the call; added at every position (prefix included).
            batch_size: queries per forward pass.
            reuse_prefix: compute the prefix's KV cache once and reuse it (fast); ``False``
                runs prefix + query for every query (the reference the fast path must match).
        """
        dev = model_device(model)
        order = sorted(range(len(queries)), key=lambda i: -len(queries[i]))
        top = torch.empty(len(queries), dtype=torch.long)
        emo = torch.empty(len(queries), len(EMOTIONS))
        emo_idx = torch.tensor(self.emotion_ids, device=dev)
        pad = pad_token_id(model.tokenizer, model.cfg.d_vocab)
        p = len(self.prefix_ids)
        check_context(
            model,
            [p + len(q) for q in queries],
            what="query (few-shot prefix + query)",
            hint="use fewer few-shot examples (n_fewshot) or shorter scenarios",
        )
        with steering_session(steering, model) as state:
            cache = None
            if reuse_prefix:
                state.reset()
                cache = prefill_cache(model, torch.tensor([self.prefix_ids], device=dev))
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(queries[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                qmask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : len(queries[i])] = torch.tensor(list(queries[i]))
                    qmask[r, : len(queries[i])] = 1
                mask = torch.cat([torch.ones(len(idx), p, dtype=torch.long), qmask], 1).to(dev)
                ids = ids.to(dev)
                state.attention_mask = mask
                if reuse_prefix:
                    assert cache is not None
                    c = copy.deepcopy(cache)
                    c.batch_repeat_interleave(len(idx))
                    state.offset = p
                    last = torch.tensor([len(queries[i]) - 1 for i in idx], device=dev)
                    final = _logits_at(model, ids, mask, last, past_key_values=c)
                else:
                    full = torch.cat(
                        [torch.tensor([self.prefix_ids] * len(idx), device=dev), ids], 1
                    )
                    state.offset = 0
                    last = torch.tensor([p + len(queries[i]) - 1 for i in idx], device=dev)
                    final = _logits_at(model, full, mask, last)
                top[idx] = final.argmax(-1).cpu()
                emo[idx] = final[:, emo_idx].cpu()
        return Predictions(top_token=top, emotion_logits=emo)
