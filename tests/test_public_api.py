"""The public API: each top-level name documented with an example; type information shipped."""

import ast
import doctest
import inspect
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import contrans_tl
from contrans_tl import gguf_vectors

REPO = Path(__file__).resolve().parents[1]
#: Examples that need no model: run as doctests, so their printed values are checked.
RUN = ["match_layers_by_depth", "resid_post_name", "emotion_scenarios", "wikisplit_sentences"]


def _example_code(doc: str) -> str:
    """The ``>>>`` / ``...`` lines of the docstring's ``Example:`` section, as Python."""
    section = doc.split("Example:", 1)[1]
    lines = []
    for line in section.splitlines():
        m = re.match(r"\s*(>>>|\.\.\.) ?(.*)", line)
        if m:
            lines.append(m.group(2))
    return "\n".join(lines)


@pytest.mark.parametrize("name", contrans_tl.__all__)
def test_every_public_name_has_an_example_that_parses(name):
    doc = inspect.getdoc(getattr(contrans_tl, name)) or ""
    assert "Example:" in doc, f"contrans_tl.{name} has no 'Example:' section"
    code = _example_code(doc)
    assert code.strip(), f"contrans_tl.{name}'s Example has no >>> line"
    ast.parse(code, filename=f"contrans_tl.{name} example")  # a SyntaxError names the line


@pytest.mark.parametrize("name", RUN)
def test_model_free_examples_run(name):
    obj = getattr(contrans_tl, name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(verbose=False)
    (test,) = finder.find(obj, name, globs=dict(vars(contrans_tl)))
    assert test.examples, name
    result = runner.run(test)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


def test_doctest_check_can_fail():
    """The runner above does compare outputs: a wrong expected value fails."""
    test = doctest.DocTestParser().get_doctest(
        ">>> resid_post_name(3)\n'blocks.4.hook_resid_post'\n",
        dict(vars(contrans_tl)),
        "x",
        None,
        0,
    )
    assert doctest.DocTestRunner(verbose=False).run(test, out=lambda _: None).failed == 1


def test_model_hint_example_runs():
    (test,) = doctest.DocTestFinder().find(gguf_vectors.model_hint, "model_hint")
    assert doctest.DocTestRunner(verbose=False).run(test).failed == 0


def test_wheel_ships_py_typed(tmp_path):
    """PEP 561: type checkers use the package's annotations only if py.typed is installed."""
    build = tmp_path / "src"
    shutil.copytree(
        REPO / "contrans_tl", build / "contrans_tl", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, build / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         str(build), "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("contrans_tl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "contrans_tl/py.typed" in names
    assert "contrans_tl/gguf_vectors.py" in names
