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
    >>> preds = task.predict(target, task.queries_for("fear"), intervention=None)
"""

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from contrans_tl.data import EMOTIONS
from contrans_tl.forward import Forward, padded_batches, prefill_cache, repeat_cache
from contrans_tl.interventions.base import Intervention
from contrans_tl.sites import check_context, model_device
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
    "answer_share",
    "specificity",
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


def answer_share(pred: Predictions, emotion: str, emotion_ids: Sequence[int]) -> float:
    """Share of the queries whose greedy next token is ``emotion``'s first token."""
    n = int(pred.top_token.numel())
    hits = pred.top_token == emotion_ids[EMOTIONS.index(emotion)]
    return float(hits.float().mean()) if n else float("nan")


def specificity(matrix: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Specificity of steering from the 6×6 answer matrix (issue 17).

    ``matrix[i][j]``: share answering emotion ``j`` on ``j``'s negative scenarios when
    steered with emotion ``i``'s vector (so the diagonal is Token Acc). For emotion ``j``:

        ``spec_j = M[j][j] − mean_{i≠j} M[i][j]``

    the on-target share minus how often the same answer comes from the other emotions'
    vectors. A generic push that makes every vector produce one answer (e.g. " fear")
    scores 0 on that emotion however high its Token Acc; a vector that moves only its
    own answer scores its Token Acc.

    Returns:
        ``{"per_emotion": {e: spec_e}, "mean": mean spec, "on_target": mean diagonal}``.

    Raises:
        ValueError: the matrix is not 6×6.
    """
    k = len(EMOTIONS)
    if len(matrix) != k or any(len(row) != k for row in matrix):
        raise ValueError(f"the matrix must be {k}x{k} (rows: steered emotion, columns: answer)")
    per = {
        e: float(matrix[j][j]) - sum(float(matrix[i][j]) for i in range(k) if i != j) / (k - 1)
        for j, e in enumerate(EMOTIONS)
    }
    return {
        "per_emotion": per,
        "mean": sum(per.values()) / k,
        "on_target": sum(float(matrix[j][j]) for j in range(k)) / k,
    }


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
        intervention: Intervention | None = None,
        batch_size: int = 16,
        reuse_prefix: bool = True,
    ) -> Predictions:
        """Greedy next token and the six emotion logits after prefix + each query.

        Only the last position of each query is unembedded, with the model's output
        transform (a final logit soft-cap where the model has one), so the emotion logits
        are the model's own logits there (:func:`contrans_tl.forward.logits_at`).

        Args:
            model: the TransformerLens model.
            queries: token ids from :meth:`query_ids`.
            intervention: in force for the call (e.g. a steering: added at every position,
                prefix included).
            batch_size: queries per forward pass.
            reuse_prefix: compute the prefix's KV cache once and reuse it (fast); ``False``
                runs prefix + query for every query (the reference the fast path must match).
        """
        dev = model_device(model)
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
        prefix = torch.tensor([self.prefix_ids], device=dev)
        with Forward(model, intervention) as fwd:
            cache = fwd.prefill(prefix) if reuse_prefix else None
            # queries right-padded behind the prefix: their positions follow it directly
            for batch in padded_batches(queries, batch_size, pad, side="right", device=dev):
                n = len(batch.index)
                mask = torch.cat([torch.ones(n, p, dtype=torch.long, device=dev), batch.mask], 1)
                last = torch.zeros_like(batch.mask, dtype=torch.bool)
                last[torch.arange(n), torch.tensor(batch.lengths) - 1] = True
                if cache is not None:
                    rows = torch.zeros(n, dtype=torch.long, device=dev)
                    final = fwd.logits_at(
                        batch.ids, mask, last, offset=p, past_key_values=repeat_cache(cache, rows)
                    )
                else:
                    full = torch.cat([prefix.expand(n, p), batch.ids], 1)
                    at = torch.cat([torch.zeros(n, p, dtype=torch.bool, device=dev), last], 1)
                    final = fwd.logits_at(full, mask, at)
                top[batch.index] = final.argmax(-1).cpu()
                emo[batch.index] = final[:, emo_idx].cpu()
        return Predictions(top_token=top, emotion_logits=emo)
