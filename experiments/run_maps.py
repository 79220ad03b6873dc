"""Map family × fitting text on SmolLM2-135M-Instruct → Gemma-3-270m (issue 17).

    python experiments/run_maps.py                    # every variant not yet stored
    python experiments/run_maps.py --only ridge-prompts mlp-mixed
    python experiments/run_maps.py --report-only      # rewrite maps.md from stored runs

Each variant is one emotion experiment (word-end pairs, 2,000 fitting texts, 50
evaluation negatives per emotion, α picked on validation negatives only, the 6×6 answer
matrix and specificity at the picked α) in experiments/results/maps/<variant>/; a variant
whose results.json is there with the same settings is not run again. On the two shared
cores here one variant takes roughly 45-75 minutes (the emotion runs of issue 3 did).
"""

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from contrans_tl.io import write_text
from contrans_tl.pipelines.configs import EmotionConfig

OUT = Path(__file__).parent / "results" / "maps"
SOURCE, TARGET = "smollm2-135m-instruct", "gemma-3-270m"
COMMON: dict[str, Any] = {
    "pairings": ("word_ends",),
    "alphas": (0.25, 0.5, 1.0, 2.0, 4.0),
    "n_map_texts": 2000,
    "n_negatives": 50,
    "n_validation_negatives": 20,
}
#: name -> (map method, fitting text, extra settings)
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "svd-wikisplit": ("svd", "wikisplit", {}),  # the paper's map, with specificity
    "ridge-wikisplit": ("ridge", "wikisplit", {}),
    "ridge-prompts": ("ridge", "prompts", {}),
    "ridge-mixed": ("ridge", "mixed", {}),
    "procrustes-mixed": ("procrustes", "mixed", {}),
    "whitened_procrustes-mixed": ("whitened_procrustes", "mixed", {}),
    "reduced_rank64-mixed": ("reduced_rank", "mixed", {"map_rank": 64}),
    "mlp-mixed": ("mlp", "mixed", {}),
    "anchor-mixed": ("anchor", "mixed", {}),
}


def config_of(name: str) -> EmotionConfig:
    method, texts, extra = VARIANTS[name]
    return EmotionConfig(**COMMON, map_method=method, map_texts=texts, **extra)


def stored(name: str) -> dict[str, Any] | None:
    """The variant's results.json if it was run with today's settings."""
    path = OUT / name / "results.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    wanted = json.loads(json.dumps(asdict(config_of(name))))
    return result if result.get("config") == wanted else None


def _cell(summary: dict[str, Any], method: str, key: str) -> str:
    value = summary.get(method, {}).get(key)
    return "-" if value is None else f"{value:.3f}"


def _ppl_cell(name: str) -> str:
    """Mean (max) over the six emotions of steered / unsteered perplexity, if measured."""
    path = OUT / name / "perplexity.json"
    if not path.is_file():
        return "-"
    got = json.loads(path.read_text(encoding="utf-8"))["contrans_word_ends"]
    return f"{got['mean_ratio']:.2f} ({got['max_ratio']:.2f})"


def report() -> str:
    """maps.md: one row per stored variant."""
    lines = [
        f"# Map family × fitting text: {SOURCE} → {TARGET} (issue 17)",
        "",
        "Command: `python experiments/run_maps.py`. Word-end pairs; R² on held-out fitting "
        "texts (own pairs, and at last tokens, where vectors are read); emotion scores on "
        "50 evaluation negatives per emotion at the α picked on validation negatives. "
        "ppl × base: the target's perplexity on 100 held-out WikiSplit sentences steered by "
        "each emotion's vector at that α over its unsteered perplexity, mean (max) over the "
        "six emotions (`python experiments/run_maps_perplexity.py`; - where not run).",
        "",
        "| variant | R² own | R² last | ConTrans Token Acc | Logit Acc | specificity | "
        "Self Token Acc | Self specificity | random specificity | ppl × base | map fit (s) |",
        "| --- |" + " ---: |" * 10,
    ]
    missing = []
    for name in VARIANTS:
        result = stored(name)
        if result is None:
            missing.append(name)
            continue
        info = result["maps"]["word_ends"]
        mets = list(info["metrics"].values())
        r2 = sum(m["r2"] for m in mets) / len(mets)
        r2_last = sum(m["r2_last"] for m in mets) / len(mets)
        s = result["summary"]
        lines.append(
            f"| {name} | {r2:.3f} | {r2_last:.3f} | {_cell(s, 'contrans_word_ends', 'token_acc')} "
            f"| {_cell(s, 'contrans_word_ends', 'logit_acc')} "
            f"| {_cell(s, 'contrans_word_ends', 'specificity')} | {_cell(s, 'self', 'token_acc')} "
            f"| {_cell(s, 'self', 'specificity')} | {_cell(s, 'random_word_ends', 'specificity')} "
            f"| {_ppl_cell(name)} | {info['seconds']:.0f} |"
        )
    if missing:
        lines += ["", "Not run yet: " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if not args.report_only:
        import contrans_tl as ct
        from contrans_tl.pipelines.emotion import run_emotion

        source, target = ct.load_model(SOURCE), ct.load_model(TARGET)
        for name in args.only:
            if stored(name) is None:
                command = f"python experiments/run_maps.py --only {name}"
                run_emotion(source, target, config_of(name), OUT / name, command=command)
                write_text(OUT / "maps.md", report())  # after each variant: results land
    write_text(OUT / "maps.md", report())


if __name__ == "__main__":
    main()
