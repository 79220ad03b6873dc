"""The ``contrans`` command (also ``python -m contrans_tl``).

Subcommands:
    emotion   run the emotion transplant experiment (paper §4.1) and write results
    analyze   figures (PNG + JSON) and a summary of one emotion transplant: layer
              similarity, vector cosines, norms, token shifts, PCA, t-SNE, separation,
              and an alpha sweep of Token Acc against perplexity
    fetch     install, join, verify and dequantize offline-zoo models ahead of time

Settings, model names and --out are checked before any model is loaded (layer ranges
right after the target is); a user error prints one line and exits with status 2,
leaving the file system as it was.
"""

import argparse
import difflib
import math
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["check_model_name", "load_checked_model", "main"]


class _UsageError(Exception):
    """A user error: :func:`main` prints it as one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: message``), status 2.

    It also records its options that take a value (:func:`_join_negative_values`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.value_options: set[str] = set()

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.nargs != 0:
            self.value_options.update(action.option_strings)
        return action

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {_one_line(message)} (see '{self.prog} --help')\n")


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


_NUMBER = r"-?(?:(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|inf(?:inity)?|nan)"
_NUMBER_LIST = re.compile(rf"\s*{_NUMBER}(?:\s*[,\s]\s*{_NUMBER})*\s*", re.IGNORECASE)


def _join_negative_values(argv: Sequence[str], value_options: set[str]) -> list[str]:
    """``['--alphas', '-1,0.5']`` -> ``['--alphas=-1,0.5']``.

    argparse takes a value that starts with ``-`` (other than one plain negative number)
    for an option and fails with "expected one argument"; joined, it reaches the
    option's own check.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (
            a in value_options
            and nxt is not None
            and nxt.startswith("-")
            and _NUMBER_LIST.fullmatch(nxt)
        ):
            out.append(f"{a}={nxt}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like '0.1,0.2,0.4', got {text!r}"
        ) from None
    bad = [x for x in values if not math.isfinite(x)]
    if bad:
        raise argparse.ArgumentTypeError(
            f"expected finite numbers like '0.1,0.2,0.4', got {text!r} "
            f"({', '.join(map(str, bad))} is not a finite strength)"
        )
    return values


def check_model_name(name: str) -> None:
    """Refuse, without loading anything, a model name that ``load_model`` refuses.

    :func:`contrans_tl.models.resolve_model_name` does the work: a zoo name, an existing
    folder, an existing ``.gguf`` file (with a GGUF header), or a Hugging Face hub id.
    Whether a hub id exists (and the hub can be reached) is only known when loading.

    Raises:
        ValueError, FileNotFoundError: as ``resolve_model_name``, with a zoo-name
            suggestion for a near miss.
    """
    from contrans_tl.models import ZOO, resolve_model_name

    try:
        resolve_model_name(name)
    except ValueError as e:
        close = difflib.get_close_matches(str(name), list(ZOO), n=1, cutoff=0.5)
        if not close:
            raise
        raise ValueError(f"{e}; did you mean the zoo name {close[0]!r}?") from None


def load_checked_model(name: str, **kwargs: Any) -> Any:
    """:func:`check_model_name`, then :func:`contrans_tl.models.load_model`.

    Args:
        name: the model name or path.
        **kwargs: passed to ``load_model``.

    Returns:
        The loaded model (a TransformerBridge).

    Raises:
        ValueError, FileNotFoundError: the name is refused (nothing is loaded).
        OSError: ``load_model`` could not load it (e.g. a hub id with the hub unreachable).
    """
    from contrans_tl import models

    check_model_name(name)
    return models.load_model(name, **kwargs)


def _check_names(*pairs: tuple[str, str]) -> None:
    """Check every ``(option, model name)`` before any model is loaded."""
    for option, name in pairs:
        try:
            check_model_name(name)
        except (ValueError, OSError) as e:
            raise _UsageError(f"{option}: {e}") from None


def _load(option: str, name: str) -> Any:
    try:
        return load_checked_model(name)
    except (ValueError, OSError) as e:
        raise _UsageError(f"{option} {name!r}: {e}") from None


def _check_out(out: str, name: str = "--out") -> None:
    from contrans_tl.evals.emotion_run import check_out_dir

    try:
        check_out_dir(out, name=name)
    except (ValueError, OSError) as e:
        raise _UsageError(str(e)) from None


def _command_line(argv: Sequence[str] | None) -> str:
    return "python -m contrans_tl " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )


def _build_parser() -> tuple[argparse.ArgumentParser, set[str]]:
    """The parser, and every option of a subcommand that takes a value."""
    p = _Parser(
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
    e.add_argument(
        "--cache-dir",
        default=None,
        help="result cache folder: vectors, maps and predictions of earlier runs are reused "
        "(default: $CONTRANS_TL_CACHE/results, i.e. ~/.cache/contrans_tl/results)",
    )
    e.add_argument(
        "--no-cache",
        action="store_true",
        help="compute everything again: neither read nor write the result cache",
    )
    a = _add_analyze(sub)
    f = sub.add_parser("fetch", help="prepare offline-zoo models (install, join, verify, cache)")
    f.add_argument("names", nargs="+", help="zoo names")
    f.add_argument("--tokenizer-only", action="store_true")
    return p, e.value_options | a.value_options | f.value_options


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_analyze(sub: Any) -> Any:
    from contrans_tl.pipelines.analysis import DEFAULT_ALPHAS, SWEEP_METHODS

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
    return a


def _layer_sets(spec: str, n_layers: int) -> dict[str, list[int] | None]:
    """``'all;0-8;9-17'`` -> ``{'all': None, '0-8': [...], '9-17': [...]}``."""
    from contrans_tl.sites import parse_layers

    parts = [x.strip() for x in spec.split(";") if x.strip()]
    if not parts:
        raise ValueError(f"--layers is empty: {spec!r}; use 'all', '3,5,7', '4-10' or 'all;4-10'")
    return {p: parse_layers(p, n_layers) for p in parts}


def _analyze(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    import dataclasses

    from contrans_tl.data import EMOTIONS
    from contrans_tl.pipelines.analysis import AnalysisConfig, run_analysis
    from contrans_tl.sites import check_layers, parse_layers

    # everything that can be checked without the models, before loading them
    try:
        config = AnalysisConfig(
            emotions=args.emotions if args.emotions is not None else EMOTIONS,
            n_map_texts=args.n_map_texts,
            map_pairing=args.map_pairing,
            map_method=args.map_method,
            layer_match=args.layer_match,
            n_similarity_texts=args.n_similarity_texts,
            similarity_max_gb=args.similarity_max_gb,
            n_refine=args.n_refine,
            n_fewshot=args.n_fewshot,
            n_per_emotion=args.n_per_emotion,
            n_sweep_negatives=args.n_sweep_negatives,
            n_ppl_texts=args.n_ppl_texts,
            n_norm_texts=args.n_norm_texts,
            alphas=args.alphas,
            alpha=args.alpha,
            pca_layer=args.pca_layer,
            pca_emotion=args.pca_emotion,
            sweep_methods=args.sweep_methods,
            top_k=args.top_k,
            top_tokens=args.top_tokens,
            max_ppl_ratio=args.max_ppl_ratio,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except ValueError as e:
        raise _UsageError(str(e)) from None
    for option, spec in (("--layers", args.layers), ("--lens-layers", args.lens_layers)):
        if spec is not None:
            try:
                _layer_sets(spec, 10**6)  # syntax only; ranges once the target is loaded
            except (ValueError, TypeError) as e:
                raise _UsageError(f"{option}: {e}") from None
    if args.map is not None and args.layer_match != "depth":
        raise _UsageError(
            f"--layer-match {args.layer_match} chooses the layer pairs of a map to fit; "
            "--map loads one with its own pairs. Drop one of them"
        )
    loaded_map = None
    if args.map is not None:
        from contrans_tl.maps import ResidualMap

        try:
            loaded_map = ResidualMap.load(args.map)
        except (ValueError, OSError) as e:
            raise _UsageError(f"--map {args.map!r}: {_one_line(str(e))}") from None
    _check_out(args.out)
    _check_names(("--source", args.source), ("--target", args.target))
    _log_steps()
    target = _load("--target", args.target)
    source = _load("--source", args.source)
    n_tgt = int(target.cfg.n_layers)
    try:
        layer_sets = _layer_sets(args.layers, n_tgt)
        lens = None if args.lens_layers is None else parse_layers(args.lens_layers, n_tgt)
        if args.pca_layer is not None:
            check_layers(n_tgt, [args.pca_layer])
    except ValueError as e:
        raise _UsageError(f"{e} (target {args.target!r} has {n_tgt} layers)") from None
    if loaded_map is not None:
        try:
            loaded_map.check_models(source, target)
        except (ValueError, OSError) as e:
            raise _UsageError(f"--map {args.map!r}: {e}") from None
    config = dataclasses.replace(
        config, map_path=args.map, layer_sets=layer_sets, layers_for_lens=lens
    )
    res = run_analysis(source, target, config, args.out, command=_command_line(argv))
    for r in res["alpha_sweep"]["rows"]:
        ppl = "-" if r["ppl"] is None else f"{r['ppl']:.2f}"
        print(f"{r['series']:>32}  alpha={r['alpha']:<6g} token_acc={r['token_acc']:.3f} ppl={ppl}")
    print(f"figures and summary.md in {args.out}")
    return 0


def _log_steps() -> None:
    """Show the pipelines' step messages (INFO) on stderr, unless logging is set up."""
    import logging

    log = logging.getLogger("contrans_tl")
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _emotion(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    import dataclasses

    from contrans_tl.pipelines.emotion import EmotionConfig, run_emotion
    from contrans_tl.sites import parse_layers

    pairings = [x.strip() for x in args.pairings.split(",") if x.strip()]
    try:
        parse_layers(args.layers, 10**6)  # syntax only; the range once the target is loaded
    except (ValueError, TypeError) as e:
        raise _UsageError(f"--layers: {e}") from None
    try:
        config = EmotionConfig(
            alphas=args.alphas,
            pairings=tuple(pairings),
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
        )
    except ValueError as e:
        raise _UsageError(str(e)) from None
    _check_out(args.out)
    if args.cache_dir is not None:
        if args.no_cache:
            raise _UsageError("--cache-dir and --no-cache exclude each other; give one")
        _check_out(args.cache_dir, name="--cache-dir")
    _check_names(("--source", args.source), ("--target", args.target))
    _log_steps()
    target = _load("--target", args.target)
    source = _load("--source", args.source)
    n_tgt = int(target.cfg.n_layers)
    try:
        layers = parse_layers(args.layers, n_tgt)
    except ValueError as e:
        raise _UsageError(f"--layers: {e} (target {args.target!r} has {n_tgt} layers)") from None
    if layers is not None:
        config = dataclasses.replace(config, layers=tuple(layers))
    res = run_emotion(
        source,
        target,
        config,
        args.out,
        command=_command_line(argv),
        cache=False if args.no_cache else args.cache_dir,
    )
    for m, s in res["summary"].items():
        print(
            f"{m:>22}  alpha={s['alpha']:<6g} token_acc={s['token_acc']:.3f} "
            f"logit_acc={s['logit_acc']:.3f}"
        )
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from contrans_tl.models import load_tokenizer

    _check_names(*(("fetch", name) for name in args.names))
    for name in args.names:
        if args.tokenizer_only:
            try:
                load_tokenizer(name)
            except (ValueError, OSError) as e:
                raise _UsageError(f"{name!r}: {e}") from None
        else:
            _load("fetch", name)
        print(f"{name}: ready")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``contrans`` command.

    Every setting that can be checked without the models is checked before any model is
    loaded; the layer ranges right after the target is loaded. A user error (a bad
    setting, model name or output folder) prints one line, ``contrans COMMAND: message``,
    on stderr and gives status 2, having written nothing; argparse's own errors (an
    unknown option, a malformed number) exit with status 2 the same way (``SystemExit``).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a user error.
    """
    parser, value_options = _build_parser()
    given = list(argv if argv is not None else sys.argv[1:])
    args = parser.parse_args(_join_negative_values(given, value_options))
    try:
        if args.command == "analyze":
            return _analyze(args, given)
        if args.command == "emotion":
            return _emotion(args, given)
        if args.command == "fetch":
            return _fetch(args)
    except _UsageError as e:
        print(f"contrans {args.command}: {_one_line(str(e))}", file=sys.stderr)
        return 2
    return 2
