"""Hook names and layer matching between two models.

Layer ``k`` means block ``k`` (0-based) and its output ``blocks.{k}.hook_resid_post``,
the residual stream the paper's Eq. 1 reads and Eq. 3 writes.

Example:
    >>> resid_post_name(3)
    'blocks.3.hook_resid_post'
    >>> match_layers_by_depth(30, 18)[:3]   # (source layer, target layer)
    [(1, 0), (3, 1), (5, 2)]
"""

import operator
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RESID_POST",
    "resid_post_name",
    "check_layers",
    "match_layers_by_depth",
    "parse_layers",
    "model_device",
    "layer_index",
    "context_length",
    "check_context",
]

RESID_POST = "blocks.{layer}.hook_resid_post"


def resid_post_name(layer: int) -> str:
    """The TransformerLens hook name of the residual stream after block ``layer``.

    Example:
        >>> resid_post_name(3)
        'blocks.3.hook_resid_post'
    """
    return RESID_POST.format(layer=layer)


def layer_index(k: Any) -> int:
    """``k`` as a Python int, if it is an integer: ``int``, a numpy integer or an integer
    tensor with one element. Floats, bools and strings are refused, never rounded or parsed.

    Raises:
        TypeError: ``k`` is not an integer.
    """
    if isinstance(k, (bool, np.bool_)) or (isinstance(k, Tensor) and k.dtype == torch.bool):
        raise TypeError(f"layer indices must be ints, got the bool {k!r}")
    if isinstance(k, Tensor) and (k.is_floating_point() or k.is_complex()):
        raise TypeError(f"layer indices must be ints, got a {k.dtype} tensor {k!r}")
    try:
        return operator.index(k)
    except TypeError:
        raise TypeError(
            f"layer indices must be ints, got {type(k).__name__} {k!r}; pass e.g. [3, 5]"
            + ("; for a spec like '3,5' or '4-10' use parse_layers()" if isinstance(k, str) else "")
        ) from None


def check_layers(model_or_n_layers: Any, layers: Iterable[int]) -> list[int]:
    """Validate layer indices against a model (or a layer count); return them sorted.

    Negative indices count from the end, as in Python. Only integers are accepted (numpy
    and torch integer scalars too): ``"12"``, ``1.7`` and ``True`` are refused, not coerced.

    Raises:
        TypeError: ``layers`` is a string or a single index, or holds a non-integer.
        ValueError: no layers, a duplicate, or an index outside ``[-n_layers, n_layers)``.
    """
    n = (
        model_or_n_layers
        if isinstance(model_or_n_layers, int)
        else int(model_or_n_layers.cfg.n_layers)
    )
    if isinstance(layers, str):
        raise TypeError(
            f"layers must be a sequence of ints, got the string {layers!r}; pass e.g. [3, 5], "
            "or parse a spec like '3,5' or '4-10' with parse_layers()"
        )
    if not isinstance(layers, Iterable) or isinstance(layers, Tensor) and layers.ndim == 0:
        raise TypeError(
            f"layers must be a sequence of ints, got {type(layers).__name__} {layers!r}; "
            "wrap a single layer in a list: [k]"
        )
    out = []
    for k in layers:
        k = layer_index(k)
        if not -n <= k < n:
            raise ValueError(f"layer {k} is out of range for a model with {n} layers (0..{n - 1})")
        out.append(k % n)
    if not out:
        raise ValueError("no layers given; pass at least one layer index")
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate layers in {sorted(out)}")
    return sorted(out)


def match_layers_by_depth(n_source: int, n_target: int) -> list[tuple[int, int]]:
    """Pair every target layer with the source layer at the same relative depth.

    Target block ``t`` sits at depth ``(t + 1) / n_target``; its partner is the source
    block whose depth ``(s + 1) / n_source`` is nearest (ties go deeper). The last
    blocks always pair with each other.

    Returns:
        ``[(source_layer, target_layer), ...]`` for every target layer, ascending.

    Example:
        >>> match_layers_by_depth(4, 6)
        [(0, 0), (0, 1), (1, 2), (2, 3), (2, 4), (3, 5)]
    """
    if n_source < 1 or n_target < 1:
        raise ValueError(f"layer counts must be positive, got {n_source} and {n_target}")
    pairs = []
    for t in range(n_target):
        s = int((t + 1) * n_source / n_target + 0.5) - 1
        pairs.append((min(max(s, 0), n_source - 1), t))
    return pairs


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int] | None:
    """Parse a layer spec: ``None``/``"all"`` (None), ``"3,5,7"``, ``"4-10"``, or a list."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = spec.strip()
        if spec in ("", "all"):
            return None
        out: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)-(\d+)", part)
            try:
                out.extend(range(int(m[1]), int(m[2]) + 1) if m else [int(part)])
            except ValueError:
                raise ValueError(
                    f"cannot read layer spec {spec!r}: use 'all', '3,5,7' or '4-10'"
                ) from None
        return check_layers(n_layers, out)
    return check_layers(n_layers, spec)


def model_device(model: Any) -> torch.device:
    """The device a model runs on (``cfg.device``, else that of its first parameter)."""
    dev = getattr(getattr(model, "cfg", None), "device", None)
    return torch.device(dev) if dev is not None else next(model.parameters()).device


def context_length(model: Any) -> int | None:
    """The most positions ``model`` takes (``cfg.n_ctx``), or ``None`` if it does not say."""
    n = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(model: Any, lengths: Sequence[int], *, what: str, hint: str) -> None:
    """Refuse sequences longer than the model's context (``cfg.n_ctx``).

    A longer sequence would run without an error on most architectures (rotary positions
    extrapolate) and give states no one asked for, so it is refused, naming the longest
    offender; ``hint`` says how to make it fit (e.g. the ``max_length`` to truncate with).

    Raises:
        ValueError: some length exceeds the context.
    """
    n_ctx = context_length(model)
    if n_ctx is None or not lengths:
        return
    worst = max(range(len(lengths)), key=lambda i: lengths[i])
    if lengths[worst] > n_ctx:
        n_over = sum(1 for n in lengths if n > n_ctx)
        raise ValueError(
            f"{what} {worst} has {lengths[worst]} tokens ({n_over} of {len(lengths)} exceed the "
            f"limit), but the model takes at most {n_ctx} positions (cfg.n_ctx); {hint}"
        )
