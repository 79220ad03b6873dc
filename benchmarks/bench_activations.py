"""Activation reads: contrans_tl against the bare forward pass, TransformerLens and the peers.

The job: read ``resid_post`` of every layer for N WikiSplit sentences, at each text's last
token (``last``) and at each word's last token (``word_ends``). Methods, all on the same
float32 weights, the same texts, the same batches (longest first, ``--batch-size`` texts a
batch, left padding with the same pad id):

- ``contrans``: ``contrans_tl.read_resid_post(model, texts, layers=None, positions=...)``.
  Its time includes its own tokenization and position finding; the baselines get their
  padded batches and positions prepared before the clock starts.
- ``hf`` (the ceiling): the bare Hugging Face decoder stack (``model.model``, no LM
  head, ``use_cache=False``) with ``output_hidden_states=True``; the selected rows of each
  layer's hidden states are copied out.
- ``hf_hooks``: the same decoder stack without ``output_hidden_states``; plain torch
  forward hooks on the decoder layers copy out only the selected rows (the leanest way to
  get these states from bare Hugging Face).
- ``hf_logits``: the ``hf`` pass through the whole ``*ForCausalLM`` (logits computed and thrown
  away), as a user who calls ``model(**batch, output_hidden_states=True)`` gets it.
- ``tl_cache``: TransformerLens ``run_with_cache`` with no ``names_filter`` (every hook
  cached, full forward) and the rows read from ``blocks.{k}.hook_resid_post``.
- the peers, ``steering-vectors`` 0.12.2 and ``repeng`` 0.4.0, in their own virtualenv
  (transformers 4.x; see ``benchmarks/peers/``), each timed against a bare forward pass
  timed there the same way; ``last`` only, as neither reads more than one position a text.

Every (model, method, repeat) runs in a fresh subprocess (methods interleaved, the order
rotated each repeat); each does one untimed warm-up batch, then the timed pass. The table
shows medians over repeats. Throughput is real (unpadded) tokens per second. Peak memory
is the growth of the process's resident set during the timed pass (high-water mark reset
just before it; outputs included), see ``benchmarks/_benchutil.py``. GFLOP/s counts
``2 · (parameters of the decoder blocks) · real tokens`` (embeddings, LM head, attention
scores and padding left out: the useful work every method must do) and is set against a
float32 ``2048²`` matmul measured in the same run with the same threads. A check column
gives the largest difference from ``hf``'s states on the first ``--check-texts`` texts at
three layers, relative to the largest ``hf`` value.

Usage:
    python benchmarks/bench_activations.py                 # 500 texts, both models, peers
    python benchmarks/bench_activations.py --quick         # SmolLM2, 16 texts, 1 repeat
    OMP_NUM_THREADS=1 python benchmarks/bench_activations.py --models gemma-3-270m --n 200

Targets (issue 6): contrans ≥ 0.9× ``hf`` tokens/s, ≥ 2× ``tl_cache``, ahead of both peers,
peak memory ≤ 1.2× ``hf``.
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
    fmt,
    machine_info,
    matmul_gflops,
    median,
    peers_python,
    run_json,
    write_json,
)

MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
METHODS = ("contrans", "hf", "hf_hooks", "hf_logits", "tl_cache")
MODES = ("last", "word_ends")


# ---------------------------------------------------------------- worker (one subprocess)


def _grab(store: dict[int, Any], k: int, rows: Any, cols: Any) -> Any:
    """A torch forward hook on decoder layer ``k`` that copies out the selected rows."""

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        h = output[0] if isinstance(output, tuple) else output
        store[k] = h[rows, cols].float().clone()

    return hook


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from contrans_tl.activations import read_resid_post, select_positions
    from contrans_tl.data import wikisplit_sentences
    from contrans_tl.models import load_hf_model, load_model
    from contrans_tl.sites import resid_post_name
    from contrans_tl.tokens import encode, pad_left, pad_token_id

    torch.set_grad_enabled(False)
    method, bs = args.worker, args.batch_size
    texts = wikisplit_sentences(args.n)
    t_load = time.perf_counter()
    hf: Any = None
    tl: Any = None
    if method in ("hf", "hf_hooks", "hf_logits"):
        from transformer_lens.utilities.tokenize_utils import get_tokenizer_with_bos

        hf, tok, _ = load_hf_model(args.model)
        # the tokenizer the bridge uses (BOS prepended, as TransformerLens does), so that
        # every method reads the same token ids
        tok = get_tokenizer_with_bos(tok)
        n_layers = int(hf.config.num_hidden_layers)
    else:
        tl = load_model(args.model)
        tok, n_layers = tl.tokenizer, int(tl.cfg.n_layers)
    load_s = time.perf_counter() - t_load
    block_params = None
    if hf is not None:
        block_params = sum(p.numel() for p in hf.model.layers.parameters())
    layers = list(range(n_layers))
    check_layers = sorted({0, n_layers // 2, max(n_layers - 2, 0)})
    encs = encode(tok, texts)
    lengths = [len(e) for e in encs]
    batches = batches_longest_first(lengths, bs)
    pad = pad_token_id(tok)

    def one_batch(ids: Any, mask: Any, rows: Any, cols: Any) -> dict[int, Any]:
        if method == "hf":
            out = hf.model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
            )
            return {k: out.hidden_states[k + 1][rows, cols].float().clone() for k in layers}
        if method == "hf_hooks":
            store: dict[int, Any] = {}
            handles = [
                hf.model.layers[k].register_forward_hook(_grab(store, k, rows, cols))
                for k in layers
            ]
            try:
                hf.model(input_ids=ids, attention_mask=mask, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            return store
        if method == "hf_logits":
            out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            return {k: out.hidden_states[k + 1][rows, cols].float().clone() for k in layers}
        if method == "tl_cache":
            _, cache = tl.run_with_cache(ids, attention_mask=mask)
            return {k: cache[resid_post_name(k)][rows, cols].float().clone() for k in layers}
        raise ValueError(method)

    mode = args.mode
    sel = [select_positions(e, mode)[0] for e in encs]
    prepared = []
    row_text: list[int] = []
    for idx in batches:
        ids, mask = pad_left([encs[i].ids for i in idx], pad)
        width = ids.shape[1]
        rows: list[int] = []
        cols: list[int] = []
        for r, i in enumerate(idx):
            rows += [r] * len(sel[i])
            cols += [p + width - len(encs[i]) for p in sel[i]]
            row_text += [i] * len(sel[i])
        prepared.append((ids, mask.long(), torch.tensor(rows), torch.tensor(cols)))
    # warm-up, untimed: the shortest text alone (first-call costs, without growing the heap
    # the way a full batch would before the memory measure)
    shortest = min(range(len(encs)), key=lambda i: lengths[i])
    if method == "contrans":
        read_resid_post(tl, [texts[shortest]], positions=mode, progress=False)
    else:
        ids, mask = pad_left([encs[shortest].ids], pad)
        one_batch(ids, mask.long(), torch.tensor([0]), torch.tensor([len(encs[shortest]) - 1]))
    with PeakMemory() as pm:
        t = time.perf_counter()
        if method == "contrans":
            reads = read_resid_post(
                tl, texts, layers=None, positions=mode, batch_size=bs, progress=False
            )
            seconds = time.perf_counter() - t
            n_states = len(reads)
        else:
            per_batch = [one_batch(*p) for p in prepared]
            seconds = time.perf_counter() - t
            n_states = sum(int(p[2].numel()) for p in prepared)
    # checks (untimed): rows of the first texts, in text order
    check: dict[str, Any] = {}
    if method == "contrans":
        keep = reads.text_index < args.check_texts
        for k in check_layers:
            check[f"{mode}.{k}"] = reads.states[k][keep].contiguous()
    else:
        rt = torch.tensor(row_text)
        order = rt.argsort(stable=True)
        keep = order[rt[order] < args.check_texts]
        for k in check_layers:
            check[f"{mode}.{k}"] = torch.cat([b[k] for b in per_batch])[keep].contiguous()
    result = {
        "method": method,
        "model": args.model,
        "mode": mode,
        "n": len(texts),
        "batch_size": bs,
        "load_seconds": load_s,
        "block_params": block_params,
        "n_layers": n_layers,
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
        "tokens": sum(lengths),
        "padded_tokens": sum(p[0].numel() for p in prepared),
        "n_states": n_states,
        "peak_mb": pm.delta_mb,
        "file_pages_mb": pm.file_delta_mb,
        "memory_method": pm.method,
    }
    if args.check_out:
        save_file(check, args.check_out)
    return result


# ---------------------------------------------------------------- parent


def _rel_diff(a_path: Path, b_path: Path) -> float | None:
    """Largest |a − b| over all checked tensors, relative to the largest |b|."""
    if not (a_path.exists() and b_path.exists()):
        return None
    from safetensors.torch import load_file

    a, b = load_file(str(a_path)), load_file(str(b_path))
    worst = 0.0
    for key, ref in b.items():
        if key not in a or a[key].shape != ref.shape:
            return float("inf")
        scale = float(ref.abs().max()) or 1.0
        worst = max(worst, float((a[key] - ref).abs().max()) / scale)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--n", type=int, default=500, help="WikiSplit sentences")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per method; median")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--peers",
        choices=("auto", "on", "off"),
        default="auto",
        help="run the peers in their virtualenv (auto: if it exists)",
    )
    ap.add_argument("--peers-python", help="the peers' interpreter (default: the venv's)")
    ap.add_argument("--check-texts", type=int, default=16)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="SmolLM2, 16 texts, batch 8, 1 repeat; contrans, hf, tl_cache",
    )
    ap.add_argument("--out", default=str(ROOT / "results" / "activations.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--check-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.models, args.n, args.batch_size, args.repeats = MODELS[0], 16, 8, 1
        args.methods = "contrans,hf,tl_cache"
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    if "hf" not in methods:
        methods.insert(0, "hf")  # the ceiling every ratio is against
    bad = [m for m in methods if m not in METHODS] + [m for m in modes if m not in MODES]
    if bad or args.n < 2 or args.batch_size < 1 or args.repeats < 1:
        raise SystemExit(f"bad arguments: {bad or 'sizes must be positive (n >= 2)'}")

    info = machine_info()
    peak_gflops = matmul_gflops()
    print(
        f"{info['platform']}, torch {info['torch']}, {info['torch_threads']} threads; "
        f"float32 matmul {peak_gflops:.0f} GFLOP/s"
    )
    print(f"{args.n} texts, batch {args.batch_size}, {args.repeats} repeat(s), modes {modes}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_act_"))
    # runs[model][mode][method] = one result per repeat
    runs: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for model in models:
        runs[model] = {md: {m: [] for m in methods} for md in modes}
        for r in range(args.repeats):
            rot = methods[r % len(methods) :] + methods[: r % len(methods)]
            for mode in modes:
                for method in rot:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--worker",
                        method,
                        "--model",
                        model,
                        "--mode",
                        mode,
                        "--n",
                        str(args.n),
                        "--batch-size",
                        str(args.batch_size),
                        "--check-texts",
                        str(args.check_texts),
                    ]
                    if r == 0:
                        cmd += [
                            "--check-out",
                            str(tmp / f"{model}.{mode}.{method}.main.safetensors"),
                        ]
                    res = run_json(cmd)
                    runs[model][mode][method].append(res)
                    print(
                        f"  [{model} {mode} r{r}] {method:<9} {res['seconds']:.2f}s "
                        f"{res['peak_mb']:.0f}MB (load {res['load_seconds']:.1f}s)",
                        flush=True,
                    )

    peers: dict[str, Any] | None = None
    ppy = peers_python(args.peers_python)
    if args.peers == "on" and (ppy is None or not ppy.exists()):
        raise SystemExit("no peers virtualenv: run bash benchmarks/peers/setup.sh first")
    if args.peers != "off" and ppy is not None and ppy.exists() and "last" in modes:
        peers_out = tmp / "peers.json"
        cmd = [
            str(ppy),
            str(PEERS_DIR / "bench_peers.py"),
            "activations",
            "--models",
            ",".join(models),
            "--n",
            str(args.n),
            "--batch-size",
            str(args.batch_size),
            "--repeats",
            str(args.repeats),
            "--check-texts",
            str(args.check_texts),
            "--check-dir",
            str(tmp),
            "--out",
            str(peers_out),
        ]
        print("peers:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        peers = json.loads(peers_out.read_text())
    elif args.peers != "off":
        print("peers skipped: no virtualenv (bash benchmarks/peers/setup.sh)")

    # ------------------------------------------------------------ table
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for model in models:
        for mode in modes:
            block_params = runs[model][mode]["hf"][0]["block_params"]
            ref_check = tmp / f"{model}.{mode}.hf.main.safetensors"
            cell: dict[str, dict[str, Any]] = {}
            for method in methods:
                rs = runs[model][mode][method]
                secs = median([x["seconds"] for x in rs])
                tokens = rs[0]["tokens"]
                cell[method] = {
                    "seconds": secs,
                    "tokens_per_s": tokens / secs,
                    "peak_mb": median([x["peak_mb"] for x in rs]),
                    "gflops": 2 * block_params * tokens / secs / 1e9,
                    "tokens": tokens,
                    "padded_tokens": rs[0]["padded_tokens"],
                    "n_states": rs[0]["n_states"],
                }
            hf_ = cell["hf"]
            print(
                f"\n{model}, {mode}: {hf_['tokens']} tokens ({hf_['padded_tokens']} padded), "
                f"{hf_['n_states']} states x {runs[model][mode]['hf'][0]['n_layers']} layers; "
                f"{block_params / 1e6:.1f}M block params"
            )
            print(
                f"{'method':<17}{'tok/s':>8}{'x hf':>7}{'s':>8}{'peak MB':>9}{'mem x hf':>9}"
                f"{'GFLOP/s':>9}{'% mm':>6}{'max rel diff':>14}"
            )
            for method in methods:
                c = cell[method]
                c["speed_vs_hf"] = c["tokens_per_s"] / hf_["tokens_per_s"]
                c["mem_vs_hf"] = c["peak_mb"] / max(hf_["peak_mb"], 1e-9)
                c["check_rel_diff_vs_hf"] = _rel_diff(
                    tmp / f"{model}.{mode}.{method}.main.safetensors", ref_check
                )
                print(
                    f"{method:<17}{c['tokens_per_s']:>8.0f}{c['speed_vs_hf']:>6.2f}x"
                    f"{c['seconds']:>8.2f}{c['peak_mb']:>9.0f}{c['mem_vs_hf']:>8.2f}x"
                    f"{c['gflops']:>9.1f}{100 * c['gflops'] / peak_gflops:>5.0f}%"
                    f"{fmt(c['check_rel_diff_vs_hf'], '.1e'):>14}"
                )
                rows.append({"model": model, "mode": mode, "method": method, "env": "main", **c})
            peer_cell: dict[str, dict[str, Any]] = {}
            if peers is not None and mode == "last":
                pc = peers["cells"].get(model, {})
                p_hf = pc.get("hf")
                for pm, c in pc.items():
                    c = dict(c)
                    c["speed_vs_own_hf"] = c["tokens_per_s"] / p_hf["tokens_per_s"]
                    c["mem_vs_own_hf"] = c["peak_mb"] / max(p_hf["peak_mb"], 1e-9)
                    c["gflops"] = 2 * block_params * c["tokens"] / c["seconds"] / 1e9
                    c["check_rel_diff_vs_hf"] = _rel_diff(
                        tmp / f"{model}.{mode}.{pm}.peers.safetensors", ref_check
                    )
                    peer_cell[pm] = c
                    label = f"peers:{pm}"
                    print(
                        f"{label:<17}{c['tokens_per_s']:>8.0f}{c['speed_vs_own_hf']:>6.2f}x"
                        f"{c['seconds']:>8.2f}{c['peak_mb']:>9.0f}{c['mem_vs_own_hf']:>8.2f}x"
                        f"{c['gflops']:>9.1f}{100 * c['gflops'] / peak_gflops:>5.0f}%"
                        f"{fmt(c['check_rel_diff_vs_hf'], '.1e'):>14}"
                    )
                    rows.append({"model": model, "mode": mode, "method": pm, "env": "peers", **c})
                print(
                    "  (peers: 'x hf' and 'mem x hf' are against peers:hf, the bare forward "
                    "in the peers' own processes, transformers "
                    f"{peers['machine'].get('transformers')})"
                )
            ct = cell.get("contrans")
            if ct is None:
                continue
            s: dict[str, Any] = {
                "speed_vs_hf": ct["speed_vs_hf"],
                "target_speed_vs_hf": 0.9,
                "mem_vs_hf": ct["mem_vs_hf"],
                "target_mem_vs_hf": 1.2,
            }
            if "tl_cache" in cell:
                s["speed_vs_tl_cache"] = ct["tokens_per_s"] / cell["tl_cache"]["tokens_per_s"]
                s["target_speed_vs_tl_cache"] = 2.0
            for pm in ("repeng", "steering_vectors"):
                if pm in peer_cell:
                    # raw: tokens/s against tokens/s; normalized: each against its own hf
                    s[f"speed_vs_{pm}_raw"] = ct["tokens_per_s"] / peer_cell[pm]["tokens_per_s"]
                    s[f"speed_vs_{pm}_normalized"] = (
                        ct["speed_vs_hf"] / peer_cell[pm]["speed_vs_own_hf"]
                    )
            summary[f"{model}/{mode}"] = s
            verdicts = [
                f"{ct['speed_vs_hf']:.2f}x hf ({'ok' if ct['speed_vs_hf'] >= 0.9 else 'MISS'}"
                " >= 0.9)",
                f"mem {ct['mem_vs_hf']:.2f}x hf ({'ok' if ct['mem_vs_hf'] <= 1.2 else 'MISS'}"
                " <= 1.2)",
            ]
            if "speed_vs_tl_cache" in s:
                v = s["speed_vs_tl_cache"]
                verdicts.append(f"{v:.2f}x tl_cache ({'ok' if v >= 2 else 'MISS'} >= 2)")
            for pm in ("repeng", "steering_vectors"):
                if f"speed_vs_{pm}_raw" in s:
                    raw, norm = s[f"speed_vs_{pm}_raw"], s[f"speed_vs_{pm}_normalized"]
                    ok = "ok" if min(raw, norm) > 1 else "MISS"
                    verdicts.append(f"{raw:.2f}x {pm} (normalized {norm:.2f}x, {ok} > 1)")
            print("  contrans: " + "; ".join(verdicts))

    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    write_json(
        args.out,
        {
            "benchmark": "activation reads: resid_post of every layer, last token and word ends",
            "command": "python benchmarks/bench_activations.py " + " ".join(sys.argv[1:]),
            "n": args.n,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "machine": {**info, "matmul_gflops_float32": peak_gflops},
            "memory": "peak resident-set growth during the timed pass (VmHWM reset via "
            "/proc/self/clear_refs, minus VmRSS before; outputs included); fresh "
            "subprocess per method and repeat",
            "gflops": "2 * decoder-block parameters * real tokens / seconds (embeddings, LM head, "
            "attention scores and padding not counted)",
            "rows": rows,
            "summary": summary,
            "runs": runs,
            "peers": peers,
        },
    )


if __name__ == "__main__":
    main()
