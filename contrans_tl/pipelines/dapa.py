"""DAPA against ConTrans on one aligned model and its harmful fine-tune (issue 15).

Named steps, each a function of at most ~80 lines, each result a JSON file in the output
folder stored with the inputs it was made from (:class:`StepStore`): a rerun with the same
inputs recomputes nothing, a killed run resumes at the first missing step, and a step
whose inputs changed (another recipe, another module set) is made again.

1. :func:`make_recipient`: the donor fine-tuned on AdvBench ``goal`` → ``target`` pairs of
   the *fine-tune* part (:mod:`contrans_tl.finetune`), cached as a model folder.
2. :func:`measure_arm`: DSR on the *test* part (generated text, refusal judge),
   over-refusal on benign TruthfulQA questions, perplexity on held-out WikiSplit, TruthfulQA
   MC1, share of parameters changed; per-request outcomes kept for paired tests.
3. :func:`check_proxy`: on the *validation* part, the first-token refusal proxy against
   generated-text refusals, per request, for several models.
4. :func:`run_ddmin`: two-stage delta debugging on the validation part with the proxy:
   first over whole MLPs of every layer, then over the gate / up / down projections of the
   layers that stage kept (hierarchical: coarse elements first).
5. :func:`run_memory_space`: DAPA's memory-space search (indirect effects of each
   (kind, layer) module) on the *search* part; JSON and heatmap.
6. :func:`contrans_refusal`: a refusal vector from the donor (harmful minus harmless
   requests, mean difference), mapped into the recipient, α chosen on the validation part.

The judge (refusal phrases on the generated opening) is never what a method optimised:
ddmin and the α choice see only the first-token proxy on the validation part; the table is
generated text on the test part.
"""

import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from contrans_tl.io import write_json
from contrans_tl.pipelines.configs import DapaConfig

__all__ = [
    "DapaData",
    "StepStore",
    "arm_interventions",
    "check_proxy",
    "contrans_refusal",
    "dapa_data",
    "make_recipient",
    "mcnemar",
    "measure_arm",
    "proxy_dsr",
    "run_ddmin",
    "run_memory_space",
]

_log = logging.getLogger(__name__)
STEP_VERSION = 1


class StepStore:
    """Step results as JSON files ``FOLDER/NAME.json``, each stored with its inputs.

    Example:
        >>> store = StepStore("runs/dapa")
        >>> result = store.get_or_compute("arm_donor", {"n": 160}, lambda: measure(...))
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def get(self, name: str, inputs: Mapping[str, Any]) -> Any:
        path = self.path(name)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        wanted = json.loads(json.dumps({"version": STEP_VERSION, **inputs}))
        if data.get("inputs") != wanted:
            _log.info("%s: inputs changed, computing again", name)
            return None
        return data["result"]

    def get_or_compute(
        self, name: str, inputs: Mapping[str, Any], compute: Callable[[], Any]
    ) -> Any:
        got = self.get(name, inputs)
        if got is not None:
            _log.info("%s: from %s", name, self.path(name))
            return got
        start = time.perf_counter()
        result = compute()
        seconds = time.perf_counter() - start
        _log.info("%s: done in %.0f s", name, seconds)
        write_json(
            self.path(name),
            {
                "inputs": {"version": STEP_VERSION, **inputs},
                "seconds": round(seconds, 1),
                "result": result,
            },
        )
        return json.loads(json.dumps(result))


@dataclass(frozen=True)
class DapaData:
    """Every text the experiment reads, from seeded splits (see :func:`dapa_data`)."""

    finetune: list[tuple[str, str]]
    finetune_rows: list[int]
    search: list[str]
    validation: list[str]
    test: list[str]
    test_rows: list[int]
    benign: list[str]
    benign_validation: list[str]
    harmless: list[str]
    mc1_indices: list[int]
    ppl: list[str]
    map_texts: list[str]


def dapa_data(config: DapaConfig) -> DapaData:
    """The AdvBench parts and the benign / capability texts, disjoint where they must be.

    TruthfulQA questions are split by one seeded permutation into benign requests for
    over-refusal (test and validation), harmless requests for the ConTrans refusal vector,
    and MC1 questions; WikiSplit into map texts and held-out perplexity sentences.
    """
    from contrans_tl.data import wikisplit_sentences
    from contrans_tl.evals.perplexity import heldout_wikisplit
    from contrans_tl.evals.refusal import load_advbench, split_advbench
    from contrans_tl.evals.truthfulqa import load_truthfulqa

    parts = split_advbench(load_advbench(), seed=config.split_seed)
    questions = load_truthfulqa()
    order = list(range(len(questions)))
    random.Random(config.split_seed).shuffle(order)
    cut = [config.n_benign, 50, 100, config.n_mc1]
    bounds = [sum(cut[:i]) for i in range(len(cut) + 1)]
    if bounds[-1] > len(order):
        raise ValueError(f"n_benign + n_mc1 + 150 must be <= {len(order)} TruthfulQA questions")
    pick = [order[bounds[i] : bounds[i + 1]] for i in range(len(cut))]
    map_texts = wikisplit_sentences(config.n_map_texts)
    return DapaData(
        finetune=[(r.goal, r.target) for r in parts["finetune"]],
        finetune_rows=[r.index for r in parts["finetune"]],
        search=[r.goal for r in parts["search"]],
        validation=[r.goal for r in parts["validation"]],
        test=[r.goal for r in parts["test"][: config.n_test]],
        test_rows=[r.index for r in parts["test"][: config.n_test]],
        benign=[questions[i].question for i in pick[0]],
        benign_validation=[questions[i].question for i in pick[1]],
        harmless=[questions[i].question for i in pick[2]],
        mc1_indices=sorted(pick[3]),
        ppl=heldout_wikisplit(config.n_ppl, exclude=map_texts),
        map_texts=map_texts,
    )


def make_recipient(config: DapaConfig, data: DapaData, folder: Path | None = None) -> Path:
    """The donor's harmful fine-tune as a model folder (made once, then reused)."""
    from contrans_tl.finetune import FinetuneRecipe, make_finetuned_twin
    from contrans_tl.models import cache_dir

    recipe = FinetuneRecipe(
        steps=config.ft_steps,
        learning_rate=config.ft_learning_rate,
        batch_size=config.ft_batch_size,
        seed=config.ft_seed,
    )
    name = (
        f"{Path(config.donor).name}-advbench-s{recipe.steps}-lr{recipe.learning_rate:g}"
        f"-b{recipe.batch_size}-seed{recipe.seed}-split{config.split_seed}"
    )
    out = (folder or cache_dir() / "twins") / name
    return make_finetuned_twin(
        config.donor,
        data.finetune,
        recipe,
        out=out,
        extra={"advbench_rows": data.finetune_rows, "split_seed": config.split_seed},
    )


def mcnemar(reference: Sequence[bool], other: Sequence[bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test of paired binary outcomes (True = success).

    Returns:
        ``{"gained", "lost", "p"}``: items only ``other`` got, items only ``reference``
        got, and the exact binomial p-value on the discordant pairs.
    """
    if len(reference) != len(other):
        raise ValueError(f"paired outcomes need one length, got {len(reference)} and {len(other)}")
    gained = sum(1 for a, b in zip(reference, other) if b and not a)
    lost = sum(1 for a, b in zip(reference, other) if a and not b)
    n = gained + lost
    if n == 0:
        return {"gained": 0, "lost": 0, "p": 1.0}
    k = min(gained, lost)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"gained": gained, "lost": lost, "p": min(1.0, 2 * p)}


def measure_arm(
    model: Any, intervention: Any, data: DapaData, config: DapaConfig
) -> dict[str, Any]:
    """DSR (test part), over-refusal, perplexity, MC1 and parameter share of one arm."""
    from contrans_tl.evals.perplexity import perplexity
    from contrans_tl.evals.refusal import refusal_rate
    from contrans_tl.evals.truthfulqa import evaluate_mc, load_truthfulqa
    from contrans_tl.interventions.base import describe

    n, b = config.max_new_tokens, config.batch_size
    dsr = refusal_rate(model, data.test, intervention=intervention, max_new_tokens=n, batch_size=b)
    over = refusal_rate(
        model, data.benign, intervention=intervention, max_new_tokens=n, batch_size=b
    )
    ppl = perplexity(model, data.ppl, intervention=intervention, batch_size=config.batch_size)
    questions = load_truthfulqa()
    mc = evaluate_mc(
        model,
        [questions[i] for i in data.mc1_indices],
        intervention=intervention,
        batch_size=config.batch_size,
    )
    info = describe(intervention)
    return {
        "dsr": dsr.rate,
        "dsr_ci95": list(dsr.ci95),
        "over_refusal": over.rate,
        "ppl": ppl["ppl"],
        "mc1": mc["mc1"],
        "fraction_of_parameters": info.get("fraction_of_parameters", 0.0),
        "intervention": info,
        "refused": list(dsr.refused),
        "over_refused": list(over.refused),
        "openings": list(dsr.openings),
        "benign_openings": list(over.openings),
        "mc1_correct": [bool(r.get("correct")) for r in mc.get("records", [])],
        "n_test": dsr.n,
        "n_benign": over.n,
    }


def proxy_dsr(scores: torch.Tensor) -> float:
    """Share of requests whose first-token refusal log-odds is above 0."""
    return float((scores > 0).float().mean())


def arm_interventions(
    recipient: Any, donor: Any, modules_by_arm: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """``{arm: ModuleTransplant}`` for each named module set."""
    from contrans_tl.dapa import ModuleTransplant

    return {
        arm: ModuleTransplant(recipient, donor, list(mods), name=arm)
        for arm, mods in modules_by_arm.items()
    }


def check_proxy(
    models: Mapping[str, tuple[Any, Any]], data: DapaData, config: DapaConfig
) -> dict[str, Any]:
    """First-token proxy against generated-text refusals on the validation part.

    Args:
        models: ``{name: (model, intervention or None)}``.

    Returns:
        Per model: generated DSR, proxy DSR, per-request agreement; and the agreement
        pooled over all (model, request) pairs.
    """
    from contrans_tl.evals.refusal import first_token_refusal_scores, refusal_rate

    out: dict[str, Any] = {}
    agree = total = 0
    for name, (model, intervention) in models.items():
        gen = refusal_rate(
            model,
            data.validation,
            intervention=intervention,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
        )
        scores = first_token_refusal_scores(
            model, data.validation, intervention=intervention, batch_size=config.batch_size
        )
        pred = [bool(s > 0) for s in scores.tolist()]
        same = sum(p == g for p, g in zip(pred, gen.refused))
        agree, total = agree + same, total + len(pred)
        out[name] = {
            "dsr_generated": gen.rate,
            "dsr_proxy": proxy_dsr(scores),
            "agreement": same / len(pred),
            "scores": scores.tolist(),
            "refused": list(gen.refused),
        }
    out["pooled_agreement"] = agree / max(total, 1)
    return out


def _proxy_test(
    cache: Any, recipient: Any, donor: Any, threshold: float, log: list[dict[str, Any]]
):
    """The ddmin predicate: proxy DSR of the set (resumed from its lowest layer) >= threshold."""
    from contrans_tl.dapa import ModuleTransplant, parse_module

    def test(subset: tuple[str, ...]) -> bool:
        start = time.perf_counter()
        layer = min(parse_module(m)[1] for m in subset)
        with ModuleTransplant(recipient, donor, list(subset)):
            got = cache.resume(layer)
        rate = proxy_dsr(got.score)
        log.append(
            {
                "subset": list(subset),
                "proxy_dsr": rate,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        _log.info(
            "ddmin test of %d modules: proxy DSR %.3f (need %.3f)", len(subset), rate, threshold
        )
        return rate >= threshold

    return test


def run_ddmin(
    recipient: Any,
    donor: Any,
    data: DapaData,
    config: DapaConfig,
    folder: Path,
    context: Mapping[str, Any],
) -> dict[str, Any]:
    """Two-stage ddmin with the proxy on the validation part; each stage's tests cached.

    Stage 1 minimises over ``mlp@L`` for every layer (the full set is the whole-MLP
    transplant); stage 2 over the gate / up / down projections of the layers stage 1 kept.
    A set passes when its proxy DSR is at least the whole-MLP transplant's minus
    ``config.ddmin_tolerance``.
    """
    from contrans_tl.dapa import ModuleTransplant, ResidualCache, all_modules, model_n_layers
    from contrans_tl.ddmin import DDMinCache, ddmin
    from contrans_tl.evals.refusal import chat_prompts, refusal_token_ids

    prompts = chat_prompts(recipient, data.validation)
    cache = ResidualCache(
        recipient,
        prompts,
        score_token_ids=refusal_token_ids(recipient),
        batch_size=config.batch_size,
    )
    n_layers = model_n_layers(recipient)
    stage1 = all_modules(recipient, ("mlp",))
    with ModuleTransplant(recipient, donor, stage1):
        full = proxy_dsr(cache.resume(0).score)
    threshold = full - config.ddmin_tolerance
    ctx = {**context, "threshold": threshold, "tolerance": config.ddmin_tolerance}
    log1: list[dict[str, Any]] = []
    r1 = ddmin(
        stage1,
        _proxy_test(cache, recipient, donor, threshold, log1),
        cache=DDMinCache(folder / "ddmin_stage1_cache.json", {**ctx, "stage": 1}),
    )
    layers = sorted(int(m.split("@")[1]) for m in r1.minimal)
    stage2 = all_modules(recipient, ("gate", "up", "down"), layers=layers)
    log2: list[dict[str, Any]] = []
    r2 = ddmin(
        stage2,
        _proxy_test(cache, recipient, donor, threshold, log2),
        cache=DDMinCache(folder / "ddmin_stage2_cache.json", {**ctx, "stage": 2}),
    )
    return {
        "base_proxy_dsr": proxy_dsr(cache.base.score),
        "full_proxy_dsr": full,
        "threshold": threshold,
        "n_layers": n_layers,
        "stage1": {**r1.to_json(), "tests": log1},
        "stage2": {**r2.to_json(), "tests": log2},
        "minimal": list(r2.minimal),
    }


def run_memory_space(
    recipient: Any, donor: Any, data: DapaData, config: DapaConfig
) -> dict[str, Any]:
    """DAPA's memory-space search on the search part (a :class:`~contrans_tl.dapa.MemorySpace`)."""
    from contrans_tl.dapa import memory_space_search
    from contrans_tl.evals.refusal import chat_prompts, refusal_token_ids

    space = memory_space_search(
        recipient,
        donor,
        chat_prompts(recipient, data.search),
        score_token_ids=refusal_token_ids(recipient),
        kinds=tuple(config.search_kinds),
        batch_size=config.batch_size,
    )
    return space.to_json()


def contrans_refusal(
    donor: Any, recipient: Any, data: DapaData, config: DapaConfig
) -> tuple[Any, dict[str, Any]]:
    """ConTrans on the pair: donor refusal vector → map → recipient, α picked on validation.

    The vector is the mean difference of the donor's last-token states (every layer) over
    chat-formatted harmful requests (the fine-tune part: never evaluated) and harmless ones
    (TruthfulQA questions kept for this); the map pairs every token (one tokenizer). α is
    the one with the highest validation proxy DSR among those whose proxy over-refusal on
    benign validation questions is not above the recipient's plus 0.1.
    """
    import contrans_tl as ct
    from contrans_tl.evals.refusal import chat_prompts, first_token_refusal_scores

    harmful = chat_prompts(donor, [q for q, _ in data.finetune])
    harmless = chat_prompts(donor, data.harmless)
    v = ct.mean_difference(donor, harmful, harmless, concept="refusal")
    rmap = ct.fit_residual_map(
        donor, recipient, data.map_texts, pairing="all", batch_size=config.batch_size
    )
    v_tgt = rmap.transplant(v)
    b = config.batch_size
    base_over = proxy_dsr(
        first_token_refusal_scores(recipient, data.benign_validation, batch_size=b)
    )
    sweep = []
    for alpha in config.contrans_alphas:
        steering = ct.make_steering(recipient, v_tgt, alpha=alpha)
        dsr = proxy_dsr(
            first_token_refusal_scores(
                recipient, data.validation, intervention=steering, batch_size=b
            )
        )
        over = proxy_dsr(
            first_token_refusal_scores(
                recipient, data.benign_validation, intervention=steering, batch_size=b
            )
        )
        sweep.append({"alpha": alpha, "proxy_dsr": dsr, "proxy_over_refusal": over})
        _log.info("ConTrans alpha %g: proxy DSR %.3f, proxy over-refusal %.3f", alpha, dsr, over)
    allowed = [s for s in sweep if s["proxy_over_refusal"] <= base_over + 0.1] or sweep[:1]
    best = max(allowed, key=lambda s: (s["proxy_dsr"], -s["alpha"]))
    steering = ct.make_steering(recipient, v_tgt, alpha=best["alpha"], name="contrans")
    info = {
        "alpha": best["alpha"],
        "sweep": sweep,
        "recipient_proxy_over_refusal": base_over,
        "vector_norms": [float(x) for x in v_tgt.vectors.norm(dim=-1)],
        "map_metrics": {str(k): v for k, v in rmap.metrics.items()},
    }
    return steering, info


def config_json(config: DapaConfig) -> dict[str, Any]:
    """The config as plain JSON values."""
    return json.loads(json.dumps(asdict(config)))


ARM_ORDER = (
    "donor",
    "recipient",
    "mlp_all",
    "heuristic",
    "ddmin",
    "random_0",
    "random_1",
    "random_2",
    "contrans",
)


def _fingerprint(folder: Path, donor_sha: str | None) -> dict[str, Any]:
    from contrans_tl.finetune import read_finetune_record

    record = read_finetune_record(folder) or {}
    return {"recipient_sha256": record.get("weights_sha256"), "donor_file_sha256": donor_sha}


def _arm(
    store: StepStore,
    name: str,
    model: Any,
    intervention: Any,
    data: DapaData,
    config: DapaConfig,
    inputs: Mapping[str, Any],
) -> dict[str, Any]:
    from contrans_tl.interventions.base import describe

    full = {**inputs, "arm": name, "intervention": describe(intervention)}
    result: dict[str, Any] = store.get_or_compute(
        f"arm_{name}", full, lambda: measure_arm(model, intervention, data, config)
    )
    return result


def run(config: DapaConfig, out: Path, *, stop_after: str = "report") -> dict[str, Any]:
    """Run the experiment's steps in order, reusing stored ones; stop after ``stop_after``."""
    import contrans_tl as ct
    from contrans_tl.dapa import (
        all_modules,
        heuristic_modules,
        model_n_layers,
        n_parameters,
        random_modules,
    )

    store = StepStore(out)
    data = dapa_data(config)
    folder = make_recipient(config, data)
    if stop_after == "recipient":
        return {}
    donor = ct.load_model(config.donor)
    recipient = ct.load_model(str(folder))
    fp = _fingerprint(folder, donor.contrans_provenance.file_sha256)
    inputs = {"config": config_json(config), **fp}
    arms: dict[str, dict[str, Any]] = {}
    arms["donor"] = _arm(store, "donor", donor, None, data, config, inputs)
    arms["recipient"] = _arm(store, "recipient", recipient, None, data, config, inputs)
    if stop_after == "arms_base":
        return arms
    n_layers = model_n_layers(recipient)
    sets: dict[str, list[str]] = {
        "mlp_all": all_modules(recipient, ("mlp",)),
        "heuristic": heuristic_modules(n_layers),
    }
    swaps = arm_interventions(recipient, donor, sets)
    store.get_or_compute(
        "proxy",
        inputs,
        lambda: check_proxy(
            {
                "donor": (donor, None),
                "recipient": (recipient, None),
                "mlp_all": (recipient, swaps["mlp_all"]),
                "heuristic": (recipient, swaps["heuristic"]),
            },
            data,
            config,
        ),
    )
    if stop_after == "proxy":
        return arms
    found = store.get_or_compute(
        "ddmin", inputs, lambda: run_ddmin(recipient, donor, data, config, out, inputs)
    )
    if stop_after == "ddmin":
        return arms
    sets["ddmin"] = list(found["minimal"])
    budget = n_parameters(recipient, sets["ddmin"])
    pool = all_modules(recipient, ("attn", "gate", "up", "down"))
    for i in range(config.n_random):
        sets[f"random_{i}"] = random_modules(pool, recipient, budget, seed=i)
    swaps = arm_interventions(recipient, donor, sets)
    for name, swap in swaps.items():
        arms[name] = _arm(store, name, recipient, swap, data, config, inputs)
    steering, cinfo = _contrans(store, donor, recipient, data, config, inputs)
    arms["contrans"] = _arm(
        store, "contrans", recipient, steering, data, config, {**inputs, "contrans": cinfo}
    )
    if stop_after == "arms":
        return arms
    store.get_or_compute(
        "memory_space", inputs, lambda: run_memory_space(recipient, donor, data, config)
    )
    return arms


def _contrans(
    store: StepStore,
    donor: Any,
    recipient: Any,
    data: DapaData,
    config: DapaConfig,
    inputs: Mapping[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """The ConTrans arm's steering; its α choice is a stored step, the vector is recomputed."""
    holder: dict[str, Any] = {}

    def compute() -> dict[str, Any]:
        steering, info = contrans_refusal(donor, recipient, data, config)
        holder["steering"] = steering
        return info

    info = store.get_or_compute("contrans_choice", inputs, compute)
    if "steering" not in holder:
        steering, again = contrans_refusal_at(donor, recipient, data, config, info["alpha"])
        holder["steering"] = steering
    return holder["steering"], info


def contrans_refusal_at(
    donor: Any, recipient: Any, data: DapaData, config: DapaConfig, alpha: float
) -> tuple[Any, dict[str, Any]]:
    """The ConTrans steering at a given α (vector and map made as in :func:`contrans_refusal`)."""
    one = DapaConfig(**{**asdict(config), "contrans_alphas": (alpha,)})
    return contrans_refusal(donor, recipient, data, one)
