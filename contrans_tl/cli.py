"""The ``contrans`` command (also ``python -m contrans_tl``).

Subcommands:
    emotion   run the emotion transplant experiment (paper §4.1) and write results
    analyze   figures (PNG + JSON) and a summary of one emotion transplant: layer
              similarity, vector cosines, norms, token shifts, PCA, t-SNE, separation,
              and an alpha sweep of Token Acc against perplexity
    fetch     install, join, verify and dequantize offline-zoo models ahead of time
"""

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like '0.1,0.2,0.4', got {text!r}"
        ) from None


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="contrans", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("emotion", help="emotion transplant experiment (paper section 4.1)")
    e.add_argument("--source", required=True, help="zoo name, hub id, HF folder or .gguf file")
    e.add_argument("--target", required=True, help="zoo name, hub id, HF folder or .gguf file")
    e.add_argument("--out", required=True, help="output folder for results.json/results.md")
    e.add_argument(
        "--alphas",
        type=_floats,
        default=[0.05, 0.1, 0.2, 0.4, 0.8],
        help="strengths, e.g. '0.05,0.1,0.2' (alpha 0 is always run as base)",
    )
    e.add_argument(
        "--layers", default=None, help="target layers to steer: 'all' (default), '3,5,7' or '4-10'"
    )
    e.add_argument(
        "--pairings",
        default="last,word_ends",
        help="map pairings to compare: any of last, word_ends, all, auto",
    )
    e.add_argument("--map-method", default="svd", choices=["svd", "ridge"])
    e.add_argument("--n-map-texts", type=int, default=2000)
    e.add_argument("--n-refine", type=int, default=100)
    e.add_argument(
        "--n-fewshot",
        type=int,
        default=3,
        help="solved examples per emotion in the few-shot prefix",
    )
    e.add_argument("--n-negatives", type=int, default=50)
    e.add_argument("--n-validation-negatives", type=int, default=30)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-self", action="store_true", help="skip the Self reference")
    e.add_argument("--no-random", action="store_true", help="skip the Random reference")
    _add_analyze(sub)
    f = sub.add_parser("fetch", help="prepare offline-zoo models (install, join, verify, cache)")
    f.add_argument("names", nargs="+", help="zoo names")
    f.add_argument("--tokenizer-only", action="store_true")
    return p


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_analyze(sub: Any) -> None:
    from contrans_tl.analysis.run import DEFAULT_ALPHAS, SWEEP_METHODS

    a = sub.add_parser(
        "analyze",
        help="figures and summary of one emotion transplant (PNG + JSON per figure)",
        description="Fit (or load) the residual map and write layer_similarity, "
        "vector_cosines, norm_profile, token_shifts_L*, pca_before_after, tsne, separation "
        "and alpha_sweep (each NAME.png + NAME.json), analysis.json and summary.md into --out. "
        "The defaults take roughly 15-25 min on a 2-core CPU for smollm2-135m-instruct -> "
        "gemma-3-270m.",
    )
    a.add_argument("--source", required=True, help="zoo name, hub id, HF folder or .gguf file")
    a.add_argument("--target", required=True, help="zoo name, hub id, HF folder or .gguf file")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--map", default=None, help="saved ResidualMap (NAME of NAME.safetensors)")
    a.add_argument(
        "--emotions", type=_names, default=None, help="comma list (default: all six emotions)"
    )
    a.add_argument("--n-map-texts", type=int, default=500)
    a.add_argument("--map-pairing", default="auto", help="auto, last, all or word_ends")
    a.add_argument("--map-method", default="svd", help="svd (paper) or ridge")
    a.add_argument(
        "--layer-match",
        default="depth",
        help="layer pairs of the map: depth (paper: same relative depth), or the best "
        "monotone matching of a cka or r2 (held-out map R²) similarity matrix",
    )
    a.add_argument("--n-similarity-texts", type=int, default=100)
    a.add_argument(
        "--similarity-max-gb",
        type=float,
        default=1.0,
        help="memory for the CKA moments; layers are thinned evenly to fit",
    )
    a.add_argument("--n-refine", type=int, default=50)
    a.add_argument("--n-fewshot", type=int, default=3)
    a.add_argument(
        "--n-per-emotion",
        type=int,
        default=20,
        help="scenarios per emotion for t-SNE/separation, negatives for shifts and PCA",
    )
    a.add_argument("--n-sweep-negatives", type=int, default=10)
    a.add_argument(
        "--n-ppl-texts", type=int, default=16, help="held-out sentences (0: no perplexity)"
    )
    a.add_argument("--n-norm-texts", type=int, default=100)
    a.add_argument(
        "--alphas",
        type=_floats,
        default=list(DEFAULT_ALPHAS),
        help="sweep strengths, e.g. '0.25,0.5,1,2,4' (alpha 0 is always run as base)",
    )
    a.add_argument("--alpha", type=float, default=1.0, help="strength for token shifts and PCA")
    a.add_argument(
        "--layers",
        default="all",
        help="steered target-layer sets of the sweep, ';'-separated, each 'all', '3,5,7' or "
        "'4-10' (e.g. 'all;0-8;9-17')",
    )
    a.add_argument(
        "--lens-layers",
        default=None,
        help="target layers of the token-shift tables (default: a middle and a late one)",
    )
    a.add_argument("--pca-layer", type=int, default=None)
    a.add_argument("--pca-emotion", default=None)
    a.add_argument(
        "--sweep-methods",
        type=_names,
        default=["transplanted", "self"],
        help=f"comma list of {', '.join(SWEEP_METHODS)}",
    )
    a.add_argument("--top-k", type=int, default=10)
    a.add_argument("--top-tokens", type=int, default=15)
    a.add_argument("--max-ppl-ratio", type=float, default=1.5)
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--seed", type=int, default=0)


def _layer_sets(spec: str, n_layers: int) -> dict[str, list[int] | None]:
    """``'all;0-8;9-17'`` -> ``{'all': None, '0-8': [...], '9-17': [...]}``."""
    from contrans_tl.sites import parse_layers

    parts = [x.strip() for x in spec.split(";") if x.strip()]
    if not parts:
        raise ValueError(f"--layers is empty: {spec!r}; use 'all', '3,5,7', '4-10' or 'all;4-10'")
    return {p: parse_layers(p, n_layers) for p in parts}


def _analyze(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from contrans_tl.analysis.run import check_analysis_args, run_analysis
    from contrans_tl.data import EMOTIONS
    from contrans_tl.io import artifact_paths
    from contrans_tl.models import load_model
    from contrans_tl.sites import check_layers

    def fail(msg: str) -> int:
        print(f"contrans analyze: {msg}", file=sys.stderr)
        return 2

    emotions = args.emotions if args.emotions is not None else list(EMOTIONS)
    sizes = {
        "n_map_texts": args.n_map_texts,
        "n_similarity_texts": args.n_similarity_texts,
        "similarity_max_gb": args.similarity_max_gb,
        "n_refine": args.n_refine,
        "n_fewshot": args.n_fewshot,
        "n_per_emotion": args.n_per_emotion,
        "n_sweep_negatives": args.n_sweep_negatives,
        "n_ppl_texts": args.n_ppl_texts,
        "n_norm_texts": args.n_norm_texts,
        "top_k": args.top_k,
        "top_tokens": args.top_tokens,
        "max_ppl_ratio": args.max_ppl_ratio,
        "batch_size": args.batch_size,
    }
    settings = {
        "emotions": emotions,
        "map_pairing": args.map_pairing,
        "map_method": args.map_method,
        "layer_match": args.layer_match,
        "alphas": args.alphas,
        "alpha": args.alpha,
        "sweep_methods": args.sweep_methods,
        "pca_emotion": args.pca_emotion,
        **sizes,
    }
    # everything that can be checked without the models, before loading them
    try:
        check_analysis_args(**settings)
        _layer_sets(args.layers, 10**6)  # syntax only; ranges once the target is loaded
        lens_spec = args.lens_layers
        if lens_spec is not None:
            _layer_sets(lens_spec, 10**6)
    except ValueError as e:
        return fail(str(e))
    if args.map is not None and args.layer_match != "depth":
        return fail(
            f"--layer-match {args.layer_match} chooses the layer pairs of a map to fit; "
            "--map loads one with its own pairs. Drop one of them"
        )
    if args.map is not None:
        missing = [str(p) for p in artifact_paths(args.map) if not p.exists()]
        if missing:
            return fail(f"--map {args.map!r}: {', '.join(missing)} not found")
    target = load_model(args.target)
    source = load_model(args.source)
    n_tgt = int(target.cfg.n_layers)
    try:
        layer_sets = _layer_sets(args.layers, n_tgt)
        lens = None
        if args.lens_layers is not None:
            from contrans_tl.sites import parse_layers

            lens = parse_layers(args.lens_layers, n_tgt)
        if args.pca_layer is not None:
            check_layers(n_tgt, [args.pca_layer])
    except ValueError as e:
        return fail(f"{e} (target {args.target!r} has {n_tgt} layers)")
    command = "python -m contrans_tl " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    res = run_analysis(
        source,
        target,
        args.out,
        map_path=args.map,
        layer_sets=layer_sets,
        layers_for_lens=lens,
        pca_layer=args.pca_layer,
        seed=args.seed,
        command=command,
        **settings,
    )
    for r in res["alpha_sweep"]["rows"]:
        ppl = "-" if r["ppl"] is None else f"{r['ppl']:.2f}"
        print(f"{r['series']:>32}  alpha={r['alpha']:<6g} token_acc={r['token_acc']:.3f} ppl={ppl}")
    print(f"figures and summary.md in {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "analyze":
        return _analyze(args, argv)
    if args.command == "fetch":
        from contrans_tl.models import load_model, load_tokenizer

        for name in args.names:
            if args.tokenizer_only:
                load_tokenizer(name)
            else:
                load_model(name)
            print(f"{name}: ready")
        return 0
    if args.command == "emotion":
        from contrans_tl.evals.emotion_run import run_emotion_experiment
        from contrans_tl.maps import PAIRINGS
        from contrans_tl.models import load_model
        from contrans_tl.sites import parse_layers

        pairings = [x.strip() for x in args.pairings.split(",") if x.strip()]
        bad = [x for x in pairings if x not in PAIRINGS]
        if bad or not pairings:
            print(
                f"contrans emotion: --pairings takes a comma list of {', '.join(PAIRINGS)}; "
                f"got {args.pairings!r}",
                file=sys.stderr,
            )
            return 2
        target = load_model(args.target)
        source = load_model(args.source)
        layers = parse_layers(args.layers, target.cfg.n_layers)
        command = "python -m contrans_tl " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
        )
        res = run_emotion_experiment(
            source,
            target,
            args.out,
            alphas=args.alphas,
            layers=layers,
            pairings=pairings,
            map_method=args.map_method,
            n_map_texts=args.n_map_texts,
            n_refine=args.n_refine,
            n_fewshot=args.n_fewshot,
            n_negatives=args.n_negatives,
            n_validation_negatives=args.n_validation_negatives,
            batch_size=args.batch_size,
            seed=args.seed,
            include_self=not args.no_self,
            include_random=not args.no_random,
            command=command,
        )
        for m, s in res["summary"].items():
            print(
                f"{m:>22}  alpha={s['alpha']:<6g} token_acc={s['token_acc']:.3f} "
                f"logit_acc={s['logit_acc']:.3f}"
            )
        return 0
    return 2
