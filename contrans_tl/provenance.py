"""Where a model's weights come from, and one check that an artifact fits a model.

Every artifact (a concept vector, a residual map, a layer similarity, a result) records
the :class:`ModelProvenance` of the model(s) it was made from. :func:`check_compatible`
is the one check that an artifact may be used with a model, with one set of messages:
the width and layer count must match always; with ``strict`` (the default) the model id
and the weight processing too, since a residual stream differs between models and
between folded and unfolded weights.

Example:
    >>> prov = model_provenance(model)          # the model's own record
    >>> check_compatible(vector.model, model, what="concept vector 'fear'")
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "SOURCES",
    "WEIGHT_PROCESSING",
    "ModelProvenance",
    "as_provenance",
    "check_compatible",
    "dtype_name",
    "model_provenance",
    "weight_processing_of",
]

SOURCES = ("zoo", "hub", "local", "gguf", "object")
"""Valid values of :attr:`ModelProvenance.source`."""

WEIGHT_PROCESSING = ("none", "compatibility")
"""Valid values of :attr:`ModelProvenance.weight_processing`."""


@dataclass(frozen=True)
class ModelProvenance:
    """Where a model's weights come from and what shape it has.

    Attributes:
        model_id: Zoo name (``"gemma-3-270m"``), hub id, resolved local path, or for models not
            loaded by this module the model's ``cfg.model_name``.
        source: One of ``"zoo"``, ``"hub"``, ``"local"``, ``"gguf"``, ``"object"``.
        revision: Hub revision if one was given, else None.
        file_sha256: sha256 of the GGUF file for ``"zoo"`` and ``"gguf"`` sources, else None.
        dtype: Parameter dtype without the ``torch.`` prefix, e.g. ``"float32"``.
        weight_processing: ``"none"`` (Hugging Face weights as they are) or ``"compatibility"``
            (TransformerLens compatibility mode: folded LayerNorm, centred weights).
        architecture: Hugging Face class name, e.g. ``"LlamaForCausalLM"``.
        n_layers: Number of transformer blocks.
        d_model: Width of the residual stream.
        d_vocab: Number of rows of the embedding matrix.
        hub_id: The hub repository the weights originally come from, if known.

    Example:
        >>> p = model_provenance(bridge)
        >>> ModelProvenance.from_dict(p.to_dict()) == p
        True
    """

    model_id: str
    source: str
    revision: str | None
    file_sha256: str | None
    dtype: str
    weight_processing: str
    architecture: str
    n_layers: int
    d_model: int
    d_vocab: int
    hub_id: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(
                f"ModelProvenance.source must be one of {SOURCES}, got {self.source!r}"
            )
        if self.weight_processing not in WEIGHT_PROCESSING:
            raise ValueError(
                "ModelProvenance.weight_processing must be one of "
                f"{WEIGHT_PROCESSING}, got {self.weight_processing!r}"
            )
        for name in ("n_layers", "d_model", "d_vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelProvenance.{name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields.

        Example:
            >>> json.dumps(model_provenance(bridge).to_dict())
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelProvenance":
        """Rebuild a provenance from :meth:`to_dict` output.

        Args:
            d: Mapping with every field name; ``hub_id`` may be left out (defaults to None).

        Returns:
            The provenance.

        Raises:
            TypeError: If ``d`` is not a mapping.
            ValueError: If keys are missing or unknown, or a value is invalid.

        Example:
            >>> ModelProvenance.from_dict(json.loads(text))
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"ModelProvenance.from_dict expects a mapping, got {type(d).__name__}")
        fields = dataclasses.fields(cls)
        valid = [f.name for f in fields]
        required = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in d]
        unknown = sorted(str(k) for k in d if k not in valid)
        problems = []
        if missing:
            problems.append(f"missing key(s) {missing}")
        if unknown:
            problems.append(f"unknown key(s) {unknown}")
        if problems:
            raise ValueError(
                f"ModelProvenance.from_dict: {' and '.join(problems)}; "
                f"valid keys are {valid} (all but 'hub_id' required)"
            )
        return cls(**{k: d[k] for k in valid if k in d})


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def weight_processing_of(model: Any) -> str:
    """'compatibility' if the model's weights were folded/centred the TransformerLens way."""
    if hasattr(model, "original_model"):  # a TransformerBridge
        processed = bool(getattr(model, "compatibility_mode", False)) and bool(
            getattr(model, "_weights_processed", False)
        )
        return "compatibility" if processed else "none"
    cfg = getattr(model, "cfg", None)
    # A legacy HookedTransformer with folded LayerNorm has normalization_type LNPre/RMSPre.
    if getattr(cfg, "normalization_type", None) in ("LNPre", "RMSPre"):
        return "compatibility"
    return "none"


def model_provenance(model: Any) -> ModelProvenance:
    """The provenance of a model, whoever loaded it.

    Returns ``model.contrans_provenance`` when the model came from :func:`load_model` or
    :func:`boot_bridge` (with ``weight_processing`` updated if compatibility mode was enabled
    afterwards). Otherwise builds one from ``model.cfg`` (a ``TransformerBridge`` or a legacy
    ``HookedTransformer``) with ``source="object"`` and ``model_id=cfg.model_name``.

    Args:
        model: A TransformerBridge, HookedTransformer or anything with a TransformerLens ``cfg``.

    Returns:
        The provenance.

    Raises:
        TypeError: If the model has neither ``contrans_provenance`` nor a usable ``cfg``.

    Example:
        >>> model_provenance(load_model("gemma-3-270m")).hub_id
        'google/gemma-3-270m'
    """
    attached = getattr(model, "contrans_provenance", None)
    if isinstance(attached, ModelProvenance):
        processing = weight_processing_of(model)
        if attached.weight_processing == "none" and processing == "compatibility":
            return dataclasses.replace(attached, weight_processing=processing)
        return attached
    cfg = getattr(model, "cfg", None)
    needed = ("n_layers", "d_model", "d_vocab")
    if cfg is None or any(getattr(cfg, k, None) is None for k in needed):
        raise TypeError(
            f"model_provenance needs a model loaded by contrans_tl.models or one with a "
            f"TransformerLens cfg carrying {needed} (TransformerBridge, HookedTransformer); "
            f"got {type(model).__name__}"
        )
    dtype = getattr(cfg, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        params = model.parameters() if hasattr(model, "parameters") else iter(())
        first = next(iter(params), None)
        dtype = first.dtype if first is not None else torch.float32
    architecture = getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None)
    if not architecture:
        original = getattr(model, "original_model", None)
        archs = getattr(getattr(original, "config", None), "architectures", None)
        architecture = archs[0] if archs else type(original or model).__name__
    return ModelProvenance(
        model_id=str(getattr(cfg, "model_name", None) or type(model).__name__),
        source="object",
        revision=None,
        file_sha256=None,
        dtype=dtype_name(dtype),
        weight_processing=weight_processing_of(model),
        architecture=str(architecture),
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        d_vocab=int(cfg.d_vocab),
    )


def as_provenance(
    value: "ModelProvenance | Mapping[str, Any]", what: str = "model"
) -> ModelProvenance:
    """A :class:`ModelProvenance` from itself or from its :meth:`~ModelProvenance.to_dict`.

    Args:
        value: a provenance, or a mapping with every field (as artifacts store it).
        what: names the value in the error, e.g. ``"concept vector 'fear' model"``.

    Raises:
        TypeError: neither a provenance nor a mapping.
        ValueError: the mapping misses fields or has unknown ones (naming them).
    """
    if isinstance(value, ModelProvenance):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{what} must be a ModelProvenance or its to_dict(), got {type(value).__name__}"
        )
    try:
        return ModelProvenance.from_dict(value)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def check_compatible(
    made_for: ModelProvenance | Mapping[str, Any],
    model: Any,
    *,
    what: str,
    strict: bool = True,
) -> None:
    """Refuse to use an artifact made for one model with another.

    The width and layer count must match always. With ``strict``, also the model id and
    the weight processing: a vector made with folded LayerNorm is wrong without it, and a
    second model of the same shape has another residual stream.

    Args:
        made_for: the provenance the artifact records.
        model: the model it is about to be used with, or that model's provenance (e.g. a
            map's source side, for a vector about to be transplanted).
        what: names the artifact in the message, e.g. ``"concept vector 'fear'"``.
        strict: also compare model id and weight processing.

    Raises:
        ValueError: naming each mismatch; for the id check, ``strict=False`` as the way
            past it when the two are known to be the same weights.
    """
    want = as_provenance(made_for, f"{what}'s model")
    have = model if isinstance(model, ModelProvenance) else model_provenance(model)
    shape = []
    if want.d_model != have.d_model:
        shape.append(f"d_model {want.d_model} vs the model's {have.d_model}")
    if want.n_layers != have.n_layers:
        shape.append(f"{want.n_layers} layers vs the model's {have.n_layers}")
    if shape:
        raise ValueError(
            f"{what} was made for {want.model_id!r} and does not fit {have.model_id!r}: "
            + "; ".join(shape)
        )
    if not strict:
        return
    ids = []
    if want.model_id != have.model_id:
        ids.append(f"model id {want.model_id!r} vs {have.model_id!r}")
    if want.weight_processing != have.weight_processing:
        wp = (want.weight_processing, have.weight_processing)
        ids.append(f"weight processing {wp[0]!r} vs the model's {wp[1]!r}")
    if ids:
        raise ValueError(
            f"{what} does not match this model: " + "; ".join(ids) + ". The residual stream "
            "differs between models and weight processings; pass strict=False only if you "
            "know the two are the same weights."
        )
