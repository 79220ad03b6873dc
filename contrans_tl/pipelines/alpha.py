"""How the steering strength α is picked: the rules every pipeline uses, in one place.

The shared principle:

* **α is picked on validation data only**: the items that pick α are never the items the
  picked α is reported on (emotion: validation negatives; TruthfulQA: validation
  questions from the refinement half; ToxiGen: validation hate prompts; the analysis
  sweep: its validation negatives).
* **The best validation score wins; ties go to the smaller α** (the weaker intervention
  is preferred when it does as well).
* **Fluency may bound the choice**: an α whose perplexity grows more than a given factor
  over the unsteered model's is not eligible (:func:`best_alpha_within_fluency`); what
  happens when no α is eligible is the caller's choice (none, or the smallest α).
* **A control runs at the α of the method it controls** (:func:`control_alphas`): the
  random direction with ConTrans's norms is judged at ConTrans's α, never tuned itself.

The rules in use:

* emotion (:func:`contrans_tl.pipelines.emotion.pick_alphas`): highest mean validation
  Token Acc (:func:`best_alpha`); ``random_<pairing>`` at ``contrans_<pairing>``'s α.
* analysis sweep (:func:`contrans_tl.pipelines.analysis.pick_alpha`): highest Token Acc
  among α with perplexity within ``max_ppl_ratio`` of base, else none.
* alignment, TruthfulQA (:mod:`contrans_tl.pipelines.alignment`): highest validation MC1.
* alignment, ToxiGen: lowest validation (toxic + empty) share among α whose perplexity
  is within ``ppl_limit`` of base, else the smallest α.

Example:
    >>> best_alpha({0.25: 0.30, 0.5: 0.34, 1.0: 0.34})
    0.5
    >>> best_alpha_within_fluency({0.3: 0.6, 1.5: 0.2}, {0.3: 70.0, 1.5: 400.0},
    ...                           base_fluency=65.0, max_ratio=2.0, higher_is_better=False)
    0.3
"""

import math
from collections.abc import Mapping
from typing import Literal

__all__ = ["best_alpha", "best_alpha_within_fluency", "control_alphas", "fluent_alphas"]

Fallback = Literal["smallest"] | None


def _check_scores(scores: Mapping[float, float], what: str) -> None:
    if not scores:
        raise ValueError(f"no {what} to pick an alpha from; give at least one alpha with a score")
    bad = {a: s for a, s in scores.items() if isinstance(s, float) and math.isnan(s)}
    if bad:
        raise ValueError(f"{what} must be numbers, got NaN at alpha {sorted(bad)}")


def best_alpha(scores: Mapping[float, float], *, higher_is_better: bool = True) -> float:
    """The α with the best validation score; ties go to the smaller α.

    Args:
        scores: ``{α: validation score}``.
        higher_is_better: ``True`` for accuracies (MC1, Token Acc), ``False`` for shares
            to lower (toxic share).

    Returns:
        The α (a key of ``scores``).

    Raises:
        ValueError: ``scores`` is empty or holds a NaN.

    Example:
        >>> best_alpha({1.0: 0.6, 2.0: 0.6, 4.0: 0.5})
        1.0
        >>> best_alpha({0.3: 0.4, 0.9: 0.1, 1.5: 0.1}, higher_is_better=False)
        0.9
    """
    _check_scores(scores, "scores")
    if higher_is_better:
        return max(scores, key=lambda a: (scores[a], -a))
    return min(scores, key=lambda a: (scores[a], a))


def fluent_alphas(
    fluency: Mapping[float, float | None],
    *,
    base_fluency: float | None,
    max_ratio: float,
) -> list[float]:
    """The α whose perplexity is at most ``max_ratio`` times the unsteered model's.

    An α whose perplexity was not measured (``None``), or every α when the base's was not
    (``base_fluency`` is ``None``), counts as fluent. The test is
    ``fluency[α] / base_fluency <= max_ratio``.

    Args:
        fluency: ``{α: perplexity or None}``.
        base_fluency: the unsteered model's perplexity on the same texts, or ``None``.
        max_ratio: how many times the base perplexity is allowed.

    Returns:
        The fluent α, in the order of ``fluency``.
    """
    if base_fluency is None:
        return list(fluency)
    if base_fluency == 0:  # no ratio to take: only a perplexity of 0 as well is within bounds
        return [a for a, f in fluency.items() if f is None or f <= 0]
    return [a for a, f in fluency.items() if f is None or f / base_fluency <= max_ratio]


def best_alpha_within_fluency(
    scores: Mapping[float, float],
    fluency: Mapping[float, float | None],
    *,
    base_fluency: float | None,
    max_ratio: float,
    higher_is_better: bool = True,
    fallback: Fallback = None,
) -> float | None:
    """The best-scoring α among the fluent ones (:func:`fluent_alphas`); ties: smaller α.

    Args:
        scores: ``{α: validation score}``.
        fluency: ``{α: perplexity or None}`` (an α missing here counts as not measured).
        base_fluency: the unsteered model's perplexity, or ``None`` (every α is fluent).
        max_ratio: perplexity allowed, as a multiple of ``base_fluency``.
        higher_is_better: as for :func:`best_alpha`.
        fallback: when no α is fluent: ``None`` returns ``None``; ``"smallest"`` returns
            the smallest α of ``scores`` (the gentlest push, as the ToxiGen rule).

    Returns:
        The α, or ``None`` (no fluent α and no fallback).

    Raises:
        ValueError: ``scores`` is empty or holds a NaN, or ``fallback`` is unknown.

    Example:
        >>> best_alpha_within_fluency({1.0: 0.6, 4.0: 0.9}, {1.0: 25.0, 4.0: 300.0},
        ...                           base_fluency=20.0, max_ratio=1.5)
        1.0
    """
    if fallback not in (None, "smallest"):
        raise ValueError(f"fallback must be None or 'smallest', got {fallback!r}")
    _check_scores(scores, "scores")
    ok = fluent_alphas(
        {a: fluency.get(a) for a in scores}, base_fluency=base_fluency, max_ratio=max_ratio
    )
    if not ok:
        return None if fallback is None else min(scores)
    return best_alpha({a: scores[a] for a in ok}, higher_is_better=higher_is_better)


def control_alphas(selected: Mapping[str, float], controls: Mapping[str, str]) -> dict[str, float]:
    """The α of each control: the α picked for the method it controls.

    Args:
        selected: ``{method: picked α}``.
        controls: ``{control: the method it controls}``, e.g.
            ``{"random_last": "contrans_last"}``.

    Returns:
        ``{control: α}``.

    Raises:
        KeyError: a controlled method has no picked α.

    Example:
        >>> control_alphas({"contrans_last": 0.4}, {"random_last": "contrans_last"})
        {'random_last': 0.4}
    """
    missing = sorted({m for m in controls.values() if m not in selected})
    if missing:
        raise KeyError(
            f"no alpha was picked for {missing}, the method(s) controlled by "
            f"{sorted(c for c, m in controls.items() if m in missing)}; picked: {sorted(selected)}"
        )
    return {c: selected[m] for c, m in controls.items()}
