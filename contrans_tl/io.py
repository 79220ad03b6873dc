"""Artifacts on disk: tensors as safetensors, provenance as JSON, never pickles.

An artifact ``NAME`` is two files: ``NAME.safetensors`` (the tensors) and ``NAME.json``
(what they are and where they come from, and the sha256 of the tensor file).

Integrity. The header of the tensor file also holds a copy of the complete metadata (the
JSON without ``tensors_sha256``, as canonical JSON), so the sha256 covers what the JSON
says about the tensors (layers, layer pairs, model ids, ...). :func:`load_artifact` refuses
a tensor file that does not match the sha256 recorded in the JSON, and a JSON whose content
differs from the copy, naming the first field that differs. Version-1 artifacts (written
before the copy existed) still load, with a warning and what cross-checks are possible.

Saving as a unit. A save holds an exclusive ``flock`` on the folder (loaders take a shared
one where they can), and under it:

1. finishes an interrupted earlier save of ``NAME`` (see below), then deletes the temporary
   files of ``NAME``: while the lock is held, any that exist belong to a save that died;
2. writes the tensors to ``.NAME.<random>.safetensors.tmp`` and the complete new JSON to
   ``.NAME.<random>.pending.json``, and fsyncs both and the folder;
3. renames the tensor file onto ``NAME.safetensors``, then the pending JSON onto
   ``NAME.json``, fsyncing the folder after each.

A save killed before the first rename leaves the old pair; after the second, the new one.
Between the two, ``NAME.json`` (old) does not match ``NAME.safetensors`` (new): the loader
then uses the pending JSON whose ``tensors_sha256`` matches the tensor file in place (and
renames it into place when the folder is writable). So ``NAME`` always loads as either the
old or the new artifact. The loader reads the tensor file once and hashes and deserializes
the same bytes, so the hash and the tensors cannot come from two different files.

Example:
    >>> save_artifact("out/fear", {"vectors": v}, {"kind": "concept_vector", ...})
    >>> tensors, meta = load_artifact("out/fear", kind="concept_vector")
"""

import contextlib
import hashlib
import json
import os
import re
import secrets
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load as _deserialize
from safetensors.torch import save as _serialize
from torch import Tensor

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no folder lock; each rename is still atomic
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT_VERSION",
    "artifact_paths",
    "save_artifact",
    "write_text",
    "load_artifact",
    "write_json",
    "write_atomic",
    "sha256_file",
]

FORMAT_VERSION = 2
"""Version written by :func:`save_artifact`; versions 1 and 2 are read."""

_READABLE_VERSIONS = (1, 2)
_META_KEY = "contrans_tl_meta"  # safetensors header entry holding the canonical metadata
_RESERVED = ("format_version", "tensors_sha256")  # set by save_artifact, not by callers
_SAVE_STEPS = ("tensors_written", "pending_written", "tensors_replaced", "json_replaced")

_save_hook: Callable[[str], None] | None = None
"""Test hook: if set, called with each name in ``_SAVE_STEPS`` as a save passes it."""


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


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], object]) -> Path:
    """Write a file through a temporary file in its folder, then move it onto ``path``.

    For files written by another library that wants a path (e.g. matplotlib's
    ``savefig``): ``write`` is called with the temporary file's path, the file gets the
    mode a plain ``open(path, "w")`` would give it, and it replaces ``path`` in one
    rename, so an interrupted write leaves the old file (or none), never half a file. The
    temporary file is removed if ``write`` raises.

    Args:
        path: the file to write; missing parent folders are created.
        write: called once with the temporary file's path (a ``str``); must write the
            whole content there.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> write_atomic("out/figure.png", lambda tmp: fig.savefig(tmp, format="png"))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _normal_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON through a temporary file (atomic replace)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")

    return write_atomic(path, write)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) through a temporary file (atomic replace), e.g. a report."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Helpers: names, locking, canonical metadata
# --------------------------------------------------------------------------------------------


def _name_of(st_path: Path) -> str:
    return st_path.name[: -len(".safetensors")]


def _temp_pattern(name: str) -> re.Pattern[str]:
    """Temporary files of artifact ``name``: this module's, and those of version-1 saves.

    The random parts have a fixed length, so the files of ``NAME`` and of ``NAME.x`` can not
    be taken for each other.
    """
    n = re.escape(name)
    return re.compile(
        rf"\.{n}\.[0-9a-f]{{16}}\.(?:safetensors\.tmp|pending\.json)"
        rf"|\.{n}\.(?:safetensors|json)\.[a-z0-9_]{{8}}\.tmp"
    )


def _pending_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{16}}\.pending\.json")


def _matching_files(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [folder / n for n in sorted(names) if pattern.fullmatch(n)]


@contextlib.contextmanager
def _folder_lock(folder: Path, *, exclusive: bool) -> Iterator[int | None]:
    """Hold a ``flock`` on ``folder``; yields the folder's fd (for fsync), or None.

    An exclusive lock (saving) must be had; a shared one (loading) is taken where the
    folder and file system allow it, and skipped otherwise. Without ``fcntl`` (not POSIX)
    there is no lock.
    """
    if fcntl is None:
        yield None
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        if exclusive:
            raise
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as e:
            if exclusive:
                raise OSError(
                    f"cannot lock folder {folder} to save into it ({e}); save artifacts to a "
                    "local file system that supports flock"
                ) from e
        yield fd
    finally:
        os.close(fd)  # also releases the lock


def _fsync(fd: int | None) -> None:
    if fd is not None:
        os.fsync(fd)


def _write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _step(name: str) -> None:
    if _save_hook is not None:
        _save_hook(name)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _without_sha(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "tensors_sha256"}


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _first_difference(in_json: Any, in_header: Any, path: tuple[str, ...] = ()) -> str:
    """Describe where two JSON values (whose canonical forms differ) first differ."""
    if isinstance(in_json, dict) and isinstance(in_header, dict):
        for key in sorted(set(in_json) | set(in_header)):
            where = "'" + ".".join((*path, key)) + "'"
            if key not in in_json:
                return f"{where} is missing from the JSON but is {_show(in_header[key])} in"
            if key not in in_header:
                return f"{where} is {_show(in_json[key])} in the JSON but absent from"
            if _canonical(in_json[key]) != _canonical(in_header[key]):
                return _first_difference(in_json[key], in_header[key], (*path, key))
    where = "'" + ".".join(path) + "'" if path else "the metadata"
    return f"{where} is {_show(in_json)} in the JSON but {_show(in_header)} in"


# --------------------------------------------------------------------------------------------
# Reading the two files
# --------------------------------------------------------------------------------------------


def _parse_object(text: str, path: Path) -> dict[str, Any]:
    """Parse an artifact JSON, raising ValueError naming ``path`` if it is not an object."""
    if not text.strip():
        raise ValueError(
            f"{path} is empty; an artifact JSON holds an object with 'kind', "
            "'format_version' and 'tensors_sha256'. Re-save the artifact."
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON (truncated or edited?): {e}. Re-save the artifact."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, expected an object with 'kind', "
            "'format_version' and 'tensors_sha256'"
        )
    return data


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, expected an artifact JSON file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 text (JSON) file: {e}") from None
    return _parse_object(text, path)


def _corrupt(path: Path, detail: str) -> ValueError:
    return ValueError(
        f"{path} is corrupt or truncated ({detail}); it is not a complete safetensors file. "
        "Re-save the artifact."
    )


def _header_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (its str -> str dict)."""
    if len(data) < 8:
        raise _corrupt(path, f"{len(data)} bytes, less than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise _corrupt(path, f"the header claims {n} bytes but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _corrupt(path, "its header metadata is not a str -> str mapping")
    return meta


def _tensors_from(data: bytes, path: Path) -> dict[str, Tensor]:
    _header_metadata(data, path)
    try:
        return _deserialize(data)
    except Exception as e:  # SafetensorError and friends
        raise _corrupt(path, str(e)) from None


def _find_pending(folder: Path, name: str, sha: str) -> tuple[Path, dict[str, Any]] | None:
    """A complete pending JSON of ``name`` that records ``sha`` as its tensors' sha256."""
    for p in _matching_files(folder, _pending_pattern(name)):
        try:
            meta = _read_json_file(p)
        except (OSError, ValueError):
            continue  # a save killed while writing it: never the one in place
        if meta.get("tensors_sha256") == sha:
            return p, meta
    return None


def _roll_forward(st_path: Path, json_path: Path) -> None:
    """Finish a save of ``NAME`` that was killed between its two renames (lock held)."""
    name = _name_of(st_path)
    if not _matching_files(st_path.parent, _pending_pattern(name)) or not st_path.exists():
        return
    sha = hashlib.sha256(st_path.read_bytes()).hexdigest()
    try:
        if _read_json_file(json_path).get("tensors_sha256") == sha:
            return
    except (OSError, ValueError):
        pass
    found = _find_pending(st_path.parent, name, sha)
    if found is not None:
        os.replace(found[0], json_path)


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def save_artifact(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Save ``tensors`` and JSON-serialisable ``meta`` as one artifact, atomically as a unit.

    ``meta`` must have a ``"kind"``; ``format_version`` and ``tensors_sha256`` are set here
    (values of those keys in ``meta`` are replaced). A copy of the metadata goes into the
    tensor file's header, so later edits of the JSON are detected. If the save is killed at
    any point, ``NAME`` still loads as the previous artifact or as this one (see the module
    docstring); temporary files that killed saves left behind are deleted.

    Returns:
        The two paths written.

    Raises:
        ValueError: ``meta`` has no ``"kind"``.
        TypeError: ``meta`` is not JSON-serialisable (nothing is written then).
    """
    if "kind" not in meta:
        raise ValueError("artifact metadata needs a 'kind' entry, e.g. {'kind': 'my_thing'}")
    body = {
        "format_version": FORMAT_VERSION,
        **{k: v for k, v in meta.items() if k not in _RESERVED},
    }
    body = json.loads(json.dumps(body))  # JSON-normalised: tuples -> lists, keys -> str
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = _serialize(clean, metadata={"kind": str(body["kind"]), _META_KEY: _canonical(body)})
    sha = hashlib.sha256(data).hexdigest()
    text = json.dumps({**body, "tensors_sha256": sha}, indent=2) + "\n"

    st_path, json_path = artifact_paths(path)
    folder = st_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    name = _name_of(st_path)
    with _folder_lock(folder, exclusive=True) as fd:
        _roll_forward(st_path, json_path)
        for stale in _matching_files(folder, _temp_pattern(name)):
            stale.unlink(missing_ok=True)
        token = secrets.token_hex(8)
        tmp_st = folder / f".{name}.{token}.safetensors.tmp"
        pending = folder / f".{name}.{token}.pending.json"
        replaced = False
        try:
            _write_synced(tmp_st, data)
            _step("tensors_written")
            _write_synced(pending, text.encode("utf-8"))
            _fsync(fd)
            _step("pending_written")
            os.replace(tmp_st, st_path)
            replaced = True
            _fsync(fd)
            _step("tensors_replaced")
            os.replace(pending, json_path)
            _fsync(fd)
            _step("json_replaced")
        except BaseException:
            # Once the tensors are in place, the pending JSON is what makes them loadable.
            tmp_st.unlink(missing_ok=True)
            if not replaced:
                pending.unlink(missing_ok=True)
            raise
    return st_path, json_path


def load_artifact(
    path: str | os.PathLike[str], *, kind: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load an artifact written by :func:`save_artifact`, checking kind and integrity.

    Works from read-only folders. If a save of ``NAME`` was killed between its two
    renames, the artifact it was writing is loaded (and its JSON moved into place when the
    folder is writable).

    Returns:
        ``(tensors, meta)``: the tensors on the CPU and the JSON metadata.

    Raises:
        FileNotFoundError: one of the two files is missing.
        ValueError: a file is not valid JSON / safetensors (corrupt or truncated), the kind
            differs from ``kind``, the format is unknown, the tensor file does not match the
            sha256 recorded in the JSON, or the JSON was edited after it was saved.
    """
    st_path, json_path = artifact_paths(path)
    if not st_path.exists():
        raise FileNotFoundError(
            f"{st_path} not found; an artifact is a NAME.safetensors + NAME.json pair"
        )
    with _folder_lock(st_path.parent, exclusive=False):
        data = st_path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        meta: dict[str, Any] | None = None
        json_error: ValueError | None = None
        try:
            meta = _read_json_file(json_path)
        except FileNotFoundError:
            pass
        except ValueError as e:
            json_error = e
        source = json_path
        if meta is None or meta.get("tensors_sha256") != sha:
            found = _find_pending(st_path.parent, _name_of(st_path), sha)
            if found is not None:  # a save killed between its two renames: finish it
                source, meta = found
                with contextlib.suppress(OSError):
                    os.replace(found[0], json_path)
            elif meta is None and json_error is None:
                raise FileNotFoundError(
                    f"{json_path} not found; an artifact is a NAME.safetensors + NAME.json pair"
                )
            else:
                _tensors_from(data, st_path)  # a corrupt tensor file is named as such
                if json_error is not None:
                    raise json_error
                assert meta is not None
                recorded = meta.get("tensors_sha256")
                raise ValueError(
                    f"{st_path} does not match its JSON (sha256 {sha[:12]}..., recorded "
                    f"{str(recorded)[:12]}...); the two files are from different saves"
                )
    return _checked(data, st_path, source, meta, kind)


def _checked(
    data: bytes, st_path: Path, json_path: Path, meta: dict[str, Any], kind: str | None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Check the metadata of a hash-verified pair against the tensor file; load the tensors."""
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS or isinstance(version, bool):
        raise ValueError(
            f"{json_path}: format_version {version!r} is not supported (this contrans_tl "
            f"reads versions {', '.join(map(str, _READABLE_VERSIONS))})"
        )
    header = _header_metadata(data, st_path)
    copy = header.get(_META_KEY)
    if copy is not None:
        if _canonical(_without_sha(meta)) != copy:
            try:
                where = _first_difference(_without_sha(meta), json.loads(copy))
            except json.JSONDecodeError:
                where = "the metadata differs from what is"
            raise ValueError(
                f"{json_path} was edited after it was saved: {where} {st_path.name}; "
                "re-save the artifact instead of editing its JSON"
            )
    elif version != 1:
        raise ValueError(
            f"{json_path} says format_version {version} but {st_path.name} holds no copy of "
            "the metadata, as version-2 tensor files do; the JSON was edited or the tensor "
            "file was written by other software. Re-save the artifact."
        )
    else:
        warnings.warn(
            f"{json_path} is a version-1 artifact: only its tensor file is covered by the "
            "integrity check, not its JSON; re-save it to upgrade it to version "
            f"{FORMAT_VERSION}",
            stacklevel=3,
        )
        if "kind" in header and header["kind"] != str(meta.get("kind")):
            raise ValueError(
                f"{json_path} says kind {meta.get('kind')!r} but {st_path.name} was saved as "
                f"a {header['kind']!r}; the JSON was edited. Re-save the artifact."
            )
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{json_path} holds a {meta.get('kind')!r}, expected a {kind!r}")
    tensors = _tensors_from(data, st_path)
    if copy is None:
        problem = _v1_mismatch(meta, tensors)
        if problem:
            raise ValueError(
                f"{json_path} (version 1) does not match {st_path.name}: {problem}; the JSON "
                "was edited. Re-save the artifact."
            )
    return tensors, meta


def _v1_mismatch(meta: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> str | None:
    """What can be cross-checked for version-1 files, whose JSON has no copy to compare."""
    names = set(tensors)
    try:
        if meta.get("kind") == "concept_vector":
            if names != {"vectors"}:
                return f"tensors {sorted(names)}, expected ['vectors']"
            shape = tuple(tensors["vectors"].shape)
            if len(shape) != 2 or shape[0] != len(meta["layers"]):
                return f"'layers' has {len(meta['layers'])} entries but vectors are {shape}"
            d_model = meta.get("model", {}).get("d_model")
            if d_model is not None and shape[1] != d_model:
                return f"'model.d_model' is {d_model} but vectors are {shape}"
        elif meta.get("kind") == "residual_map":
            targets = [int(t) for _, t in meta["layer_pairs"]]
            expected = {f"{w}.{t}" for t in targets for w in ("weight", "bias")}
            if names != expected:
                return (
                    f"'layer_pairs' {meta['layer_pairs']} asks for tensors {sorted(expected)} "
                    f"but the file holds {sorted(names)}"
                )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"its metadata is malformed ({type(e).__name__}: {e})"
    return None
