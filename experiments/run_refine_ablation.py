"""Number of refinement examples per emotion (paper App. B.2, Fig. 5), issue 4.

    python experiments/run_refine_ablation.py [--source S --target T --n-map-texts N]

One seeded split of the RepE emotion scenarios with 150 refinement scenarios per emotion
(the most a disjoint split allows: each emotion has 203-228 scenarios, and 3 few-shot, 20
validation and 30 evaluation ones are set aside). For n in --ns, n refinement scenarios per
emotion are drawn from those 150 (--repeats draws, seeded) and the emotion vector is refined
from them (positives: the n scenarios; negatives: n scenarios of the other emotions), then
transplanted with the pair's map (word-end pairing, the map of run_alignment.py when it
exists) and added at --alpha (issue 3 picked alpha = 1 for this pair on validation
negatives). Self (the target's own vector from the same n scenarios) runs beside it. Token
Acc and Logit Acc on --n-negatives evaluation negatives per emotion.
Writes experiments/results/ablation_refine/<source>__<target>/results.json.
"""

import argparse
import random
import shlex
import sys
import time
from pathlib import Path

import torch

import contrans_tl as ct
from contrans_tl.data import EMOTIONS, emotion_scenarios, wikisplit_sentences
from contrans_tl.evals.emotion import (
    REFINE_TEMPLATE,
    EmotionTask,
    negatives,
    score,
    split_scenarios,
)
from contrans_tl.io import write_json


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="smollm2-135m-instruct")
    ap.add_argument("--target", default="gemma-3-270m")
    ap.add_argument("--n-map-texts", type=int, default=2000)
    ap.add_argument("--maps-dir", default="runs/maps")
    ap.add_argument("--ns", default="10,20,50,100,150")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--n-refine-pool", type=int, default=150)
    ap.add_argument("--n-negatives", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    command = "python experiments/run_refine_ablation.py " + shlex.join(sys.argv[1:])
    ns = [int(x) for x in args.ns.split(",")]
    if max(ns) > args.n_refine_pool:
        raise SystemExit(f"--ns up to {max(ns)} exceeds --n-refine-pool {args.n_refine_pool}")
    out = Path(args.out or f"experiments/results/ablation_refine/{args.source}__{args.target}")
    t0 = time.time()

    src, tgt = ct.load_model(args.source), ct.load_model(args.target)
    map_path = Path(args.maps_dir) / f"{args.source}__{args.target}__auto__{args.n_map_texts}"
    if map_path.with_name(map_path.name + ".safetensors").exists():
        rmap = ct.ResidualMap.load(map_path)
    else:
        log("fitting the map")
        rmap = ct.fit_residual_map(src, tgt, wikisplit_sentences(args.n_map_texts), seed=args.seed)
        map_path.parent.mkdir(parents=True, exist_ok=True)
        rmap.save(map_path)

    split = split_scenarios(
        emotion_scenarios(), n_fewshot=3, n_refine=args.n_refine_pool, seed=args.seed
    )
    task = EmotionTask.build(tgt, split)
    queries = {e: task.query_ids(tgt, negatives(split, e, args.n_negatives)) for e in EMOTIONS}

    def evaluate(vectors: dict[str, ct.ConceptVector] | None) -> dict[str, float]:
        accs = {"token_acc": [], "logit_acc": []}
        for e in EMOTIONS:
            steering = None if vectors is None else ct.make_steering(tgt, vectors[e], args.alpha)
            s = score(task.predict(tgt, queries[e], intervention=steering), e, task.emotion_ids)
            for k in accs:
                accs[k].append(s[k])
        return {k: sum(v) / len(v) for k, v in accs.items()} | {
            f"{k}_by_emotion": dict(zip(EMOTIONS, v)) for k, v in accs.items()
        }

    rows = [{"method": "base", "n": 0, "repeat": 0, **evaluate(None)}]
    log(f"base {rows[0]['token_acc']:.3f}")
    fmt = REFINE_TEMPLATE.format
    for n in ns:
        for rep in range(args.repeats if n < args.n_refine_pool else 1):
            rng = random.Random(f"{args.seed}-{n}-{rep}")
            pos = {e: rng.sample(list(split.refine[e]), n) for e in EMOTIONS}
            vecs: dict[str, dict[str, ct.ConceptVector]] = {"contrans": {}, "self": {}}
            for e in EMOTIONS:
                others = [s for o in EMOTIONS if o != e for s in pos[o]]
                neg = rng.sample(others, n)
                p_txt = [fmt(scenario=s) for s in pos[e]]
                n_txt = [fmt(scenario=s) for s in neg]
                v_src = ct.mean_difference(src, p_txt, n_txt, concept=e, batch_size=args.batch_size)
                vecs["contrans"][e] = rmap.transplant(v_src)
                vecs["self"][e] = ct.mean_difference(
                    tgt, p_txt, n_txt, concept=e, batch_size=args.batch_size
                )
            for method, v in vecs.items():
                r = {"method": method, "n": n, "repeat": rep, **evaluate(v)}
                rows.append(r)
                log(f"{method} n={n} rep={rep}: Token Acc {r['token_acc']:.3f}")
    result = {
        "experiment": "refinement examples per emotion (paper App. B.2, Fig. 5)",
        "command": command,
        "source": args.source,
        "target": args.target,
        "alpha": args.alpha,
        "split_sizes": split.sizes(),
        "n_negatives_per_emotion": args.n_negatives,
        "negatives_from": "the other emotions' evaluation scenarios",
        "refine_pool_per_emotion": args.n_refine_pool,
        "map": {"pairing": rmap.pairing, "n_texts": args.n_map_texts},
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
    }
    write_json(out / "results.json", result)
    log(f"wrote {out / 'results.json'} in {result['seconds']} s")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
