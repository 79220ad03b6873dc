"""DAPA: transplant modules of an aligned model into an unaligned one, and find which.

DAPA (Luo et al., "Decoupled Alignment for Robust Plug-and-Play Adaptation") copies
some modules of an aligned ("donor") model into an unaligned ("recipient") model of the
same architecture. This module gives its parts:

* **Module references.** A module of a decoder layer is named ``"<kind>@<layer>"``, e.g.
  ``"gate@12"``; kinds are :data:`KINDS`: ``q``, ``k``, ``v``, ``o`` (attention
  projections), ``attn`` (the four together), ``gate``, ``up``, ``down`` (MLP
  projections) and ``mlp`` (the three together). :func:`module_parameters` gives the
  Hugging Face parameter names of one (Llama/Qwen2/Gemma layout:
  ``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.mlp.{gate,up,down}_proj``,
  biases included where they exist); :func:`all_modules`, :func:`heuristic_modules` (the
  paper's choice: gate projections of the middle third of layers), :func:`n_parameters`
  and :func:`random_modules` (a seeded control set of about the same size) build sets.
* **Transplant.** :class:`ModuleTransplant` is an intervention (a
  :class:`~contrans_tl.interventions.weights.WeightSwap`): inside its block the
  recipient has the donor's parameters for those modules; they are restored bit for bit
  when the block ends, whatever happens inside.
* **Memory-space search** (the paper's Figs. 3-4). :func:`memory_space_search` patches one
  donor module at a time into the recipient and measures, over prompts, (a) the change of
  the recipient's final hidden state at the last token and (b) the change of a refusal
  score (log-odds that the first generated token is in a token set). The recipient runs
  once (:class:`ResidualCache` keeps the residual stream entering every layer) and each
  patch of layer ``L`` resumes the forward pass from layer ``L``: layers before it are
  unchanged by the patch. :func:`plot_memory_space` draws the result as two heatmaps.

Example:
    >>> space = memory_space_search(base, aligned, chat_prompts(base, requests),
    ...                             score_token_ids=refusal_token_ids(base))
    >>> modules = [m for m, _ in space.ranked("score_effect")[:8]]
    >>> with ModuleTransplant(base, aligned, modules) as dapa:
    ...     dapa.describe()["fraction_of_parameters"]
    0.031
"""

import logging
import os
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.interventions.weights import WeightSwap, donor_weights, parameter_table

__all__ = [
    "KINDS",
    "PROJECTIONS",
    "GROUPS",
    "parse_module",
    "module_name",
    "model_n_layers",
    "module_parameters",
    "all_modules",
    "heuristic_modules",
    "n_parameters",
    "random_modules",
    "check_same_architecture",
    "ModuleTransplant",
    "set_log_odds",
    "LastToken",
    "ResidualCache",
    "PatchEffect",
    "patch_effect",
    "MemorySpace",
    "memory_space_search",
    "plot_memory_space",
]

logger = logging.getLogger(__name__)

#: The projections of a decoder layer: kind -> (sub-module, projection) in the Hugging
#: Face layout ``model.layers.{i}.<sub-module>.<projection>``.
PROJECTIONS: Mapping[str, tuple[str, str]] = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}

#: Kinds that stand for several projections at once.
GROUPS: Mapping[str, tuple[str, ...]] = {
    "attn": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
}

#: Every module kind, in display order.
KINDS: tuple[str, ...] = ("q", "k", "v", "o", "attn", "gate", "up", "down", "mlp")

#: Config fields two models must share to swap modules between them (the name used in
#: messages after each).
_CONFIG_DIMS: tuple[tuple[str, str], ...] = (
    ("num_hidden_layers", "n_layers"),
    ("hidden_size", "d_model"),
    ("intermediate_size", "d_mlp"),
    ("num_attention_heads", "n_heads"),
    ("num_key_value_heads", "n_key_value_heads"),
    ("vocab_size", "d_vocab"),
)

_MODULE_RE = re.compile(r"^\s*([A-Za-z_]+)\s*@\s*(-?\d+)\s*$")


# --------------------------------------------------------------------------------------------
# Module references
# --------------------------------------------------------------------------------------------


def _hf(model: Any) -> torch.nn.Module:
    """The Hugging Face model behind a ``TransformerBridge`` (or the model itself)."""
    module = getattr(model, "original_model", model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"expected a Hugging Face model or a TransformerBridge, got {type(model).__name__}"
        )
    return module


def _text_config(model: Any) -> Any:
    config = getattr(_hf(model), "config", None)
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def model_n_layers(model: Any) -> int:
    """The number of decoder layers of ``model`` (a TransformerBridge or HF model).

    Read from the Hugging Face config (``num_hidden_layers``), else counted from the
    parameter names ``model.layers.{i}.``.

    Example:
        >>> model_n_layers(qwen)   # Qwen2.5-0.5B
        24
    """
    config = _text_config(model)
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    found = {
        int(m.group(1))
        for name in parameter_table(model)
        if (m := re.match(r"model\.layers\.(\d+)\.", name))
    }
    if not found:
        raise ValueError(
            f"cannot tell how many decoder layers {type(_hf(model)).__name__} has: its config "
            "has no num_hidden_layers and no parameter is named 'model.layers.{i}...'"
        )
    return max(found) + 1


def parse_module(module: str, n_layers: int | None = None) -> tuple[str, int]:
    """Split a module reference ``"<kind>@<layer>"`` into ``(kind, layer)`` and check it.

    Args:
        module: e.g. ``"gate@12"``; the kind is one of :data:`KINDS`.
        n_layers: if given, the layer must be in ``[0, n_layers)``.

    Raises:
        ValueError: not of the form ``kind@layer``, an unknown kind, or a layer out of
            range; the message names the valid kinds or layers.

    Example:
        >>> parse_module("gate@12", n_layers=24)
        ('gate', 12)
    """
    if not isinstance(module, str):
        raise TypeError(f"a module reference is a string like 'gate@12', got {module!r}")
    m = _MODULE_RE.match(module)
    if m is None:
        raise ValueError(
            f"module {module!r} is not of the form '<kind>@<layer>', e.g. 'gate@12'; kinds: "
            f"{', '.join(KINDS)}"
        )
    kind, layer = m.group(1).lower(), int(m.group(2))
    if kind not in KINDS:
        raise ValueError(
            f"module {module!r} has unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}"
        )
    if layer < 0 or (n_layers is not None and layer >= n_layers):
        valid = f"0..{n_layers - 1}" if n_layers is not None else "a non-negative layer index"
        raise ValueError(f"module {module!r} has layer {layer} out of range; valid layers: {valid}")
    return kind, layer


def module_name(kind: str, layer: int) -> str:
    """The reference ``"<kind>@<layer>"`` (checked).

    Example:
        >>> module_name("mlp", 3)
        'mlp@3'
    """
    name = f"{kind}@{layer}"
    parse_module(name)
    return name


def _layer_names(table: Mapping[str, Any], layer: int) -> list[str]:
    pattern = re.compile(rf"(^|\.){layer}\.")
    return [n for n in table if pattern.search(n)]


def _projection_names(table: Mapping[str, Any], model: Any, kind: str, layer: int) -> list[str]:
    block, proj = PROJECTIONS[kind]
    prefix = f"model.layers.{layer}.{block}.{proj}."
    weight = prefix + "weight"
    if weight not in table:
        has = _layer_names(table, layer)
        raise ValueError(
            f"{type(_hf(model)).__name__} has no parameter {weight!r}: DAPA modules are defined "
            "for the Llama/Qwen2/Gemma layout (model.layers.{i}.self_attn.{q,k,v,o}_proj, "
            f"model.layers.{{i}}.mlp.{{gate,up,down}}_proj); its layer-{layer} parameters are "
            f"{has[:12] if has else list(table)[:12]}"
        )
    bias = prefix + "bias"
    return [weight, bias] if bias in table else [weight]


def module_parameters(model: Any, module: str) -> list[str]:
    """The Hugging Face parameter names of one module (weights, then biases where they exist).

    Names are those of :func:`~contrans_tl.interventions.weights.parameter_table` (a
    ``TransformerBridge``'s ``._original_component`` parts left out).

    Args:
        model: a TransformerBridge or a Hugging Face model of the Llama/Qwen2/Gemma layout.
        module: a reference ``"<kind>@<layer>"`` (see :func:`parse_module`).

    Raises:
        ValueError: a bad reference, or a model whose parameters are laid out otherwise
            (the message lists the names it has at that layer).

    Example:
        >>> module_parameters(qwen, "q@3")
        ['model.layers.3.self_attn.q_proj.weight', 'model.layers.3.self_attn.q_proj.bias']
    """
    kind, layer = parse_module(module, model_n_layers(model))
    table = parameter_table(model)
    out: list[str] = []
    for part in GROUPS.get(kind, (kind,)):
        out += _projection_names(table, model, part, layer)
    return out


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    out = tuple(kinds)
    if not out:
        raise ValueError(f"give at least one module kind; valid kinds: {', '.join(KINDS)}")
    bad = [k for k in out if k not in KINDS]
    if bad:
        raise ValueError(f"unknown module kind(s) {bad}; valid kinds: {', '.join(KINDS)}")
    if len(set(out)) != len(out):
        raise ValueError(f"module kinds {list(out)} repeat a kind")
    return out


def _check_layer_list(layers: Iterable[int] | None, n_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(n_layers))
    out = tuple(int(x) for x in layers)
    if not out:
        raise ValueError(f"give at least one layer (valid: 0..{n_layers - 1}) or None for all")
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range; valid layers: 0..{n_layers - 1}")
    if len(set(out)) != len(out):
        raise ValueError(f"layers {list(out)} repeat a layer")
    return out


def all_modules(
    model: Any, kinds: Iterable[str] = ("gate", "up", "down"), layers: Iterable[int] | None = None
) -> list[str]:
    """Every module of the given kinds, layer by layer (all layers unless ``layers``).

    Raises:
        ValueError: an unknown kind or a layer out of range.

    Example:
        >>> all_modules(model_with_2_layers, kinds=("gate", "attn"))
        ['gate@0', 'attn@0', 'gate@1', 'attn@1']
    """
    ks = _check_kinds(kinds)
    ls = _check_layer_list(layers, model_n_layers(model))
    return [f"{k}@{i}" for i in ls for k in ks]


def heuristic_modules(n_layers: int) -> list[str]:
    """The paper's heuristic: the gate projections of the middle third of the layers.

    That is ``gate@i`` for ``i`` in ``floor(n/3) .. floor(2n/3) - 1`` (for 24 layers:
    layers 8 to 15; for 3 layers: layer 1).

    Raises:
        ValueError: ``n_layers < 3`` (the middle third would be empty).

    Example:
        >>> heuristic_modules(6)
        ['gate@2', 'gate@3']
    """
    if n_layers < 3:
        raise ValueError(f"heuristic_modules needs n_layers >= 3 (a middle third), got {n_layers}")
    return [f"gate@{i}" for i in range(n_layers // 3, 2 * n_layers // 3)]


def _unique_modules(modules: Iterable[str], what: str) -> list[str]:
    if isinstance(modules, str):
        modules = [modules]
    out: list[str] = []
    for m in modules:
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError(f"{what} needs at least one module, like 'gate@12'")
    return out


def _names_of(model: Any, modules: Sequence[str]) -> list[str]:
    names: list[str] = []
    for m in modules:
        for n in module_parameters(model, m):
            if n not in names:
                names.append(n)
    return names


def n_parameters(model: Any, modules: Iterable[str]) -> int:
    """The number of parameters (elements) in ``modules``, each counted once.

    Overlapping references (``"attn@3"`` and ``"q@3"``) count their shared parameters once.

    Example:
        >>> n_parameters(qwen, ["gate@8"]) == 896 * 4864
        True
    """
    mods = list([modules] if isinstance(modules, str) else modules)
    if not mods:
        return 0
    table = parameter_table(model)
    return sum(table[n].numel() for n in _names_of(model, mods))


def _sort_key(module: str) -> tuple[int, int]:
    kind, layer = parse_module(module)
    return layer, KINDS.index(kind)


def random_modules(
    candidates: Iterable[str], model: Any, n_params: int, *, seed: int = 0
) -> list[str]:
    """A seeded random set of ``candidates`` with about ``n_params`` parameters (a control).

    The set's count is as close to ``n_params`` as this search finds without going above
    it: candidates are taken in a seeded random order whenever they still fit, then single
    exchanges (a chosen module for a larger unchosen one that still fits) are made while
    they bring the count closer. So nothing unchosen would still fit, and no one exchange
    gets closer; with candidates all of one size (e.g. gate projections) it is exact. If
    even the smallest candidate has more than ``n_params`` parameters, the result is that
    one module (the only way to get a non-empty set). The same seed gives the same set.

    Args:
        candidates: module references sharing no parameters (not ``"attn@3"`` with
            ``"q@3"``).
        model: the model whose parameter counts are used.
        n_params: the target count (at least 1), e.g. ``n_parameters(model, heuristic)``.
        seed: seeds the random order.

    Returns:
        The chosen references, sorted by layer then kind.

    Raises:
        ValueError: no candidates, overlapping candidates, or ``n_params < 1``.

    Example:
        >>> heur = heuristic_modules(24)
        >>> cands = [m for m in all_modules(qwen, ("gate", "up", "down")) if m not in heur]
        >>> control = random_modules(cands, qwen, n_parameters(qwen, heur), seed=1)
        >>> len(control)
        8
    """
    cands = _unique_modules(candidates, "random_modules")
    if n_params < 1:
        raise ValueError(f"n_params must be >= 1, got {n_params}")
    table = parameter_table(model)
    owner: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for m in cands:
        names = module_parameters(model, m)
        for n in names:
            if n in owner:
                raise ValueError(
                    f"candidates {owner[n]!r} and {m!r} share parameter {n!r}; give candidates "
                    "that share none (e.g. the kinds gate/up/down, or mlp, not both)"
                )
            owner[n] = m
        sizes[m] = sum(table[n].numel() for n in names)
    order = list(cands)
    random.Random(seed).shuffle(order)
    chosen: list[str] = []
    total = 0
    for m in order:
        if total + sizes[m] <= n_params:
            chosen.append(m)
            total += sizes[m]
    if not chosen:
        return [min(order, key=lambda m: sizes[m])]
    while True:
        rest = [m for m in order if m not in chosen]
        best: tuple[int, str, str] | None = None
        for a in chosen:
            for b in rest:
                gain = sizes[b] - sizes[a]
                if 0 < gain <= n_params - total and (best is None or gain > best[0]):
                    best = (gain, a, b)
        if best is None:
            break
        gain, a, b = best
        chosen[chosen.index(a)] = b
        total += gain
    return sorted(chosen, key=_sort_key)


# --------------------------------------------------------------------------------------------
# Transplant
# --------------------------------------------------------------------------------------------


def check_same_architecture(
    recipient: Any, donor: Any, modules: Iterable[str] | None = None
) -> None:
    """Raise unless ``donor``'s modules can replace ``recipient``'s.

    Checks: the same Hugging Face model class; the same config dimensions (layers,
    ``d_model``, ``d_mlp``, heads, key-value heads, vocabulary); and, for ``modules``,
    the same parameter names and shapes.

    Raises:
        ValueError: the first difference found, named (e.g. ``config.intermediate_size
            (d_mlp): 104 in the recipient, 80 in the donor``).

    Example:
        >>> check_same_architecture(qwen_base, qwen_instruct, ["gate@8"])  # no error
    """
    r_hf, d_hf = _hf(recipient), _hf(donor)
    if type(r_hf) is not type(d_hf):
        raise ValueError(
            f"recipient and donor are different architectures: {type(r_hf).__name__} vs "
            f"{type(d_hf).__name__}; modules can only be swapped between models of one class"
        )
    r_cfg, d_cfg = _text_config(recipient), _text_config(donor)
    for key, short in _CONFIG_DIMS:
        a, b = getattr(r_cfg, key, None), getattr(d_cfg, key, None)
        if a != b:
            raise ValueError(
                f"recipient and donor differ in config.{key} ({short}): {a} in the recipient, "
                f"{b} in the donor; modules can only be swapped between models of one size"
            )
    if modules is None:
        return
    mods = _unique_modules(modules, "check_same_architecture")
    r_table, d_table = parameter_table(recipient), parameter_table(donor)
    for m in mods:
        r_names, d_names = module_parameters(recipient, m), module_parameters(donor, m)
        if r_names != d_names:
            raise ValueError(
                f"module {m!r} has parameters {r_names} in the recipient but {d_names} in the donor"
            )
        for n in r_names:
            rs, ds = tuple(r_table[n].shape), tuple(d_table[n].shape)
            if rs != ds:
                raise ValueError(
                    f"parameter {n!r} (module {m!r}) has shape {rs} in the recipient but {ds} in "
                    "the donor"
                )


def _model_id(model: Any) -> str:
    config = getattr(_hf(model), "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(model, "model_id", "") or "")


class ModuleTransplant(WeightSwap):
    """DAPA's transplant: the donor's ``modules`` in the recipient, inside a block.

    Entered, the recipient's parameters of ``modules`` are replaced by copies of the
    donor's (taken when this object is made); they are restored bit for bit when the
    block ends, also when it raises (see
    :class:`~contrans_tl.interventions.weights.WeightSwap`).

    Args:
        recipient: the model to change (a TransformerBridge or a Hugging Face model).
        donor: the model to copy from, of the same architecture (either kind).
        modules: module references, e.g. :func:`heuristic_modules` of the model.
        name: label for results tables.

    Raises:
        ValueError: no modules, a bad reference, or models of different architectures
            (see :func:`check_same_architecture`).

    Example:
        >>> dapa = ModuleTransplant(base, aligned, heuristic_modules(24))
        >>> with dapa:
        ...     text = generate(base, prompt)   # with the aligned model's gate projections
        >>> dapa.describe()["n_parameters_changed"]
        34865152
    """

    def __init__(
        self, recipient: Any, donor: Any, modules: Iterable[str], *, name: str = "dapa"
    ) -> None:
        mods = sorted(_unique_modules(modules, "ModuleTransplant"), key=_sort_key)
        check_same_architecture(recipient, donor, mods)
        names = _names_of(recipient, mods)
        self.modules: list[str] = mods
        self.donor_id = _model_id(donor)
        super().__init__(
            recipient,
            donor_weights(donor, names),
            name=name,
            metadata={"modules": mods, "donor": self.donor_id},
        )

    def describe(self) -> dict[str, Any]:
        """The modules, and the number and fraction of the recipient's parameters changed.

        Example:
            >>> ModuleTransplant(base, aligned, ["gate@1"]).describe()["modules"]
            ['gate@1']
        """
        out = super().describe()
        out["kind"] = "ModuleTransplant"
        out["modules"] = list(self.modules)
        out["n_modules"] = len(self.modules)
        out["donor"] = self.donor_id
        out["n_parameters_changed"] = out["n_parameters_swapped"]
        return out


# --------------------------------------------------------------------------------------------
# Resumable forward passes
# --------------------------------------------------------------------------------------------


def set_log_odds(
    logits: Float[Tensor, "batch vocab"], token_ids: Sequence[int]
) -> Float[Tensor, " batch"]:
    """``log P(S) - log(1 - P(S))`` of the next-token distribution, ``S = token_ids``.

    Computed as a difference of two log-sum-exps over the log-probabilities (inside and
    outside the set), so it stays finite for probabilities near 0 or 1.

    Raises:
        ValueError: an empty set, ids out of range, or a set covering the whole vocabulary.

    Example:
        >>> set_log_odds(torch.zeros(1, 4), [0])   # P = 1/4: log(1/3)
        tensor([-1.0986])
    """
    ids = _check_token_ids(token_ids, logits.shape[-1])
    logp = torch.log_softmax(logits.float(), dim=-1)
    inside = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    inside[torch.tensor(ids, device=logits.device)] = True
    lp_in = torch.logsumexp(logp[:, inside], dim=-1)
    lp_out = torch.logsumexp(logp[:, ~inside], dim=-1)
    return lp_in - lp_out


def _check_token_ids(token_ids: Sequence[int], vocab: int) -> list[int]:
    ids = [int(i) for i in token_ids]
    if not ids:
        raise ValueError(
            "score_token_ids is empty; give the ids of the tokens that count "
            "(e.g. refusal_token_ids)"
        )
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"score_token_ids {bad[:5]} out of range; valid ids: 0..{vocab - 1}")
    if len(set(ids)) == vocab:
        raise ValueError(
            f"score_token_ids cover the whole vocabulary ({vocab}); the log-odds would be infinite"
        )
    return sorted(set(ids))


@dataclass(frozen=True)
class LastToken:
    """What a pass gives at each prompt's last token.

    Attributes:
        hidden: ``[prompt, d_model]`` the final hidden state (after the final norm: what the
            unembedding reads, Hugging Face's ``hidden_states[-1]``), float32 on the CPU.
        score: ``[prompt]`` :func:`set_log_odds` of the next-token distribution there.
    """

    hidden: Float[Tensor, "prompt d_model"]
    score: Float[Tensor, " prompt"]


class _Skip(torch.nn.Module):
    """Stands in for a decoder layer whose output is already known: passes its input on."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


def _decoder(hf: torch.nn.Module) -> torch.nn.Module:
    base = getattr(hf, "model", None)
    if not isinstance(getattr(base, "layers", None), torch.nn.ModuleList) or not hasattr(
        base, "norm"
    ):
        raise ValueError(
            f"{type(hf).__name__} has no .model.layers (ModuleList) and .model.norm; resuming a "
            "pass needs the Llama/Qwen2/Gemma layout"
        )
    assert isinstance(base, torch.nn.Module)
    return base


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, Tensor):
        raise RuntimeError("a decoder layer was called without a hidden_states tensor")
    return h


@dataclass(frozen=True)
class _Batch:
    index: list[int]
    ids: Tensor
    mask: Tensor
    positions: Tensor


def _run(
    hf: torch.nn.Module,
    batch: _Batch,
    *,
    start: int = 0,
    entering: Tensor | None = None,
    record: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One pass over a left-padded batch: ``(final hidden, logits)`` at the last column.

    With ``start > 0`` the layers before ``start`` are skipped and ``entering`` (the
    residual stream entering layer ``start``) is fed to it; everything else (masks,
    rotary embeddings, final norm, logit transforms) is the model's own forward. With
    ``record``, the residual stream entering each layer is appended to it.
    """
    base = _decoder(hf)
    layers = base.layers
    assert isinstance(layers, torch.nn.ModuleList)
    final: list[Tensor] = []
    handles = []
    skipped: list[torch.nn.Module] = []

    def keep_final(module: Any, args: Any, out: Any) -> None:
        final.append((out[0] if isinstance(out, tuple) else out)[:, -1])

    def keep_input(module: Any, args: Any, kwargs: Any) -> None:
        assert record is not None
        record.append(_hidden_arg(args, kwargs).detach().clone())

    def feed(module: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
        assert entering is not None
        if tuple(_hidden_arg(args, kwargs).shape) != tuple(entering.shape):
            raise RuntimeError("the cached residual stream does not fit this batch")
        if args:
            return (entering, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": entering}

    was_training = hf.training
    try:
        hf.eval()
        norm = base.norm
        assert isinstance(norm, torch.nn.Module)
        handles.append(norm.register_forward_hook(keep_final))
        if record is not None:
            handles += [
                layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in layers
            ]
        if start > 0:
            handles.append(layers[start].register_forward_pre_hook(feed, with_kwargs=True))
            for i in range(start):
                skipped.append(layers[i])
                layers[i] = _Skip()
        out = hf(
            input_ids=batch.ids,
            attention_mask=batch.mask,
            position_ids=batch.positions,
            use_cache=False,
            logits_to_keep=1,
        )
    finally:
        for i, layer in enumerate(skipped):
            layers[i] = layer
        for h in handles:
            h.remove()
        hf.train(was_training)
    if len(final) != 1:
        raise RuntimeError(f"the final norm ran {len(final)} times in one pass; expected once")
    logits = out.logits if hasattr(out, "logits") else out[0]
    return final[0], logits[:, -1]


def _tokenize(prompts: Sequence[Any], tokenizer: Any, model: Any) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(
            "prompts must be a non-empty list of texts or of token-id sequences, got "
            f"{type(prompts).__name__}"
        )
    if all(isinstance(p, str) for p in prompts):
        from contrans_tl.evals.truthfulqa import tokenizer_of

        tok = tokenizer_of(tokenizer if tokenizer is not None else model)
        from contrans_tl.evals.truthfulqa import encode_prompt

        seqs = [encode_prompt(tok, p) for p in prompts]
    elif all(
        isinstance(p, Tensor) or (isinstance(p, Sequence) and not isinstance(p, str))
        for p in prompts
    ):
        seqs = []
        for i, p in enumerate(prompts):
            if isinstance(p, Tensor) and p.dim() != 1:
                raise ValueError(
                    f"prompts[{i}] is a tensor of shape {tuple(p.shape)}; give 1-D token ids"
                )
            seqs.append([int(t) for t in (p.tolist() if isinstance(p, Tensor) else p)])
    else:
        raise ValueError("prompts must be all texts or all token-id sequences, not a mix")
    empty = [i for i, s in enumerate(seqs) if not s]
    if empty:
        raise ValueError(f"prompts {empty[:5]} have no tokens; every prompt needs at least one")
    return seqs


def _batches(seqs: Sequence[Sequence[int]], batch_size: int, device: torch.device) -> list[_Batch]:
    from contrans_tl.forward import padded_batches

    out = []
    for b in padded_batches(seqs, batch_size, 0, side="left", device=device):
        positions = (b.mask.cumsum(-1) - 1).clamp(min=0)
        out.append(_Batch(b.index, b.ids, b.mask, positions))
    return out


def _device(hf: torch.nn.Module) -> torch.device:
    p = next(hf.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class ResidualCache:
    """The recipient's residual stream entering every layer, to resume passes from a layer.

    Made once (one full pass over the prompts, left-padded, each position id counting real
    tokens only), it answers :meth:`resume`: the pass from layer ``L`` on, with the model's
    current weights (e.g. inside a :class:`ModuleTransplant` of layer-``L`` modules),
    at the cost of the layers from ``L`` on. That equals a full pass whenever the weights
    of layers before ``L`` are those the cache was made with.

    Args:
        model: the recipient (a TransformerBridge or a Hugging Face model of the
            Llama/Qwen2/Gemma layout). Passes run on its Hugging Face model; any hooks
            attached to it run too.
        prompts: texts (tokenized with ``tokenizer``: no automatic special tokens, BOS
            where the tokenizer adds one) or token-id sequences; used as given (format
            chat prompts first, e.g. with
            :func:`contrans_tl.evals.refusal.chat_prompts`).
        score_token_ids: the token set of the score (e.g.
            :func:`contrans_tl.evals.refusal.refusal_token_ids`).
        tokenizer: for texts; default the model's ``.tokenizer``.
        batch_size: prompts per pass.

    Attributes:
        base: the full pass's :class:`LastToken`.
        sequences: the prompts' token ids.
        n_layers: decoder layers.

    Example:
        >>> cache = ResidualCache(base, prompts, score_token_ids=[40, 19434])
        >>> with ModuleTransplant(base, aligned, ["gate@10"]):
        ...     patched = cache.resume(10)
        >>> (patched.score - cache.base.score).mean()
        tensor(0.8120)
    """

    def __init__(
        self,
        model: Any,
        prompts: Sequence[Any],
        *,
        score_token_ids: Sequence[int],
        tokenizer: Any = None,
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.hf = _hf(model)
        _decoder(self.hf)
        self.n_layers = model_n_layers(model)
        self.sequences = _tokenize(prompts, tokenizer, model)
        self.score_token_ids = _check_token_ids(score_token_ids, _vocab(model))
        self._batches = _batches(self.sequences, batch_size, _device(self.hf))
        self._entering: list[list[Tensor]] = []
        parts = []
        with torch.inference_mode():
            for b in self._batches:
                record: list[Tensor] = []
                parts.append(_run(self.hf, b, record=record))
                if len(record) != self.n_layers:
                    raise RuntimeError(
                        f"recorded {len(record)} layer inputs in one pass but the model has "
                        f"{self.n_layers} layers"
                    )
                self._entering.append(record)
        self.base = self._collect(parts)

    @property
    def n_prompts(self) -> int:
        """The number of prompts."""
        return len(self.sequences)

    def _collect(self, parts: Sequence[tuple[Tensor, Tensor]]) -> LastToken:
        n = self.n_prompts
        hidden = torch.empty(n, parts[0][0].shape[-1], dtype=torch.float32)
        score = torch.empty(n, dtype=torch.float32)
        for b, (h, logits) in zip(self._batches, parts):
            rows = torch.tensor(b.index)
            hidden[rows] = h.float().cpu()
            score[rows] = set_log_odds(logits, self.score_token_ids).cpu()
        return LastToken(hidden, score)

    def resume(self, layer: int) -> LastToken:
        """The pass from ``layer`` on, with the model's current weights.

        Args:
            layer: the first layer to run (0: a full pass).

        Raises:
            ValueError: ``layer`` out of range.

        Example:
            >>> torch.equal(cache.resume(2).hidden, cache.base.hidden)   # nothing changed
            True
        """
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range; valid layers: 0..{self.n_layers - 1}")
        parts = []
        with torch.inference_mode():
            for b, entering in zip(self._batches, self._entering):
                parts.append(_run(self.hf, b, start=layer, entering=entering[layer]))
        return self._collect(parts)

    def full_pass(self, model: Any) -> LastToken:
        """A full pass of another ``model`` (e.g. the donor) over the same prompts.

        Example:
            >>> cache.full_pass(aligned).score.mean()
            tensor(2.31)
        """
        hf = _hf(model)
        device = _device(hf)
        parts = []
        with torch.inference_mode():
            for b in self._batches:
                moved = _Batch(b.index, b.ids.to(device), b.mask.to(device), b.positions.to(device))
                parts.append(_run(hf, moved))
        return self._collect(parts)


def _vocab(model: Any) -> int:
    v = getattr(_text_config(model), "vocab_size", None)
    if isinstance(v, int):
        return v
    emb = _hf(model).get_input_embeddings()  # type: ignore[operator]
    return int(emb.weight.shape[0])


@dataclass(frozen=True)
class PatchEffect:
    """The per-prompt effect of patching one donor module into the recipient.

    Attributes:
        module: the module reference.
        hidden: ``[prompt]`` L2 norm of (patched - unpatched) final hidden state at the
            last token (see :class:`LastToken`).
        score: ``[prompt]`` patched minus unpatched score.
        seconds: wall time of the patched pass.
    """

    module: str
    hidden: Float[Tensor, " prompt"]
    score: Float[Tensor, " prompt"]
    seconds: float


def patch_effect(cache: ResidualCache, donor: Any, module: str) -> PatchEffect:
    """Patch one ``donor`` module into the cache's model, resume the pass, and compare.

    The pass resumes from the module's layer (earlier layers are unchanged by it); the
    model's weights are restored bit for bit afterwards.

    Raises:
        ValueError: a bad reference or a donor of another architecture.

    Example:
        >>> e = patch_effect(cache, aligned, "gate@10")
        >>> e.hidden.mean(), e.score.mean()
        (tensor(3.1), tensor(0.81))
    """
    _, layer = parse_module(module, cache.n_layers)
    t0 = time.perf_counter()
    with ModuleTransplant(cache.model, donor, [module], name=f"patch {module}"):
        patched = cache.resume(layer)
    seconds = time.perf_counter() - t0
    hidden = torch.linalg.vector_norm(patched.hidden - cache.base.hidden, dim=-1)
    return PatchEffect(module, hidden, patched.score - cache.base.score, seconds)


# --------------------------------------------------------------------------------------------
# Memory space
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySpace:
    """DAPA's memory space: the effect of patching each (kind, layer) donor module.

    Attributes:
        kinds: the module kinds (rows).
        layers: the layers (columns).
        hidden_effect: ``[kind, layer]`` mean over prompts of the L2 norm of the change of
            the final hidden state at the last token.
        score_effect: ``[kind, layer]`` mean patched score minus mean unpatched score.
        base_score: the recipient's mean score.
        donor_score: the donor's mean score.
        n_prompts: prompts averaged over.
        score_token_ids: the token set of the score.

    Example:
        >>> space.score_effect[space.kinds.index("gate"), space.layers.index(10)]
        0.81
    """

    kinds: tuple[str, ...]
    layers: tuple[int, ...]
    hidden_effect: Float[np.ndarray, "kind layer"]
    score_effect: Float[np.ndarray, "kind layer"]
    base_score: float
    donor_score: float
    n_prompts: int
    score_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", _check_kinds(self.kinds))
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        shape = (len(self.kinds), len(self.layers))
        for field in ("hidden_effect", "score_effect"):
            value = np.asarray(getattr(self, field), dtype=np.float64)
            if value.shape != shape:
                raise ValueError(
                    f"MemorySpace.{field} has shape {value.shape}; expected "
                    f"(kinds, layers) = {shape}"
                )
            value.setflags(write=False)
            object.__setattr__(self, field, value)
        if self.n_prompts < 1:
            raise ValueError(f"MemorySpace.n_prompts must be >= 1, got {self.n_prompts}")
        object.__setattr__(self, "score_token_ids", tuple(int(i) for i in self.score_token_ids))

    def modules(self) -> list[str]:
        """Every module of the grid, row by row.

        Example:
            >>> space.modules()[:2]
            ['attn@0', 'attn@1']
        """
        return [f"{k}@{i}" for k in self.kinds for i in self.layers]

    def ranked(
        self, by: str = "score_effect", *, descending: bool = True
    ) -> list[tuple[str, float]]:
        """``(module, value)`` sorted by ``by`` (``"score_effect"`` or ``"hidden_effect"``).

        Example:
            >>> space.ranked("hidden_effect")[0]
            ('mlp@2', 5.7)
        """
        if by not in ("score_effect", "hidden_effect"):
            raise ValueError(f"by must be 'score_effect' or 'hidden_effect', got {by!r}")
        values = getattr(self, by).reshape(-1).tolist()
        pairs = list(zip(self.modules(), values))
        return sorted(pairs, key=lambda p: p[1], reverse=descending)

    def to_json(self) -> dict[str, Any]:
        """A plain dict of lists and numbers (``json.dump``-able).

        Example:
            >>> MemorySpace.from_json(space.to_json()) == space
            True
        """
        return {
            "kinds": list(self.kinds),
            "layers": list(self.layers),
            "hidden_effect": self.hidden_effect.tolist(),
            "score_effect": self.score_effect.tolist(),
            "base_score": float(self.base_score),
            "donor_score": float(self.donor_score),
            "n_prompts": int(self.n_prompts),
            "score_token_ids": list(self.score_token_ids),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "MemorySpace":
        """The inverse of :meth:`to_json`.

        Raises:
            ValueError: a missing field or arrays of the wrong shape.

        Example:
            >>> MemorySpace.from_json(json.load(open("memory_space.json"))).layers[:3]
            (0, 1, 2)
        """
        need = [
            "kinds",
            "layers",
            "hidden_effect",
            "score_effect",
            "base_score",
            "donor_score",
            "n_prompts",
        ]
        missing = [k for k in need if k not in data]
        if missing:
            raise ValueError(f"memory-space JSON lacks {missing}; it needs {need}")
        return cls(
            kinds=tuple(data["kinds"]),
            layers=tuple(int(x) for x in data["layers"]),
            hidden_effect=np.asarray(data["hidden_effect"], dtype=np.float64),
            score_effect=np.asarray(data["score_effect"], dtype=np.float64),
            base_score=float(data["base_score"]),
            donor_score=float(data["donor_score"]),
            n_prompts=int(data["n_prompts"]),
            score_token_ids=tuple(int(i) for i in data.get("score_token_ids", ())),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemorySpace):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]


def memory_space_search(
    recipient: Any,
    donor: Any,
    prompts: Sequence[Any],
    *,
    score_token_ids: Sequence[int],
    kinds: Iterable[str] = ("attn", "mlp", "gate", "up", "down"),
    layers: Iterable[int] | None = None,
    tokenizer: Any = None,
    batch_size: int = 16,
) -> MemorySpace:
    """Patch each (kind, layer) donor module into the recipient alone and measure its effect.

    For each module: (a) the mean over prompts of the L2 norm of the change of the
    recipient's final hidden state at the last token (after the final norm: Hugging Face's
    ``hidden_states[-1]``), and (b) the change of the mean score, the log-odds that the
    first generated token is in ``score_token_ids`` (:func:`set_log_odds`). Prompts are
    left-padded (the last column is every prompt's last token) with position ids that
    count real tokens only, so each prompt's numbers do not depend on its batch.

    The recipient runs once (:class:`ResidualCache`); each patch of layer ``L`` resumes
    from layer ``L``, so a grid costs about half a full pass per module.

    Args:
        recipient: the model patched (TransformerBridge or Hugging Face model).
        donor: the model of the same architecture the modules come from.
        prompts: texts or token-id sequences, used as given (see :class:`ResidualCache`).
        score_token_ids: the token set of the score.
        kinds: module kinds (rows), from :data:`KINDS`.
        layers: layers (columns); default all.
        tokenizer: for texts; default the recipient's ``.tokenizer``.
        batch_size: prompts per pass.

    Raises:
        ValueError: an unknown kind, a layer out of range, bad prompts or token ids, or a
            donor of another architecture.

    Example:
        >>> space = memory_space_search(base, aligned, prompts, score_token_ids=ids)
        >>> plot_memory_space(space, "results/dapa_memory_space.png")
    """
    ks = _check_kinds(kinds)
    ls = _check_layer_list(layers, model_n_layers(recipient))
    grid = [f"{k}@{i}" for k in ks for i in ls]
    check_same_architecture(recipient, donor, grid)
    cache = ResidualCache(
        recipient,
        prompts,
        score_token_ids=score_token_ids,
        tokenizer=tokenizer,
        batch_size=batch_size,
    )
    donor_score = float(cache.full_pass(donor).score.mean())
    hidden = np.zeros((len(ks), len(ls)))
    score = np.zeros((len(ks), len(ls)))
    for r, k in enumerate(ks):
        for c, i in enumerate(ls):
            effect = patch_effect(cache, donor, f"{k}@{i}")
            hidden[r, c] = float(effect.hidden.mean())
            score[r, c] = float(effect.score.mean())
            logger.info(
                "patched %s: hidden %.4g, score %+.4g (%.2fs)",
                effect.module,
                hidden[r, c],
                score[r, c],
                effect.seconds,
            )
    return MemorySpace(
        kinds=ks,
        layers=ls,
        hidden_effect=hidden,
        score_effect=score,
        base_score=float(cache.base.score.mean()),
        donor_score=donor_score,
        n_prompts=cache.n_prompts,
        score_token_ids=tuple(cache.score_token_ids),
    )


def plot_memory_space(space: MemorySpace, path: str | os.PathLike[str]) -> Path:
    """Write ``space`` as a PNG with two heatmaps: hidden effect and score effect.

    Layers are on the x axis, kinds on the y axis; the score panel uses a diverging map
    centred on 0. Drawn on matplotlib's Agg canvas (no display, no global ``pyplot``
    state); the file is written atomically.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> plot_memory_space(space, "results/dapa_memory_space.png")
        PosixPath('results/dapa_memory_space.png')
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from contrans_tl.io import write_atomic

    width = min(24.0, 3.0 + 0.45 * len(space.layers))
    fig = Figure(figsize=(width, 1.6 + 0.9 * len(space.kinds)), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(2, 1, i + 1) for i in range(2)]
    bound = float(np.nanmax(np.abs(space.score_effect))) or 1.0
    panels = [
        (space.hidden_effect, "|Δ final hidden state| (mean L2)", "viridis", None, None),
        (space.score_effect, "Δ score (log-odds)", "RdBu_r", -bound, bound),
    ]
    for ax, (values, title, cmap, vmin, vmax) in zip(axes, panels):
        im = ax.imshow(
            values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
        )
        ax.set_title(title, fontsize=10)
        ax.set_yticks(range(len(space.kinds)), list(space.kinds))
        step = max(1, len(space.layers) // 24)
        ticks = list(range(0, len(space.layers), step))
        ax.set_xticks(ticks, [str(space.layers[t]) for t in ticks])
        ax.set_xlabel("layer")
        ax.set_ylabel("module kind")
        fig.colorbar(im, ax=ax)
    fig.suptitle(
        f"DAPA memory space ({space.n_prompts} prompts; recipient score {space.base_score:.3g}, "
        f"donor {space.donor_score:.3g})",
        fontsize=10,
    )
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
