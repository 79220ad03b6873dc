"""Map fitting: streaming accumulation (``LinearMapFitter``) vs one full least-squares solve.

A residual map is ``y ≈ x @ W`` fitted on N paired states (source width ``d_src``, target
width ``d_tgt``). contrans_tl streams: each chunk of pairs adds to ``XᵀX`` and ``XᵀY``
(float64, ``d_src × d_src`` and ``d_src × d_tgt``), and one eigendecomposition solves at
the end, so memory does not grow with N. The alternative is to gather all N pairs and call
``torch.linalg.lstsq`` once (float64, the direct computation). Both see the same float32
pairs (generated chunk by chunk from a seeded generator, so the full solve gathers exactly
what the stream saw), and the script checks they give the same map.

Each (method, N) runs in a fresh subprocess, so its peak memory is its own: the figure is
the growth of the process's peak resident set (``ru_maxrss``) from just before the first
pair is made to the end of the solve. Time excludes making the synthetic pairs. The workers
run with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``, default 128 KiB):
glibc otherwise raises the threshold after the first freed chunk, later chunk buffers come
from the heap, and fragmentation adds tens of MB at random to either method
(``--allocator default`` turns the pin off).

Targets (issue 6): the two maps agree within 1e-4 relative, and the stream's peak does not
grow with N (largest N against the smallest N that fills a whole chunk, within 1.2x).

Usage:
    python benchmarks/bench_mapfit.py                      # N = 1k, 10k, 100k; 576 -> 640
    python benchmarks/bench_mapfit.py --quick              # N = 1k, 5k
    python benchmarks/bench_mapfit.py --sizes 1000,10000 --d-src 896 --d-tgt 1536

Prints one row per N with both times, both peak-memory growths, their ratios and the
largest relative difference between the two maps; writes the numbers to ``--out``.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from contrans_tl.maps import LinearMapFitter

ROOT = Path(__file__).resolve().parent


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _chunk(i: int, rows: int, w: torch.Tensor, d_src: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk ``i`` of the synthetic pairs: anisotropic x with an offset, y = x W + noise."""
    g = torch.Generator().manual_seed(1000 + i)
    scales = torch.logspace(0, -2, d_src)
    x = torch.randn(rows, d_src, generator=g) * scales * 10 + 0.5
    y = x @ w + 0.1 * torch.randn(rows, w.shape[1], generator=g)
    return x, y


def worker(method: str, n: int, d_src: int, d_tgt: int, chunk: int) -> dict[str, Any]:
    torch.manual_seed(0)
    w_true = torch.randn(d_src, d_tgt, generator=torch.Generator().manual_seed(7)) / d_src**0.5
    n_chunks = (n + chunk - 1) // chunk
    sizes = [min(chunk, n - i * chunk) for i in range(n_chunks)]
    rss0 = _rss_now_mb()
    peak0 = _rss_peak_mb()
    elapsed = 0.0
    if method == "stream":
        fitter = LinearMapFitter(d_src, d_tgt)
        for i, rows in enumerate(sizes):
            x, y = _chunk(i, rows, w_true, d_src)
            t = time.perf_counter()
            fitter.update(x, y)
            elapsed += time.perf_counter() - t
        t = time.perf_counter()
        weight, _ = fitter.solve("svd")
        elapsed += time.perf_counter() - t
    elif method == "full":
        xs, ys = zip(*(_chunk(i, rows, w_true, d_src) for i, rows in enumerate(sizes)))
        t = time.perf_counter()
        x_all = torch.cat(xs).double()
        y_all = torch.cat(ys).double()
        del xs, ys
        weight = torch.linalg.lstsq(x_all, y_all, driver="gelsd").solution.float()
        elapsed = time.perf_counter() - t
    else:
        raise ValueError(f"method must be 'stream' or 'full', got {method!r}")
    peak = _rss_peak_mb()
    return {
        "method": method,
        "n": n,
        "seconds": elapsed,
        # growth of the peak over the resident set when the work began
        "peak_mb": max(peak, peak0) - rss0,
        "_w": weight,
    }


def run_worker(args: argparse.Namespace) -> None:
    res = worker(args.worker, args.n, args.d_src, args.d_tgt, args.chunk)
    w = res.pop("_w")
    if args.weight_out:
        from safetensors.torch import save_file

        save_file({"weight": w.contiguous()}, args.weight_out)
    print(json.dumps({k: res[k] for k in ("method", "n", "seconds", "peak_mb")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="N paired states, comma-separated")
    ap.add_argument("--d-src", type=int, default=576, help="source width (SmolLM2-135M: 576)")
    ap.add_argument("--d-tgt", type=int, default=640, help="target width (Gemma-3-270m: 640)")
    ap.add_argument("--chunk", type=int, default=4096, help="pairs per streamed update")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is kept")
    ap.add_argument("--quick", action="store_true", help="N = 1k, 5k; one repeat")
    ap.add_argument("--out", default=str(ROOT / "results" / "mapfit.json"))
    ap.add_argument(
        "--allocator",
        choices=["pinned", "default"],
        default="pinned",
        help="pinned: MALLOC_MMAP_THRESHOLD_=131072 in the workers (see above)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--weight-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.quick:
        args.sizes, args.repeats = "1000,5000", 1
    sizes = [int(s) for s in args.sizes.split(",")]
    if min(sizes) < 1 or args.repeats < 1 or args.chunk < 1:
        raise SystemExit("--sizes, --repeats and --chunk must be positive")

    from safetensors.torch import load_file

    env = dict(os.environ)
    if args.allocator == "pinned":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    tmp = Path(args.out).parent / "_mapfit_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"d_src {args.d_src} -> d_tgt {args.d_tgt}, chunk {args.chunk}, {args.repeats} repeats")
    print(
        f"{'N':>8} {'stream s':>9} {'full s':>9} {'full/stream':>11} "
        f"{'stream MB':>10} {'full MB':>9} {'mem ratio':>9} {'max rel diff':>12}"
    )
    for n in sizes:
        cell: dict[str, list[dict[str, Any]]] = {"stream": [], "full": []}
        for r in range(args.repeats):
            for method in ("stream", "full"):  # alternate, so drift hits both
                wpath = tmp / f"{method}_{n}.safetensors"
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    method,
                    "--n",
                    str(n),
                    "--d-src",
                    str(args.d_src),
                    "--d-tgt",
                    str(args.d_tgt),
                    "--chunk",
                    str(args.chunk),
                ]
                if r == 0:
                    cmd += ["--weight-out", str(wpath)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                cell[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
        w_s = load_file(str(tmp / f"stream_{n}.safetensors"))["weight"]
        w_f = load_file(str(tmp / f"full_{n}.safetensors"))["weight"]
        rel = float((w_s - w_f).abs().max() / w_f.abs().max())

        def med(method: str, key: str, cell: dict[str, list[dict[str, Any]]] = cell) -> float:
            vals = sorted(c[key] for c in cell[method])
            return vals[len(vals) // 2]

        row = {
            "n": n,
            "stream_seconds": med("stream", "seconds"),
            "full_seconds": med("full", "seconds"),
            "stream_peak_mb": med("stream", "peak_mb"),
            "full_peak_mb": med("full", "peak_mb"),
            "max_rel_diff": rel,
            "runs": cell,
        }
        row["time_ratio_full_over_stream"] = row["full_seconds"] / row["stream_seconds"]
        row["mem_ratio_full_over_stream"] = row["full_peak_mb"] / max(row["stream_peak_mb"], 1e-9)
        rows.append(row)
        print(
            f"{n:>8} {row['stream_seconds']:>9.3f} {row['full_seconds']:>9.3f} "
            f"{row['time_ratio_full_over_stream']:>10.2f}x {row['stream_peak_mb']:>10.1f} "
            f"{row['full_peak_mb']:>9.1f} {row['mem_ratio_full_over_stream']:>8.2f}x "
            f"{rel:>12.2e}"
        )
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    worst = max(r["max_rel_diff"] for r in rows)
    full_chunks = [r for r in rows if r["n"] >= args.chunk]
    targets: dict[str, Any] = {
        "same_map": {"max_rel_diff": worst, "target": 1e-4, "ok": worst <= 1e-4},
    }
    if len(full_chunks) >= 2:
        lo, hi = full_chunks[0], full_chunks[-1]
        growth = hi["stream_peak_mb"] / max(lo["stream_peak_mb"], 1e-9)
        targets["stream_memory_flat"] = {
            "n_small": lo["n"],
            "n_large": hi["n"],
            "peak_ratio_large_over_small": growth,
            "target": 1.2,
            "ok": growth <= 1.2,
        }
    for name, t in targets.items():
        shown = {k: v for k, v in t.items() if k != "ok"}
        print(f"{'ok  ' if t['ok'] else 'MISS'} {name}: {shown}")
    result = {
        "benchmark": "map fitting: streaming LinearMapFitter vs full torch.linalg.lstsq",
        "command": "python benchmarks/bench_mapfit.py " + " ".join(sys.argv[1:]),
        "d_src": args.d_src,
        "d_tgt": args.d_tgt,
        "chunk": args.chunk,
        "repeats": args.repeats,
        "memory": "growth of ru_maxrss over the resident set before the first pair, "
        "fresh subprocess per run",
        "allocator": args.allocator,
        "targets": targets,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
