"""Artifacts on disk: tensors as safetensors, provenance as JSON, never pickles.

An artifact ``NAME`` is two files: ``NAME.safetensors`` (the tensors) and ``NAME.json``
(what they are and where they come from, including the sha256 of the tensor file).
Both are written to temporary files first and moved into place, so an interrupted save
leaves no half-written artifact behind.

Example:
    >>> save_artifact("out/fear", {"vectors": v}, {"kind": "concept_vector", ...})
    >>> tensors, meta = load_artifact("out/fear", kind="concept_vector")
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = [
    "FORMAT_VERSION",
    "artifact_paths",
    "save_artifact",
    "load_artifact",
    "write_json",
    "sha256_file",
]

FORMAT_VERSION = 1


def artifact_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for ``NAME``, ``NAME.json`` or ``NAME.safetensors``."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _normal_mode(path: str | os.PathLike[str]) -> None:
    """Give a temporary file the mode a plain ``open(..., "w")`` would (mkstemp uses 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON through a temporary file (atomic replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        _normal_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_artifact(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Save ``tensors`` and JSON-serialisable ``meta`` as one artifact.

    ``meta`` must have a ``"kind"``; ``format_version`` and ``tensors_sha256`` are added.

    Returns:
        The two paths written.
    """
    if "kind" not in meta:
        raise ValueError("artifact metadata needs a 'kind' entry")
    st_path, json_path = artifact_paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp_st = tempfile.mkstemp(dir=st_path.parent, prefix=f".{st_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(clean, tmp_st, metadata={"kind": str(meta["kind"])})
        full = {
            "format_version": FORMAT_VERSION,
            **meta,
            "tensors_sha256": sha256_file(Path(tmp_st)),
        }
        json.dumps(full)  # fail before anything is moved into place
        _normal_mode(tmp_st)
        os.replace(tmp_st, st_path)
    except BaseException:
        Path(tmp_st).unlink(missing_ok=True)
        raise
    write_json(json_path, full)
    return st_path, json_path


def load_artifact(
    path: str | os.PathLike[str], *, kind: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load an artifact written by :func:`save_artifact`, checking kind and integrity.

    Raises:
        FileNotFoundError: one of the two files is missing.
        ValueError: the kind differs from ``kind``, the format is unknown, or the tensor
            file does not match the sha256 recorded in the JSON.
    """
    st_path, json_path = artifact_paths(path)
    for p in (st_path, json_path):
        if not p.exists():
            raise FileNotFoundError(
                f"{p} not found; an artifact is a NAME.safetensors + NAME.json pair"
            )
    meta = json.loads(json_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{json_path}: format_version {meta.get('format_version')!r} is not supported "
            f"(this contrans_tl reads version {FORMAT_VERSION})"
        )
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{json_path} holds a {meta.get('kind')!r}, expected a {kind!r}")
    actual = sha256_file(st_path)
    if actual != meta.get("tensors_sha256"):
        raise ValueError(
            f"{st_path} does not match its JSON (sha256 {actual[:12]}..., recorded "
            f"{str(meta.get('tensors_sha256'))[:12]}...); the two files are from different saves"
        )
    return load_file(str(st_path)), meta
