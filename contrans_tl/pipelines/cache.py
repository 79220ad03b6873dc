"""A result cache for pipeline steps: artifacts stored under a key that hashes their inputs.

A step's result (concept vectors, a residual map, predictions) is saved as ordinary
artifacts (:func:`contrans_tl.io.save_artifact`: safetensors + JSON, never pickles) in
``FOLDER/STEP/KEY/``. The key is the sha256 of everything the result depends on:

* each model's provenance (:func:`contrans_tl.models.model_provenance`, with the sha256 of
  its GGUF file for zoo models); models without a file hash get a hash of their weights;
  and a hash of the tokenizer (its files, else its serialised form);
* the texts and the settings that change the result;
* the code version: ``contrans_tl.__version__``, the step's own version number (raised
  when a step changes what it computes), and a hash of the package's source files, so
  that a result made by other code (an edited checkout, say) is never served.

An entry is complete once its ``complete.json`` is written, after all its artifacts; an
entry without it (a run stopped half-way through saving) is computed again, as is one
whose artifacts no longer load (it is logged and replaced). So an interrupted or repeated
run redoes only what it does not have.

Example:
    >>> cache = open_cache(None)  # the default folder; open_cache(False): no cache
    >>> vectors, hit = cache.get_or_compute(
    ...     "refine", 1, {"model": model_fingerprint(model), "texts": texts},
    ...     compute=lambda: refine(...), save=save_vectors, load=load_vectors)
"""

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

import contrans_tl
from contrans_tl.io import write_json
from contrans_tl.models import cache_dir, model_provenance

__all__ = [
    "ResultCache",
    "code_digest",
    "default_cache_dir",
    "open_cache",
    "model_fingerprint",
    "tensor_digest",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
_COMPLETE = "complete.json"


def default_cache_dir() -> Path:
    """``contrans_tl.models.cache_dir() / "results"`` (``$CONTRANS_TL_CACHE/results``)."""
    return cache_dir() / "results"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def tensor_digest(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (on the CPU, contiguous)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _weights_digest(model: Any) -> str:
    h = hashlib.blake2b(digest_size=32)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str | None:
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    files = sorted(folder.glob("tokenizer*.json")) if folder.is_dir() else []
    if files:
        h = hashlib.sha256()
        for f in files + sorted(folder.glob("special_tokens_map.json")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        return h.hexdigest()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    return None


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of the source files of the installed ``contrans_tl`` package (``*.py``)."""
    root = Path(contrans_tl.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What identifies a model's results: provenance, weights and tokenizer.

    Zoo and GGUF models carry the sha256 of their weight file in their provenance; any
    other model (a hub id, a local folder, an object built in memory) gets a hash of its
    parameters (``weights_sha``; about a second per GB), so two models with the same name
    but different weights never share results. The tokenizer is hashed too (its files, or
    its serialised form).

    Returns:
        A JSON-ready dict.
    """
    out = model_provenance(model).to_dict()
    if not out.get("file_sha256"):
        out["weights_sha"] = _weights_digest(model)
    tokenizer = getattr(model, "tokenizer", None)
    out["tokenizer_sha"] = None if tokenizer is None else _tokenizer_digest(tokenizer)
    return out


@dataclass(frozen=True)
class ResultCache:
    """Results of pipeline steps in ``folder`` (see the module docstring).

    Attributes:
        folder: the cache folder; created when the first result is stored.
    """

    folder: Path

    def key(self, step: str, version: int, inputs: Mapping[str, Any]) -> str:
        """The key of a step's result: sha256 of its inputs and the code version.

        Args:
            step: the step's name (also the sub-folder).
            version: the step's version; raise it when the step computes something else.
            inputs: JSON-ready inputs (models as :func:`model_fingerprint`, texts, settings).
        """
        body = {
            "step": step,
            "step_version": version,
            "contrans_tl": contrans_tl.__version__,
            "code": code_digest(),
            "inputs": dict(inputs),
        }
        return hashlib.sha256(_canonical(body).encode()).hexdigest()

    def entry(self, step: str, key: str) -> Path:
        """The folder of one result: ``folder/step/key[:32]``."""
        return self.folder / step / key[:32]

    def get_or_compute(
        self,
        step: str,
        version: int,
        inputs: Mapping[str, Any],
        compute: Callable[[], T],
        *,
        save: Callable[[T, Path], None],
        load: Callable[[Path], T],
    ) -> tuple[T, bool]:
        """The stored result of ``step`` for ``inputs``, or ``compute()`` stored for next time.

        Args:
            step, version, inputs: as for :meth:`key`.
            compute: makes the result when it is not stored.
            save: writes a result into an (existing) entry folder, as artifacts.
            load: reads it back from that folder.

        Returns:
            ``(result, True)`` when it was stored, ``(result, False)`` when computed now.
        """
        key = self.key(step, version, inputs)
        folder = self.entry(step, key)
        marker = folder / _COMPLETE
        if marker.exists():
            try:
                if json.loads(marker.read_text()).get("key") == key:
                    return load(folder), True
                log.warning("cache entry %s belongs to another key; recomputing it", folder)
            except (OSError, ValueError, KeyError) as e:
                log.warning("cache entry %s does not load (%s); recomputing it", folder, e)
        result = compute()
        folder.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        save(result, folder)
        write_json(marker, {"step": step, "version": version, "key": key})
        return result, False


def open_cache(cache: Any) -> ResultCache | None:
    """The cache a ``cache=`` argument names.

    Args:
        cache: ``None`` or ``True``: the default folder (:func:`default_cache_dir`);
            ``False``: no cache (everything is computed); a path: that folder; a
            :class:`ResultCache`: itself.

    Raises:
        TypeError: anything else.
    """
    if isinstance(cache, ResultCache):
        return cache
    if cache is False:
        return None
    if cache is None or cache is True:
        return ResultCache(default_cache_dir())
    if isinstance(cache, (str, os.PathLike)):
        if not str(os.fspath(cache)).strip():
            raise ValueError("cache is an empty path; give a folder, None (default) or False")
        return ResultCache(Path(cache).expanduser())
    raise TypeError(
        f"cache must be None (the default folder), False (off), a folder or a ResultCache, "
        f"got {type(cache).__name__} {cache!r}"
    )
