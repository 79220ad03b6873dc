"""Run the emotion transplant experiment end to end and write results.json / results.md.

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
"""

import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import torch

from contrans_tl.concepts import ConceptVector, mean_difference
from contrans_tl.data import EMOTIONS, emotion_scenarios, wikisplit_sentences
from contrans_tl.evals.emotion import (
    EmotionTask,
    Predictions,
    negatives,
    refinement_prompts,
    score,
    split_scenarios,
)
from contrans_tl.io import write_json
from contrans_tl.maps import PAIRINGS, MapMethod, Pairing, fit_residual_map
from contrans_tl.models import model_provenance
from contrans_tl.sites import check_layers
from contrans_tl.steering import make_steering

__all__ = [
    "check_emotion_args",
    "check_minimums",
    "check_out_dir",
    "run_emotion_experiment",
    "random_like",
    "write_markdown",
]

_MAP_METHODS = get_args(MapMethod)
_N_VALIDATION = 20  # validation scenarios per emotion (the negatives that pick alpha)


def check_out_dir(out_dir: str | os.PathLike[str], *, name: str = "out_dir") -> Path:
    """Check that ``out_dir`` can be the output folder of a run, without creating it.

    Fine: an existing writable folder (empty or not: files of the same names in it are
    replaced), or a path that does not exist yet whose nearest existing ancestor is a
    writable folder. Nothing is created here; a run creates the folder when it writes.

    Args:
        out_dir: the output folder.
        name: what to call it in messages (``"--out"`` for the command line).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path` (``~`` expanded).

    Raises:
        ValueError: ``out_dir`` is empty.
        NotADirectoryError: ``out_dir`` is an existing file, or lies under one.
        PermissionError: the folder, or the nearest existing ancestor it would be created
            in, is not writable.
    """
    if not str(os.fspath(out_dir)).strip():
        raise ValueError(f"{name} is empty; give the folder to write the results into")
    path = Path(out_dir).expanduser()
    probe = path
    while True:
        try:
            exists = probe.exists() or probe.is_symlink()
        except OSError as e:
            raise PermissionError(f"{name} {str(out_dir)!r}: cannot look at {probe}: {e}") from None
        if exists or probe == probe.parent:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "is an existing file" if probe == path else f"is under {probe}, which is a file"
        raise NotADirectoryError(
            f"{name} {str(out_dir)!r} {where}, not a folder; give a folder (existing, or new "
            "under an existing folder)"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is a folder" if probe == path else f"would be created in {probe}, a folder"
        raise PermissionError(
            f"{name} {str(out_dir)!r} {where} that this user cannot write to; give a "
            "writable folder"
        )
    return path


def check_minimums(minimum: Mapping[str, tuple[object, int]]) -> None:
    """Check counts: ``{name: (value, lowest valid)}``; each must be an int ``>= lowest``.

    Raises:
        ValueError: naming the first count that is not an integer or is too small.
    """
    for name, (value, low) in minimum.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_emotion_args(
    *,
    alphas: Sequence[float] = (0.05, 0.1, 0.2, 0.4, 0.8),
    layers: Sequence[int] | None = None,
    pairings: Sequence[str] = ("last", "word_ends"),
    map_method: str = "svd",
    n_map_texts: int = 2000,
    n_refine: int = 100,
    n_fewshot: int = 3,
    n_negatives: int = 50,
    n_validation_negatives: int = 30,
    batch_size: int = 16,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
) -> list[float]:
    """Check the settings of :func:`run_emotion_experiment` that do not need the models.

    Called by :func:`run_emotion_experiment` and, before any model is loaded, by the
    ``contrans emotion`` command. Also cuts the scenario split, which must leave enough
    scenarios and negatives for every part. Layers are checked as indices only (their
    range needs the target: :func:`run_emotion_experiment` checks it first thing).

    Args:
        alphas, layers, pairings, map_method, n_map_texts, n_refine, n_fewshot,
            n_negatives, n_validation_negatives, batch_size, seed: as for
            :func:`run_emotion_experiment`.
        out_dir: the output folder, checked with :func:`check_out_dir` (``None``: not
            checked).

    Returns:
        The strengths the experiment runs, sorted and without duplicates.

    Raises:
        ValueError: a setting out of range, naming it and what would be valid.
        NotADirectoryError, PermissionError: ``out_dir`` cannot be written
            (:func:`check_out_dir`).
    """
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence):
        raise ValueError(f"alphas must be a list of strengths > 0, got {alphas!r}")
    values = []
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise ValueError(f"alphas must be real numbers, got {a!r} in {list(alphas)}")
        values.append(float(a))
    if not values:
        raise ValueError("alphas is empty; give strengths > 0, e.g. 0.05,0.1,0.2 (0 is base)")
    wrong = [a for a in values if not (math.isfinite(a) and a > 0)]
    if wrong:
        raise ValueError(
            f"alphas must be finite numbers > 0 (alpha 0 is always run as the unsteered "
            f"'base'), got {wrong}; e.g. 0.05,0.1,0.2"
        )
    if layers is not None:
        check_layers(10**6, layers)  # indices only; the range once the target is known
    if isinstance(pairings, str):
        raise ValueError(f"pairings must be a list of pairings, got the string {pairings!r}")
    bad = [p for p in pairings if p not in PAIRINGS]
    if bad or not pairings:
        raise ValueError(
            f"pairings must be a non-empty list of {list(PAIRINGS)}, got {list(pairings)}"
        )
    if len(set(pairings)) != len(pairings):
        raise ValueError(f"pairings must be distinct, got {list(pairings)}")
    if map_method not in _MAP_METHODS:
        raise ValueError(f"map_method must be one of {list(_MAP_METHODS)}, got {map_method!r}")
    minimum = {
        "n_map_texts": (n_map_texts, 10),
        "n_refine": (n_refine, 1),
        "n_fewshot": (n_fewshot, 1),
        "n_negatives": (n_negatives, 1),
        "n_validation_negatives": (n_validation_negatives, 1),
        "batch_size": (batch_size, 1),
    }
    check_minimums(minimum)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    n_texts = len(wikisplit_sentences())
    if n_map_texts > n_texts:
        raise ValueError(
            f"n_map_texts must be at most {n_texts} (the WikiSplit sentences there are), "
            f"got {n_map_texts}"
        )
    scenarios = emotion_scenarios()
    have = min(len(v) for v in scenarios.values())
    if n_fewshot + n_refine + _N_VALIDATION + 1 > have:
        raise ValueError(
            f"n_refine={n_refine} with n_fewshot={n_fewshot} leaves no evaluation scenarios: "
            f"the smallest emotion has {have} scenarios for few-shot + refinement + "
            f"{_N_VALIDATION} validation + at least 1 evaluation; n_refine can be at most "
            f"{have - n_fewshot - _N_VALIDATION - 1} with this n_fewshot"
        )
    split = split_scenarios(
        scenarios, n_fewshot=n_fewshot, n_refine=n_refine, n_validation=_N_VALIDATION, seed=seed
    )
    for part, n, name in (
        ("validation", n_validation_negatives, "n_validation_negatives"),
        ("evaluation", n_negatives, "n_negatives"),
    ):
        pool = getattr(split, part)
        have = min(sum(len(pool[o]) for o in EMOTIONS if o != e) for e in EMOTIONS)
        if n > have:
            raise ValueError(
                f"{name} must be at most {have} (the {part} scenarios of the other emotions "
                f"with n_fewshot={n_fewshot}, n_refine={n_refine}), got {n}"
            )
    if out_dir is not None:
        check_out_dir(out_dir)
    return sorted(set(values))


def random_like(vector: ConceptVector, seed: int) -> ConceptVector:
    """Random directions with the same per-layer norms as ``vector`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(vector.vectors.shape, generator=g)
    r = r / r.norm(dim=-1, keepdim=True) * vector.vectors.norm(dim=-1, keepdim=True)
    meta = dict(vector.metadata)
    meta.update({"random_seed": seed, "norms_of": vector.method})
    return vector.replace(vectors=r, method="random", metadata=meta)


def _log(msg: str) -> None:
    print(f"[emotion {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_emotion_experiment(
    source: Any,
    target: Any,
    out_dir: str | Path,
    *,
    alphas: Sequence[float] = (0.05, 0.1, 0.2, 0.4, 0.8),
    layers: Sequence[int] | None = None,
    pairings: Sequence[Pairing] = ("last", "word_ends"),
    map_method: MapMethod = "svd",
    n_map_texts: int = 2000,
    n_refine: int = 100,
    n_fewshot: int = 3,
    n_negatives: int = 50,
    n_validation_negatives: int = 30,
    batch_size: int = 16,
    seed: int = 0,
    include_self: bool = True,
    include_random: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Refine, reformulate and transplant emotion vectors; score them on the target.

    Args:
        source: the model the vectors come from (weak, aligned).
        target: the model they are added to.
        out_dir: where results.json and results.md go (created when they are written;
            checked first with :func:`check_out_dir`).
        alphas: strengths (finite, ``α > 0``); α = 0 is always run, as the ``base`` row.
        layers: target layers to steer (``None``: all of them, as in the paper).
        pairings: map pairings to compare (each gives a ``contrans_<pairing>`` method).
        map_method: ``"svd"`` (paper) or ``"ridge"``.
        n_map_texts: WikiSplit sentences for the maps (10% held out for R²).
        n_refine: refinement scenarios per emotion (and as many negatives).
        n_fewshot: solved examples per emotion in the few-shot prefix.
        n_negatives: evaluation negatives per emotion.
        n_validation_negatives: validation negatives per emotion (pick α).
        batch_size: prompts per forward pass.
        seed: seeds splits, held-out texts and random directions.
        include_self, include_random: add the ``self`` / ``random_*`` references.
        command: the command line, recorded in the results.

    Returns:
        The dict written to ``results.json``.

    Raises:
        ValueError: a setting out of range (see :func:`check_emotion_args`) or a layer
            the target does not have; raised before any work.
        NotADirectoryError, PermissionError: ``out_dir`` cannot be written
            (:func:`check_out_dir`).
    """
    t0 = time.time()
    alphas = check_emotion_args(
        alphas=alphas,
        layers=layers,
        pairings=pairings,
        map_method=map_method,
        n_map_texts=n_map_texts,
        n_refine=n_refine,
        n_fewshot=n_fewshot,
        n_negatives=n_negatives,
        n_validation_negatives=n_validation_negatives,
        batch_size=batch_size,
        seed=seed,
        out_dir=out_dir,
    )
    if layers is not None:
        layers = check_layers(target, layers)
    out = Path(out_dir).expanduser()  # created when the results are written
    split = split_scenarios(
        emotion_scenarios(),
        n_fewshot=n_fewshot,
        n_refine=n_refine,
        n_validation=_N_VALIDATION,
        seed=seed,
    )
    _log(f"split sizes {split.sizes()['evaluation']} (evaluation)")

    prompts = {e: refinement_prompts(split, e) for e in EMOTIONS}
    _log("refining source vectors")
    src_vecs = {
        e: mean_difference(source, *prompts[e], concept=e, batch_size=batch_size) for e in EMOTIONS
    }
    vectors: dict[str, dict[str, ConceptVector]] = {}
    maps_info: dict[str, Any] = {}
    texts = wikisplit_sentences(n_map_texts)
    for p in pairings:
        _log(f"fitting maps, pairing={p}, {len(texts)} texts")
        t = time.time()
        rmap = fit_residual_map(
            source,
            target,
            texts,
            pairing=p,
            method=map_method,
            batch_size=batch_size,
            seed=seed,
        )
        maps_info[p] = {
            "pairing": rmap.pairing,
            "method": rmap.method,
            "info": rmap.info,
            "seconds": round(time.time() - t, 1),
            "metrics": {str(k): v for k, v in rmap.metrics.items()},
            "layer_pairs": rmap.layer_pairs,
        }
        vectors[f"contrans_{p}"] = {e: rmap.transplant(src_vecs[e]) for e in EMOTIONS}
        if include_random:
            vectors[f"random_{p}"] = {
                e: random_like(vectors[f"contrans_{p}"][e], seed * 100 + j)
                for j, e in enumerate(EMOTIONS)
            }
    if include_self:
        _log("refining the target's own vectors (self)")
        vectors["self"] = {
            e: mean_difference(target, *prompts[e], concept=e, batch_size=batch_size)
            for e in EMOTIONS
        }

    task = EmotionTask.build(target, split)
    queries = {
        part: {e: task.query_ids(target, negatives(split, e, n, part)) for e in EMOTIONS}
        for part, n in (("validation", n_validation_negatives), ("evaluation", n_negatives))
    }
    rows: list[dict[str, Any]] = []
    _log("scoring base")
    for part in queries:
        for e in EMOTIONS:
            s = score(
                task.predict(target, queries[part][e], batch_size=batch_size), e, task.emotion_ids
            )
            rows.append({"split": part, "method": "base", "emotion": e, "alpha": 0.0, **s})

    def run_method(method: str, method_alphas: Sequence[float]) -> None:
        _log(f"scoring {method} over alphas {list(method_alphas)}")
        for a in method_alphas:
            for e in EMOTIONS:
                steering = make_steering(target, vectors[method][e], a, layers=layers)
                both = queries["validation"][e] + queries["evaluation"][e]
                pred = task.predict(target, both, steering=steering, batch_size=batch_size)
                n_val = len(queries["validation"][e])
                for part, sl in (
                    ("validation", slice(0, n_val)),
                    ("evaluation", slice(n_val, None)),
                ):
                    sub = Predictions(pred.top_token[sl], pred.emotion_logits[sl])
                    rows.append(
                        {
                            "split": part,
                            "method": method,
                            "emotion": e,
                            "alpha": a,
                            **score(sub, e, task.emotion_ids),
                        }
                    )

    def mean_acc(split_name: str, method: str, alpha: float, key: str) -> float:
        vals = [
            r[key]
            for r in rows
            if r["split"] == split_name and r["method"] == method and r["alpha"] == alpha
        ]
        return sum(vals) / len(vals)

    selected: dict[str, float] = {}
    for method in vectors:
        if method.startswith("random_"):
            continue
        run_method(method, alphas)
        best = max(alphas, key=lambda a: (mean_acc("validation", method, a, "token_acc"), -a))
        selected[method] = best
    for method in vectors:
        if method.startswith("random_"):
            selected[method] = selected["contrans_" + method[len("random_") :]]
            run_method(method, [selected[method]])
    summary = {
        "base": {
            "alpha": 0.0,
            "token_acc": mean_acc("evaluation", "base", 0.0, "token_acc"),
            "logit_acc": mean_acc("evaluation", "base", 0.0, "logit_acc"),
        }
    }
    for method, a in selected.items():
        summary[method] = {
            "alpha": a,
            "token_acc": mean_acc("evaluation", method, a, "token_acc"),
            "logit_acc": mean_acc("evaluation", method, a, "logit_acc"),
        }
    cosines = {}
    if "self" in vectors:
        for method in vectors:
            if method.startswith("contrans_"):
                cosines[method] = {
                    e: {
                        str(k): float(
                            torch.nn.functional.cosine_similarity(
                                vectors[method][e][k], vectors["self"][e][k], dim=0
                            )
                        )
                        for k in vectors[method][e].layers
                    }
                    for e in EMOTIONS
                }
    result = {
        "experiment": "emotion transplant (ConTrans paper section 4.1, Fig. 2a)",
        "command": command,
        "source": model_provenance(source).to_dict(),
        "target": model_provenance(target).to_dict(),
        "protocol": {
            "split_sizes": split.sizes(),
            "seed": seed,
            "n_negatives_per_emotion": n_negatives,
            "n_validation_negatives_per_emotion": n_validation_negatives,
            "refine_template": prompts["fear"][0][0].split("Scenario:")[0] + "Scenario: {s}...",
            "few_shot_prefix": task.prefix_text,
            "emotion_token_ids": dict(zip(EMOTIONS, task.emotion_ids)),
            "steered_layers": "all" if layers is None else list(layers),
            "positions": "all (prefix, query)",
            "alphas": alphas,
            "alpha_selection": "max mean Token Acc on validation negatives; random_* at the "
            "alpha selected for the matching contrans_*",
            "map_method": map_method,
            "n_map_texts": n_map_texts,
        },
        "maps": maps_info,
        "selected_alpha": selected,
        "summary": summary,
        "cosine_transplanted_vs_self": cosines,
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    (out / "results.md").write_text(write_markdown(result))
    _log(f"done in {result['seconds']} s -> {out}")
    return result


def write_markdown(result: dict[str, Any]) -> str:
    """Render results.json as Markdown tables."""
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    alphas = sorted({r["alpha"] for r in rows if r["alpha"] > 0})
    ev = [r for r in rows if r["split"] == "evaluation"]

    def mean(method: str, alpha: float, key: str) -> str:
        v = [r[key] for r in ev if r["method"] == method and r["alpha"] == alpha]
        return f"{sum(v) / len(v):.3f}" if v else "-"

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
        "| method | α | Token Acc | Logit Acc |",
        "| --- | ---: | ---: | ---: |",
    ]
    for m, s in result["summary"].items():
        lines.append(f"| {m} | {s['alpha']:g} | {s['token_acc']:.3f} | {s['logit_acc']:.3f} |")
    lines += [
        "",
        "## Token Acc for every α (evaluation negatives)",
        "",
        "| method | " + " | ".join(f"α={a:g}" for a in alphas) + " |",
        "| --- |" + " ---: |" * len(alphas),
    ]
    base_tok = mean("base", 0.0, "token_acc")
    lines.append("| base (α=0) | " + " | ".join([base_tok] * len(alphas)) + " |")
    for m in methods:
        if m != "base":
            lines.append(f"| {m} | " + " | ".join(mean(m, a, "token_acc") for a in alphas) + " |")
    lines += [
        "",
        "## Logit Acc for every α (evaluation negatives)",
        "",
        "| method | " + " | ".join(f"α={a:g}" for a in alphas) + " |",
        "| --- |" + " ---: |" * len(alphas),
    ]
    for m in methods:
        if m != "base":
            lines.append(f"| {m} | " + " | ".join(mean(m, a, "logit_acc") for a in alphas) + " |")
    lines += [
        "",
        "## Per emotion at the selected α (Token Acc / Logit Acc)",
        "",
        "| method | " + " | ".join(EMOTIONS) + " |",
        "| --- |" + " ---: |" * len(EMOTIONS),
    ]
    for m, s in result["summary"].items():
        cells = []
        for e in EMOTIONS:
            r = [
                x for x in ev if x["method"] == m and x["alpha"] == s["alpha"] and x["emotion"] == e
            ]
            cells.append(f"{r[0]['token_acc']:.2f} / {r[0]['logit_acc']:.2f}" if r else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Maps (held-out WikiSplit sentences)",
        "",
        "| pairing | train pairs | mean R² (own pairs) | mean R² (last token) | "
        "mean cos (last token) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for p, info in result["maps"].items():
        mets = list(info["metrics"].values())
        if mets:
            r2 = sum(m["r2"] for m in mets) / len(mets)
            r2l = sum(m["r2_last"] for m in mets) / len(mets)
            cl = sum(m["cosine_last"] for m in mets) / len(mets)
            lines.append(
                f"| {p} | {info['info']['n_pairs_train']} | {r2:.3f} | {r2l:.3f} | {cl:.3f} |"
            )
    lines.append("")
    lines.append(f"Run time: {result['seconds']} s on {result['machine']['platform']}.")
    return "\n".join(lines) + "\n"
