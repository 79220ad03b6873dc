"""Perplexity of the target under each stored maps variant's transplanted vectors (issue 17).

    python experiments/run_maps_perplexity.py --only ridge-prompts
    python experiments/run_maps_perplexity.py          # every stored variant without one

For a variant that experiments/run_maps.py has stored, the transplanted vectors are made
again through the emotion pipeline's own steps (refine, fit the map, transplant; served
from the result cache when the run's cache is still there, recomputed otherwise), and the
target's perplexity on 100 held-out WikiSplit sentences (none of them a fitting text) is
measured unsteered and steered by each emotion's vector at the α that run picked on
validation negatives (every layer, every position). The Self vectors at their own α are
the reference. Writes experiments/results/maps/<variant>/perplexity.json, then maps.md.
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


def measure(source: Any, target: Any, name: str) -> dict[str, Any]:
    """perplexity.json of one stored variant."""
    from contrans_tl.evals.emotion import EMOTIONS, refinement_prompts
    from contrans_tl.evals.perplexity import heldout_wikisplit, perplexity
    from contrans_tl.pipelines import emotion as pe
    from contrans_tl.pipelines.cache import open_cache
    from contrans_tl.steering import make_steering

    t0 = time.time()
    stored = run_maps.stored(name)
    if stored is None:
        raise ValueError(f"{name}: no stored run with today's settings; run run_maps.py first")
    config = run_maps.config_of(name)
    store = open_cache(None)
    split = config.split()
    prompts = {e: refinement_prompts(split, e) for e in EMOTIONS}
    _, _, vectors = pe.emotion_vectors(source, target, config, prompts, store, {})
    texts = heldout_wikisplit(N_TEXTS, exclude=pe.map_fitting_texts(config))
    base = perplexity(target, texts)["ppl"]
    out: dict[str, Any] = {
        "command": f"python experiments/run_maps_perplexity.py --only {name}",
        "variant": name,
        "n_texts": len(texts),
        "base_ppl": base,
    }
    for method in ("contrans_word_ends", "self"):
        alpha = stored["selected_alpha"][method]
        ppl = {
            e: perplexity(target, texts, intervention=make_steering(target, v, alpha))["ppl"]
            for e, v in vectors[method].items()
        }
        ratios = [p / base for p in ppl.values()]
        out[method] = {
            "alpha": alpha,
            "ppl": ppl,
            "mean_ratio": sum(ratios) / len(ratios),
            "max_ratio": max(ratios),
        }
    out["seconds"] = time.time() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = list(run_maps.VARIANTS)
    parser.add_argument("--only", nargs="+", choices=names, default=names)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    import contrans_tl as ct

    todo = [
        n
        for n in args.only
        if run_maps.stored(n) is not None and not (run_maps.OUT / n / "perplexity.json").is_file()
    ]
    if todo:
        source, target = ct.load_model(run_maps.SOURCE), ct.load_model(run_maps.TARGET)
        for name in todo:
            write_json(run_maps.OUT / name / "perplexity.json", measure(source, target, name))
            write_text(run_maps.OUT / "maps.md", run_maps.report())
    write_text(run_maps.OUT / "maps.md", run_maps.report())


if __name__ == "__main__":
    main()
