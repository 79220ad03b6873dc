"""One evaluation of one model, base and under an intervention (``contrans evaluate``).

Each task runs the same items twice, without and with the intervention, so the two
numbers are comparable; the intervention may be anything the evaluations take (a
steering, a weight swap, an instruction, a stack).

* ``emotion``: Token Acc / Logit Acc of one emotion on the other emotions' evaluation
  scenarios (paper §4.1; the few-shot prompt of :class:`~contrans_tl.evals.emotion.EmotionTask`).
* ``truthfulqa``: MC1 (and MC2) on the first ``n_items`` questions.
* ``toxigen``: toxic share of greedy continuations of hate prompts, judged by the
  offline MiniLM classifier.
* ``perplexity``: on held-out WikiSplit sentences.

Example:
    >>> res = evaluate("truthfulqa", model, EvaluateConfig(n_items=50), steering)
    >>> res["results"]["base"]["mc1"], res["results"][steering.name]["mc1"]
"""

import time
from collections.abc import Callable
from typing import Any

from contrans_tl.interventions.base import Intervention, describe, intervention_name
from contrans_tl.pipelines.configs import EVAL_TASKS, EvaluateConfig
from contrans_tl.provenance import model_provenance

__all__ = ["evaluate"]

Metrics = dict[str, Any]
Measure = Callable[[Intervention | None], Metrics]


def _emotion(model: Any, config: EvaluateConfig, emotion: str) -> Measure:
    from contrans_tl.data import emotion_scenarios
    from contrans_tl.evals.emotion import EmotionTask, negatives, score, split_scenarios

    split = split_scenarios(emotion_scenarios(), seed=config.seed)
    task = EmotionTask.build(model, split)
    queries = task.query_ids(model, negatives(split, emotion, config.n_items or 50))

    def measure(intervention: Intervention | None) -> Metrics:
        preds = task.predict(
            model, queries, intervention=intervention, batch_size=config.batch_size
        )
        return {**score(preds, emotion, task.emotion_ids), "n": len(queries)}

    return measure


def _truthfulqa(model: Any, config: EvaluateConfig) -> Measure:
    from contrans_tl.evals.truthfulqa import evaluate_mc, load_truthfulqa

    questions = load_truthfulqa()[: config.n_items]

    def measure(intervention: Intervention | None) -> Metrics:
        r = evaluate_mc(
            model,
            questions,
            intervention=intervention,
            instruction=config.instruction,
            mc2=config.mc2,
            batch_size=config.batch_size,
        )
        return {k: r[k] for k in ("mc1", "mc2", "n") if k in r}

    return measure


def _toxigen(model: Any, config: EvaluateConfig) -> Measure:
    from contrans_tl.evals.toxicity import load_toxicity_classifier
    from contrans_tl.evals.toxigen import evaluate_toxigen, hate_prompts

    _, prompts = hate_prompts(n_validation=0, n_evaluation=config.n_items or 20, seed=config.seed)
    classifier = load_toxicity_classifier()

    def measure(intervention: Intervention | None) -> Metrics:
        r = evaluate_toxigen(
            model,
            prompts,
            classifier,
            intervention=intervention,
            instruction=config.instruction,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
        )
        return {k: r[k] for k in ("toxic_share", "mean_score", "n", "n_empty", "by_group")}

    return measure


def _perplexity(model: Any, config: EvaluateConfig) -> Measure:
    from contrans_tl.evals.perplexity import heldout_wikisplit, perplexity

    texts = heldout_wikisplit(config.n_items or 200)

    def measure(intervention: Intervention | None) -> Metrics:
        r = perplexity(
            model,
            texts,
            intervention=intervention,
            batch_size=config.batch_size,
            max_length=config.max_length,
        )
        return {"ppl": r["ppl"], "n": len(texts)}

    return measure


def evaluate(
    task: str,
    model: Any,
    config: EvaluateConfig,
    intervention: Intervention | None = None,
    *,
    concept: str | None = None,
    include_base: bool = True,
) -> dict[str, Any]:
    """Measure ``task`` on ``model``: base, and under ``intervention`` if one is given.

    Args:
        task: one of :data:`~contrans_tl.pipelines.configs.EVAL_TASKS`.
        model: the TransformerLens model.
        config: the settings (``n_items``, ``instruction``, ...).
        intervention: e.g. a steering of ``model``; ``None``: base only.
        concept: the emotion task's emotion when ``config.emotion`` is not set (e.g.
            the vector's concept).
        include_base: also measure the model without the intervention.

    Returns:
        ``{"task", "model": provenance, "settings", "intervention": describe(),
        "results": {"base": metrics, <intervention name>: metrics}, "seconds"}``.

    Raises:
        ValueError: unknown task, no emotion for the emotion task, nothing to measure,
            or an intervention made for another model.
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {list(EVAL_TASKS)}, got {task!r}")
    if intervention is not None:
        intervention.check_model(model)
    if intervention is None and not include_base:
        raise ValueError("nothing to measure: no intervention and include_base=False")
    if task == "emotion":
        emotion = config.emotion or concept
        if emotion is None:
            raise ValueError("the emotion task needs an emotion: set config.emotion")
        measure = _emotion(model, config, emotion)
    else:
        measure = {"truthfulqa": _truthfulqa, "toxigen": _toxigen, "perplexity": _perplexity}[task](
            model, config
        )
    results: dict[str, Metrics] = {}
    seconds: dict[str, float] = {}
    runs = ([None] if include_base else []) + ([intervention] if intervention else [])
    for run in runs:
        t = time.perf_counter()
        results[intervention_name(run)] = measure(run)
        seconds[intervention_name(run)] = round(time.perf_counter() - t, 2)
    return {
        "task": task,
        "model": model_provenance(model).to_dict(),
        "settings": {k: v for k, v in vars(config).items()},
        "intervention": describe(intervention),
        "results": results,
        "seconds": seconds,
    }
