"""The peers, steering-vectors 0.12.2 and repeng 0.4.0, on contrans_tl's models and data.

Runs in the peers' virtualenv (``bash benchmarks/peers/setup.sh`` builds
``benchmarks/peers/.venv-peers``: transformers 4.57, numpy < 2, same CPU torch), because
repeng pins transformers < 5 and numpy < 2. ``bench_activations.py`` and
``bench_generation.py`` call it and merge its numbers; it also runs alone:

    benchmarks/peers/.venv-peers/bin/python benchmarks/peers/bench_peers.py activations --n 500
    benchmarks/peers/.venv-peers/bin/python benchmarks/peers/bench_peers.py generation

Weights: the float32 safetensors folders that contrans_tl caches
(``~/.cache/contrans_tl/zoo/NAME/float32``, written by transformers 5). transformers 4.x
cannot ``from_pretrained`` them as they are (no ``format`` entry in the safetensors
metadata; RoPE settings under 5.x's ``rope_parameters``), so the model is built from the
translated config and the state dict loaded directly (tied embeddings restored); the
tokenizer is the folder's ``tokenizer.json``, with BOS prepended as TransformerLens (and
so contrans_tl) does, so every method reads the same token ids.

Each peer is timed against a bare forward pass (or a bare ``generate``) timed here the same
way, so its ratio does not depend on the transformers version. Activations: one fresh
subprocess per (model, method, repeat), one untimed warm-up on the shortest text, peak
memory as in ``benchmarks/_benchutil.py``. Generation: the three variants alternate in one
process (``repeats`` rounds), greedy, exactly ``max_new_tokens`` new tokens per prompt.
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _benchutil import (  # noqa: E402
    PeakMemory,
    batches_longest_first,
    generation_prompts,
    machine_info,
    median,
    model_folder,
    run_json,
    wikisplit,
    write_json,
)

MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
ACT_METHODS = ("hf", "repeng", "steering_vectors")
GEN_VARIANTS = ("hf", "steering_vectors", "repeng")


# ---------------------------------------------------------------- loading (transformers 4.x)


def _config_for_tf4(d: dict[str, Any]) -> dict[str, Any]:
    """Translate a transformers-5 config dict (``rope_parameters``) to 4.x fields."""
    d = dict(d)
    rp = d.pop("rope_parameters", None)
    if rp:
        if "full_attention" in rp:  # Gemma-3: global and sliding-window RoPE
            full, local = rp["full_attention"], rp.get("sliding_attention", {})
            d["rope_theta"] = full["rope_theta"]
            if "rope_theta" in local:
                d["rope_local_base_freq"] = local["rope_theta"]
            d["rope_scaling"] = None if full.get("rope_type", "default") == "default" else full
        else:
            d["rope_theta"] = rp["rope_theta"]
            d["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    return d


def load_tf4(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from contrans_tl's float32 folder, under transformers 4.x."""
    import torch
    from safetensors.torch import load_file
    from tokenizers import processors
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = model_folder(name)
    raw = _config_for_tf4(json.loads((folder / "config.json").read_text()))
    model_type = raw.pop("model_type")
    for k in ("transformers_version", "_model_name_or_path", "dtype", "torch_dtype"):
        raw.pop(k, None)
    config = AutoConfig.for_model(model_type, **raw)
    try:  # skip the random initialisation that load_state_dict overwrites anyway
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    state = load_file(str(folder / "model.safetensors"))
    if "model.embed_tokens.weight" not in state and "lm_head.weight" in state:
        state["model.embed_tokens.weight"] = state["lm_head.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"{name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    model.requires_grad_(False)

    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    specials = {k: v for k, v in tcfg.items() if k.endswith("_token") and isinstance(v, str)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **specials)
    bos = tok.bos_token
    if bos is not None and tok("a")["input_ids"][:1] != [tok.bos_token_id]:
        backend: Any = tok._tokenizer
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.bos_token_id)],
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def _pad_left(seqs: list[list[int]], pad: int) -> tuple[Any, Any]:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s)
        mask[r, width - len(s) :] = 1
    return ids, mask


# ---------------------------------------------------------------- activation workers


def act_worker(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    method, bs = args.method, args.batch_size
    texts = wikisplit(args.n)
    t_load = time.perf_counter()
    model, tok = load_tf4(args.model)
    load_s = time.perf_counter() - t_load
    n_layers = int(model.config.num_hidden_layers)
    layers = list(range(n_layers))
    check_layers = sorted({0, n_layers // 2, max(n_layers - 2, 0)})
    ids_list = [tok(t)["input_ids"] for t in texts]
    lengths = [len(x) for x in ids_list]
    batches = batches_longest_first(lengths, bs)
    order = [i for b in batches for i in b]
    pad = tok.pad_token_id
    shortest = min(range(len(texts)), key=lambda i: lengths[i])

    # each method returns {layer: [n, d] tensor} with rows in ``row_text`` order
    if method == "hf":
        prepared = [(_pad_left([ids_list[i] for i in b], pad), b) for b in batches]

        def run(prep: list[Any]) -> tuple[dict[int, Any], list[int]]:
            out: dict[int, list[Any]] = {k: [] for k in layers}
            for (ids, mask), _ in prep:
                hs = model.model(
                    input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
                ).hidden_states
                for k in layers:
                    out[k].append(hs[k + 1][:, -1].float().clone())
            return {k: torch.cat(v) for k, v in out.items()}, [i for _, b in prep for i in b]

        warm: list[Any] = [(_pad_left([ids_list[shortest]], pad), [shortest])]
        work: list[Any] = prepared
    elif method == "repeng":
        from repeng.extract import batched_get_hiddens

        def run(prep: list[Any]) -> tuple[dict[int, Any], list[int]]:
            # repeng's input order is [positive, negative, positive, ...]; here it is the
            # longest-first order itself, so its batches are exactly the others' batches
            hid = batched_get_hiddens(model, tok, [texts[i] for i in prep], layers, bs)
            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hid.items()}, prep

        warm, work = [shortest, shortest], order
    elif method == "steering_vectors":
        from steering_vectors import extract_activations

        def run(prep: list[Any]) -> tuple[dict[int, Any], list[int]]:
            # pairs (longest-first order 2i, 2i+1): each batch of bs pairs is one forward
            # pass of bs positives and one of bs negatives, both of similar lengths
            pos_idx, neg_idx = prep[0::2], prep[1::2]
            if len(neg_idx) < len(pos_idx):
                neg_idx = neg_idx + [pos_idx[-1]]  # odd n: the last text pairs with itself
            pairs = [(texts[a], texts[b]) for a, b in zip(pos_idx, neg_idx)]
            pos, neg = extract_activations(
                model,
                tok,
                pairs,
                layers=layers,
                batch_size=bs,
                read_token_index=-1,
                move_to_cpu=True,
            )
            states = {k: torch.cat([torch.cat(pos[k]), torch.cat(neg[k])]).float() for k in layers}
            return states, pos_idx + neg_idx

        warm, work = [shortest, shortest], order
    else:
        raise ValueError(method)

    run(warm)
    with PeakMemory() as pm:
        t = time.perf_counter()
        states, row_text = run(work)
        seconds = time.perf_counter() - t
    tokens = sum(lengths[i] for i in row_text)  # tokens actually read (odd n: one twice)
    if args.check_out:
        seen: dict[int, int] = {}
        for r, i in enumerate(row_text):
            seen.setdefault(i, r)
        rows = [seen[i] for i in range(min(args.check_texts, len(texts)))]
        save_file({f"last.{k}": states[k][rows].contiguous() for k in check_layers}, args.check_out)
    return {
        "method": method,
        "model": args.model,
        "mode": "last",
        "n": len(texts),
        "batch_size": bs,
        "load_seconds": load_s,
        "n_layers": n_layers,
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
        "tokens": tokens,
        "n_states": len(row_text),
        "peak_mb": pm.delta_mb,
        "memory_method": pm.method,
    }


def run_activations(args: argparse.Namespace) -> dict[str, Any]:
    methods = list(ACT_METHODS)
    models = [m for m in args.models.split(",") if m]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for model in models:
        runs[model] = {m: [] for m in methods}
        for r in range(args.repeats):
            rot = methods[r % len(methods) :] + methods[: r % len(methods)]
            for method in rot:
                cmd = [
                    sys.executable,
                    __file__,
                    "act-worker",
                    "--method",
                    method,
                    "--model",
                    model,
                    "--n",
                    str(args.n),
                    "--batch-size",
                    str(args.batch_size),
                    "--check-texts",
                    str(args.check_texts),
                ]
                if r == 0 and args.check_dir:
                    cmd += [
                        "--check-out",
                        str(Path(args.check_dir) / f"{model}.last.{method}.peers.safetensors"),
                    ]
                res = run_json(cmd)
                runs[model][method].append(res)
                print(
                    f"  [peers {model} last r{r}] {method:<16} {res['seconds']:.2f}s "
                    f"{res['peak_mb']:.0f}MB (load {res['load_seconds']:.1f}s)",
                    flush=True,
                )
    cells: dict[str, dict[str, Any]] = {}
    for model in models:
        cells[model] = {}
        for method in methods:
            rs = runs[model][method]
            secs = median([x["seconds"] for x in rs])
            cells[model][method] = {
                "seconds": secs,
                "tokens": rs[0]["tokens"],
                "tokens_per_s": rs[0]["tokens"] / secs,
                "peak_mb": median([x["peak_mb"] for x in rs]),
                "n_states": rs[0]["n_states"],
            }
        hf = cells[model]["hf"]
        print(f"\npeers env, {model}, last token, every layer:")
        print(f"{'method':<18}{'tok/s':>8}{'x hf':>7}{'s':>8}{'peak MB':>9}{'mem x hf':>9}")
        for method, c in cells[model].items():
            print(
                f"{method:<18}{c['tokens_per_s']:>8.0f}"
                f"{c['tokens_per_s'] / hf['tokens_per_s']:>6.2f}x{c['seconds']:>8.2f}"
                f"{c['peak_mb']:>9.0f}{c['peak_mb'] / max(hf['peak_mb'], 1e-9):>8.2f}x"
            )
    return {"cells": cells, "runs": runs}


# ---------------------------------------------------------------- generation worker


def gen_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    torch.set_grad_enabled(False)
    model, tok = load_tf4(args.model)
    n_layers = int(model.config.num_hidden_layers)
    vecs = load_file(args.vectors)["vectors"].float()
    if vecs.shape[0] != n_layers:
        raise ValueError(f"vectors have {vecs.shape[0]} rows, model has {n_layers} layers")
    alpha, new = args.alpha, args.max_new_tokens
    prompts = generation_prompts(args.n, args.prompt_words)
    enc = [tok(p)["input_ids"] for p in prompts]
    batches = batches_longest_first([len(e) for e in enc], args.batch_size)
    pad = tok.pad_token_id

    def generate(gen_model: Any, which: list[list[int]]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for b in which:
            ids, mask = _pad_left([enc[i] for i in b], pad)
            seq = gen_model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
            )
            for r, i in enumerate(b):
                out[i] = seq[r, ids.shape[1] :].tolist()
        return out

    def variant(name: str, which: list[list[int]]) -> dict[int, list[int]]:
        if name == "hf":
            return generate(model, which)
        if name == "steering_vectors":
            from steering_vectors import SteeringVector

            sv = SteeringVector({k: alpha * vecs[k] for k in range(n_layers)}, "decoder_block")
            with sv.apply(model, min_token_index=0):
                return generate(model, which)
        if name == "repeng":
            from repeng import ControlModel, ControlVector

            cm = ControlModel(model, list(range(n_layers)))
            if shim["repeng"]:
                # repeng's ControlModule wrapper hides the block's attributes; Gemma-3's
                # decoder loop (transformers 4.5x) reads ``layer.attention_type`` and fails.
                # The shim copies that one attribute onto the wrapper (timing only).
                for wrapper in model.model.layers:
                    block = getattr(wrapper, "block", None)
                    if block is not None and hasattr(block, "attention_type"):
                        wrapper.attention_type = block.attention_type
            try:
                cv = ControlVector(
                    model_type=model.config.model_type,
                    directions={k: vecs[k].numpy() for k in range(n_layers)},
                )
                cm.set_control(cv, coeff=alpha)
                return generate(cm, which)
            finally:
                cm.unwrap()
        raise ValueError(name)

    shortest = min(range(len(prompts)), key=lambda i: len(enc[i]))
    shim = {"repeng": False}
    errors: dict[str, str] = {}
    for name in GEN_VARIANTS:  # warm-up; a peer that fails as it is gets its shim, if any
        try:
            variant(name, [[shortest]])
        except AttributeError as e:
            if name != "repeng":
                raise
            errors[name] = f"{type(e).__name__}: {e}"
            shim[name] = True
            variant(name, [[shortest]])
    times: dict[str, list[float]] = {v: [] for v in GEN_VARIANTS}
    first: dict[str, list[int]] = {}
    for r in range(args.repeats):
        rot = list(GEN_VARIANTS[r % 3 :] + GEN_VARIANTS[: r % 3])
        for name in rot:
            t = time.perf_counter()
            out = variant(name, batches)
            times[name].append(time.perf_counter() - t)
            first.setdefault(name, out[0])
    return {
        "model": args.model,
        "n": len(prompts),
        "max_new_tokens": new,
        "generated_tokens": len(prompts) * new,
        "seconds": times,
        "errors_as_is": errors,
        "shimmed": [k for k, v in shim.items() if v],
        "first_prompt_ids": first,
        "torch_threads": torch.get_num_threads(),
    }


def run_generation(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in [m for m in args.models.split(",") if m]:
        vec_path = Path(args.vectors_dir) / f"{model}.safetensors"
        cmd = [
            sys.executable,
            __file__,
            "gen-worker",
            "--model",
            model,
            "--n",
            str(args.n),
            "--batch-size",
            str(args.batch_size),
            "--repeats",
            str(args.repeats),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--prompt-words",
            str(args.prompt_words),
            "--alpha",
            str(args.alpha),
            "--vectors",
            str(vec_path),
        ]
        res = run_json(cmd)
        out[model] = res
        base = median(res["seconds"]["hf"])
        for v, err in res.get("errors_as_is", {}).items():
            print(f"  [peers {model}] {v} fails as it is ({err}); timed with a shim")
        for v in GEN_VARIANTS:
            s = median(res["seconds"][v])
            print(
                f"  [peers {model}] {v:<16} {res['generated_tokens'] / s:>7.1f} tok/s "
                f"{s / base:>5.2f}x the time of unsteered hf",
                flush=True,
            )
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("activations", "generation", "act-worker", "gen-worker"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--model")
    ap.add_argument("--method")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check-texts", type=int, default=16)
    ap.add_argument("--check-dir")
    ap.add_argument("--check-out")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=12)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--vectors", help="safetensors with 'vectors' [n_layers, d_model]")
    ap.add_argument("--vectors-dir", help="folder of MODEL.safetensors steering vectors")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.what == "act-worker":
        print(json.dumps(act_worker(args)))
        return
    if args.what == "gen-worker":
        print(json.dumps(gen_worker(args)))
        return
    from importlib.metadata import version

    import repeng  # noqa: F401  (fail early if the venv is incomplete)
    import steering_vectors  # noqa: F401
    import torch

    info = {
        **machine_info(),
        **{p: version(p) for p in ("transformers", "steering-vectors", "repeng", "numpy")},
    }
    if args.what == "activations":
        body = run_activations(args)
    else:
        if not args.vectors_dir:
            raise SystemExit("generation needs --vectors-dir (bench_generation.py writes it)")
        body = {"models": run_generation(args)}
    result = {
        "benchmark": f"peers: {args.what}",
        "command": f"{sys.executable} {__file__} " + " ".join(sys.argv[1:]),
        "machine": info,
        "torch": torch.__version__,
        **body,
    }
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
