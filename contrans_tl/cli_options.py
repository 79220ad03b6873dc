"""Command-line options made from config dataclasses, so each setting is declared once.

A config field becomes one option: ``n_map_texts`` -> ``--n-map-texts``, with the field's
``metadata["help"]`` and its default in the help text. What the option parses follows
the field's type:

* ``int``, ``float`` (finite), ``str`` (``metadata["choices"]`` lists valid values);
* ``bool``: a switch, ``--NAME`` for a default of ``False`` and ``--no-NAME`` for ``True``;
* ``Sequence[float]`` / ``Sequence[str]``: a comma list, ``--alphas 0.5,1,2``;
* ``metadata["cli"] == "layers"``: a layer spec kept as text (``all``, ``3,5,7``,
  ``4-10``), resolved against the model once it is loaded (see
  :func:`contrans_tl.sites.parse_layers`).

``metadata["cli_help"]`` replaces ``help`` on the command line (where the option's text
differs from the Python value), ``metadata["shown_default"]`` the default shown;
``metadata["flag"]`` renames the option (``include_self`` -> ``--no-self``, whose help is
``metadata["switch"]``);
``metadata["cli"] is False`` leaves a field out. Options left off the command line are
left out of the parsed namespace, so the config's own defaults apply
(:func:`config_kwargs`).

This module imports neither torch nor TransformerLens.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_config_options(parser, EmotionConfig)
    >>> args = parser.parse_args(["--alphas", "0.5,1", "--no-self"])
    >>> EmotionConfig(**config_kwargs(args, EmotionConfig))
    EmotionConfig(alphas=(0.5, 1.0), ..., include_self=False, ...)
"""

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "add_config_options",
    "config_kwargs",
    "config_options",
    "float_list",
    "name_list",
    "option_flag",
]


def float_list(text: str) -> list[float]:
    """``"0.1,0.2 0.4"`` -> ``[0.1, 0.2, 0.4]``; finite numbers only.

    Raises:
        argparse.ArgumentTypeError: not numbers, or one is inf / nan.
    """
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


def finite_float(text: str) -> float:
    """One finite number.

    Raises:
        argparse.ArgumentTypeError: not a number, or inf / nan.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def name_list(text: str) -> list[str]:
    """``"fear, anger"`` -> ``["fear", "anger"]``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def option_flag(f: dataclasses.Field[Any]) -> str:
    """The option string of a config field: ``metadata["flag"]`` or ``--field-name``."""
    return str(f.metadata.get("flag", "--" + f.name.replace("_", "-")))


def config_options(config_cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of ``config_cls`` that are command-line options."""
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("cli", True) is not False]


def _parts(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else tp), optional
    return tp, False


def _parser_for(f: dataclasses.Field[Any], tp: Any) -> tuple[Callable[[str], Any] | None, str]:
    """What parses the option's text, and its metavar."""
    if f.metadata.get("cli") == "layers":
        return str, "LAYERS"
    base, _ = _parts(tp)
    origin = typing.get_origin(base)
    if origin is not None and issubclass(origin, Sequence) and origin is not str:
        (item,) = typing.get_args(base)[:1] or (str,)
        return (float_list, "X,Y,...") if item is float else (name_list, "A,B,...")
    if base is int:
        return int, "N"
    if base is float:
        return finite_float, "X"
    return str, str(f.metadata.get("metavar", "TEXT"))


def _default_text(f: dataclasses.Field[Any]) -> str:
    """The default as the command line would write it (``metadata["none"]`` for None)."""
    if "shown_default" in f.metadata:
        return str(f.metadata["shown_default"]).replace("%", "%%")
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return str(f.metadata.get("none", "none"))
    if isinstance(value, (tuple, list)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_config_options(
    parser: argparse.ArgumentParser, config_cls: type, *, group: str | None = None
) -> list[str]:
    """Add one option per field of ``config_cls`` (see the module docstring).

    Args:
        parser: the (sub)parser.
        config_cls: a config dataclass whose fields carry ``metadata["help"]``.
        group: title of an argument group to put them in (``None``: the parser itself).

    Returns:
        The option strings added.
    """
    hints = typing.get_type_hints(config_cls)
    target: Any = parser.add_argument_group(group) if group else parser
    added = []
    for f in config_options(config_cls):
        flag = option_flag(f)
        is_switch = hints[f.name] is bool
        text = str(f.metadata.get("help", ""))
        text = str(f.metadata.get("switch" if is_switch else "cli_help", text))
        text = text.replace("%", "%%")  # argparse formats help with %
        if is_switch:
            on = f.default is not True
            target.add_argument(
                flag,
                dest=f.name,
                action="store_true" if on else "store_false",
                default=argparse.SUPPRESS,
                help=text,
            )
        else:
            parse, metavar = _parser_for(f, hints[f.name])
            choices = f.metadata.get("choices")
            target.add_argument(
                flag,
                dest=f.name,
                type=parse,
                metavar=None if choices else metavar,
                choices=choices,
                default=argparse.SUPPRESS,
                help=text if "(default" in text else f"{text} (default: {_default_text(f)})",
            )
        added.append(flag)
    return added


def config_kwargs(args: argparse.Namespace, config_cls: type) -> dict[str, Any]:
    """The settings given on the command line for ``config_cls``, as keyword arguments.

    Options left off the command line are left out, so the config's defaults apply;
    layer-spec fields (``metadata["cli"] == "layers"``) are left out too, for the command
    to resolve against the model.
    """
    out = {}
    for f in config_options(config_cls):
        if f.metadata.get("cli") == "layers" or not hasattr(args, f.name):
            continue
        out[f.name] = getattr(args, f.name)
    return out
