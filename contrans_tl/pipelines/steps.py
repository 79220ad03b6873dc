"""Experiment steps stored as JSON with the inputs they were made from.

A step's result is ``FOLDER/NAME.json``: ``{"inputs", "seconds", "result"}``. A rerun
whose inputs match reads it instead of computing again; a killed run resumes at the first
missing step; a step whose inputs changed is made again (the log names the first input
that differs). Inputs match when equal, floats up to a relative :data:`INPUT_RTOL`: a
recomputed vector's norms differ in their last digits between CPUs.

Example:
    >>> store = StepStore("runs/dapa")
    >>> result = store.get_or_compute("arm_donor", {"n": 160}, lambda: measure(...))
"""

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from contrans_tl.io import write_json

__all__ = [
    "STEP_VERSION",
    "INPUT_RTOL",
    "StepStore",
    "stored_result",
    "same_inputs",
    "first_difference",
]

_log = logging.getLogger(__name__)
STEP_VERSION = 1


#: Floats in step inputs (a recomputed vector's norms, a map's R²) that differ by less
#: than this, relatively, are the same input: float32 sums differ in their last digits
#: between CPUs, and through a map fit and a 24-layer pass that grows to ~2e-4 (the DAPA
#: ConTrans vector's norms, rebuilt on another CPU).
INPUT_RTOL = 1e-3


def same_inputs(a: Any, b: Any, rtol: float = INPUT_RTOL) -> bool:
    """JSON values equal, floats up to a relative ``rtol`` (ints, strings, keys exactly)."""
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, bool) or isinstance(b, bool):
            return False
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_inputs(a[k], b[k], rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_inputs(x, y, rtol) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def first_difference(a: Any, b: Any, path: str = "inputs") -> str:
    """Where two JSON values first differ (as :func:`same_inputs` sees it), for messages."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: only in the {'stored' if k in a else 'wanted'} inputs"
            if not same_inputs(a[k], b[k]):
                return first_difference(a[k], b[k], f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if not same_inputs(x, y):
                return first_difference(x, y, f"{path}[{i}]")
    return f"{path}: stored {str(a)[:60]}, wanted {str(b)[:60]}"


def stored_result(folder: str | Path, name: str) -> Any:
    """The result of step ``name`` stored in ``folder`` whatever its inputs (None when there
    is none): for reports, which read what was run and create nothing.

    Example:
        >>> stored_result("experiments/results/dapa", "arm_donor")["dsr"]
    """
    path = Path(folder) / f"{name}.json"
    return json.loads(path.read_text())["result"] if path.is_file() else None


class StepStore:
    """Step results as JSON files ``FOLDER/NAME.json``, each stored with its inputs.

    Stored inputs match wanted ones when they are equal, floats up to a relative
    :data:`INPUT_RTOL` (:func:`same_inputs`).

    Example:
        >>> store = StepStore("runs/dapa")
        >>> result = store.get_or_compute("arm_donor", {"n": 160}, lambda: measure(...))
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def _check_not_an_artifact(self, name: str) -> None:
        """A step's JSON would overwrite an artifact's JSON of the same name (the artifact
        then no longer loads): refuse, naming both."""
        path = self.path(name)
        if path.is_file() and "tensors_sha256" in json.loads(path.read_text()):
            raise ValueError(
                f"step {name!r} would overwrite the JSON of the artifact {path.with_suffix('')} "
                "(a .safetensors + .json pair): give the step or the artifact another name"
            )

    def get(self, name: str, inputs: Mapping[str, Any]) -> Any:
        path = self.path(name)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if "tensors_sha256" in data:  # an artifact's JSON, not a stored step
            self._check_not_an_artifact(name)
        wanted = json.loads(json.dumps({"version": STEP_VERSION, **inputs}))
        if not same_inputs(data.get("inputs"), wanted):
            where = first_difference(data.get("inputs"), wanted)
            _log.info("%s: inputs changed (%s), computing again", name, where)
            return None
        return data["result"]

    def get_or_compute(
        self, name: str, inputs: Mapping[str, Any], compute: Callable[[], Any]
    ) -> Any:
        got = self.get(name, inputs)
        if got is not None:
            _log.info("%s: from %s", name, self.path(name))
            return got
        start = time.perf_counter()
        result = compute()
        seconds = time.perf_counter() - start
        _log.info("%s: done in %.0f s", name, seconds)
        self._check_not_an_artifact(name)  # e.g. compute() saved one under the step's name
        write_json(
            self.path(name),
            {
                "inputs": {"version": STEP_VERSION, **inputs},
                "seconds": round(seconds, 1),
                "result": result,
            },
        )
        return json.loads(json.dumps(result))
