"""examples/steering.ipynb: current with its source, and executed cell by cell in a kernel."""

import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "build_notebook", ROOT / "examples" / "build_notebook.py"
)
assert _spec is not None and _spec.loader is not None
build_notebook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_notebook)


def test_notebook_is_built_from_the_tutorial():
    committed = (ROOT / "examples" / "steering.ipynb").read_text(encoding="utf-8")
    assert committed == build_notebook.build(), "run: python examples/build_notebook.py"
    nb = nbformat.reads(committed, as_version=4)
    nbformat.validate(nb)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds.count("markdown") >= 9 and kinds.count("code") >= 10
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert "EXPECT_EFFECT = True" in params.source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_percent_layout_parsing():
    cells = build_notebook.cells_of(
        "# %% [markdown]\n# # Title\n#\n# text\n\n"
        '# %% tags=["parameters"]\nA = 1\n\n# %%\nprint(A)\n'
    )
    assert [c["cell_type"] for c in cells] == ["markdown", "code", "code"]
    assert cells[0]["source"] == ["# Title\n", "\n", "text"]
    assert cells[1]["metadata"] == {"tags": ["parameters"]} and cells[1]["source"] == ["A = 1"]


def _execute(tmp_path, parameters: str | None):
    nb = nbformat.reads(build_notebook.build(), as_version=4)
    if parameters is not None:
        (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        params.source = parameters
    client = nbclient.NotebookClient(
        nb,
        timeout=1800,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    client.execute()
    text = []
    images = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            if "image/png" in out.get("data", {}):
                images += 1
    return "".join(text), images


def test_notebook_runs_on_tiny_models(folders, tmp_path):
    src, tgt = folders
    parameters = f"""SOURCE = {src!r}
TARGET = {tgt!r}
EMOTION = "fear"
N_REFINE = 4
N_MAP_TEXTS = 30
N_VALIDATION = 10
N_EVAL = 3
ALPHAS = (0.5, 1.0)
SOURCE_ALPHA = 4.0
GENERATE_ALPHA = 1.0
N_LENS = 2
MAX_NEW_TOKENS = 4
EXPECT_EFFECT = False  # random tiny models hold no emotion to move"""
    text, images = _execute(tmp_path, parameters)
    from test_examples import CHECKS

    for name in CHECKS:
        assert f"CHECK {name}: ok" in text, name
    assert "FAILED" not in text and f"all checks passed ({len(CHECKS)})" in text
    assert images == 1  # the lens figure, inline


@pytest.mark.slow
def test_notebook_on_the_offline_models(tmp_path):
    text, images = _execute(tmp_path, None)
    from test_examples import CHECKS, EFFECT_CHECKS

    for name in CHECKS + EFFECT_CHECKS:
        assert f"CHECK {name}: ok" in text, name
    assert images == 1
