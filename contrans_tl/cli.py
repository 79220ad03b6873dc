"""The ``contrans`` command (also ``python -m contrans_tl``).

The method, one step per command:
    refine      a concept vector from positive and negative prompts (paper Eq. 1)
    fit-map     per-layer linear maps from a source model's residual stream to a target's
                (Eq. 2)
    transplant  carry a source vector through a map into the target model (Eq. 3)
    generate    greedy continuations, steered by a vector
    evaluate    emotion, truthfulqa, toxigen or perplexity, base and steered

Experiments and tools:
    emotion     the emotion transplant experiment (paper section 4.1), written as
                results.json + results.md
    analyze     figures (PNG + JSON) and summary.md of one emotion transplant
    report      show (and re-render) the results of earlier runs
    fetch       install, join, verify and dequantize offline-zoo models ahead of time

Every setting is checked before any model is loaded (layer ranges right after the model
is); a user error prints one line, ``contrans COMMAND: message``, and exits with status
2, leaving the file system as it was. Progress goes to stderr, results to stdout.
"""

import argparse
import difflib
import json
import logging
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from contrans_tl.cli_options import add_config_options, config_kwargs
from contrans_tl.pipelines.configs import (
    DAPA_STEPS,
    EVAL_TASKS,
    AnalysisConfig,
    EmotionConfig,
    EvaluateConfig,
    GenerateConfig,
    MapConfig,
    RefineConfig,
    SteerConfig,
    TransplantConfig,
)

__all__ = ["COMMANDS", "check_model_name", "load_checked_model", "main"]

log = logging.getLogger("contrans_tl.cli")

DTYPES = ("float32", "bfloat16", "float16")
"""Parameter dtypes ``--dtype`` takes."""


class _UsageError(Exception):
    """A user error: :func:`main` prints it as one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: message``), status 2.

    It also records its options that take a value (:func:`_join_negative_values`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.value_options: set[str] = set()

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.nargs != 0:
            self.value_options.update(action.option_strings)
        return action

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        group = super().add_argument_group(*args, **kwargs)
        plain = group.add_argument

        def add(*a: Any, **kw: Any) -> argparse.Action:
            action = plain(*a, **kw)
            if action.option_strings and action.nargs != 0:
                self.value_options.update(action.option_strings)
            return action

        group.add_argument = add  # type: ignore[method-assign]
        return group

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


# --------------------------------------------------------------------------------------------
# Checks and loading
# --------------------------------------------------------------------------------------------


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
        **kwargs: passed to ``load_model`` (``device``, ``dtype``).

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


def _check_device(args: argparse.Namespace) -> None:
    """``--device`` names a device torch has here (checked before loading)."""
    from contrans_tl.models import check_device

    try:
        check_device(args.device)
    except (ValueError, RuntimeError) as e:
        raise _UsageError(f"--device {args.device!r}: {e}") from None


def _load(option: str, name: str, args: argparse.Namespace) -> Any:
    import torch

    try:
        return load_checked_model(name, device=args.device, dtype=getattr(torch, args.dtype))
    except (ValueError, OSError) as e:
        raise _UsageError(f"{option} {name!r}: {e}") from None


def _check_out(out: str, name: str = "--out") -> None:
    from contrans_tl.pipelines.configs import check_out_dir

    try:
        check_out_dir(out, name=name)
    except (ValueError, OSError) as e:
        raise _UsageError(str(e)) from None


def _check_artifact_out(out: str, option: str = "--out") -> None:
    """``NAME`` of ``NAME.safetensors`` + ``NAME.json``: its folder must be writable."""
    if not out.strip() or out.endswith(("/", ".safetensors", ".json")):
        raise _UsageError(
            f"{option} {out!r}: give the artifact's NAME (NAME.safetensors and NAME.json "
            "are written), e.g. vectors/fear"
        )
    _check_out(str(Path(out).expanduser().parent), name=f"{option}'s folder")


def _check_json_out(out: str | None) -> None:
    if out is None:
        return
    if not out.endswith(".json"):
        raise _UsageError(f"--out {out!r}: give a .json file to write the results into")
    _check_out(str(Path(out).expanduser().parent), name="--out's folder")


def _config(cls: type, args: argparse.Namespace, **resolved: Any) -> Any:
    """``cls`` from the options given (the rest at its defaults); a refusal is a user error."""
    try:
        return cls(**config_kwargs(args, cls), **resolved)
    except (ValueError, TypeError) as e:
        raise _UsageError(str(e)) from None


def _layers(
    spec: str | None, option: str, n_layers: int | None = None, model: str = "the model"
) -> list[int] | None:
    """A layer spec read (``None``: all); with ``n_layers`` also checked against ``model``."""
    from contrans_tl.sites import parse_layers

    try:
        return parse_layers(spec, n_layers if n_layers is not None else 10**6)
    except (ValueError, TypeError) as e:
        where = "" if n_layers is None else f" ({model} has {n_layers} layers)"
        raise _UsageError(f"{option}: {e}{where}") from None


def _read_prompts(path: str, option: str) -> list[str]:
    """Prompts from a file: a JSON list of strings (``.json``), else one per line."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise _UsageError(f"{option} {path!r}: cannot read it ({e.strerror or e})") from None
    if p.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise _UsageError(f"{option} {path!r}: not JSON ({e})") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise _UsageError(f"{option} {path!r}: a .json file must hold a list of strings")
    else:
        items = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not items:
        raise _UsageError(f"{option} {path!r} holds no prompts")
    return items


def _load_artifact(cls_path: str, path: str, option: str) -> Any:
    """A saved vector or map (``NAME`` or ``NAME.safetensors``), refusals as user errors."""
    import importlib

    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    try:
        return cls.load(str(path).removesuffix(".safetensors").removesuffix(".json"))
    except (ValueError, OSError, KeyError) as e:
        raise _UsageError(f"{option} {path!r}: {_one_line(str(e))}") from None


def _command_line(argv: Sequence[str] | None) -> str:
    return "python -m contrans_tl " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )


def _log_steps(quiet: bool = False) -> None:
    """Show the steps' messages (INFO) on stderr, unless logging is set up already."""
    pkg = logging.getLogger("contrans_tl")
    if quiet:
        pkg.setLevel(logging.WARNING)
    if not pkg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        pkg.addHandler(handler)
        if not quiet:
            pkg.setLevel(logging.INFO)


def _emit(result: dict[str, Any], out: str | None) -> None:
    """Write ``result`` to ``out`` (.json, atomically) if given; say where."""
    if out is None:
        return
    from contrans_tl.io import write_json

    path = write_json(Path(out).expanduser(), result)
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# The method's steps
# --------------------------------------------------------------------------------------------


def _refine(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from contrans_tl.data import EMOTIONS

    config = _config(RefineConfig, args)
    _layers(getattr(args, "layers", None), "--layers")
    if (args.emotion is None) == (args.positive is None):
        raise _UsageError("give --emotion NAME, or --positive FILE and --negative FILE")
    if args.emotion is not None and args.emotion not in EMOTIONS:
        raise _UsageError(f"--emotion must be one of {list(EMOTIONS)}, got {args.emotion!r}")
    if args.positive is not None and args.negative is None:
        raise _UsageError("--positive needs --negative FILE (the prompts without the concept)")
    prompts = None
    if args.positive is not None:
        prompts = (
            _read_prompts(args.positive, "--positive"),
            _read_prompts(args.negative, "--negative"),
        )
    _check_artifact_out(args.out)
    _check_names(("--model", args.model))
    _check_device(args)
    _log_steps(args.quiet)
    model = _load("--model", args.model, args)
    layers = _layers(
        getattr(args, "layers", None), "--layers", int(model.cfg.n_layers), repr(args.model)
    )
    if prompts is None:
        from contrans_tl.data import emotion_scenarios
        from contrans_tl.evals.emotion import refinement_prompts, split_scenarios

        split = split_scenarios(emotion_scenarios(), n_refine=config.n_refine, seed=config.seed)
        prompts = refinement_prompts(split, args.emotion)
    concept = args.concept or args.emotion or Path(args.out).name
    from contrans_tl.concepts import mean_difference

    log.info("refining %r from %d + %d prompts", concept, len(prompts[0]), len(prompts[1]))
    vector = mean_difference(
        model,
        *prompts,
        layers=layers,
        concept=concept,
        positions=config.positions,  # type: ignore[arg-type]
        batch_size=config.batch_size,
        progress=not args.quiet,
        metadata={"command": _command_line(argv)},
    )
    vector.save(Path(args.out).expanduser())
    print(f"{args.out}.safetensors: {concept!r} on {len(vector.layers)} layers of {args.model}")
    return 0


def _fit_map(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    config = _config(MapConfig, args)
    texts = _read_prompts(args.texts, "--texts") if args.texts is not None else None
    _check_artifact_out(args.out)
    _check_names(("--source", args.source), ("--target", args.target))
    _check_device(args)
    _log_steps(args.quiet)
    if texts is None:
        from contrans_tl.data import wikisplit_sentences

        texts = wikisplit_sentences()[: config.n_texts]
    source = _load("--source", args.source, args)
    target = _load("--target", args.target, args)
    from contrans_tl.maps import fit_residual_map

    log.info("fitting maps on %d texts", len(texts))
    rmap = fit_residual_map(
        source,
        target,
        texts,
        pairing=config.pairing,  # type: ignore[arg-type]
        method=config.method,  # type: ignore[arg-type]
        ridge=config.ridge,
        heldout_fraction=config.heldout_fraction,
        seed=config.seed,
        batch_size=config.batch_size,
        max_length=config.max_length,
        progress=not args.quiet,
    )
    rmap.info["command"] = _command_line(argv)
    rmap.save(Path(args.out).expanduser())
    r2 = [m["r2"] for m in rmap.metrics.values() if m.get("r2") is not None]
    mean_r2 = f", mean held-out R² {sum(r2) / len(r2):.3f}" if r2 else ""
    print(f"{args.out}.safetensors: {len(rmap.layer_pairs)} layer maps ({rmap.pairing}){mean_r2}")
    return 0


def _transplant(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    config = _config(TransplantConfig, args)
    _check_artifact_out(args.out)
    vector = _load_artifact("contrans_tl.concepts.ConceptVector", args.vector, "--vector")
    rmap = _load_artifact("contrans_tl.maps.ResidualMap", args.map, "--map")
    try:
        out = rmap.transplant(vector, strict=config.strict)
    except ValueError as e:
        raise _UsageError(f"--vector {args.vector!r} with --map {args.map!r}: {e}") from None
    out.metadata["command"] = _command_line(argv)
    out.save(Path(args.out).expanduser())
    print(
        f"{args.out}.safetensors: {out.concept!r} on {len(out.layers)} layers of "
        f"{out.model.model_id}"
    )
    return 0


def _steering(model: Any, args: argparse.Namespace, steer: SteerConfig) -> Any:
    """The steering ``--vector`` asks for (``None`` without one), checked against ``model``."""
    if args.vector is None:
        return None
    from contrans_tl.steering import make_steering

    vector = _load_artifact("contrans_tl.concepts.ConceptVector", args.vector, "--vector")
    layers = _layers(
        getattr(args, "layers", None), "--layers", int(model.cfg.n_layers), repr(args.model)
    )
    try:
        return make_steering(
            model,
            vector,
            steer.alpha,
            layers=layers,
            positions=steer.positions,  # type: ignore[arg-type]
            scale=steer.scale,  # type: ignore[arg-type]
            name=f"{vector.concept} x{steer.alpha:g}",
        )
    except ValueError as e:
        raise _UsageError(f"--vector {args.vector!r}: {e}") from None


def _generate(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    steer = _config(SteerConfig, args)
    config = _config(GenerateConfig, args)
    _layers(getattr(args, "layers", None), "--layers")
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        prompts += _read_prompts(args.prompts, "--prompts")
    if not prompts:
        raise _UsageError("give --prompt TEXT (repeatable) or --prompts FILE")
    if args.vector is not None:
        _load_artifact("contrans_tl.concepts.ConceptVector", args.vector, "--vector")
    _check_names(("--model", args.model))
    _check_device(args)
    _log_steps(args.quiet)
    model = _load("--model", args.model, args)
    steering = _steering(model, args, steer)
    from contrans_tl.steering import generate

    try:
        texts = generate(
            model,
            prompts,
            max_new_tokens=config.max_new_tokens,
            intervention=steering,
            batch_size=config.batch_size,
        )
    except ValueError as e:
        raise _UsageError(str(e)) from None
    label = "base" if steering is None else steering.name
    for prompt, text in zip(prompts, texts):
        print(json.dumps({"prompt": prompt, label: text}, ensure_ascii=False))
    return 0


def _evaluate(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    steer = _config(SteerConfig, args)
    config = _config(EvaluateConfig, args)
    _layers(getattr(args, "layers", None), "--layers")
    concept = None
    if args.vector is not None:
        concept = _load_artifact("contrans_tl.concepts.ConceptVector", args.vector, "--vector")
        concept = concept.concept
    if args.task == "emotion":
        from contrans_tl.data import EMOTIONS

        emotion = config.emotion or concept
        if emotion not in EMOTIONS:
            raise _UsageError(
                f"the emotion task scores one of {list(EMOTIONS)}: give --emotion (the "
                f"vector's concept is {concept!r})"
            )
    _check_json_out(args.out)
    _check_names(("--model", args.model))
    _check_device(args)
    _log_steps(args.quiet)
    model = _load("--model", args.model, args)
    steering = _steering(model, args, steer)
    from contrans_tl.pipelines.evaluate import evaluate

    try:
        result = evaluate(args.task, model, config, steering, concept=concept)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    result["command"] = _command_line(argv)
    for name, metrics in result["results"].items():
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{name:>24}  {shown}")
    _emit(result, args.out)
    return 0


# --------------------------------------------------------------------------------------------
# Experiments and tools
# --------------------------------------------------------------------------------------------


def _layer_sets(spec: str, n_layers: int) -> dict[str, list[int] | None]:
    """``'all;0-8;9-17'`` -> ``{'all': None, '0-8': [...], '9-17': [...]}``."""
    from contrans_tl.sites import parse_layers

    parts = [x.strip() for x in spec.split(";") if x.strip()]
    if not parts:
        raise ValueError(f"--layers is empty: {spec!r}; use 'all', '3,5,7', '4-10' or 'all;4-10'")
    return {p: parse_layers(p, n_layers) for p in parts}


def _analyze(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    import dataclasses

    from contrans_tl.sites import check_layers

    config = _config(AnalysisConfig, args)  # map_path and layer_match checked here
    layer_spec = getattr(args, "layer_sets", "all")
    lens_spec = getattr(args, "layers_for_lens", None)
    for option, spec in (("--layers", layer_spec), ("--lens-layers", lens_spec)):
        if spec is not None:
            try:
                _layer_sets(spec, 10**6)  # syntax only; ranges once the target is loaded
            except (ValueError, TypeError) as e:
                raise _UsageError(f"{option}: {e}") from None
    loaded_map = None
    if config.map_path is not None:
        loaded_map = _load_artifact("contrans_tl.maps.ResidualMap", str(config.map_path), "--map")
    _check_out(args.out)
    _check_names(("--source", args.source), ("--target", args.target))
    _check_device(args)
    _log_steps(args.quiet)
    target = _load("--target", args.target, args)
    source = _load("--source", args.source, args)
    n_tgt = int(target.cfg.n_layers)
    try:
        layer_sets = _layer_sets(layer_spec, n_tgt)
        lens = None if lens_spec is None else _layers(lens_spec, "--lens-layers", n_tgt)
        if config.pca_layer is not None:
            check_layers(n_tgt, [config.pca_layer])
    except ValueError as e:
        raise _UsageError(f"{e} (target {args.target!r} has {n_tgt} layers)") from None
    if loaded_map is not None:
        try:
            loaded_map.check_models(source, target)
        except (ValueError, OSError) as e:
            raise _UsageError(f"--map {config.map_path!r}: {e}") from None
    config = dataclasses.replace(config, layer_sets=layer_sets, layers_for_lens=lens)
    from contrans_tl.pipelines.analysis import run_analysis

    res = run_analysis(source, target, config, args.out, command=_command_line(argv))
    for r in res["alpha_sweep"]["rows"]:
        ppl = "-" if r["ppl"] is None else f"{r['ppl']:.2f}"
        print(f"{r['series']:>32}  alpha={r['alpha']:<6g} token_acc={r['token_acc']:.3f} ppl={ppl}")
    print(f"figures, analysis.json and summary.md in {args.out}")
    return 0


def _emotion(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    import dataclasses

    config = _config(EmotionConfig, args)
    _layers(getattr(args, "layers", None), "--layers")
    _check_out(args.out)
    if args.cache_dir is not None:
        if args.no_cache:
            raise _UsageError("--cache-dir and --no-cache exclude each other; give one")
        _check_out(args.cache_dir, name="--cache-dir")
    _check_names(("--source", args.source), ("--target", args.target))
    _check_device(args)
    _log_steps(args.quiet)
    target = _load("--target", args.target, args)
    source = _load("--source", args.source, args)
    n_tgt = int(target.cfg.n_layers)
    layers = _layers(getattr(args, "layers", None), "--layers", n_tgt, f"target {args.target!r}")
    if layers is not None:
        config = dataclasses.replace(config, layers=tuple(layers))
    from contrans_tl.pipelines.emotion import run_emotion

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
    print(f"results: {Path(args.out) / 'results.md'} (and results.json)")
    return 0


def _dapa(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from contrans_tl.pipelines.configs import DapaConfig

    config = _config(DapaConfig, args)
    _check_out(args.out)
    _check_device(args)
    _log_steps(args.quiet)
    from contrans_tl.pipelines import dapa

    dapa.run(config, Path(args.out), stop_after=args.until)
    if args.until == "report":
        print(f"results: {dapa.write_report(args.out)}")
    return 0


def _recontrol(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from contrans_tl.pipelines.configs import ReControlConfig

    config = _config(ReControlConfig, args)
    _check_out(args.out)
    if args.work is not None:
        _check_out(args.work, name="--work")
    _check_names(("--target", config.target), ("--source", config.source))
    _check_device(args)
    _log_steps(args.quiet)
    from contrans_tl.io import write_text
    from contrans_tl.models import cache_dir
    from contrans_tl.pipelines import recontrol

    work = args.work or cache_dir() / "recontrol" / f"{config.target}-seed{config.seed}"
    recontrol.run(config, Path(args.out), Path(work))
    lines = ["# RE-Control on ToxiGen (issue 16)", "", *recontrol.render_report(args.out), ""]
    write_text(Path(args.out) / "recontrol.md", "\n".join(lines))
    print(f"results: {Path(args.out) / 'recontrol.md'}")
    return 0


def _fetch(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from contrans_tl.models import load_tokenizer

    _check_names(*(("fetch", name) for name in args.names))
    _check_device(args)
    _log_steps(args.quiet)
    for name in args.names:
        if args.tokenizer_only:
            try:
                load_tokenizer(name)
            except (ValueError, OSError) as e:
                raise _UsageError(f"{name!r}: {e}") from None
        else:
            _load("fetch", name, args)
        print(f"{name}: ready")
    return 0


def _export_gguf(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if not args.out.endswith(".gguf"):
        raise _UsageError(f"--out {args.out!r}: give the .gguf file to write, e.g. fear.gguf")
    _check_out(str(Path(args.out).expanduser().parent), name="--out's folder")
    vector = _load_artifact("contrans_tl.concepts.ConceptVector", args.vector, "--vector")
    try:
        path = vector.to_gguf(
            Path(args.out).expanduser(), alpha=args.alpha, drop_layer_0=args.drop_layer_0
        )
    except ValueError as e:
        raise _UsageError(f"--vector {args.vector!r}: {_one_line(str(e))}") from None
    kept = [k for k in vector.layers if k != 0]
    print(
        f"{path}: llama.cpp control vector {vector.concept!r} (x{args.alpha:g}) for "
        f"{vector.model.model_id}, direction.{kept[0]}..direction.{kept[-1]} "
        f"({len(kept)} layers)"
    )
    return 0


def _report(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from contrans_tl.pipelines.report import render_report

    try:
        for path in args.paths:
            print(render_report(path, write=not args.no_write))
    except (ValueError, OSError) as e:
        raise _UsageError(_one_line(str(e))) from None
    return 0


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------

_MODEL_HELP = "zoo name (see 'contrans fetch --help'), hub id, HF folder or .gguf file"


def _zoo_names() -> str:
    from contrans_tl.zoo import ZOO

    return ", ".join(ZOO)


def _add_common(p: argparse.ArgumentParser, *, models: bool = True) -> None:
    """--device / --dtype for commands that load models, and --quiet for all."""
    if models:
        p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
        p.add_argument("--dtype", default="float32", choices=DTYPES, help="(default: float32)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")


def _add_steer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vector", default=None, metavar="NAME", help="a saved ConceptVector")
    add_config_options(p, SteerConfig, group="steering (with --vector)")


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace, Sequence[str] | None], int]]] = {
    "refine": ("a concept vector from positive and negative prompts (Eq. 1)", _refine),
    "fit-map": ("per-layer residual maps from a source model to a target (Eq. 2)", _fit_map),
    "transplant": ("carry a source vector through a map into the target (Eq. 3)", _transplant),
    "generate": ("greedy continuations, optionally steered by a vector", _generate),
    "evaluate": ("emotion, truthfulqa, toxigen or perplexity: base and steered", _evaluate),
    "emotion": ("the emotion transplant experiment (paper section 4.1)", _emotion),
    "analyze": ("figures and summary of one emotion transplant", _analyze),
    "dapa": ("DAPA vs ConTrans on an aligned model and its harmful fine-tune", _dapa),
    "recontrol": ("RE-Control on ToxiGen next to ConTrans and best-of-N", _recontrol),
    "export-gguf": ("write a vector as a llama.cpp control vector (.gguf)", _export_gguf),
    "report": ("show (and re-render) the results of earlier runs", _report),
    "fetch": ("prepare offline-zoo models (install, join, verify, cache)", _fetch),
}
"""Each command: its one-line help and its handler."""


def _add_io(name: str, p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of each command (its settings come from its config)."""
    if name == "refine":
        p.add_argument("--model", required=True, help=_MODEL_HELP)
        p.add_argument("--out", required=True, metavar="NAME", help="writes NAME.safetensors/.json")
        p.add_argument("--emotion", default=None, help="refine an emotion from the RepE scenarios")
        p.add_argument("--positive", default=None, metavar="FILE", help="one prompt per line")
        p.add_argument("--negative", default=None, metavar="FILE", help="one prompt per line")
        p.add_argument("--concept", default=None, help="the vector's name (default: from --out)")
        add_config_options(p, RefineConfig)
    elif name == "fit-map":
        p.add_argument("--source", required=True, help=_MODEL_HELP)
        p.add_argument("--target", required=True, help=_MODEL_HELP)
        p.add_argument("--out", required=True, metavar="NAME", help="writes NAME.safetensors/.json")
        p.add_argument("--texts", default=None, metavar="FILE", help="texts to fit on, one a line")
        add_config_options(p, MapConfig)
    elif name == "transplant":
        p.add_argument("--vector", required=True, metavar="NAME", help="a source ConceptVector")
        p.add_argument("--map", required=True, metavar="NAME", help="a ResidualMap")
        p.add_argument("--out", required=True, metavar="NAME", help="writes NAME.safetensors/.json")
        add_config_options(p, TransplantConfig)
    elif name == "generate":
        p.add_argument("--model", required=True, help=_MODEL_HELP)
        p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
        p.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line")
        _add_steer(p)
        add_config_options(p, GenerateConfig)
    elif name == "evaluate":
        p.add_argument("task", choices=EVAL_TASKS, help="what to measure")
        p.add_argument("--model", required=True, help=_MODEL_HELP)
        p.add_argument("--out", default=None, metavar="FILE.json", help="write the results here")
        _add_steer(p)
        add_config_options(p, EvaluateConfig)
    else:
        _add_experiment_io(name, p)


def _add_experiment_io(name: str, p: argparse.ArgumentParser) -> None:
    if name in ("emotion", "analyze"):
        p.add_argument("--source", required=True, help=_MODEL_HELP)
        p.add_argument("--target", required=True, help=_MODEL_HELP)
        p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    if name == "emotion":
        p.add_argument(
            "--cache-dir",
            default=None,
            help="result cache folder: vectors, maps and predictions of earlier runs are "
            "reused (default: $CONTRANS_TL_CACHE/results, i.e. ~/.cache/contrans_tl/results)",
        )
        p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
        add_config_options(p, EmotionConfig)
    elif name == "analyze":
        add_config_options(p, AnalysisConfig)
    elif name == "dapa":
        from contrans_tl.pipelines.configs import DapaConfig

        p.add_argument("--out", required=True, metavar="DIR", help="results folder (resumed)")
        p.add_argument(
            "--until",
            default="report",
            choices=DAPA_STEPS,
            help="stop after this step ('recipient': only make and cache the fine-tune)",
        )
        add_config_options(p, DapaConfig)
    elif name == "recontrol":
        from contrans_tl.pipelines.configs import ReControlConfig

        p.add_argument("--out", required=True, metavar="DIR", help="results folder (resumed)")
        p.add_argument(
            "--work",
            default=None,
            metavar="DIR",
            help="rollouts and the value artifact (default: under ~/.cache/contrans_tl)",
        )
        add_config_options(p, ReControlConfig)
    elif name == "export-gguf":
        p.add_argument("--vector", required=True, metavar="NAME", help="a saved ConceptVector")
        p.add_argument("--out", required=True, metavar="FILE.gguf", help="the file to write")
        p.add_argument("--alpha", type=float, default=1.0, help="strength baked in (default: 1)")
        p.add_argument(
            "--drop-layer-0",
            action="store_true",
            help="leave out the layer-0 row (llama.cpp cannot steer block 0's output)",
        )
    elif name == "report":
        p.add_argument("paths", nargs="+", metavar="PATH", help="run folders or results .json")
        p.add_argument("--no-write", action="store_true", help="only print; write no .md")
    elif name == "fetch":
        p.add_argument("names", nargs="+", help=f"zoo names: {_zoo_names()}")
        p.add_argument("--tokenizer-only", action="store_true", help="only the tokenizer")


_TOP = """Concept transplantation (ConTrans) on TransformerLens: refine a concept vector in
one model, map it into another model's residual stream, add it there.

The method is refine -> fit-map -> transplant -> generate / evaluate; emotion and analyze
run the paper's experiment and its figures end to end."""

_EPILOG = """Every setting is checked before any model is loaded; a user error prints one line
and exits with status 2. Progress goes to stderr, results to stdout. 'contrans COMMAND
--help' shows a command's options and defaults."""

_DESCRIPTIONS = {
    "analyze": "Fit (or load) the residual map and write layer_similarity, vector_cosines, "
    "norm_profile, token_shifts_L*, pca_before_after, tsne, separation and alpha_sweep "
    "(each NAME.png + NAME.json), analysis.json and summary.md into --out. The defaults "
    "take roughly 15-25 min on a 2-core CPU for smollm2-135m-instruct -> gemma-3-270m.",
    "emotion": "Refine the six emotion vectors in --source (and, as the Self reference, in "
    "--target), fit the maps, transplant, and score Token/Logit Acc at each alpha; the "
    "alpha of each method is picked on validation negatives. Writes results.json and "
    "results.md into --out. Vectors, maps and predictions are cached.",
    "evaluate": "Measure one task on --model, unsteered (base) and, with --vector, steered: "
    "emotion (Token/Logit Acc of the vector's emotion), truthfulqa (MC1/MC2), toxigen "
    "(toxic share by the offline classifier) or perplexity (held-out WikiSplit).",
}


def build_parser() -> tuple[argparse.ArgumentParser, set[str]]:
    """The parser, and every option of a subcommand that takes a value.

    It imports neither torch nor TransformerLens, so ``--help`` answers at once.
    """
    from contrans_tl import __version__

    p = _Parser(prog="contrans", description=_TOP, epilog=_EPILOG)
    p.add_argument("--version", action="version", version=f"contrans_tl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    values: set[str] = set()
    for name, (text, _) in COMMANDS.items():
        c = sub.add_parser(
            name,
            help=text,
            description=_DESCRIPTIONS.get(name, text),
            formatter_class=argparse.HelpFormatter,
        )
        _add_io(name, c)
        _add_common(c, models=name not in ("transplant", "report", "export-gguf"))
        values |= c.value_options
    return p, values


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``contrans`` command.

    Every setting that can be checked without the models is checked before any model is
    loaded; the layer ranges right after the model is loaded. A user error (a bad
    setting, model name or output path) prints one line, ``contrans COMMAND: message``,
    on stderr and gives status 2, having written nothing; argparse's own errors (an
    unknown option, a malformed number) exit with status 2 the same way (``SystemExit``).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a user error.
    """
    parser, value_options = build_parser()
    given = list(argv if argv is not None else sys.argv[1:])
    args = parser.parse_args(_join_negative_values(given, value_options))
    try:
        return COMMANDS[args.command][1](args, given)
    except _UsageError as e:
        print(f"contrans {args.command}: {_one_line(str(e))}", file=sys.stderr)
        return 2
