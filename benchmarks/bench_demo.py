"""The README demo, timed: the emotion transplant before and after the pipeline (issue 14).

Runs the README's demo command in fresh processes, each timed from start to exit (imports
and model loading included; the models must be prepared already, ``python -m contrans_tl
fetch smollm2-135m-instruct gemma-3-270m``):

``before``  the code before the change: a git worktree of ``--before-ref`` (default
            ``188ec70``, the commit the change started from), or ``--before-tree``;
``first``   this tree with an empty result cache (a fresh folder, ``--cache-dir``);
``repeat``  this tree again with that cache: everything comes from it.

Each run's ``results.json`` is compared number by number with the ``before`` one (rows,
summaries, selected alphas, map metrics, cosines; wall-clock keys left out), so the
speed-up is for the same results. The load average before and after each run is recorded:
on this shared machine other work running beside a run slows it down.

Targets (issue 14, on an idle 2-core machine): ``first`` at most 180 s, ``repeat`` under
30 s.

Usage:
    python benchmarks/bench_demo.py                       # all three runs (~15 min)
    python benchmarks/bench_demo.py --before-tree /tmp/before-emotion
    python benchmarks/bench_demo.py --skip-before         # only this tree's two runs

Writes ``--out`` (default ``benchmarks/results/demo.json``).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import data_dir, machine_info, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEMO = [
    "emotion",
    "--source",
    "smollm2-135m-instruct",
    "--target",
    "gemma-3-270m",
    "--pairings",
    "word_ends",
    "--alphas",
    "0.5,1,2",
    "--n-map-texts",
    "500",
    "--n-negatives",
    "20",
    "--n-validation-negatives",
    "10",
    "--no-random",
    "--no-specificity",
]
SKIP = {"seconds", "step_seconds", "machine", "command", "config", "cache", "cached"}
TARGETS = {"first": 180.0, "repeat": 30.0}


def compare(old: Any, new: Any, path: str = "") -> tuple[int, float, list[str]]:
    """``(numbers compared, largest difference, problems)`` of two results.json trees.

    Keys in ``SKIP`` (wall-clock, and what only the new code writes) are left out.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        n, worst, bad = 0, 0.0, []
        for k in sorted((set(old) | set(new)) - SKIP):
            if k not in old or k not in new:
                bad.append(f"{path}/{k}: only in {'before' if k in old else 'after'}")
                continue
            a, b, c = compare(old[k], new[k], f"{path}/{k}")
            n, worst, bad = n + a, max(worst, b), bad + c
        return n, worst, bad
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return 0, 0.0, [f"{path}: {len(old)} vs {len(new)} items"]
        n, worst, bad = 0, 0.0, []
        for i, (x, y) in enumerate(zip(old, new)):
            a, b, c = compare(x, y, f"{path}[{i}]")
            n, worst, bad = n + a, max(worst, b), bad + c
        return n, worst, bad
    numbers = (int, float)
    if isinstance(old, numbers) and isinstance(new, numbers) and not isinstance(old, bool):
        if math.isnan(old) and math.isnan(new):
            return 1, 0.0, []
        d = abs(old - new)
        return 1, d, [f"{path}: {old!r} vs {new!r}"] if d > 1e-6 else []
    return 0, 0.0, [] if old == new else [f"{path}: {old!r} vs {new!r}"]


def run_demo(tree: Path, out: Path, extra: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One demo run in a fresh process, from ``tree`` (its code is the one imported)."""
    cmd = [sys.executable, "-m", "contrans_tl", *DEMO, "--out", str(out), *extra]
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"demo failed in {tree} ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    return {
        "tree": str(tree),
        "command": " ".join(cmd[1:]),
        "seconds": round(seconds, 1),
        "experiment_seconds": res.get("seconds"),
        "step_seconds": res.get("step_seconds"),
        "loadavg_before": round(load0, 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
        "summary": res["summary"],
        "results": res,
    }


def _which_code(tree: Path, env: dict[str, str]) -> str:
    probe = [sys.executable, "-c", "import contrans_tl; print(contrans_tl.__file__)"]
    return subprocess.run(probe, cwd=tree, env=env, capture_output=True, text=True).stdout.strip()


def _before_tree(args: argparse.Namespace, tmp: Path) -> Path:
    if args.before_tree:
        return Path(args.before_tree).resolve()
    tree = tmp / "before"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.before_ref],
        check=True,
        capture_output=True,
    )
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before-ref", default="188ec70", help="git ref of the code before")
    ap.add_argument("--before-tree", default=None, help="a checkout of the code before")
    ap.add_argument("--skip-before", action="store_true", help="run only this tree")
    ap.add_argument("--out", default=str(ROOT / "results" / "demo.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    env = dict(os.environ, CONTRANS_TL_DATA=str(data_dir()))
    env.pop("PYTHONPATH", None)
    machine = machine_info()  # the load average at the start
    runs: dict[str, Any] = {}
    made_tree = None
    try:
        if not args.skip_before:
            tree = _before_tree(args, tmp)
            made_tree = None if args.before_tree else tree
            print(f"before: {_which_code(tree, env)}", flush=True)
            runs["before"] = run_demo(tree, tmp / "out_before", [], env)
            print(f"before: {runs['before']['seconds']} s", flush=True)
        cache = ["--cache-dir", str(tmp / "cache")]
        print(f"after: {_which_code(REPO, env)}", flush=True)
        for name in ("first", "repeat"):
            runs[name] = run_demo(REPO, tmp / f"out_{name}", cache, env)
            print(f"{name}: {runs[name]['seconds']} s", flush=True)
    finally:
        if made_tree is not None:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(made_tree)]
            )
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.out, _report(runs, sys.argv, machine))


def _report(runs: dict[str, Any], argv: list[str], machine: dict[str, Any]) -> dict[str, Any]:
    same: dict[str, Any] = {}
    ref = runs.get("before", runs["first"])["results"]
    for name in ("first", "repeat"):
        n, worst, bad = compare(ref, runs[name]["results"])
        same[name] = {"numbers_compared": n, "max_abs_diff": worst, "problems": bad[:20]}
    for r in runs.values():
        r.pop("results")
    targets = {
        name: {
            "seconds": runs[name]["seconds"],
            "target": limit,
            "ok": runs[name]["seconds"] <= limit,
        }
        for name, limit in TARGETS.items()
    }
    ratios = {}
    if "before" in runs:
        for name in ("first", "repeat"):
            ratios[f"before_over_{name}"] = round(
                runs["before"]["seconds"] / runs[name]["seconds"], 2
            )
    for name, row in targets.items():
        print(f"{name}: {row['seconds']} s (target <= {row['target']:g} s) {row['ok']}")
    print("ratios", ratios, "same numbers", {k: not v["problems"] for k, v in same.items()})
    return {
        "benchmark": "README emotion demo, wall time per fresh process (issue 14)",
        "command": "python " + " ".join(argv),
        "demo": "python -m contrans_tl " + " ".join(DEMO) + " --out DIR",
        "machine": machine,
        "runs": runs,
        "ratios": ratios,
        "targets": targets,
        "same_numbers_as_before": same,
    }


if __name__ == "__main__":
    main()
