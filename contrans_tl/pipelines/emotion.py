"""The emotion transplant experiment as a pipeline (paper §4.1, Fig. 2a).

Methods compared on the target model, for every α of a grid:
    * ``base``: no steering (α = 0).
    * ``contrans_<pairing>``: the source's emotion vector carried over by a map fitted
      with that pairing (``last``: the paper's last-token pairs; ``word_ends``; ``all``).
    * ``self``: the target's own mean-difference vector (same refinement prompts).
    * ``random_<pairing>``: per layer, a random direction with the norm of the
      transplanted vector of that layer (seeded), the reference for "any push of this size".

α is picked per method on the validation negatives (mean Token Acc over emotions); each
``random_<pairing>`` is run and reported only at the α picked for ``contrans_<pairing>``.
The full α grid on the evaluation negatives is in the results for the other methods.

Every setting is a field of :class:`EmotionConfig` (validated when it is made).
:func:`run_emotion` runs named steps, each logged with its duration: refine the source
vectors, fit the maps, transplant, refine the Self vectors, build the queries, score,
pick α, write the results. Each emotion's negatives are the other emotions' positives, so
the six emotions' 1,200 refinement prompts are 600 distinct texts: each model reads them
once (:func:`contrans_tl.concepts.mean_differences`). Vectors, maps and predictions are
kept in a result cache (:mod:`contrans_tl.pipelines.cache`) under keys hashing their
inputs, so a repeated or interrupted run redoes only what it does not have.

Example:
    >>> config = EmotionConfig(alphas=(0.5, 1, 2), pairings=("word_ends",), n_map_texts=500)
    >>> result = run_emotion(source, target, config, "runs/emotion")
    >>> result["summary"]["contrans_word_ends"]["token_acc"]
"""

import contextlib
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from contrans_tl.activations import read_resid_post
from contrans_tl.concepts import ConceptVector, mean_differences
from contrans_tl.data import EMOTIONS
from contrans_tl.evals.emotion import (
    EmotionSplit,
    EmotionTask,
    Predictions,
    answer_share,
    negatives,
    refinement_prompts,
    score,
    specificity,
)
from contrans_tl.io import load_artifact, save_artifact, write_json, write_text
from contrans_tl.maps import MapMethod, Pairing, ResidualMap, fit_residual_map
from contrans_tl.models import model_provenance
from contrans_tl.pipelines.alpha import best_alpha, control_alphas
from contrans_tl.pipelines.cache import ResultCache, model_fingerprint, open_cache, tensor_digest
from contrans_tl.pipelines.configs import (
    N_VALIDATION,
    STATE_MAP_FAMILIES,
    EmotionConfig,
    check_minimums,
    check_out_dir,
)
from contrans_tl.sites import check_layers
from contrans_tl.state_maps import Family, StateMap, fit_state_map, transplant_states
from contrans_tl.steering import Scale, make_steering

__all__ = [
    "EmotionConfig",
    "N_VALIDATION",
    "STEP_VERSIONS",
    "FittedMap",
    "Queries",
    "check_minimums",
    "check_out_dir",
    "random_like",
    "run_emotion",
    "emotion_vectors",
    "refine_source_vectors",
    "fit_maps",
    "transplant_vectors",
    "refine_self_vectors",
    "build_queries",
    "score_base",
    "score_method",
    "pick_alphas",
    "summarize",
    "write_results",
    "write_markdown",
]

log = logging.getLogger(__name__)

STEP_VERSIONS = {"refine": 1, "fit_map": 1, "predict": 1}
"""Version of each cached step; raise one when that step computes something else."""

Row = dict[str, Any]
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _timed(step: str, seconds: dict[str, float]) -> Iterator[None]:
    log.info("%s ...", step)
    t = time.perf_counter()
    yield
    seconds[step] = round(time.perf_counter() - t, 2)
    log.info("%s: done in %.1f s", step, seconds[step])


def _cached(
    cache: ResultCache | None,
    step: str,
    inputs: Mapping[str, Any],
    compute: Callable[[], T],
    save: Callable[[T, Path], None],
    load: Callable[[Path], T],
) -> tuple[T, bool]:
    if cache is None:
        return compute(), False
    return cache.get_or_compute(step, STEP_VERSIONS[step], inputs, compute, save=save, load=load)


def random_like(vector: ConceptVector, seed: int) -> ConceptVector:
    """Random directions with the same per-layer norms as ``vector`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(vector.vectors.shape, generator=g)
    r = r / r.norm(dim=-1, keepdim=True) * vector.vectors.norm(dim=-1, keepdim=True)
    meta = dict(vector.metadata)
    meta.update({"random_seed": seed, "norms_of": vector.method})
    return vector.replace(vectors=r, method="random", metadata=meta)


def _save_vectors(vectors: Mapping[str, ConceptVector], folder: Path) -> None:
    for name, v in vectors.items():
        v.save(folder / name)


def _vector_loader(names: Sequence[str]) -> Callable[[Path], dict[str, ConceptVector]]:
    def load(folder: Path) -> dict[str, ConceptVector]:
        return {name: ConceptVector.load(folder / name) for name in names}

    return load


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _refine(
    model: Any,
    fingerprint: Mapping[str, Any],
    prompts: Mapping[str, tuple[list[str], list[str]]],
    config: EmotionConfig,
    cache: ResultCache | None,
) -> dict[str, ConceptVector]:
    inputs = {
        "model": dict(fingerprint),
        "prompts": {e: [list(p), list(n)] for e, (p, n) in prompts.items()},
        "layers": "all",
        "positions": "last",
        "batch_size": config.batch_size,
    }
    vectors, hit = _cached(
        cache,
        "refine",
        inputs,
        lambda: mean_differences(model, prompts, batch_size=config.batch_size),
        _save_vectors,
        _vector_loader(list(prompts)),
    )
    if hit:
        log.info("vectors of %s from the result cache", fingerprint.get("model_id"))
    return dict(vectors)


def refine_source_vectors(
    source: Any,
    fingerprint: Mapping[str, Any],
    prompts: Mapping[str, tuple[list[str], list[str]]],
    config: EmotionConfig,
    cache: ResultCache | None,
) -> dict[str, ConceptVector]:
    """Step 1 (Eq. 1): one mean-difference vector per emotion in the source model.

    The distinct refinement prompts are read once (:func:`mean_differences`).
    """
    return _refine(source, fingerprint, prompts, config, cache)


@dataclass(frozen=True)
class FittedMap:
    """A fitted map, the seconds this run spent on it, and whether it came from the cache."""

    rmap: ResidualMap | StateMap
    seconds: float
    cached: bool

    def info(self) -> dict[str, Any]:
        """The map's entry in ``results.json["maps"]``."""
        return {
            "pairing": self.rmap.pairing,
            "method": self.rmap.method,
            "info": self.rmap.info,
            "seconds": self.seconds,
            "cached": self.cached,
            "metrics": {str(k): v for k, v in self.rmap.metrics.items()},
            "layer_pairs": self.rmap.layer_pairs,
        }


def fit_maps(
    source: Any,
    target: Any,
    fingerprints: tuple[Mapping[str, Any], Mapping[str, Any]],
    config: EmotionConfig,
    cache: ResultCache | None,
) -> dict[str, FittedMap]:
    """Step 2 (Eq. 2): one residual map per pairing, on ``n_map_texts`` texts of the kind
    ``config.map_texts`` (WikiSplit by default), none containing an evaluation or
    validation scenario."""
    texts = map_fitting_texts(config)
    out = {}
    for p in config.pairings:
        log.info("fitting maps, pairing=%s, %d texts", p, len(texts))
        t = time.perf_counter()
        inputs = {
            "source": dict(fingerprints[0]),
            "target": dict(fingerprints[1]),
            "texts": texts,
            "pairing": p,
            "method": config.map_method,
            **({} if config.map_rank is None else {"rank": config.map_rank}),
            "batch_size": config.batch_size,
            "seed": config.seed,
            "fit_defaults": {"ridge": 1e-3, "heldout_fraction": 0.1, "max_length": 128},
        }
        fit: Callable[[], ResidualMap | StateMap]
        if config.map_method in STATE_MAP_FAMILIES:
            fit = functools.partial(
                fit_state_map,
                source,
                target,
                texts,
                family=cast(Family, config.map_method),
                pairing=cast(Pairing, p),
                batch_size=config.batch_size,
                seed=config.seed,
            )
        else:
            fit = functools.partial(
                fit_residual_map,
                source,
                target,
                texts,
                pairing=cast(Pairing, p),
                method=cast(MapMethod, config.map_method),
                rank=config.map_rank,
                batch_size=config.batch_size,
                seed=config.seed,
            )
        rmap, hit = _cached(cache, "fit_map", inputs, fit, _save_map, _load_map)
        if hit:
            log.info("map (pairing=%s) from the result cache", p)
        out[p] = FittedMap(rmap, round(time.perf_counter() - t, 1), hit)
    return out


def map_fitting_texts(config: EmotionConfig) -> list[str]:
    """The texts :func:`fit_maps` fits on: ``config.map_texts`` with every validation and
    evaluation scenario of the split excluded."""
    from contrans_tl.map_texts import fitting_texts

    split = config.split()
    held = [s for part in (split.validation, split.evaluation) for e in EMOTIONS for s in part[e]]
    return fitting_texts(config.map_texts, config.n_map_texts, seed=config.seed, exclude=held)


def _save_map(rmap: ResidualMap | StateMap, folder: Path) -> None:
    rmap.save(folder / "map")


def _load_map(folder: Path) -> ResidualMap | StateMap:
    kind = json.loads((folder / "map.json").read_text(encoding="utf-8")).get("kind")
    return (
        StateMap.load(folder / "map") if kind == "state_map" else ResidualMap.load(folder / "map")
    )


def refinement_states(
    source: Any,
    prompts: Mapping[str, tuple[list[str], list[str]]],
    config: EmotionConfig,
) -> dict[str, tuple[dict[int, Tensor], dict[int, Tensor]]]:
    """Step 3a, for maps that are not linear: each emotion's positive and negative
    last-token states in the source, every layer (the distinct prompts read once)."""
    distinct = list(dict.fromkeys(t for pos, neg in prompts.values() for t in [*pos, *neg]))
    reads = read_resid_post(source, distinct, positions="last", batch_size=config.batch_size)
    row = {t: i for i, t in enumerate(distinct)}  # one last-token row per text

    def rows(texts: list[str]) -> dict[int, Tensor]:
        idx = torch.tensor([row[t] for t in texts])
        return {k: v[idx] for k, v in reads.states.items()}

    return {e: (rows(pos), rows(neg)) for e, (pos, neg) in prompts.items()}


def transplant_vectors(
    maps: Mapping[str, FittedMap],
    source_vectors: Mapping[str, ConceptVector],
    config: EmotionConfig,
    source_states: Mapping[str, tuple[dict[int, Tensor], dict[int, Tensor]]] | None = None,
) -> dict[str, dict[str, ConceptVector]]:
    """Step 3: ``contrans_<pairing>`` vectors (``v F``; for a map that is not linear, the
    mean difference of the mapped ``source_states``) and, if asked, random controls."""
    vectors: dict[str, dict[str, ConceptVector]] = {}
    for p, fitted in maps.items():
        rmap = fitted.rmap
        if isinstance(rmap, StateMap):
            if source_states is None:
                raise ValueError(f"a {rmap.method!r} map needs the refinement states")
            moved = {e: transplant_states(rmap, *source_states[e], concept=e) for e in EMOTIONS}
        else:
            moved = {e: rmap.transplant(source_vectors[e]) for e in EMOTIONS}
        vectors[f"contrans_{p}"] = moved
        if config.include_random:
            vectors[f"random_{p}"] = {
                e: random_like(moved[e], config.seed * 100 + j) for j, e in enumerate(EMOTIONS)
            }
    return vectors


def refine_self_vectors(
    target: Any,
    fingerprint: Mapping[str, Any],
    prompts: Mapping[str, tuple[list[str], list[str]]],
    config: EmotionConfig,
    cache: ResultCache | None,
) -> dict[str, ConceptVector]:
    """Step 4: the target's own vectors (Self), from the same refinement prompts."""
    return _refine(target, fingerprint, prompts, config, cache)


@dataclass(frozen=True)
class Queries:
    """The target's few-shot task and the token ids of each emotion's negatives."""

    task: EmotionTask
    validation: dict[str, list[list[int]]]
    evaluation: dict[str, list[list[int]]]

    def part(self, name: str) -> dict[str, list[list[int]]]:
        """The queries of ``"validation"`` or ``"evaluation"``."""
        return self.validation if name == "validation" else self.evaluation


def build_queries(target: Any, split: EmotionSplit, config: EmotionConfig) -> Queries:
    """Step 5: the few-shot prefix, the emotion tokens, and the negatives as token ids."""
    task = EmotionTask.build(target, split)
    parts = {}
    for part, n in (
        ("validation", config.n_validation_negatives),
        ("evaluation", config.n_negatives),
    ):
        parts[part] = {e: task.query_ids(target, negatives(split, e, n, part)) for e in EMOTIONS}
    return Queries(task, parts["validation"], parts["evaluation"])


def _save_predictions(preds: Mapping[str, Predictions], folder: Path) -> None:
    tensors = {}
    for name, p in preds.items():
        tensors[f"{name}.top_token"] = p.top_token
        tensors[f"{name}.emotion_logits"] = p.emotion_logits
    save_artifact(
        folder / "predictions", tensors, {"kind": "emotion_predictions", "names": list(preds)}
    )


def _load_predictions(folder: Path) -> dict[str, Predictions]:
    tensors, meta = load_artifact(folder / "predictions", kind="emotion_predictions")
    return {
        n: Predictions(tensors[f"{n}.top_token"], tensors[f"{n}.emotion_logits"])
        for n in meta["names"]
    }


def predict_jobs(
    target: Any,
    fingerprint: Mapping[str, Any],
    queries: Queries,
    jobs: Mapping[str, tuple[list[list[int]], ConceptVector | None, float]],
    layers: list[int] | None,
    config: EmotionConfig,
    cache: ResultCache | None,
) -> dict[str, Predictions]:
    """Predictions of named jobs ``{name: (query ids, vector or None, alpha)}``, cached."""
    task = queries.task
    inputs = {
        "target": dict(fingerprint),
        "prefix_ids": task.prefix_ids,
        "emotion_ids": task.emotion_ids,
        "layers": layers,
        **({} if config.scale == "raw" else {"scale": config.scale}),
        "batch_size": config.batch_size,
        "jobs": {
            name: {
                "queries": q,
                "vector": None if v is None else [tensor_digest(v.vectors), list(v.layers)],
                "alpha": a,
            }
            for name, (q, v, a) in jobs.items()
        },
    }

    def compute() -> dict[str, Predictions]:
        out = {}
        for name, (q, v, a) in tqdm(jobs.items(), desc="predicting", leave=False):
            steering = (
                None
                if v is None
                else make_steering(target, v, a, layers=layers, scale=cast(Scale, config.scale))
            )
            out[name] = task.predict(target, q, intervention=steering, batch_size=config.batch_size)
        return out

    preds, hit = _cached(cache, "predict", inputs, compute, _save_predictions, _load_predictions)
    if hit:
        log.info("predictions of %s from the result cache", ", ".join(jobs))
    return dict(preds)


def score_base(
    target: Any,
    fingerprint: Mapping[str, Any],
    queries: Queries,
    config: EmotionConfig,
    cache: ResultCache | None,
) -> list[Row]:
    """Step 6a: the unsteered target on validation and evaluation negatives (α = 0).

    Unsteered, a query's prediction does not depend on the emotion it is scored against,
    and each emotion's negatives are scenarios of the other five: the distinct queries
    (a fifth of them) are run once, in one pass after one prefill of the prefix.
    """
    parts = ("validation", "evaluation")
    distinct = list(
        dict.fromkeys(tuple(q) for part in parts for e in EMOTIONS for q in queries.part(part)[e])
    )
    jobs = {"base": ([list(q) for q in distinct], None, 0.0)}
    pred = predict_jobs(target, fingerprint, queries, jobs, None, config, cache)["base"]
    where = {q: i for i, q in enumerate(distinct)}
    rows = []
    for part in parts:
        for e in EMOTIONS:
            idx = torch.tensor([where[tuple(q)] for q in queries.part(part)[e]], dtype=torch.long)
            sub = Predictions(pred.top_token[idx], pred.emotion_logits[idx])
            s = score(sub, e, queries.task.emotion_ids)
            rows.append({"split": part, "method": "base", "emotion": e, "alpha": 0.0, **s})
    return rows


def score_method(
    target: Any,
    fingerprint: Mapping[str, Any],
    queries: Queries,
    method: str,
    vectors: Mapping[str, ConceptVector],
    alphas: Sequence[float],
    layers: list[int] | None,
    config: EmotionConfig,
    cache: ResultCache | None,
) -> list[Row]:
    """Step 6b: one steering method at each α, on validation + evaluation negatives."""
    log.info("scoring %s over alphas %s", method, list(alphas))
    rows = []
    for a in alphas:
        jobs = {e: (queries.validation[e] + queries.evaluation[e], vectors[e], a) for e in EMOTIONS}
        preds = predict_jobs(target, fingerprint, queries, jobs, layers, config, cache)
        for e in EMOTIONS:
            n_val = len(queries.validation[e])
            for part, sl in (("validation", slice(0, n_val)), ("evaluation", slice(n_val, None))):
                sub = Predictions(preds[e].top_token[sl], preds[e].emotion_logits[sl])
                s = score(sub, e, queries.task.emotion_ids)
                rows.append({"split": part, "method": method, "emotion": e, "alpha": a, **s})
    return rows


def score_confusion(
    target: Any,
    fingerprint: Mapping[str, Any],
    queries: Queries,
    vectors: Mapping[str, ConceptVector],
    alpha: float,
    layers: list[int] | None,
    config: EmotionConfig,
    cache: ResultCache | None,
) -> dict[str, Any]:
    """Step 7b: the 6×6 answer matrix of one method at its α, and its specificity.

    ``matrix[i][j]``: share answering emotion ``j`` on ``j``'s evaluation negatives when
    steered with emotion ``i``'s vector (the diagonal is Token Acc); the score is
    :func:`contrans_tl.evals.emotion.specificity`.
    """
    jobs = {
        f"{ei}->{ej}": (queries.evaluation[ej], vectors[ei], alpha)
        for ei in EMOTIONS
        for ej in EMOTIONS
    }
    preds = predict_jobs(target, fingerprint, queries, jobs, layers, config, cache)
    ids = queries.task.emotion_ids
    matrix = [[answer_share(preds[f"{ei}->{ej}"], ej, ids) for ej in EMOTIONS] for ei in EMOTIONS]
    return {"alpha": alpha, "matrix": matrix, **specificity(matrix)}


def score_specificity(
    target: Any,
    fingerprint: Mapping[str, Any],
    queries: Queries,
    vectors: Mapping[str, Mapping[str, ConceptVector]],
    selected: Mapping[str, float],
    layers: list[int] | None,
    config: EmotionConfig,
    cache: ResultCache | None,
) -> dict[str, Any]:
    """:func:`score_confusion` of every method at its picked α."""
    return {
        m: score_confusion(target, fingerprint, queries, v, selected[m], layers, config, cache)
        for m, v in vectors.items()
    }


def _mean(rows: Sequence[Row], split: str, method: str, alpha: float, key: str) -> float:
    vals = [
        r[key]
        for r in rows
        if r["split"] == split and r["method"] == method and r["alpha"] == alpha
    ]
    return sum(vals) / len(vals)


def pick_alphas(
    rows: Sequence[Row], methods: Sequence[str], alphas: Sequence[float]
) -> dict[str, float]:
    """Step 7: per method, the α of the highest mean validation Token Acc (ties: smallest α).

    A ``random_<pairing>`` method gets the α picked for ``contrans_<pairing>``. The rules
    are :func:`contrans_tl.pipelines.alpha.best_alpha` and
    :func:`~contrans_tl.pipelines.alpha.control_alphas`.
    """
    selected = {
        m: best_alpha({a: _mean(rows, "validation", m, a, "token_acc") for a in alphas})
        for m in methods
        if not m.startswith("random_")
    }
    controls = {m: "contrans_" + m[len("random_") :] for m in methods if m.startswith("random_")}
    selected.update(control_alphas(selected, controls))
    return selected


def summarize(
    rows: Sequence[Row],
    selected: Mapping[str, float],
    vectors: Mapping[str, Mapping[str, ConceptVector]],
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Mean Token/Logit Acc on the evaluation negatives at each method's α, and the cosine
    of each transplanted vector with the Self vector of the same emotion, per layer."""
    summary = {}
    for m, a in {"base": 0.0, **selected}.items():
        summary[m] = {
            "alpha": a,
            "token_acc": _mean(rows, "evaluation", m, a, "token_acc"),
            "logit_acc": _mean(rows, "evaluation", m, a, "logit_acc"),
        }
    cosines: dict[str, Any] = {}
    if "self" in vectors:
        for m in vectors:
            if m.startswith("contrans_"):
                cosines[m] = {
                    e: {
                        str(k): float(
                            torch.nn.functional.cosine_similarity(
                                vectors[m][e][k], vectors["self"][e][k], dim=0
                            )
                        )
                        for k in vectors[m][e].layers
                    }
                    for e in EMOTIONS
                }
    return summary, cosines


def write_results(out: Path, result: Mapping[str, Any]) -> None:
    """Step 8: ``results.json`` and ``results.md`` in ``out`` (created; each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    write_text(out / "results.md", write_markdown(result))


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _protocol(
    config: EmotionConfig,
    layers: list[int] | None,
    split: EmotionSplit,
    prompts: Mapping[str, tuple[list[str], list[str]]],
    task: EmotionTask,
) -> dict[str, Any]:
    return {
        "split_sizes": split.sizes(),
        "seed": config.seed,
        "n_negatives_per_emotion": config.n_negatives,
        "n_validation_negatives_per_emotion": config.n_validation_negatives,
        "refine_template": prompts["fear"][0][0].split("Scenario:")[0] + "Scenario: {s}...",
        "few_shot_prefix": task.prefix_text,
        "emotion_token_ids": dict(zip(EMOTIONS, task.emotion_ids)),
        "steered_layers": "all" if layers is None else list(layers),
        "positions": "all (prefix, query)",
        "alphas": list(config.alphas),
        "scale": config.scale,
        "alpha_selection": "max mean Token Acc on validation negatives; random_* at the "
        "alpha selected for the matching contrans_*",
        "map_method": config.map_method,
        "n_map_texts": config.n_map_texts,
        "map_texts": config.map_texts,
    }


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def emotion_vectors(
    source: Any,
    target: Any,
    config: EmotionConfig,
    prompts: Mapping[str, tuple[list[str], list[str]]],
    store: ResultCache | None,
    steps: dict[str, float],
) -> tuple[tuple[dict[str, Any], dict[str, Any]], dict[str, FittedMap], dict[str, Any]]:
    """Steps 1-3 of :func:`run_emotion`, and the Self reference: the models' fingerprints,
    the source vectors, the maps, the transplanted vectors (and, with
    ``config.include_self``, the target's own under ``"self"``), each step timed into
    ``steps`` and served from ``store`` where it holds them.

    Returns:
        ``(fingerprints, maps, {method: {emotion: ConceptVector}})``.
    """
    with _timed("fingerprint models", steps):
        fps = (model_fingerprint(source), model_fingerprint(target))
    with _timed("refine source vectors", steps):
        src_vecs = refine_source_vectors(source, fps[0], prompts, config, store)
    with _timed("fit maps", steps):
        maps = fit_maps(source, target, fps, config, store)
    with _timed("transplant", steps):
        nonlinear = config.map_method in STATE_MAP_FAMILIES
        states = refinement_states(source, prompts, config) if nonlinear else None
        vectors: dict[str, Any] = transplant_vectors(maps, src_vecs, config, states)
    if config.include_self:
        with _timed("refine self vectors", steps):
            vectors["self"] = refine_self_vectors(target, fps[1], prompts, config, store)
    return fps, maps, vectors


def run_emotion(
    source: Any,
    target: Any,
    config: EmotionConfig,
    out_dir: str | os.PathLike[str],
    *,
    command: str | None = None,
    cache: Any = None,
) -> dict[str, Any]:
    """Refine, reformulate and transplant emotion vectors; score them on the target.

    Args:
        source: the model the vectors come from (weak, aligned).
        target: the model they are added to.
        config: the settings (:class:`EmotionConfig`).
        out_dir: where results.json and results.md go (created when they are written;
            checked first with :func:`check_out_dir`).
        command: the command line, recorded in the results.
        cache: the result cache: ``None`` (default) or ``True``: ``cache_dir()/results``;
            ``False``: off; a folder; or a :class:`~contrans_tl.pipelines.cache.ResultCache`.

    Returns:
        The dict written to ``results.json`` (its ``step_seconds``: each step's duration).

    Raises:
        TypeError: ``config`` is not an :class:`EmotionConfig`, or ``cache`` is invalid.
        ValueError: a layer the target does not have; raised before any work.
        NotADirectoryError, PermissionError: ``out_dir`` cannot be written.
    """
    t0 = time.time()
    if not isinstance(config, EmotionConfig):
        raise TypeError(f"config must be an EmotionConfig, got {type(config).__name__}")
    out = check_out_dir(out_dir)
    layers = None if config.layers is None else check_layers(target, config.layers)
    store = open_cache(cache)
    split = config.split()
    log.info("split sizes %s (evaluation)", split.sizes()["evaluation"])
    prompts = {e: refinement_prompts(split, e) for e in EMOTIONS}
    steps: dict[str, float] = {}
    fps, maps, vectors = emotion_vectors(source, target, config, prompts, store, steps)
    with _timed("build queries", steps):
        queries = build_queries(target, split, config)
    with _timed("score", steps):
        rows = score_base(target, fps[1], queries, config, store)
        for m in [m for m in vectors if not m.startswith("random_")]:
            rows += score_method(
                target, fps[1], queries, m, vectors[m], config.alphas, layers, config, store
            )
    with _timed("pick alpha", steps):
        selected = pick_alphas(rows, list(vectors), config.alphas)
    for m in [m for m in vectors if m.startswith("random_")]:
        with _timed(f"score {m} at the picked alpha", steps):
            rows += score_method(
                target, fps[1], queries, m, vectors[m], [selected[m]], layers, config, store
            )
    summary, cosines = summarize(rows, selected, vectors)
    confusion: dict[str, Any] = {}
    if config.include_specificity:
        with _timed("specificity", steps):
            confusion = score_specificity(
                target, fps[1], queries, vectors, selected, layers, config, store
            )
        for m, c in confusion.items():
            summary[m]["specificity"] = c["mean"]
    result = {
        "experiment": "emotion transplant (ConTrans paper section 4.1, Fig. 2a)",
        "command": command,
        "source": model_provenance(source).to_dict(),
        "target": model_provenance(target).to_dict(),
        "config": asdict(config),
        "protocol": _protocol(config, layers, split, prompts, queries.task),
        "maps": {p: m.info() for p, m in maps.items()},
        "selected_alpha": selected,
        "summary": summary,
        "cosine_transplanted_vs_self": cosines,
        "confusion": confusion,
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
        "step_seconds": steps,
        "cache": None if store is None else str(store.folder),
        "machine": _machine(),
    }
    write_results(out, result)
    log.info("done in %s s -> %s", result["seconds"], out / "results.md")
    return result


def write_markdown(result: Mapping[str, Any]) -> str:
    """Render results.json as Markdown tables."""
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    alphas = sorted({r["alpha"] for r in rows if r["alpha"] > 0})
    ev = [r for r in rows if r["split"] == "evaluation"]

    def mean(method: str, alpha: float, key: str) -> str:
        v = [r[key] for r in ev if r["method"] == method and r["alpha"] == alpha]
        return f"{sum(v) / len(v):.3f}" if v else "-"

    def alpha_table(title: str, key: str, with_base: bool) -> list[str]:
        lines = [
            "",
            f"## {title} for every α (evaluation negatives)",
            "",
            "| method | " + " | ".join(f"α={a:g}" for a in alphas) + " |",
            "| --- |" + " ---: |" * len(alphas),
        ]
        if with_base:
            lines.append(
                "| base (α=0) | " + " | ".join([mean("base", 0.0, key)] * len(alphas)) + " |"
            )
        for m in methods:
            if m != "base":
                lines.append(f"| {m} | " + " | ".join(mean(m, a, key) for a in alphas) + " |")
        return lines

    n_neg = result["protocol"]["n_negatives_per_emotion"]
    lines = [
        f"# Emotion transplant: {result['source']['model_id']} → {result['target']['model_id']}",
        "",
        f"Command: `{result.get('command')}`",
        "",
        f"Negatives: {n_neg} evaluation scenarios per emotion (other emotions' scenarios, "
        "never used for refinement, few-shot or α selection). Token Acc: greedy next token is "
        "the emotion; Logit Acc: the emotion wins among the six. Means over the six emotions.",
        "",
        "## Summary (α picked on validation negatives)",
        "",
        "| method | α | Token Acc | Logit Acc | specificity |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for m, s in result["summary"].items():
        spec = f"{s['specificity']:.3f}" if "specificity" in s else "-"
        lines.append(
            f"| {m} | {s['alpha']:g} | {s['token_acc']:.3f} | {s['logit_acc']:.3f} | {spec} |"
        )
    lines += alpha_table("Token Acc", "token_acc", True)
    lines += alpha_table("Logit Acc", "logit_acc", False)
    lines += _per_emotion_table(result["summary"], ev)
    lines += _confusion_tables(result.get("confusion", {}))
    lines += _maps_table(result["maps"])
    lines.append("")
    lines.append(f"Run time: {result['seconds']} s on {result['machine']['platform']}.")
    return "\n".join(lines) + "\n"


def _per_emotion_table(summary: Mapping[str, Any], ev: Sequence[Row]) -> list[str]:
    lines = [
        "",
        "## Per emotion at the selected α (Token Acc / Logit Acc)",
        "",
        "| method | " + " | ".join(EMOTIONS) + " |",
        "| --- |" + " ---: |" * len(EMOTIONS),
    ]
    for m, s in summary.items():
        cells = []
        for e in EMOTIONS:
            r = [
                x for x in ev if x["method"] == m and x["alpha"] == s["alpha"] and x["emotion"] == e
            ]
            cells.append(f"{r[0]['token_acc']:.2f} / {r[0]['logit_acc']:.2f}" if r else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _confusion_tables(confusion: Mapping[str, Any]) -> list[str]:
    """One 6×6 answer matrix per method (rows: the steering vector's emotion)."""
    if not confusion:
        return []
    lines = [
        "",
        "## Answers under each emotion's vector (specificity)",
        "",
        "Row: the emotion whose vector steers; column: share answering that emotion on its "
        "evaluation negatives (the diagonal is Token Acc). Specificity of an emotion: its "
        "diagonal cell minus the mean of the other rows in its column (a push that makes "
        "every vector give the same answer scores 0 there).",
    ]
    for m, c in confusion.items():
        lines += [
            "",
            f"**{m}** (α={c['alpha']:g}; specificity {c['mean']:.3f})",
            "",
            "| vector | " + " | ".join(EMOTIONS) + " | specificity |",
            "| --- |" + " ---: |" * (len(EMOTIONS) + 1),
        ]
        for e, row in zip(EMOTIONS, c["matrix"]):
            cells = " | ".join(f"{x:.2f}" for x in row)
            lines.append(f"| {e} | {cells} | {c['per_emotion'][e]:.2f} |")
    return lines


def _maps_table(maps: Mapping[str, Any]) -> list[str]:
    lines = [
        "",
        "## Maps (held-out WikiSplit sentences)",
        "",
        "| pairing | train pairs | mean R² (own pairs) | mean R² (last token) | "
        "mean cos (last token) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for p, info in maps.items():
        mets = list(info["metrics"].values())
        if mets:
            r2 = sum(m["r2"] for m in mets) / len(mets)
            r2l = sum(m["r2_last"] for m in mets) / len(mets)
            cl = sum(m["cosine_last"] for m in mets) / len(mets)
            lines.append(
                f"| {p} | {info['info']['n_pairs_train']} | {r2:.3f} | {r2l:.3f} | {cl:.3f} |"
            )
    lines += [
        "",
        "R² is 1 − (squared error of the mapped states) / (variance of the target's states "
        "about their mean): 0 means no better than always predicting the mean state. Cosine "
        "compares mapped and true states as raw vectors; residual states share a large "
        "common direction, so a cosine near 1 can sit beside an R² near 0 (the map gets the "
        "shared part right and the differences between texts wrong). Last-token R² is the "
        "one that matters here: vectors are read and added at last tokens.",
    ]
    return lines
