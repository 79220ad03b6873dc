"""Steerable-layer search on a stored maps variant (issue 17, step 3).

    python experiments/run_layer_search.py --only ridge-prompts
    python experiments/run_layer_search.py --pair qwen --only ridge-prompts

For a variant experiments/run_maps.py has stored, its transplanted vectors are made again
(served from the result cache when the run's cache is still there), and
:func:`contrans_tl.pipelines.layer_search.run_layer_search` picks the steered target
layers (every layer, three contiguous bands, two unions of neighbouring bands), the scale
(raw α · v with α in RAW_ALPHAS, or relative: α times each layer's mean residual norm, α
in 0.1-0.4) and α on the validation negatives only (36 settings: on the two shared cores
here each costs about a minute on Gemma, so the raw grid is the run's α ≥ 1, where the
stored runs picked theirs); the picked setting alone is then
scored on the evaluation negatives (Token / Logit Acc, the 6×6 answer matrix's
specificity) and, with ``--perplexity``, by the target's perplexity on 100 held-out
WikiSplit sentences under each emotion's vector. Writes layer_search.json next to the
variant's results.json, then maps.md.
"""

import argparse
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from contrans_tl.io import write_json, write_text

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("run_maps", HERE / "run_maps.py")
assert _spec is not None and _spec.loader is not None
run_maps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_maps)
N_TEXTS = 100
RAW_ALPHAS = (1.0, 2.0, 4.0)


def measure(source: Any, target: Any, name: str, pair: str, with_ppl: bool) -> dict[str, Any]:
    """layer_search.json of one stored variant."""
    from contrans_tl.evals.perplexity import heldout_wikisplit, perplexity
    from contrans_tl.pipelines.emotion import map_fitting_texts
    from contrans_tl.pipelines.layer_search import run_layer_search
    from contrans_tl.steering import make_steering

    config = run_maps.config_of(name, pair)
    if run_maps.stored(name, pair) is None:
        raise ValueError(f"{pair}/{name}: no stored run with today's settings; run run_maps.py")
    got = run_layer_search(source, target, config, raw_alphas=RAW_ALPHAS)
    vectors = got.pop("picked_vectors")
    flag = "" if pair == "gemma" else f" --pair {pair}"
    out: dict[str, Any] = {
        "command": f"python experiments/run_layer_search.py{flag} --only {name}"
        + (" --perplexity" if with_ppl else ""),
        "variant": name,
        "pair": pair,
        **got,
    }
    if with_ppl:
        t0 = time.time()
        picked = got["picked"]
        texts = heldout_wikisplit(N_TEXTS, exclude=map_fitting_texts(config))
        base = perplexity(target, texts)["ppl"]
        ppl = {}
        for e, v in vectors.items():
            steer = make_steering(
                target, v, picked["alpha"], layers=picked["layer_list"], scale=picked["scale"]
            )
            ppl[e] = perplexity(target, texts, intervention=steer)["ppl"]
        ratios = [p / base for p in ppl.values()]
        out["perplexity"] = {
            "n_texts": len(texts),
            "base_ppl": base,
            "ppl": ppl,
            "mean_ratio": sum(ratios) / len(ratios),
            "max_ratio": max(ratios),
            "seconds": round(time.time() - t0, 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(run_maps.VARIANTS), required=True)
    parser.add_argument("--pair", choices=list(run_maps.PAIRS), default="gemma")
    parser.add_argument("--perplexity", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    missing = [n for n in args.only if run_maps.stored(n, args.pair) is None]
    if missing:
        parser.error(f"no stored run_maps.py result for {', '.join(missing)} ({args.pair})")
    import contrans_tl as ct

    source_name, target_name = run_maps.PAIRS[args.pair][:2]
    source, target = ct.load_model(source_name), ct.load_model(target_name)
    for name in args.only:
        path = run_maps.folder(name, args.pair) / "layer_search.json"
        write_json(path, measure(source, target, name, args.pair, args.perplexity))
        write_text(run_maps.OUT / "maps.md", run_maps.report())


if __name__ == "__main__":
    main()
