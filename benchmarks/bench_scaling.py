"""Scaling: forward-pass throughput against model size, next to the FLOP ceiling.

For each offline model, the same WikiSplit sentences (length sorted, left padded, batches
of ``--batch-size``) are run two ways:

``read``  contrans_tl's :func:`read_resid_post` of every layer at the last token: the pass
          stops after the last block, so the unembedding is skipped.
``full``  a plain forward pass of the TransformerLens model to the logits (``use_cache``
          off), what a naive evaluation pays.

The ceiling is what the machine's float32 matrix product rate allows: a token costs
``2 · P`` FLOPs for the ``P`` weights of the matrix products it goes through (every 2-D
weight inside the blocks for ``read``; plus ``d_model · d_vocab`` of the unembedding for
``full``; embedding lookups cost no FLOPs), plus the attention scores and mixing,
``4 · n_layers · d_attn · L`` per token for a padded length ``L`` (counted from the actual
batches). The rate is measured in the same run with a square float32 ``torch.matmul`` on
the same number of threads. Utilization = achieved FLOP/s over that rate; it counts the
padded tokens the model really computes, while "tok/s" counts real tokens only.

Each model runs in its own subprocess (so one model's memory does not sit under the next).

Usage:
    python benchmarks/bench_scaling.py                  # the four offline models, 64 sentences
    python benchmarks/bench_scaling.py --quick          # two small models, 16 sentences
    python benchmarks/bench_scaling.py --models gemma-3-270m --n 128
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import weight_counts  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODELS = [
    "smollm2-135m-instruct",
    "gemma-3-270m",
    "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b-instruct",
]


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """Best-of float32 FLOP/s of a ``size × size`` matrix product on this process's threads."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def worker(name: str, n: int, batch_size: int, repeats: int) -> dict[str, Any]:
    from contrans_tl.activations import read_resid_post
    from contrans_tl.data import wikisplit_sentences
    from contrans_tl.models import load_model
    from contrans_tl.tokens import encode, pad_left, pad_token_id

    torch.set_grad_enabled(False)
    model = load_model(name)
    cfg = model.cfg
    texts = wikisplit_sentences(n)
    encs = encode(model.tokenizer, texts)
    lens = sorted((len(e.ids) for e in encs), reverse=True)
    batches = [lens[i : i + batch_size] for i in range(0, len(lens), batch_size)]
    real = sum(lens)
    padded = sum(len(b) * b[0] for b in batches)
    d_attn = cfg.n_heads * cfg.d_head
    # attention scores (QK^T) and mixing (AV): 2 * 2 * d_attn FLOPs per (query, key) pair
    attn_flops = sum(len(b) * 4 * cfg.n_layers * d_attn * b[0] * b[0] for b in batches)
    w = weight_counts(model)
    flops = {
        "read": 2 * w["blocks"] * padded + attn_flops,
        "full": 2 * (w["blocks"] + w["unembed"]) * padded + attn_flops,
    }
    pad = pad_token_id(model.tokenizer)
    order = sorted(range(len(encs)), key=lambda i: -len(encs[i].ids))
    id_batches = [
        pad_left([encs[i].ids for i in order[k : k + batch_size]], pad)
        for k in range(0, len(order), batch_size)
    ]

    def run_read() -> None:
        read_resid_post(
            model, texts, layers=None, positions="last", batch_size=batch_size, progress=False
        )

    def run_full_logits() -> None:
        extra = {"use_cache": False} if hasattr(model, "original_model") else {}
        for ids, mask in id_batches:
            model(ids, attention_mask=mask, **extra)

    run_read()  # warm-up (allocator, lazy init)
    times: dict[str, list[float]] = {"read": [], "full": []}
    for _ in range(repeats):
        for key, fn in (("read", run_read), ("full", run_full_logits)):
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    rate = matmul_rate()
    out: dict[str, Any] = {
        "model": name,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "weights": w,
        "n_texts": len(texts),
        "real_tokens": real,
        "padded_tokens": padded,
        "matmul_flops_per_s": rate,
        "threads": torch.get_num_threads(),
    }
    for key, ts in times.items():
        sec = statistics.median(ts)
        out[key] = {
            "seconds": sec,
            "runs": ts,
            "tokens_per_s": real / sec,
            "flops": flops[key],
            "flops_per_s": flops[key] / sec,
            "utilization": flops[key] / sec / rate,
            "ceiling_tokens_per_s": rate * padded / flops[key] * real / padded,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--n", type=int, default=64, help="WikiSplit sentences")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="two small models, 16 sentences")
    ap.add_argument("--out", default=str(ROOT / "results" / "scaling.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.batch_size, args.repeats)))
        return
    if args.quick:
        args.models, args.n, args.repeats = "smollm2-135m-instruct,gemma-3-270m", 16, 1
    models = [m for m in args.models.split(",") if m]
    rows = []
    for m in models:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            m,
            "--n",
            str(args.n),
            "--batch-size",
            str(args.batch_size),
            "--repeats",
            str(args.repeats),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{m} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(
        f"{args.n} WikiSplit sentences, batch {args.batch_size}, median of {args.repeats}; "
        f"matmul rate {rows[0]['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s "
        f"({rows[0]['threads']} threads)"
    )
    print(
        f"{'model':<28} {'block W (M)':>11} {'read tok/s':>10} {'ceiling':>8} {'util':>6} "
        f"{'full tok/s':>10} {'ceiling':>8} {'util':>6} {'read/full':>9}"
    )
    for r in rows:
        rd, fu = r["read"], r["full"]
        print(
            f"{r['model']:<28} {r['weights']['blocks'] / 1e6:>11.1f} "
            f"{rd['tokens_per_s']:>10.1f} {rd['ceiling_tokens_per_s']:>8.1f} "
            f"{rd['utilization']:>6.2f} {fu['tokens_per_s']:>10.1f} "
            f"{fu['ceiling_tokens_per_s']:>8.1f} {fu['utilization']:>6.2f} "
            f"{fu['seconds'] / rd['seconds']:>8.2f}x"
        )
    result = {
        "benchmark": "forward throughput against model size and the FLOP ceiling",
        "command": "python benchmarks/bench_scaling.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
