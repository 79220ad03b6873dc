"""Helpers shared by the benchmark scripts (stdlib and torch only).

This module is imported both in contrans_tl's environment and in the peers' virtualenv
(``benchmarks/peers/.venv-peers``, transformers 4.x), so it must not import contrans_tl,
transformers or numpy.

Peak memory: each measured run happens in a fresh subprocess. Just before the measured
work the garbage is collected, the C heap's free pages are given back to the OS
(``malloc_trim(0)``: otherwise memory freed while loading the model is silently reused and
the work seems to need none), and the resident-set high-water mark is reset (``echo 5 >
/proc/self/clear_refs``, Linux >= 4.0). The figure reported is ``VmHWM`` after the work
minus ``VmRSS`` before it: the most extra memory the work held at any moment, its outputs
included, and file pages of the memory-mapped weights first touched during the work (the
embedding rows of new tokens; reported separately as ``file_pages_mb``). Where the reset
is refused the figure falls back to ``ru_maxrss`` (which can include a higher peak from
loading the model; the JSON says which was used).
"""

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
PEERS_DIR = ROOT / "peers"


# ---------------------------------------------------------------- memory


def _status_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) / 1024 if m else None


def rss_mb() -> float:
    """Resident set size of this process now, MiB."""
    now = _status_mb("VmRSS")
    if now is not None:
        return now
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _malloc_trim() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``).

    Without it, memory freed while loading the model stays in the process's heap and the
    measured work reuses it without the resident set growing: its peak reads as ~0.
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak extra resident memory of a block of work, MiB (see the module docstring).

    >>> with PeakMemory() as pm:
    ...     work()
    >>> pm.delta_mb
    """

    def __init__(self) -> None:
        self.delta_mb = float("nan")
        self.file_delta_mb: float | None = None
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        import gc

        gc.collect()
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "malloc_trim(0); VmHWM reset by /proc/self/clear_refs; minus VmRSS"
        except OSError:
            self.method = "ru_maxrss minus VmRSS before (high-water mark could not be reset)"
        self._rss0 = rss_mb()
        self._file0 = _status_mb("RssFile")
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _status_mb("VmHWM") if self.method.startswith("VmHWM") else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.delta_mb = peak - self._rss0
        f1 = _status_mb("RssFile")
        # file-backed pages (mmapped weights, e.g. embedding rows of new tokens) faulted in
        # during the work; part of the delta, reported separately
        self.file_delta_mb = (
            (f1 - self._file0) if f1 is not None and self._file0 is not None else None
        )


# ---------------------------------------------------------------- machine


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 ``n × n`` matmul rate of this process's torch threads, GFLOP/s."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    torch.mm(a, b)  # warm up the thread pool and the kernel choice
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_at_start": os.getloadavg(),
    }


# ---------------------------------------------------------------- data


def data_dir() -> Path:
    """The shared data folder, found as ``contrans_tl.data.data_dir`` finds it."""
    env = os.environ.get("CONTRANS_TL_DATA")
    cands = [Path(env)] if env else []
    for base in (Path.cwd(), Path.cwd().parent, ROOT.parent, ROOT.parent.parent):
        cands.append(base / "shared" / "data")
    for c in cands:
        if (c / "wikisplit").is_dir():
            return c
    raise FileNotFoundError("no shared/data/wikisplit found; set CONTRANS_TL_DATA")


def wikisplit(n: int) -> list[str]:
    """The first ``n`` sentences of WikiSplit ``random2000_seed0`` (as contrans_tl reads it)."""
    path = data_dir() / "wikisplit" / "validation_random2000_seed0.tsv"
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            first = line.rstrip("\n").split("\t")[0].strip()
            if first:
                out.append(first)
    return out[:n]


def generation_prompts(n: int, words: int) -> list[str]:
    """``n`` prompts: the first ``words`` words of the first ``n`` WikiSplit sentences."""
    return [" ".join(s.split()[:words]) for s in wikisplit(n)]


def model_folder(name: str) -> Path:
    """The float32 safetensors folder of a zoo model in contrans_tl's cache."""
    base = Path(os.environ.get("CONTRANS_TL_CACHE", Path.home() / ".cache" / "contrans_tl"))
    folder = base / "zoo" / name / "float32"
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{folder} has no model.safetensors; load the model once with "
            f"contrans_tl.load_model({name!r}) to build the float32 cache"
        )
    return folder


def batches_longest_first(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Text indices sorted longest first (stable), cut into batches: contrans_tl's order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


# ---------------------------------------------------------------- running


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def run_json(cmd: Sequence[str], *, timeout: float | None = None) -> dict[str, Any]:
    """Run a worker; its last stdout line is a JSON object. Raise with stderr on failure."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"worker printed no JSON: {' '.join(cmd)}\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def peers_python(explicit: str | None = None) -> Path | None:
    """The peers' virtualenv interpreter: ``--peers-python``, ``$PEERS_PYTHON``, or the
    default ``benchmarks/peers/.venv-peers/bin/python`` if it exists."""
    for cand in (explicit, os.environ.get("PEERS_PYTHON")):
        if cand:
            return Path(cand)
    default = PEERS_DIR / ".venv-peers" / "bin" / "python"
    return default if default.exists() else None


def write_json(path: str | Path, data: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1, default=float))
    print(f"wrote {p}")


def fmt(x: float | None, spec: str = ".2f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return none
    return format(x, spec)


def this_python() -> str:
    return sys.executable


def weight_counts(model: Any) -> dict[str, int]:
    """Matrix-product weights: inside the blocks, and the unembedding (``d_model × d_vocab``)."""
    blocks = 0
    names = []
    for name, p in model.named_parameters():
        in_block = "blocks." in name or "layers." in name  # HookedTransformer / bridge names
        if p.ndim == 2 and in_block and "embed" not in name and "lm_head" not in name:
            blocks += p.numel()
            names.append(name)
    if not names:
        raise RuntimeError("found no 2-D weights under 'blocks.' or 'layers.'; cannot count FLOPs")
    cfg = model.cfg
    return {"blocks": blocks, "unembed": cfg.d_model * cfg.d_vocab, "n_block_matrices": len(names)}
