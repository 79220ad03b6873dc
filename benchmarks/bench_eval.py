"""Evaluation speed: shared prefixes reused vs recomputed, batched vs one-at-a-time generation.

Three measurements on one model, each fast path beside the slow path it replaces, in the
same run and on the same inputs, and each checked to give the same answer:

``emotion``     the emotion evaluation (:meth:`EmotionTask.predict`): the few-shot prefix's
                KV cache computed once and reused for every query, vs prefix + query run for
                every query (``reuse_prefix=False``). Check: same greedy tokens, emotion
                logits equal to float tolerance.
``truthfulqa``  TruthfulQA MC1 (:func:`score_many`, as :func:`evaluate_mc` runs it): each
                question's KV cache computed once and shared by its answer choices, the
                choices of several questions in one pass, only answer positions
                unembedded; vs question + choice run in full for every choice (batched per
                question). Check: same scores to float tolerance, same MC1 picks. Also
                printed: the FLOP bound, the most any sharing can save on these prompts
                (the questions are short next to their answers, so it is well under the
                emotion prefix's).
``toxigen``     ToxiGen continuations (:func:`generate`, greedy, KV cache): prompts batched
                (left padding, length sorted) vs one prompt at a time. Check: the share of
                continuations that are token-identical (padding can change the last bits of
                a logit, so a greedy tie can flip; the share is reported, not assumed).

Each pair is timed ``--repeats`` times, alternating fast and slow, and the median kept.

Usage:
    python benchmarks/bench_eval.py                    # gemma-3-270m, default sizes
    python benchmarks/bench_eval.py --quick            # small sizes, under a minute or two
    python benchmarks/bench_eval.py --model smollm2-135m-instruct --parts emotion,truthfulqa

Target (issue 6): shared-prefix evaluation >= 3x faster than per-prompt.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from contrans_tl.data import EMOTIONS, emotion_scenarios
from contrans_tl.evals.emotion import EmotionTask, negatives, split_scenarios
from contrans_tl.evals.toxigen import completion_context, hate_prompts
from contrans_tl.evals.truthfulqa import (
    answer_separator,
    encode_choices,
    format_question,
    load_truthfulqa,
    score_many,
)
from contrans_tl.models import load_model
from contrans_tl.steering import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import weight_counts  # noqa: E402

ROOT = Path(__file__).resolve().parent


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def race(fast: Callable[[], Any], slow: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Median seconds of each, alternating; returns the outputs of the first round too."""
    tf, ts = [], []
    out_f = out_s = None
    for r in range(repeats):
        a, of = timed(fast)
        b, os_ = timed(slow)
        tf.append(a)
        ts.append(b)
        if r == 0:
            out_f, out_s = of, os_
    return {
        "fast_seconds": statistics.median(tf),
        "slow_seconds": statistics.median(ts),
        "fast_runs": tf,
        "slow_runs": ts,
        "speedup": statistics.median(ts) / statistics.median(tf),
        "_out": (out_f, out_s),
    }


def bench_emotion(model: Any, n_per_emotion: int, batch_size: int, repeats: int) -> dict:
    split = split_scenarios(emotion_scenarios(), seed=0)
    task = EmotionTask.build(model, split)
    queries = []
    for e in EMOTIONS:
        queries += task.query_ids(model, negatives(split, e, n_per_emotion))
    r = race(
        lambda: task.predict(model, queries, batch_size=batch_size, reuse_prefix=True),
        lambda: task.predict(model, queries, batch_size=batch_size, reuse_prefix=False),
        repeats,
    )
    fast, slow = r.pop("_out")
    n_tokens = len(task.prefix_ids) * len(queries) + sum(len(q) for q in queries)
    return {
        **r,
        "n_queries": len(queries),
        "prefix_tokens": len(task.prefix_ids),
        "mean_query_tokens": sum(len(q) for q in queries) / len(queries),
        "tokens_per_query_run": n_tokens / len(queries),
        "same_top_token": float((fast.top_token == slow.top_token).float().mean()),
        "max_abs_logit_diff": float((fast.emotion_logits - slow.emotion_logits).abs().max()),
    }


def bench_truthfulqa(model: Any, n_questions: int, batch_size: int, repeats: int) -> dict:
    qs = load_truthfulqa()[:n_questions]
    sep = answer_separator(model)
    encs = [
        encode_choices(model, format_question(model, q.question), q.mc1_choices, separator=sep)
        for q in qs
    ]

    def fast() -> list[list[float]]:  # what evaluate_mc runs
        return score_many(model, encs, batch_size=batch_size)

    def slow() -> list[list[float]]:  # every choice with its question, one question at a time
        return score_many(model, encs, batch_size=batch_size, reuse_prefix=False)

    r = race(fast, slow, repeats)
    out_fast, out_slow = r.pop("_out")
    diffs = [abs(a - b) for fa, sa in zip(out_fast, out_slow) for a, b in zip(fa, sa)]
    picks = [
        max(range(len(f)), key=f.__getitem__) == max(range(len(s)), key=s.__getitem__)
        for f, s in zip(out_fast, out_slow)
    ]
    # The most sharing can save: matrix-product FLOPs of the slow path over the fast
    # path's, counting real tokens only (no padding, no attention scores). Slow: every
    # choice runs context + choice through the blocks and the unembedding. Fast: each
    # context but its last token runs once through the blocks; each choice's tokens run
    # through blocks and unembedding.
    w = weight_counts(model)
    blk, une = 2 * w["blocks"], 2 * w["unembed"]
    flops_slow = flops_fast = 0
    for e in encs:
        p = len(e.context_ids)
        flops_fast += (p - 1) * blk
        for c in e.choice_ids:
            flops_slow += (p + len(c)) * (blk + une)
            flops_fast += len(c) * (blk + une)
    return {
        **r,
        "n_questions": len(qs),
        "n_choices": sum(len(e.choice_ids) for e in encs),
        "mean_context_tokens": sum(len(e.context_ids) for e in encs) / len(encs),
        "mean_choice_tokens": sum(len(c) for e in encs for c in e.choice_ids)
        / sum(len(e.choice_ids) for e in encs),
        "flop_bound_speedup": flops_slow / flops_fast,
        "max_abs_score_diff": max(diffs),
        "same_mc1_pick": sum(picks) / len(picks),
    }


def bench_toxigen(
    model: Any, n_per_group: int, batch_size: int, max_new: int, repeats: int
) -> dict:
    _, ev = hate_prompts(n_validation=0, n_evaluation=n_per_group)
    contexts = [completion_context(model, p.text) for p in ev]

    def run(bs: int) -> list[list[int]]:
        out = generate(model, contexts, max_new_tokens=max_new, batch_size=bs, decode=False)
        return out  # type: ignore[return-value]

    r = race(lambda: run(batch_size), lambda: run(1), repeats)
    fast, slow = r.pop("_out")
    n_new = sum(len(o) for o in fast)
    return {
        **r,
        "n_prompts": len(contexts),
        "batch_size": batch_size,
        "max_new_tokens": max_new,
        "generated_tokens_batched": n_new,
        "tokens_per_second_batched": n_new / r["fast_seconds"],
        "tokens_per_second_single": sum(len(o) for o in slow) / r["slow_seconds"],
        "identical_continuations": sum(a == b for a, b in zip(fast, slow)) / len(fast),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--parts", default="emotion,truthfulqa,toxigen")
    ap.add_argument("--emotion-n", type=int, default=20, help="negative queries per emotion")
    ap.add_argument("--tqa-n", type=int, default=40, help="TruthfulQA questions")
    ap.add_argument("--tox-n", type=int, default=2, help="ToxiGen prompts per group (13 groups)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="forward batch (emotion, TQA)")
    ap.add_argument("--gen-batch-size", type=int, default=8, help="generation batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    ap.add_argument("--out", default=str(ROOT / "results" / "eval.json"))
    args = ap.parse_args()
    if args.quick:
        args.emotion_n, args.tqa_n, args.tox_n, args.max_new_tokens, args.repeats = 3, 8, 1, 8, 1
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"emotion", "truthfulqa", "toxigen"}
    if unknown:
        raise SystemExit(f"unknown --parts {sorted(unknown)}; valid: emotion, truthfulqa, toxigen")
    model = load_model(args.model)
    res: dict[str, Any] = {
        "benchmark": "evaluation: shared prefix reused vs recomputed; batched vs single generation",
        "command": "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    with torch.inference_mode():
        if "emotion" in parts:
            res["emotion"] = bench_emotion(model, args.emotion_n, args.batch_size, args.repeats)
        if "truthfulqa" in parts:
            res["truthfulqa"] = bench_truthfulqa(model, args.tqa_n, args.batch_size, args.repeats)
        if "toxigen" in parts:
            res["toxigen"] = bench_toxigen(
                model, args.tox_n, args.gen_batch_size, args.max_new_tokens, args.repeats
            )
    print(f"model {args.model}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'part':<11} {'fast s':>8} {'slow s':>8} {'speedup':>8}  check")
    labels = {
        "emotion": ("prefix reused", "per prompt"),
        "truthfulqa": ("prefix reused", "per choice"),
        "toxigen": ("batched", "one at a time"),
    }
    for p in parts:
        r = res[p]
        if p == "emotion":
            check = (
                f"same top token {r['same_top_token']:.3f}, "
                f"max |Δlogit| {r['max_abs_logit_diff']:.1e}"
            )
        elif p == "truthfulqa":
            check = (
                f"same MC1 pick {r['same_mc1_pick']:.3f}, "
                f"max |Δscore| {r['max_abs_score_diff']:.1e}, "
                f"FLOP bound {r['flop_bound_speedup']:.2f}x"
            )
        else:
            check = f"identical continuations {r['identical_continuations']:.3f}"
        print(
            f"{p:<11} {r['fast_seconds']:>8.2f} {r['slow_seconds']:>8.2f} "
            f"{r['speedup']:>7.2f}x  {check}   ({labels[p][0]} vs {labels[p][1]})"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
