"""Writes ``benchmarks/BENCHMARKS.md`` from the JSON the benchmark scripts left in
``benchmarks/results/``: one table per benchmark, the issue-6 targets with ok / MISS and by
how much, and the machine and command each file came from.

Usage:
    python benchmarks/make_tables.py                    # results/ -> BENCHMARKS.md
    python benchmarks/make_tables.py --results DIR --out FILE

A benchmark whose JSON is missing is listed as "not run" (nothing is filled in for it).
Further runs of a script, written with ``--out results/{name}_{label}.json`` (e.g.
``eval_smollm2-135m-instruct.json``), get a subsection of their own under it.
"""

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent

FILES = {
    "activations": "bench_activations.py",
    "generation": "bench_generation.py",
    "eval": "bench_eval.py",
    "mapfit": "bench_mapfit.py",
    "scaling": "bench_scaling.py",
    "demo": "bench_demo.py",
}


def _verdict(ok: bool) -> str:
    return "ok" if ok else "**MISS**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _machine(d: dict[str, Any]) -> str:
    m = d.get("machine", {})
    keys = ("platform", "torch", "transformers", "threads", "torch_threads", "cpu_count")
    parts = [f"{k} {m[k]}" for k in keys if k in m]
    if "matmul_gflops_float32" in m:
        parts.append(f"float32 matmul {m['matmul_gflops_float32']:.0f} GFLOP/s")
    if "loadavg_at_start" in m:
        parts.append(f"load at start {m['loadavg_at_start'][0]:.2f}")
    return "; ".join(parts)


def _source(d: dict[str, Any]) -> list[str]:
    return [f"Command: `{d.get('command', '?').strip()}`. Machine: {_machine(d)}.", ""]


def activations(d: dict[str, Any]) -> list[str]:
    out = [
        f"{d['n']} WikiSplit sentences, batch {d['batch_size']}, median of {d['repeats']} "
        "fresh processes per method. `x hf`: tokens/s over the bare HF forward pass "
        "(peers: over the bare pass timed in their own environment); `mem x hf` likewise "
        "for the peak resident-set growth.",
        "",
    ]
    rows = []
    for r in d["rows"]:
        speed = r.get("speed_vs_hf", r.get("speed_vs_own_hf"))
        mem = r.get("mem_vs_hf", r.get("mem_vs_own_hf"))
        label = r["method"] if r["env"] == "main" else f"peers: {r['method']}"
        rows.append(
            [
                r["model"],
                r["mode"],
                label,
                f"{r['tokens_per_s']:.0f}",
                f"{speed:.2f}x",
                f"{r['peak_mb']:.0f}",
                f"{mem:.2f}x",
                f"{r['gflops']:.1f}",
            ]
        )
    hdr = ["model", "positions", "method", "tok/s", "x hf", "peak MB", "mem x hf", "GFLOP/s"]
    out += _table(hdr, rows) + [""]
    trows = []
    for key, s in d.get("summary", {}).items():
        trows.append(
            [
                key,
                "speed vs bare HF",
                f"{s['speed_vs_hf']:.2f}x",
                ">= 0.9x",
                _verdict(s["speed_vs_hf"] >= 0.9),
            ]
        )
        trows.append(
            [
                key,
                "peak memory vs bare HF",
                f"{s['mem_vs_hf']:.2f}x",
                "<= 1.2x",
                _verdict(s["mem_vs_hf"] <= 1.2),
            ]
        )
        if "speed_vs_tl_cache" in s:
            v = s["speed_vs_tl_cache"]
            trows.append(
                [key, "speed vs TL run_with_cache", f"{v:.2f}x", ">= 2x", _verdict(v >= 2)]
            )
        for pm in ("steering_vectors", "repeng"):
            if f"speed_vs_{pm}_raw" in s:
                raw, norm = s[f"speed_vs_{pm}_raw"], s[f"speed_vs_{pm}_normalized"]
                trows.append(
                    [
                        key,
                        f"speed vs {pm} (raw / normalized)",
                        f"{raw:.2f}x / {norm:.2f}x",
                        "> 1x",
                        _verdict(min(raw, norm) > 1),
                    ]
                )
    out += ["Targets:", ""] + _table(["cell", "target", "measured", "needed", ""], trows)
    return out + [""]


def generation(d: dict[str, Any]) -> list[str]:
    out = [
        f"{d['n']} prompts x {d['max_new_tokens']} new tokens, batch {d['batch_size']}, "
        f"alpha {d['alpha']}, {d['repeats']} rounds alternating the variants. `time x base`: "
        "seconds over the same process's unsteered baseline.",
        "",
    ]
    rows = []
    for r in d["rows"]:
        label = r["variant"] + (" (shim)" if r.get("shimmed") else "")
        rows.append(
            [
                r["model"],
                r["process"],
                label,
                f"{r['tokens_per_s']:.1f}",
                f"{r['time_vs_base']:.3f}x",
            ]
        )
    out += _table(["model", "process", "variant", "tok/s", "time x base"], rows) + [""]
    trows = []
    for model, s in d.get("summary", {}).items():
        slow = s["steered_slowdown"]
        trows.append(
            [
                model,
                "contrans steered vs unsteered",
                f"{100 * slow:+.1f}%",
                "<= +5%",
                _verdict(slow <= 0.05),
            ]
        )
        for pm in ("steering_vectors", "repeng"):
            if f"{pm}_slowdown" in s:
                trows.append(
                    [
                        model,
                        f"{pm} steered vs its bare generate",
                        f"{100 * s[f'{pm}_slowdown']:+.1f}%",
                        "(peer)",
                        "",
                    ]
                )
        trows.append(
            [
                model,
                "contrans unsteered vs bare HF generate (speed)",
                f"{s['contrans_unsteered_vs_hf_generate_speed']:.2f}x",
                "(context)",
                "",
            ]
        )
    out += ["Targets:", ""] + _table(["model", "measure", "measured", "needed", ""], trows)
    return out + [""]


def evaluation(d: dict[str, Any]) -> list[str]:
    st = d["settings"]
    out = [f"Model {d['model']}; median of {st['repeats']} alternating runs.", ""]
    rows = []
    labels = {
        "emotion": (
            "emotion evaluation",
            "few-shot prefix KV reused vs recomputed",
            lambda r: (
                f"same top token {r['same_top_token']:.3f}, "
                f"max abs logit diff {r['max_abs_logit_diff']:.1e}"
            ),
            True,
        ),
        "truthfulqa": (
            "TruthfulQA MC1",
            "question KV shared by choices vs per choice",
            lambda r: (
                f"same MC1 pick {r['same_mc1_pick']:.3f}, "
                f"max abs score diff {r['max_abs_score_diff']:.1e}"
                + (
                    f"; FLOP bound of sharing on these prompts {r['flop_bound_speedup']:.2f}x, "
                    f"reached {r['speedup'] / r['flop_bound_speedup']:.0%}"
                    if "flop_bound_speedup" in r
                    else ""
                )
            ),
            True,
        ),
        "toxigen": (
            "ToxiGen generation",
            "batched vs one prompt at a time",
            lambda r: f"identical continuations {r['identical_continuations']:.3f}",
            False,
        ),
    }
    for part, (name, what, check, targeted) in labels.items():
        if part not in d:
            continue
        r = d[part]
        verdict = _verdict(r["speedup"] >= 3) + " (>= 3x)" if targeted else "(no target)"
        rows.append(
            [
                name,
                what,
                f"{r['fast_seconds']:.2f}",
                f"{r['slow_seconds']:.2f}",
                f"{r['speedup']:.2f}x",
                verdict,
                check(r),
            ]
        )
    out += _table(["part", "fast vs slow", "fast s", "slow s", "speedup", "target", "check"], rows)
    return out + [""]


def mapfit(d: dict[str, Any]) -> list[str]:
    out = [
        f"{d['d_src']} -> {d['d_tgt']}, chunks of {d['chunk']}, median of {d['repeats']} fresh "
        f"processes; allocator {d.get('allocator', 'default')}.",
        "",
    ]
    rows = [
        [
            f"{r['n']:,}",
            f"{r['stream_seconds']:.3f}",
            f"{r['full_seconds']:.3f}",
            f"{r['time_ratio_full_over_stream']:.2f}x",
            f"{r['stream_peak_mb']:.0f}",
            f"{r['full_peak_mb']:.0f}",
            f"{r['mem_ratio_full_over_stream']:.2f}x",
            f"{r['max_rel_diff']:.1e}",
        ]
        for r in d["rows"]
    ]
    hdr = [
        "N",
        "stream s",
        "full lstsq s",
        "time full/stream",
        "stream MB",
        "full MB",
        "mem full/stream",
        "max rel diff",
    ]
    out += _table(hdr, rows) + [""]
    t = d.get("targets", {})
    if "same_map" in t:
        out.append(
            f"- same map within 1e-4: {_verdict(t['same_map']['ok'])} "
            f"(largest relative difference {t['same_map']['max_rel_diff']:.1e})"
        )
    if "stream_memory_flat" in t:
        m = t["stream_memory_flat"]
        out.append(
            f"- stream memory independent of N: {_verdict(m['ok'])} (peak at "
            f"N={m['n_large']:,} is {m['peak_ratio_large_over_small']:.2f}x that at "
            f"N={m['n_small']:,}; needed <= 1.2x)"
        )
    return out + [""]


def scaling(d: dict[str, Any]) -> list[str]:
    r0 = d["rows"][0]
    out = [
        f"{r0['n_texts']} WikiSplit sentences per model; float32 matmul rate "
        f"{r0['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s with {r0['threads']} threads (measured "
        "in each worker; the first shown). Ceiling: FLOPs of the pass / that rate. `util`: "
        "the ceiling's time over the measured time.",
        "",
    ]
    rows = []
    for r in d["rows"]:
        rd, fu = r["read"], r["full"]
        rows.append(
            [
                r["model"],
                f"{r['weights']['blocks'] / 1e6:.1f}",
                f"{rd['tokens_per_s']:.0f}",
                f"{rd['ceiling_tokens_per_s']:.0f}",
                f"{rd['utilization']:.2f}",
                f"{fu['tokens_per_s']:.0f}",
                f"{fu['ceiling_tokens_per_s']:.0f}",
                f"{fu['utilization']:.2f}",
                f"{fu['seconds'] / rd['seconds']:.2f}x",
            ]
        )
    hdr = [
        "model",
        "block weights (M)",
        "read tok/s",
        "ceiling",
        "util",
        "full tok/s",
        "ceiling",
        "util",
        "full time / read time",
    ]
    return out + _table(hdr, rows) + [""]


def demo(d: dict[str, Any]) -> list[str]:
    runs = d["runs"]
    out = [
        f"The README demo (`{d['demo']}`), each run a fresh process timed from start to exit "
        "(imports and model loading included). `first`: empty result cache; `repeat`: the same "
        "command again. Load: the 1-minute load average before / after the run (2 cores; "
        "other work beside a run slows it).",
        "",
    ]
    rows = []
    for name, r in runs.items():
        steps = r.get("step_seconds") or {}
        top = sorted(steps.items(), key=lambda kv: -kv[1])[:3]
        rows.append(
            [
                name,
                f"{r['seconds']:.1f}",
                "-" if r.get("experiment_seconds") is None else f"{r['experiment_seconds']:.1f}",
                f"{r['loadavg_before']:.2f} / {r['loadavg_after']:.2f}",
                ", ".join(f"{k} {v:.0f} s" for k, v in top) or "-",
            ]
        )
    out += _table(["run", "wall s", "in experiment s", "load", "largest steps"], rows) + [""]
    trows = [
        [name, f"{t['seconds']:.1f} s", f"<= {t['target']:g} s", _verdict(t["ok"])]
        for name, t in d["targets"].items()
    ]
    for k, v in d.get("ratios", {}).items():
        trows.append([k.replace("_", " "), f"{v:.2f}x", "", ""])
    for name, s in d.get("same_numbers_as_before", {}).items():
        n, off = s["numbers_compared"], s["problems"]
        where = f" ({'; '.join(off[:2])})" if off else ""
        trows.append(
            [
                f"{name}: same numbers as before",
                f"{n - len(off)} of {n} within 1e-6; largest diff {s['max_abs_diff']:.3g}{where}",
                "<= 1e-6",
                _verdict(not off),
            ]
        )
    out += ["Targets:", ""] + _table(["cell", "measured", "needed", ""], trows)
    return out + [""]


SECTIONS = {
    "activations": ("Activation reads", activations),
    "generation": ("Steered generation", generation),
    "eval": ("Evaluation: shared prefixes and batching", evaluation),
    "mapfit": ("Map fitting: streaming vs one least-squares solve", mapfit),
    "scaling": ("Scaling with model size", scaling),
    "demo": ("The README demo: first and repeated run", demo),
}


def render(results: Path) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/make_tables.py` from `benchmarks/results/*.json`; "
        "each section names the command that wrote its JSON and the machine it ran on. "
        "How each number is measured: `benchmarks/README.md`. Ratios compare runs made side "
        "by side in one invocation; absolute times on this shared 2-core machine mean little.",
        "",
    ]
    for key, (title, fn) in SECTIONS.items():
        lines += [f"## {title}", ""]
        path = results / f"{key}.json"
        if not path.exists():
            lines += [f"Not run (no `{path.name}`; `python benchmarks/{FILES[key]}`).", ""]
        else:
            d = json.loads(path.read_text())
            lines += _source(d) + fn(d)
        # further runs of the same script (another model, say): ``{key}_{label}.json``
        for extra in sorted(results.glob(f"{key}_*.json")):
            d = json.loads(extra.read_text())
            lines += [f"### {title}: {extra.stem[len(key) + 1 :]}", ""]
            lines += _source(d) + fn(d)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    text = render(Path(args.results))
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
