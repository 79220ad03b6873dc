"""Map family × fitting text, on two model pairs (issue 17).

    python experiments/run_maps.py                    # every SmolLM2 → Gemma variant not yet stored
    python experiments/run_maps.py --only ridge-prompts mlp-mixed
    python experiments/run_maps.py --pair qwen --only ridge-prompts
    python experiments/run_maps.py --report-only      # rewrite maps.md from stored runs

Each variant is one emotion experiment (α picked on validation negatives only, the 6×6
answer matrix and specificity at the picked α) in experiments/results/maps/<variant>/ for
SmolLM2-135M-Instruct → Gemma-3-270m (word-end pairs, 2,000 fitting texts, 50 evaluation
negatives per emotion) and in experiments/results/maps/qwen/<variant>/ for
Qwen2.5-Coder-0.5B → 1.5B-Instruct (one tokenizer, so every-token pairs; 1,000 fitting
texts, 20 evaluation negatives per emotion, three strengths, no 6×6 answer matrix: the
1.5B model is about six times Gemma's cost per token here, and the matrix alone would be
another 2,160 steered queries). A variant whose results.json is there with the same
settings is not run again. On the two shared cores here a Gemma variant takes 20-45
minutes.
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
#: pair -> (source, target, folder under OUT ("" = OUT itself), settings replacing COMMON's)
PAIRS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "gemma": (SOURCE, TARGET, "", {}),
    "qwen": (
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "qwen",
        {
            "pairings": ("all",),
            "alphas": (0.5, 1.0, 2.0),
            "n_map_texts": 1000,
            "n_negatives": 20,
            "n_validation_negatives": 10,
            "batch_size": 8,
            "include_specificity": False,
        },
    ),
}
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


def config_of(name: str, pair: str = "gemma") -> EmotionConfig:
    method, texts, extra = VARIANTS[name]
    settings = {**COMMON, **PAIRS[pair][3]}
    return EmotionConfig(**settings, map_method=method, map_texts=texts, **extra)


def folder(name: str, pair: str = "gemma") -> Path:
    """Where the variant's results live."""
    sub = PAIRS[pair][2]
    return (OUT / sub if sub else OUT) / name


def method_of(pair: str = "gemma") -> str:
    """The transplanted vectors' method name in the results (contrans_<pairing>)."""
    return f"contrans_{(PAIRS[pair][3].get('pairings') or COMMON['pairings'])[0]}"


def stored(name: str, pair: str = "gemma") -> dict[str, Any] | None:
    """The variant's results.json if it was run with today's settings."""
    path = folder(name, pair) / "results.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    wanted = json.loads(json.dumps(asdict(config_of(name, pair))))
    return result if result.get("config") == wanted else None


def _cell(summary: dict[str, Any], method: str, key: str) -> str:
    value = summary.get(method, {}).get(key)
    return "-" if value is None else f"{value:.3f}"


def _ppl_cell(name: str, pair: str) -> str:
    """Mean (max) over the six emotions of steered / unsteered perplexity, if measured."""
    path = folder(name, pair) / "perplexity.json"
    if not path.is_file():
        return "-"
    got = json.loads(path.read_text(encoding="utf-8"))[method_of(pair)]
    return f"{got['mean_ratio']:.2f} ({got['max_ratio']:.2f})"


def report() -> str:
    """maps.md: one row per stored (pair, variant)."""
    lines = [
        "# Map family × fitting text (issue 17)",
        "",
        "Command: `python experiments/run_maps.py [--pair qwen]`. Pairs: gemma = "
        f"{SOURCE} → {TARGET} (word-end pairs, 2,000 fitting texts, 50 evaluation negatives "
        "per emotion, α from 0.25-4); qwen = {} → {} (every-token pairs, 1,000 fitting texts, "
        "20 evaluation negatives, α from 0.5-2). R² on held-out fitting texts (own pairs, and "
        "at last tokens, where vectors are read); emotion scores on the evaluation negatives "
        "at the α picked on validation negatives. ppl × base: the target's perplexity on 100 "
        "held-out WikiSplit sentences steered by each emotion's vector at that α over its "
        "unsteered perplexity, mean (max) over the six emotions "
        "(`python experiments/run_maps_perplexity.py`; - where not run).".format(
            PAIRS["qwen"][0], PAIRS["qwen"][1]
        ),
        "",
        "layers: `all` steers every target layer with α · v at the α picked on validation "
        "(the paper); `searched` rows are `python experiments/run_layer_search.py`: the "
        "layer set (all, three bands, two unions of neighbouring bands), scale (raw, or "
        "relative: α × the layer's mean residual norm) and α picked together on the "
        "validation negatives, then scored once on the evaluation negatives.",
        "",
        "| pair | variant | layers | R² own | R² last | ConTrans Token Acc | Logit Acc | "
        "specificity | Self Token Acc | Self specificity | random specificity | ppl × base "
        "| map fit (s) |",
        "| --- | --- | --- |" + " ---: |" * 10,
    ]
    missing = []
    for pair in PAIRS:
        for name in VARIANTS:
            result = stored(name, pair)
            if result is None:
                missing.append(name if pair == "gemma" else f"{pair}/{name}")
                continue
            lines.append(_row(result, name, pair))
            search = folder(name, pair) / "layer_search.json"
            if search.is_file():
                lines.append(_search_row(json.loads(search.read_text(encoding="utf-8")), result))
    if missing:
        lines += ["", "Not run yet: " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def _r2(result: dict[str, Any]) -> str:
    info = next(iter(result["maps"].values()))
    mets = list(info["metrics"].values())
    r2 = sum(m["r2"] for m in mets) / len(mets)
    r2_last = sum(m["r2_last"] for m in mets) / len(mets)
    return f"{r2:.3f} | {r2_last:.3f}"


def _search_row(search: dict[str, Any], result: dict[str, Any]) -> str:
    """The row of a variant's layer search: its evaluation scores at the picked setting."""
    p, ev = search["picked"], search["evaluation"]
    ppl = search.get("perplexity")
    ppl_cell = "-" if ppl is None else f"{ppl['mean_ratio']:.2f} ({ppl['max_ratio']:.2f})"
    return (
        f"| {search['pair']} | {search['variant']} | searched: {p['layers']}, {p['scale']} "
        f"α {p['alpha']:g} | {_r2(result)} | {ev['token_acc']:.3f} | {ev['logit_acc']:.3f} "
        f"| {search['confusion']['mean']:.3f} | - | - | - | {ppl_cell} | - |"
    )


def _row(result: dict[str, Any], name: str, pair: str) -> str:
    info = next(iter(result["maps"].values()))
    s, ct = result["summary"], method_of(pair)
    random = "random_" + ct.removeprefix("contrans_")
    return (
        f"| {pair} | {name} | all, raw α {s[ct]['alpha']:g} | {_r2(result)} "
        f"| {_cell(s, ct, 'token_acc')} "
        f"| {_cell(s, ct, 'logit_acc')} | {_cell(s, ct, 'specificity')} "
        f"| {_cell(s, 'self', 'token_acc')} | {_cell(s, 'self', 'specificity')} "
        f"| {_cell(s, random, 'specificity')} | {_ppl_cell(name, pair)} "
        f"| {info['seconds']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--pair", choices=list(PAIRS), default="gemma")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if not args.report_only:
        import contrans_tl as ct
        from contrans_tl.pipelines.emotion import run_emotion

        source_name, target_name = PAIRS[args.pair][:2]
        source, target = ct.load_model(source_name), ct.load_model(target_name)
        for name in args.only:
            if stored(name, args.pair) is None:
                command = f"python experiments/run_maps.py --only {name}"
                if args.pair != "gemma":
                    command = f"python experiments/run_maps.py --pair {args.pair} --only {name}"
                run_emotion(
                    source,
                    target,
                    config_of(name, args.pair),
                    folder(name, args.pair),
                    command=command,
                )
                write_text(OUT / "maps.md", report())  # after each variant: results land
    write_text(OUT / "maps.md", report())


if __name__ == "__main__":
    main()
