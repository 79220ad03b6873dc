"""Swapping some of a model's weights for a while (the DAPA transplant's mechanism).

:class:`WeightSwap` replaces named parameters of a model by given tensors (for DAPA: an
aligned donor's MLP projections) inside a block, and puts the originals back bit for bit
when the block ends, whatever happens inside. Names are those of the Hugging Face model
(``model.original_model`` of a ``TransformerBridge``), e.g.
``"model.layers.5.mlp.gate_proj.weight"``; :func:`donor_weights` takes them from another
model of the same architecture.

Example:
    >>> swap = WeightSwap(target, donor_weights(aligned, names), name="dapa")
    >>> with swap:
    ...     logits = target(tokens)       # with the donor's modules
    >>> # here every parameter of target is as it was, bit for bit
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from contrans_tl.interventions.base import CountedIntervention

__all__ = ["WeightSwap", "donor_weights", "parameter_table"]


def parameter_table(model: Any) -> dict[str, torch.nn.Parameter]:
    """``{name: parameter}`` of the Hugging Face model behind ``model`` (or ``model``).

    Names are the Hugging Face ones (``"model.layers.5.mlp.gate_proj.weight"``): a
    ``TransformerBridge`` puts its components into the module tree, and the
    ``._original_component`` parts that adds to the names are left out.
    """
    module = getattr(model, "original_model", model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"expected a torch module or a TransformerBridge, got {type(model).__name__}"
        )
    return {name.replace("._original_component", ""): p for name, p in module.named_parameters()}


def donor_weights(donor: Any, names: Sequence[str]) -> dict[str, Tensor]:
    """Copies of ``donor``'s parameters ``names`` (detached, on the CPU).

    Raises:
        KeyError: a name the donor does not have (the message lists close ones).
    """
    table = parameter_table(donor)
    missing = [n for n in names if n not in table]
    if missing:
        raise KeyError(_unknown(missing, table))
    return {n: table[n].detach().to("cpu", copy=True) for n in names}


def _unknown(missing: Sequence[str], table: Mapping[str, Any]) -> str:
    import difflib

    hints = {m: difflib.get_close_matches(m, list(table), n=2) for m in missing[:3]}
    return (
        f"{len(missing)} parameter name(s) not in the model, e.g. {missing[:3]}; close names: "
        f"{hints}; names are those of the Hugging Face model, like "
        f"{next(iter(table), '?')!r}"
    )


class WeightSwap(CountedIntervention):
    """Replace named parameters of ``model`` inside a block; restore them bit for bit after.

    Args:
        model: the model to change (a ``TransformerBridge`` or a torch module).
        weights: ``{parameter name: new value}``; each value must have the parameter's
            shape; it is cast to the parameter's dtype and device when applied.
        name: label for results tables.
        metadata: anything worth recording with the swap (donor provenance, how the
            names were chosen); returned by :meth:`describe`.

    Raises:
        KeyError: a name the model does not have.
        ValueError: no weights, a shape that differs from the parameter's, or a value that
            is not finite.

    Notes:
        Tied parameters (one tensor under two names, e.g. embedding and unembedding) are
        changed under both names, since they are one tensor.
    """

    def __init__(
        self,
        model: Any,
        weights: Mapping[str, Tensor],
        *,
        name: str = "weight_swap",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model)
        if not weights:
            raise ValueError("WeightSwap needs at least one parameter to swap")
        table = parameter_table(model)
        missing = [n for n in weights if n not in table]
        if missing:
            raise KeyError(_unknown(missing, table))
        for n, w in weights.items():
            if not isinstance(w, Tensor):
                raise TypeError(f"weights[{n!r}] is {type(w).__name__}, expected a tensor")
            if tuple(w.shape) != tuple(table[n].shape):
                raise ValueError(
                    f"weights[{n!r}] has shape {tuple(w.shape)} but the parameter has "
                    f"{tuple(table[n].shape)}; a swap needs the same architecture and size"
                )
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"weights[{n!r}] holds NaN or inf")
        self.name = name
        self.weights = {n: w.detach() for n, w in weights.items()}
        self.metadata = dict(metadata or {})
        self._params = {n: table[n] for n in self.weights}
        self._saved: dict[str, Tensor] = {}
        self._n_total = sum(p.numel() for p in table.values())

    def describe(self) -> dict[str, Any]:
        n_swapped = sum(p.numel() for p in self._params.values())
        return {
            "name": self.name,
            "kind": "WeightSwap",
            "parameters": sorted(self.weights),
            "n_parameters_swapped": n_swapped,
            "fraction_of_parameters": n_swapped / max(self._n_total, 1),
            **({"metadata": self.metadata} if self.metadata else {}),
        }

    @torch.no_grad()
    def _apply(self) -> None:
        saved: dict[str, Tensor] = {}
        try:
            for n, p in self._params.items():
                saved[n] = p.detach().clone()
                p.copy_(self.weights[n].to(device=p.device, dtype=p.dtype))
        except BaseException:
            for n, original in saved.items():
                self._params[n].copy_(original)
            raise
        self._saved = saved

    @torch.no_grad()
    def _undo(self) -> None:
        for n, original in self._saved.items():
            self._params[n].copy_(original)
        self._saved = {}
