"""Saving processes for the kill test of ``tests/test_artifact_safety.py``.

Run as a script, this is a small fork server: it loads ``contrans_tl/io.py`` once, then
reads one JSON command per line on stdin and answers one JSON line on stdout.

* ``{"op": "loop", "folder", "name", "base", "log"}``: fork a child that saves the artifact
  ``folder/name`` over and over (counter ``base``, ``base + 1``, ...), appending
  ``start K`` / ``done K`` lines to ``log`` around each save, until it is killed.
  Answers ``{"pid": PID}``.
* ``{"op": "once", ..., "step"}``: fork a child that saves counter ``base`` once with
  ``contrans_tl.io._save_hook`` set to SIGKILL the child at save step ``step``.
* ``{"op": "wait", "pid"}``: reap a child; answers ``{"signal": N or null, "exit": N}``.

Forking from one warm process makes each of the many kills cheap (no new interpreter and
no torch import per kill). The test imports :func:`tensors_for` and :func:`meta_for` to
know exactly what each counter's artifact holds.
"""

import functools
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import torch

N_FLOATS = 1 << 19  # two tensors of 2 MiB each: the save takes long enough to be hit


@functools.cache
def _tensor_set(which: int) -> dict[str, torch.Tensor]:
    base = torch.arange(N_FLOATS, dtype=torch.float32)
    if which == 0:
        return {"a": base, "b": base * 2}
    return {"a": -base, "b": base + 0.5}


def tensors_for(k: int) -> dict[str, torch.Tensor]:
    """The tensors of save number ``k`` (two distinct sets, alternating)."""
    return _tensor_set(k % 2)


def meta_for(k: int) -> dict[str, object]:
    """The metadata of save number ``k``."""
    return {"kind": "kill_test", "counter": k, "which": k % 2, "layers": [k % 7]}


def _log(log: str, line: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _child(cmd: dict, io: object) -> None:
    """Run one child's saves; ``io`` is the :mod:`contrans_tl.io` module."""
    path = os.path.join(cmd["folder"], cmd["name"])
    k = int(cmd["base"])
    if cmd["op"] == "once":
        step = cmd["step"]

        def hook(name: str) -> None:
            if name == step:
                os.kill(os.getpid(), signal.SIGKILL)

        io._save_hook = hook
        _log(cmd["log"], f"start {k}")
        io.save_artifact(path, tensors_for(k), meta_for(k))
        _log(cmd["log"], f"done {k}")
        return
    while True:
        _log(cmd["log"], f"start {k}")
        io.save_artifact(path, tensors_for(k), meta_for(k))
        _log(cmd["log"], f"done {k}")
        k += 1


def _load_io() -> object:
    """``contrans_tl/io.py`` as a module, without the package's ``__init__``.

    ``io.py`` imports only torch and safetensors; the package's ``__init__`` also imports
    transformers and TransformerLens, which would triple the server's start-up time.
    """
    spec = importlib.util.find_spec("contrans_tl")
    assert spec is not None and spec.origin is not None, "contrans_tl is not installed"
    path = Path(spec.origin).with_name("io.py")
    io_spec = importlib.util.spec_from_file_location("_contrans_tl_io_under_test", path)
    assert io_spec is not None and io_spec.loader is not None
    module = importlib.util.module_from_spec(io_spec)
    io_spec.loader.exec_module(module)
    return module


def main() -> None:
    io = _load_io()
    for k in (0, 1):  # build both sets before forking
        tensors_for(k)
    children: set[int] = set()
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] in ("loop", "once"):
                pid = os.fork()
                if pid == 0:
                    code = 0
                    try:
                        _child(cmd, io)
                    except BaseException:
                        code = 3
                    os._exit(code)
                children.add(pid)
                print(json.dumps({"pid": pid}), flush=True)
            elif cmd["op"] == "wait":
                pid = int(cmd["pid"])
                _, status = os.waitpid(pid, 0)
                children.discard(pid)
                sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
                code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
                print(json.dumps({"signal": sig, "exit": code}), flush=True)
            else:
                break
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass


if __name__ == "__main__":
    main()
