"""Steered generation: tokens/s with a vector added on every layer, against unsteered.

Greedy generation of exactly ``--max-new-tokens`` tokens for each of ``--n`` prompts (the
first ``--prompt-words`` words of WikiSplit sentences), batched ``--batch-size`` at a time
(longest first, left padding), KV cache on. The steering adds ``α · v_k`` to the output of
every block (``blocks.{k}.hook_resid_post``), with ``v_k`` a seeded random unit vector per
layer, the same for every method (written to a file the peers read too).

Variants (main environment, transformers 5.x):

- ``contrans`` process: ``contrans_tl.generate`` unsteered, steered with
  ``make_steering(model, v, α)`` (positions ``"all"``: prompt and generated tokens,
  padding never steered), and steered with ``positions="generated"``; the three alternate,
  ``--repeats`` rounds, in one process, so their ratios are side by side.
- ``hf`` process: the bare Hugging Face ``generate`` (the ceiling), and the same with a plain
  torch forward hook on each decoder layer adding ``α · v_k`` (the least steering can cost).

The peers (``benchmarks/peers/bench_peers.py generation``, transformers 4.x): bare
``generate``, steering-vectors ``SteeringVector.apply`` and repeng ``ControlModel`` with the
same vectors and α, alternating in one process; each against its own bare ``generate``.

Throughput is generated tokens (prompts × new tokens) per second, prompt processing
included. The target (issue 6): contrans steered ≤ 5% slower than contrans unsteered. A
check compares the first prompt's generated ids across methods: steered runs should agree
with each other and differ from unsteered ones (showing the vector was applied).

Usage:
    python benchmarks/bench_generation.py                # 32 prompts x 32 tokens, both models
    python benchmarks/bench_generation.py --quick        # SmolLM2, 4 prompts x 8 tokens
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import (  # noqa: E402
    PEERS_DIR,
    ROOT,
    PeakMemory,
    batches_longest_first,
    generation_prompts,
    machine_info,
    median,
    model_folder,
    peers_python,
    run_json,
    write_json,
)

MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
CT_VARIANTS = ("unsteered", "steered", "steered_generated")
HF_VARIANTS = ("unsteered", "hooked")


# ---------------------------------------------------------------- workers


def _rounds(variants: tuple[str, ...], repeats: int) -> list[str]:
    """``repeats`` rounds of all variants, the order rotated each round."""
    out: list[str] = []
    for r in range(repeats):
        k = r % len(variants)
        out += list(variants[k:] + variants[:k])
    return out


def ct_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from contrans_tl.concepts import ConceptVector
    from contrans_tl.models import load_model, model_provenance
    from contrans_tl.steering import generate, make_steering

    torch.set_grad_enabled(False)
    tl = load_model(args.model)
    n_layers = int(tl.cfg.n_layers)
    vecs = load_file(args.vectors)["vectors"].float()
    v = ConceptVector(
        vecs,
        tuple(range(n_layers)),
        model_provenance(tl),
        concept="random",
        method="random",
    )
    steerings: dict[str, Any] = {
        "unsteered": None,
        "steered": make_steering(tl, v, args.alpha, positions="all"),
        "steered_generated": make_steering(tl, v, args.alpha, positions="generated"),
    }
    prompts = generation_prompts(args.n, args.prompt_words)

    def call(variant: str, ps: list[str], new: int) -> list[list[int]]:
        out = generate(
            tl,
            ps,
            max_new_tokens=new,
            intervention=steerings[variant],
            stop_at_eos=False,
            batch_size=args.batch_size,
            decode=False,
        )
        return out  # type: ignore[return-value]

    for variant in CT_VARIANTS:  # warm-up: one short prompt, two tokens
        call(variant, prompts[:1], 2)
    return _timed_rounds(
        CT_VARIANTS, args, lambda vr: call(vr, prompts, args.max_new_tokens), len(prompts)
    )


def hf_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file
    from transformer_lens.utilities.tokenize_utils import get_tokenizer_with_bos

    from contrans_tl.models import load_hf_model
    from contrans_tl.tokens import pad_left, pad_token_id

    torch.set_grad_enabled(False)
    hf: Any
    hf, tok, _ = load_hf_model(args.model)
    tok = get_tokenizer_with_bos(tok)  # the token ids contrans_tl's bridge feeds
    n_layers = int(hf.config.num_hidden_layers)
    adds = args.alpha * load_file(args.vectors)["vectors"].float()
    prompts = generation_prompts(args.n, args.prompt_words)
    enc = [tok(p)["input_ids"] for p in prompts]
    pad = pad_token_id(tok)

    def add_hook(k: int) -> Any:
        def hook(_m: Any, _i: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (output[0] + adds[k],) + tuple(output[1:])
            return output + adds[k]

        return hook

    def call(variant: str, which: list[int], new: int) -> list[list[int]]:
        handles = []
        if variant == "hooked":
            handles = [
                hf.model.layers[k].register_forward_hook(add_hook(k)) for k in range(n_layers)
            ]
        out: dict[int, list[int]] = {}
        try:
            lengths = [len(enc[i]) for i in which]
            for b in batches_longest_first(lengths, args.batch_size):
                rows = [which[j] for j in b]
                ids, mask = pad_left([enc[i] for i in rows], pad)
                seq = hf.generate(
                    input_ids=ids,
                    attention_mask=mask.long(),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=pad,
                )
                for r, i in enumerate(rows):
                    out[i] = seq[r, ids.shape[1] :].tolist()
        finally:
            for h in handles:
                h.remove()
        return [out[i] for i in which]

    everything = list(range(len(prompts)))
    for variant in HF_VARIANTS:
        call(variant, [0], 2)
    return _timed_rounds(
        HF_VARIANTS, args, lambda vr: call(vr, everything, args.max_new_tokens), len(prompts)
    )


def _timed_rounds(
    variants: tuple[str, ...], args: argparse.Namespace, run: Any, n_prompts: int
) -> dict[str, Any]:
    import torch

    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, float] = {}
    first: dict[str, list[int]] = {}
    for variant in _rounds(variants, args.repeats):
        with PeakMemory() as pm:
            t = time.perf_counter()
            out = run(variant)
            times[variant].append(time.perf_counter() - t)
        peaks.setdefault(variant, pm.delta_mb)
        first.setdefault(variant, list(out[0]))
    return {
        "model": args.model,
        "n": n_prompts,
        "max_new_tokens": args.max_new_tokens,
        "generated_tokens": n_prompts * args.max_new_tokens,
        "seconds": times,
        "peak_mb": peaks,
        "first_prompt_ids": first,
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- parent


def _write_vectors(model: str, path: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model_folder(model) / "config.json").read_text())
    n_layers, d = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n_layers, d, generator=g)
    save_file({"vectors": (v / v.norm(dim=-1, keepdim=True)).contiguous()}, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--n", type=int, default=32, help="prompts")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per process; median")
    ap.add_argument("--alpha", type=float, default=8.0, help="strength of the unit vectors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--peers-python")
    ap.add_argument("--quick", action="store_true", help="SmolLM2, 4 prompts x 8 tokens, 1 round")
    ap.add_argument("--out", default=str(ROOT / "results" / "generation.json"))
    ap.add_argument("--worker", choices=("contrans", "hf"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--vectors", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps((ct_worker if args.worker == "contrans" else hf_worker)(args)))
        return
    if args.quick:
        args.models, args.n, args.batch_size = MODELS[0], 4, 4
        args.max_new_tokens, args.repeats = 8, 1
    models = [m for m in args.models.split(",") if m]
    if min(args.n, args.batch_size, args.max_new_tokens, args.repeats, args.prompt_words) < 1:
        raise SystemExit("sizes must be positive")

    info = machine_info()
    print(f"{info['platform']}, torch {info['torch']}, {info['torch_threads']} threads")
    print(
        f"{args.n} prompts x {args.max_new_tokens} new tokens, batch {args.batch_size}, "
        f"{args.repeats} round(s), alpha {args.alpha}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_gen_"))
    common = [
        "--n",
        str(args.n),
        "--batch-size",
        str(args.batch_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--prompt-words",
        str(args.prompt_words),
        "--repeats",
        str(args.repeats),
        "--alpha",
        str(args.alpha),
    ]
    res: dict[str, dict[str, Any]] = {}
    for model in models:
        vec = tmp / f"{model}.safetensors"
        _write_vectors(model, vec, args.seed)
        res[model] = {}
        for w in ("contrans", "hf"):
            res[model][w] = run_json(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    w,
                    "--model",
                    model,
                    "--vectors",
                    str(vec),
                    *common,
                ]
            )
            print(f"  [{model}] {w} done", flush=True)

    peers: dict[str, Any] | None = None
    ppy = peers_python(args.peers_python)
    if args.peers == "on" and (ppy is None or not ppy.exists()):
        raise SystemExit("no peers virtualenv: run bash benchmarks/peers/setup.sh first")
    if args.peers != "off" and ppy is not None and ppy.exists():
        out = tmp / "peers.json"
        cmd = [
            str(ppy),
            str(PEERS_DIR / "bench_peers.py"),
            "generation",
            "--models",
            ",".join(models),
            "--vectors-dir",
            str(tmp),
            "--out",
            str(out),
            *common,
        ]
        print("peers:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        peers = json.loads(out.read_text())
    elif args.peers != "off":
        print("peers skipped: no virtualenv (bash benchmarks/peers/setup.sh)")

    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for model in models:
        groups = [
            ("contrans", res[model]["contrans"], "unsteered"),
            ("hf", res[model]["hf"], "unsteered"),
        ]
        if peers is not None:
            groups.append(("peers", peers["models"][model], "hf"))
        ref_ids = res[model]["contrans"]["first_prompt_ids"]
        print(f"\n{model}: {res[model]['contrans']['generated_tokens']} generated tokens a run")
        print(
            f"{'process':<10}{'variant':<19}{'tok/s':>8}{'s':>8}{'time x base':>12}"
            f"{'peak MB':>9}{'same ids as ct steered':>24}"
        )
        for proc, r, base in groups:
            base_s = median(r["seconds"][base])
            for variant, ts in r["seconds"].items():
                s = median(ts)
                ids = r["first_prompt_ids"][variant]
                same = sum(a == b for a, b in zip(ids, ref_ids["steered"])) / max(len(ids), 1)
                row = {
                    "model": model,
                    "process": proc,
                    "variant": variant,
                    "seconds": s,
                    "tokens_per_s": r["generated_tokens"] / s,
                    "time_vs_base": s / base_s,
                    "base": base,
                    "peak_mb": (r.get("peak_mb") or {}).get(variant),
                    "first_prompt_agreement_with_contrans_steered": same,
                }
                label = variant
                if variant in r.get("shimmed", []):
                    row["shimmed"] = True
                    row["error_as_is"] = r["errors_as_is"].get(variant)
                    label += " (shim)"
                rows.append(row)
                pk = row["peak_mb"]
                print(
                    f"{proc:<10}{label:<19}{row['tokens_per_s']:>8.1f}{s:>8.2f}"
                    f"{row['time_vs_base']:>11.3f}x{(f'{pk:.0f}' if pk is not None else '-'):>9}"
                    f"{same:>23.0%}"
                )
        ct = res[model]["contrans"]["seconds"]
        slow = median(ct["steered"]) / median(ct["unsteered"]) - 1
        slow_gen = median(ct["steered_generated"]) / median(ct["unsteered"]) - 1
        # per-round pairs (same round, adjacent calls) are less exposed to drift
        pairs = [a / b - 1 for a, b in zip(ct["steered"], ct["unsteered"])]
        summ: dict[str, Any] = {
            "steered_slowdown": slow,
            "steered_generated_slowdown": slow_gen,
            "steered_slowdown_per_round": pairs,
            "target_slowdown": 0.05,
            "unsteered_equals_steered_ids": ref_ids["unsteered"] == ref_ids["steered"],
        }
        hfs = res[model]["hf"]["seconds"]
        summ["contrans_unsteered_vs_hf_generate_speed"] = median(hfs["unsteered"]) / median(
            ct["unsteered"]
        )
        summ["hf_hooked_slowdown"] = median(hfs["hooked"]) / median(hfs["unsteered"]) - 1
        if peers is not None:
            ps = peers["models"][model]["seconds"]
            for pm in ("steering_vectors", "repeng"):
                summ[f"{pm}_slowdown"] = median(ps[pm]) / median(ps["hf"]) - 1
                # speed of contrans steered relative to the peer, each over its own baseline
                summ[f"contrans_steered_vs_{pm}_normalized"] = (
                    median(ps[pm]) / median(ps["hf"])
                ) / (median(ct["steered"]) / median(hfs["unsteered"]))
                summ[f"contrans_steered_vs_{pm}_raw"] = median(ps[pm]) / median(ct["steered"])
        summary[model] = summ
        verdict = "ok" if slow <= 0.05 else "MISS"
        print(
            f"  contrans steered is {100 * slow:+.1f}% time vs unsteered ({verdict}, target "
            f"<= +5%); positions='generated' {100 * slow_gen:+.1f}%; per round "
            + ", ".join(f"{100 * p:+.1f}%" for p in pairs)
        )
        print(
            f"  contrans unsteered runs at {summ['contrans_unsteered_vs_hf_generate_speed']:.2f}x "
            f"the bare HF generate's speed; a bare HF hook costs "
            f"{100 * summ['hf_hooked_slowdown']:+.1f}%"
        )
        if summ["unsteered_equals_steered_ids"]:
            print(
                "  note: steering did not change the first prompt's tokens; raise --alpha "
                "to see that the vector is applied"
            )
        if peers is not None:
            for v, err in peers["models"][model].get("errors_as_is", {}).items():
                summ[f"{v}_error_as_is"] = err
                print(f"  {v} fails on {model} as it is ({err}); its row is timed with a shim")
            print(
                "  peers (each vs its own bare generate): "
                + ", ".join(
                    f"{pm} {100 * summ[f'{pm}_slowdown']:+.1f}%"
                    for pm in ("steering_vectors", "repeng")
                )
            )

    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    write_json(
        args.out,
        {
            "benchmark": "steered greedy generation, vector added at every layer",
            "command": "python benchmarks/bench_generation.py " + " ".join(sys.argv[1:]),
            "n": args.n,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "prompt_words": args.prompt_words,
            "repeats": args.repeats,
            "alpha": args.alpha,
            "machine": info,
            "rows": rows,
            "summary": summary,
            "runs": res,
            "peers": peers,
        },
    )


if __name__ == "__main__":
    main()
