"""Steerable-layer search for the emotion experiment (issue 17, step 3).

Steering every layer with ``α · v`` (the paper) is one choice among many: a vector may act
only where the target represents the concept, and layers whose residual norms differ by
an order of magnitude may want strengths on different scales. This step searches, on the
**validation negatives only**, over

* target layer sets (:func:`layer_candidates`): every layer, ``n_bands`` contiguous bands
  of near-equal size, and each union of two neighbouring bands;
* scales: ``"raw"`` (add ``α · v``) with the run's α grid or another, and ``"relative"`` (add
  ``α · ‖h_k‖ · v / ‖v‖``, per-layer norm calibration, :func:`contrans_tl.steering.make_steering`)
  with its own grid, since there α is a share of the stream's norm;

and picks the setting with the highest mean validation Token Acc over the six emotions
(first in the order above on ties: fewer moves from the paper's setting win). Only that
one setting is then scored on the evaluation negatives (Token Acc, Logit Acc and the
6×6 answer matrix's specificity), so the reported numbers are not selected on the data
they are reported on.
"""

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from contrans_tl.concepts import ConceptVector
from contrans_tl.data import EMOTIONS
from contrans_tl.evals.emotion import Predictions, refinement_prompts, score
from contrans_tl.pipelines.cache import ResultCache, open_cache
from contrans_tl.pipelines.configs import EmotionConfig
from contrans_tl.pipelines.emotion import (
    Queries,
    build_queries,
    emotion_vectors,
    predict_jobs,
    score_confusion,
)

log = logging.getLogger(__name__)

#: The relative-scale α grid: shares of each layer's mean residual norm.
RELATIVE_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.4)


def layer_candidates(n_layers: int, n_bands: int = 3) -> dict[str, list[int]]:
    """Target layer sets to search: ``"all"``, then ``n_bands`` contiguous bands of
    near-equal size (``torch.tensor_split`` of ``range(n_layers)``), then the union of
    each two neighbouring bands; each named by its first and last layer (``"6-11"``).

    Raises:
        ValueError: ``n_bands`` below 2 or above ``n_layers``.

    Example:
        >>> layer_candidates(7, 3)
        {'all': [0, 1, 2, 3, 4, 5, 6], '0-2': [0, 1, 2], '3-4': [3, 4], '5-6': [5, 6], \
'0-4': [0, 1, 2, 3, 4], '3-6': [3, 4, 5, 6]}
    """
    if not 2 <= n_bands <= n_layers:
        raise ValueError(f"n_bands must be between 2 and the {n_layers} layers, got {n_bands}")
    bands = [[int(k) for k in b] for b in torch.arange(n_layers).tensor_split(n_bands)]
    sets = [list(range(n_layers)), *bands]
    sets += [bands[i] + bands[i + 1] for i in range(n_bands - 1)]
    return {("all" if len(s) == n_layers else f"{s[0]}-{s[-1]}"): s for s in sets}


def _mean_scores(
    preds: Mapping[str, Predictions], queries: Queries
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    per = {e: score(preds[e], e, queries.task.emotion_ids) for e in EMOTIONS}
    means = {k: sum(s[k] for s in per.values()) / len(per) for k in ("token_acc", "logit_acc")}
    return means, {e: {k: s[k] for k in ("token_acc", "logit_acc")} for e, s in per.items()}


def search_layers(
    target: Any,
    fingerprint: Mapping[str, Any],
    queries: Queries,
    vectors: Mapping[str, ConceptVector],
    candidates: Mapping[str, Sequence[int]],
    grids: Mapping[str, Sequence[float]],
    config: EmotionConfig,
    cache: ResultCache | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every (layer set, scale, α) on the validation negatives; pick the best.

    Args:
        target, fingerprint, queries: as in :func:`contrans_tl.pipelines.emotion.run_emotion`.
        vectors: ``{emotion: ConceptVector}`` of one method.
        candidates: ``{name: target layers}`` (:func:`layer_candidates`).
        grids: ``{scale: α values}``, e.g. ``{"raw": (0.5, 1, 2), "relative": (0.1, 0.2)}``.
        config: supplies the batch size (its ``scale`` is replaced per grid).
        cache: the result cache (each setting's predictions are cached).

    Returns:
        ``(rows, best)``: one row per setting with the mean validation Token / Logit Acc,
        and the first row with the highest Token Acc.

    Raises:
        ValueError: an empty candidate set or grid.
    """
    if not candidates or not any(grids.values()):
        raise ValueError("search_layers needs at least one layer set and one α")
    rows: list[dict[str, Any]] = []
    for name, layers in candidates.items():
        for scale, alphas in grids.items():
            cfg = replace(config, scale=scale)
            for a in alphas:
                jobs = {e: (queries.validation[e], vectors[e], float(a)) for e in EMOTIONS}
                preds = predict_jobs(target, fingerprint, queries, jobs, list(layers), cfg, cache)
                means, _ = _mean_scores(preds, queries)
                rows.append({"layers": name, "scale": scale, "alpha": float(a), **means})
                log.info(
                    "validation %s %s α=%s: Token Acc %.3f", name, scale, a, means["token_acc"]
                )
    best = max(rows, key=lambda r: float(r["token_acc"]))  # max keeps the first of equals
    return rows, best


def run_layer_search(
    source: Any,
    target: Any,
    config: EmotionConfig,
    *,
    n_bands: int = 3,
    raw_alphas: Sequence[float] | None = None,
    relative_alphas: Sequence[float] = RELATIVE_ALPHAS,
    cache: Any = None,
) -> dict[str, Any]:
    """The emotion experiment's transplanted vectors (``config``'s first pairing) with the
    steered layers, scale and α searched on validation negatives, then scored once on the
    evaluation negatives at the picked setting.

    Args:
        source, target: the models of the emotion experiment.
        config: its settings (:class:`EmotionConfig`).
        n_bands: how many contiguous bands :func:`layer_candidates` cuts the target into.
        raw_alphas: the ``scale="raw"`` grid (``None``: ``config.alphas``).
        relative_alphas: the ``scale="relative"`` grid.
        cache: as in :func:`contrans_tl.pipelines.emotion.run_emotion`.

    Returns:
        ``{"method", "candidates", "validation" (one row per setting), "picked",
        "evaluation" (mean and per-emotion Token / Logit Acc), "confusion" (6×6 matrix and
        specificity), "seconds"}``; the vectors the picked setting steers with are
        ``"picked_vectors"`` (not JSON; drop it before writing).

    Raises:
        TypeError: ``config`` is not an :class:`EmotionConfig`.
        ValueError: ``n_bands`` out of range (before any model work).
    """
    if not isinstance(config, EmotionConfig):
        raise TypeError(f"config must be an EmotionConfig, got {type(config).__name__}")
    t0 = time.time()
    candidates = layer_candidates(target.cfg.n_layers, n_bands)
    store = open_cache(cache)
    split = config.split()
    prompts = {e: refinement_prompts(split, e) for e in EMOTIONS}
    fps, _, vectors = emotion_vectors(source, target, config, prompts, store, {})
    method = f"contrans_{config.pairings[0]}"
    queries = build_queries(target, split, config)
    raw = tuple(config.alphas if raw_alphas is None else raw_alphas)
    grids = {"raw": raw, "relative": tuple(relative_alphas)}
    rows, best = search_layers(
        target, fps[1], queries, vectors[method], candidates, grids, config, store
    )
    cfg = replace(config, scale=best["scale"])
    layers = candidates[best["layers"]]
    jobs = {e: (queries.evaluation[e], vectors[method][e], best["alpha"]) for e in EMOTIONS}
    means, per = _mean_scores(
        predict_jobs(target, fps[1], queries, jobs, layers, cfg, store), queries
    )
    confusion = score_confusion(
        target, fps[1], queries, vectors[method], best["alpha"], layers, cfg, store
    )
    return {
        "method": method,
        "candidates": candidates,
        "validation": rows,
        "picked": {**best, "layer_list": layers},
        "evaluation": {**means, "per_emotion": per},
        "confusion": confusion,
        "seconds": round(time.time() - t0, 1),
        "picked_vectors": vectors[method],
    }
