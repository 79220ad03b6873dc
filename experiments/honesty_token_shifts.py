"""Logit-lens token shifts of the honesty vector (paper App. B.3, Table 8), issue 5.

    python experiments/honesty_token_shifts.py --source S --target T [--n-map-texts N]

The clean-protocol honesty vector (Table 9 instructions on the refine half of TruthfulQA,
questions only; as in run_alignment.py) is refined in the source, transplanted with the
pair's map (the map of run_alignment.py under runs/maps/ when it exists, else fitted and
kept there), and added in the direct logit-lens view (``token_shifts(mode="direct")``) to
the last-token state of --n-questions held-out TruthfulQA questions, each formatted as the
MC1 evaluation formats it (chat template for an instruct model, ``Q: ...\\nA:`` otherwise),
at the target layers the emotion analysis reads (a middle and a late layer). The same view
for the source's own vector at the paired source layer sits beside it. Count: in how many
questions a token is among the top --k risers (fallers) of next-token probability.

Writes experiments/results/analysis/<source>__<target>/token_shifts_honesty_L{t}.{md,json}.
"""

import argparse
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import contrans_tl as ct
from contrans_tl.analysis import aggregate_shifts, token_shifts
from contrans_tl.analysis.plots import write_shift_table
from contrans_tl.data import wikisplit_sentences
from contrans_tl.evals.truthfulqa import (
    format_question,
    honesty_prompts,
    load_truthfulqa,
    split_questions,
)
from contrans_tl.pipelines.analysis import default_lens_layers

ROOT = Path(__file__).resolve().parent / "results" / "analysis"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="smollm2-135m-instruct")
    ap.add_argument("--target", default="gemma-3-270m")
    ap.add_argument("--n-map-texts", type=int, default=2000, help="as in run_alignment.py")
    ap.add_argument("--pairing", default="auto")
    ap.add_argument("--maps-dir", default="runs/maps")
    ap.add_argument("--n-questions", type=int, default=100, help="held-out questions read")
    ap.add_argument("--alpha", type=float, default=1.0, help="raw alpha, as the emotion tables")
    ap.add_argument("--layers", default=None, help="target layers, e.g. 8,14 (default: lens)")
    ap.add_argument("--k", type=int, default=10, help="risers/fallers kept per question")
    ap.add_argument("--top", type=int, default=15, help="rows per table")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder (default: the pair's analysis folder)")
    args = ap.parse_args()
    if args.n_questions < 1 or args.k < 1 or args.top < 1:
        raise SystemExit("--n-questions, --k and --top must be positive")
    command = "python experiments/honesty_token_shifts.py " + shlex.join(sys.argv[1:])
    out = Path(args.out) if args.out else ROOT / f"{args.source}__{args.target}"

    src = ct.load_model(args.source)
    tgt = ct.load_model(args.target)
    layers = (
        [int(x) for x in args.layers.split(",")]
        if args.layers
        else default_lens_layers(int(tgt.cfg.n_layers))
    )

    map_path = (
        Path(args.maps_dir) / f"{args.source}__{args.target}__{args.pairing}__{args.n_map_texts}"
    )
    if map_path.with_name(map_path.name + ".safetensors").exists():
        rmap = ct.ResidualMap.load(map_path)
        log(f"loaded map {map_path}")
    else:
        log(f"fitting map ({args.pairing}, {args.n_map_texts} sentences)")
        rmap = ct.fit_residual_map(
            src,
            tgt,
            wikisplit_sentences(args.n_map_texts),
            pairing=args.pairing,  # type: ignore[arg-type]
            batch_size=args.batch_size,
            seed=args.seed,
        )
        map_path.parent.mkdir(parents=True, exist_ok=True)
        rmap.save(map_path)
    rmap.check_models(src, tgt)

    questions = load_truthfulqa()
    refine_half, held_half = split_questions(questions, seed=args.seed)
    if args.n_questions > len(held_half):
        raise SystemExit(f"--n-questions {args.n_questions} > {len(held_half)} held-out questions")
    read = sorted(
        random.Random(args.seed).sample(held_half, args.n_questions), key=lambda q: q.index
    )
    log(f"refining the honesty vector in {args.source} on {len(refine_half)} questions")
    pos, neg = honesty_prompts(refine_half, model_or_tokenizer=src)
    src_vec = ct.mean_difference(src, pos, neg, concept="honesty", batch_size=args.batch_size)
    tr_vec = rmap.transplant(src_vec)

    tables = {}
    for tl in layers:
        sl = rmap.source_layer(tl)
        log(f"token shifts at target layer {tl} / source layer {sl}")

        def counts(model: Any, vec: ct.ConceptVector, layer: int) -> Any:
            texts = [format_question(model, q.question) for q in read]
            shifts = token_shifts(
                model,
                texts,
                vec,
                args.alpha,
                layers=[layer],
                k=args.k,
                mode="direct",
                batch_size=args.batch_size,
            )[layer]
            return aggregate_shifts(shifts, top=args.top)

        pair_tables = {
            f"honesty: transplanted, {args.target} L{tl}": counts(tgt, tr_vec, tl),
            f"honesty: source vector, {args.source} L{sl}": counts(src, src_vec, sl),
        }
        tables[tl] = pair_tables
        note = (
            f"Logit lens, direct view: {len(read)} held-out TruthfulQA questions (seed "
            f"{args.seed}), each formatted as the MC1 evaluation formats it for that model, "
            f"read at the last token after block L; α·v (α = {args.alpha:g}, the clean "
            f"honesty vector refined on {len(refine_half)} other questions) is added to that "
            f"state and the change of every token's next-token probability is ranked. "
            f"Count: in how many questions the token is among the top {args.k} risers "
            f"(fallers). Target layer {tl} is mapped from source layer {sl}. Command: "
            f"`{command}`"
        )
        write_shift_table(
            pair_tables,
            out / f"token_shifts_honesty_L{tl}",
            title=f"Honesty token shifts at target layer {tl} / source layer {sl}",
            note=note,
        )
        log(f"wrote {out / f'token_shifts_honesty_L{tl}'}.md")


if __name__ == "__main__":
    main()
