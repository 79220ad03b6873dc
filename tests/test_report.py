"""experiments/make_report.py: the numbers in REPORT.md are the ones in the result files."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report_module():
    spec = importlib.util.spec_from_file_location(
        "make_report", ROOT / "experiments" / "make_report.py"
    )
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_mcnemar_against_hand_computation(report_module):
    a = [True, True, False, False, False, True]
    b = [True, False, True, True, True, True]
    gained, lost, p = report_module.mcnemar(a, b)
    assert (gained, lost) == (3, 1)
    # discordant n = 4, k = 1: 2 * (C(4,0) + C(4,1)) / 2^4 = 10/16
    assert p == pytest.approx(10 / 16)
    assert report_module.mcnemar([True], [True]) == (0, 0, 1.0)
    # all discordant pairs one way: 2 / 2^n
    assert report_module.mcnemar([False] * 5, [True] * 5)[2] == pytest.approx(2 / 32)


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_report_shows_the_numbers_of_the_result_files(report_module, tmp_path, monkeypatch):
    src, tgt = "smollm2-135m-instruct", "gemma-3-270m"
    pair = tmp_path / "alignment" / f"{src}__{tgt}"
    target = tmp_path / "alignment" / f"target__{tgt}"
    base_rec = [{"correct": c} for c in (True, False, False, False, False)]
    con_rec = [{"correct": c} for c in (True, True, True, False, False)]
    _write(target / "runs" / "tqa_base.json", {"records": base_rec})
    _write(pair / "runs" / "tqa_con.json", {"records": con_rec})
    results = {
        "source": src,
        "target": tgt,
        "command": "python experiments/run_alignment.py --x",
        "settings": {},
        "map": {
            "method": "svd",
            "pairing": "word_ends",
            "n_texts": 10,
            "metrics": {"3": {"r2": 0.5, "r2_last": 0.1}, "5": {"r2": 0.7, "r2_last": 0.3}},
        },
        "truthfulqa": {
            "base": {"mc1": 0.2, "n": 5, "key": "tqa_base"},
            "contrans_clean": {
                "mc1": 0.6,
                "n": 5,
                "key": "tqa_con",
                "alpha": 0.5,
                "val_grid": {"0.5": 0.4, "1": 0.2},
            },
        },
        "perplexity": {"base": {"ppl": 20.0}, "contrans_clean_honesty": {"ppl": 25.5}},
    }
    _write(pair / "results.json", results)
    out = tmp_path / "REPORT.md"
    monkeypatch.setattr(
        sys, "argv", ["make_report.py", "--results", str(tmp_path), "--out", str(out)]
    )
    report_module.main()
    text = out.read_text()
    assert "| ConTrans (clean) | 60.0% (α=0.5; PPL 25.5; vs Base +2/−0, p=0.5) |" in text
    assert "| Base | 20.0% |" in text
    assert "mean 0.600 / 0.200" in text  # map R² averaged over layer pairs
    assert "ConTrans (clean) − Base = +40.0 points on 5 questions" in text
    assert "Not run: " in text and "Qwen2.5-Coder-1.5B-Instruct" in text
