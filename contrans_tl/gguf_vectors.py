"""llama.cpp control vectors: a :class:`~contrans_tl.concepts.ConceptVector` as a GGUF file.

llama.cpp steers with ``--control-vector FILE`` (or ``--control-vector-scaled FILE S``);
repeng writes and reads the same files (``ControlVector.export_gguf`` / ``import_gguf``).
What the format is, as read from llama.cpp's loader (``common_control_vector_load_one``
in ``common/common.cpp``, applied by ``llama_adapter_cvec`` in ``src/llama-adapter.cpp``)
and repeng 0.4.0's ``extract.py`` / ``control.py``:

- a GGUF file whose ``general.architecture`` is ``"controlvector"``, with one 1-D float32
  tensor ``direction.N`` per steered layer, all of the model's width;
- ``direction.N`` is added to the output of block ``N`` (0-based) at every position: in
  llama.cpp right after the block's last residual add (``build_cvec(cur, il)``), in
  repeng to the output of ``model.layers[N]``. That is this package's layer ``N``,
  ``blocks.N.hook_resid_post``, so ``direction.N`` is ``v[N]`` with no shift;
- ``N = 0`` is refused by llama.cpp (``invalid (zero) direction tensor layer index``):
  block 0's output cannot be steered there, so a vector with a layer-0 row must drop it
  to be exported (``drop_layer_0=True``);
- llama.cpp sums several files, each times its strength, and reads no metadata;
  ``controlvector.model_hint`` (repeng: the Hugging Face ``model_type``, which it
  requires on import) and ``controlvector.layer_count`` are informative. We also write
  the concept, method, strength and the model's provenance under ``contrans_tl.*``.

The residual stream here is the Hugging Face one when the model was loaded without
weight processing (``weight_processing="none"``, the default of
:func:`~contrans_tl.models.load_model`), which is the stream llama.cpp computes.

Example:
    >>> v = ConceptVector.load("vectors/happiness")       # made for gemma-3-270m
    >>> v.select(v.layers[1:]).to_gguf("happiness.gguf")
    >>> # llama-cli -m gemma-3-270m.gguf --control-vector-scaled happiness.gguf 0.8 ...
    >>> w = ConceptVector.from_gguf("happiness.gguf", model)
"""

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from contrans_tl.io import sha256_file, write_atomic
from contrans_tl.provenance import check_compatible, model_provenance

if TYPE_CHECKING:
    from contrans_tl.concepts import ConceptVector

__all__ = ["ARCH", "model_hint", "read_control_vector", "write_control_vector"]

ARCH = "controlvector"
"""``general.architecture`` of a llama.cpp control vector."""
_DIRECTION = re.compile(r"direction\.(\d+)")


def model_hint(architecture: str) -> str:
    """The ``controlvector.model_hint`` for a Hugging Face class name.

    repeng writes the model's ``config.model_type``; for the causal-LM classes that is
    the class name without ``ForCausalLM``, lower-cased.

    Example:
        >>> model_hint("Gemma3ForCausalLM"), model_hint("LlamaForCausalLM")
        ('gemma3', 'llama')
    """
    return re.sub(r"For(Causal|Conditional)(LM|Generation)$", "", architecture).lower()


def write_control_vector(
    vector: "ConceptVector",
    path: str | os.PathLike[str],
    *,
    alpha: float = 1.0,
    drop_layer_0: bool = False,
) -> Path:
    """Write ``alpha · vector`` as a llama.cpp control vector (``direction.N`` = row of layer N).

    Args:
        vector: a vector on ``blocks.{k}.hook_resid_post`` (what this package makes).
        path: the ``.gguf`` file; written whole or not at all.
        alpha: a strength baked into the file (llama.cpp multiplies by its own
            ``--control-vector-scaled`` strength on top); stored as ``contrans_tl.alpha``.
        drop_layer_0: leave out the layer-0 row, which llama.cpp cannot apply; without it
            a vector with a layer-0 row is refused.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the vector is on another hook point, has a layer-0 row without
            ``drop_layer_0``, has no row left to write, or ``alpha`` is not a finite number.

    Example:
        >>> write_control_vector(v.select(range(1, 18)), "fear.gguf", alpha=2.0)
        PosixPath('fear.gguf')
    """
    import gguf

    from contrans_tl.sites import RESID_POST

    if vector.hook_template != RESID_POST:
        raise ValueError(
            f"a llama.cpp control vector is added to each block's output ({RESID_POST}); "
            f"vector {vector.concept!r} is on {vector.hook_template!r}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    layers = list(vector.layers)
    if 0 in layers and not drop_layer_0:
        raise ValueError(
            f"vector {vector.concept!r} has a layer-0 row, and llama.cpp never steers block "
            "0's output (it refuses direction.0); pass drop_layer_0=True (CLI: "
            "--drop-layer-0) to write layers "
            f"{layers[1:] if len(layers) > 1 else '(none)'} only"
        )
    layers = [k for k in layers if k != 0]
    if not layers:
        raise ValueError(f"vector {vector.concept!r} has no layer above 0 to write")
    prov = vector.model
    rows = {
        k: (alpha * vector[k].detach().float().cpu()).numpy().astype(np.float32) for k in layers
    }

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint(prov.architecture))
        writer.add_uint32(f"{ARCH}.layer_count", len(layers))
        writer.add_string("general.name", f"{vector.concept} ({prov.model_id})")
        writer.add_string("contrans_tl.concept", vector.concept)
        writer.add_string("contrans_tl.method", vector.method)
        writer.add_float32("contrans_tl.alpha", float(alpha))
        writer.add_string("contrans_tl.model", json.dumps(prov.to_dict(), sort_keys=True))
        writer.add_string("contrans_tl.hook", f"direction.N = alpha * v on {RESID_POST}")
        for k in layers:
            writer.add_tensor(f"direction.{k}", rows[k])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomic(path, write)


def _field(reader: Any, name: str) -> Any:
    field = reader.get_field(name)
    return None if field is None else field.contents()


def read_control_vector(
    path: str | os.PathLike[str],
    model: Any,
    *,
    concept: str | None = None,
    strict: bool = True,
) -> "ConceptVector":
    """Read a llama.cpp control vector (ours, repeng's or llama.cpp's) for ``model``.

    ``direction.N`` becomes the row of layer ``N``. A file written by
    :func:`write_control_vector` also gives back its concept, method, strength and the
    provenance of the model it was made for, which is checked against ``model`` like any
    artifact (``strict=False``: shape only).

    Args:
        path: the ``.gguf`` file.
        model: the TransformerLens model the vector is for.
        concept: the vector's name (default: the file's ``contrans_tl.concept``, else
            the file name without ``.gguf``).
        strict: also compare model id and weight processing with the recorded provenance.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a GGUF control vector; a tensor that is not ``direction.N``, not
            1-D float32, of another width than the model's ``d_model``, or for layer 0 or
            a layer the model does not have; a recorded provenance that does not fit.

    Example:
        >>> v = read_control_vector("happiness.gguf", model)
        >>> v.layers[:3]
        (1, 2, 3)
    """
    import gguf

    from contrans_tl.concepts import ConceptVector

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no control vector file at {str(path)!r}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(
            f"{str(path)!r} is a GGUF file of architecture {arch!r}, not a control vector "
            f"({ARCH!r}); a model file goes to load_model, not here"
        )
    n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    rows: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        m = _DIRECTION.fullmatch(t.name)
        if m is None:
            raise ValueError(f"{str(path)!r}: tensor {t.name!r} is not named direction.N")
        k = int(m.group(1))
        if not 1 <= k < n_layers:
            raise ValueError(
                f"{str(path)!r}: {t.name} is for block {k}, but llama.cpp steers blocks "
                f"1..{n_layers - 1} of this {n_layers}-block model; made for another model?"
            )
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise ValueError(
                f"{str(path)!r}: {t.name} must be a 1-D float32 tensor, got "
                f"{t.tensor_type.name} of shape {tuple(int(s) for s in t.shape)}"
            )
        if int(t.n_elements) != d_model:
            raise ValueError(
                f"{str(path)!r}: {t.name} has width {int(t.n_elements)}, but the model's "
                f"d_model is {d_model}; made for another model?"
            )
        rows[k] = np.array(t.data, dtype=np.float32)  # GGUFReader refuses duplicate names
    if not rows:
        raise ValueError(f"{str(path)!r} holds no direction tensors")
    recorded = _field(reader, "contrans_tl.model")
    if recorded is not None:
        check_compatible(
            json.loads(recorded), model, what=f"control vector {str(path)!r}", strict=strict
        )
    layers = sorted(rows)
    alpha = _field(reader, "contrans_tl.alpha")
    return ConceptVector(
        vectors=torch.from_numpy(np.stack([rows[k] for k in layers])),
        layers=tuple(layers),
        model=model_provenance(model),
        concept=concept or _field(reader, "contrans_tl.concept") or path.name.removesuffix(".gguf"),
        method=_field(reader, "contrans_tl.method") or "gguf_control_vector",
        metadata={
            "gguf": {
                "file": str(path),
                "sha256": sha256_file(path),
                "model_hint": _field(reader, f"{ARCH}.model_hint"),
                "alpha": None if alpha is None else float(alpha),
                "made_for": None if recorded is None else json.loads(recorded),
            }
        },
    )
