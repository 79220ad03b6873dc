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


def _analysis(layer_match, rows, picked, loaded=False, pairs=((1, 0), (2, 1), (4, 2))):
    m = {"layer_pairs": [list(p) for p in pairs], "pairing": "all", "method": "svd"}
    if loaded:
        m["loaded_from"] = "runs/maps/x"
    else:
        m["layer_match"] = layer_match
    return {
        "command": f"python -m contrans_tl analyze --layer-match {layer_match}",
        "source": {"n_layers": 5},
        "target": {"n_layers": 3},
        "map": m,
        "alpha_sweep": {"rows": rows, "picked": picked},
    }


def _row(series, method, layers, alpha, acc, ppl):
    return {
        "series": series,
        "method": method,
        "layers": layers,
        "alpha": alpha,
        "token_acc": acc,
        "ppl": ppl,
    }


def test_layer_match_comparison_rows(report_module, tmp_path, monkeypatch):
    s = "transplanted · layers all"
    depth_rows = [
        _row(s, "transplanted", "all", 0.0, 0.05, 50.0),
        _row(s, "transplanted", "all", 1.0, 0.40, 60.0),
        _row(s, "transplanted", "all", 2.0, 0.70, 120.0),
        _row("self · layers all", "self", "all", 1.0, 0.9, 55.0),
    ]
    r2_rows = [
        _row(s, "transplanted", "all", 0.0, 0.05, 50.0),
        _row(s, "transplanted", "all", 1.0, 0.55, 70.0),
    ]
    pair = tmp_path / "analysis"
    _write(
        pair / "a__b" / "analysis.json",
        _analysis("depth", depth_rows, {s: 1.0, "self · layers all": 1.0}, loaded=True),
    )
    _write(pair / "a__b__match-r2" / "analysis.json", _analysis("r2", r2_rows, {s: 1.0}))
    monkeypatch.setattr(report_module, "RESULTS", tmp_path)
    monkeypatch.setattr(report_module, "HERE", tmp_path)
    text = "\n".join(report_module.analysis_section())
    assert "**a → b (match-r2)**" in text and "map layers: r2" in text
    # a loaded map's pairs are compared with the depth matching (5 -> 3 layers: 1, 2, 4)
    assert "map layers: depth (loaded map)" in text
    own = _analysis("depth", r2_rows, {}, loaded=True, pairs=((0, 0), (2, 1), (4, 2)))
    assert report_module._layer_match(own) == "loaded map, its own pairs"
    assert (
        "| a__b | depth (loaded map) | all | 1 | 0.40 | 60.0 (×1.20) | "
        "0.70 (α 2, PPL 120.0 (×2.40)) |" in text
    )
    assert (
        "| a__b__match-r2 | r2 | all | 1 | 0.55 | 70.0 (×1.40) | 0.55 (α 1, PPL 70.0 (×1.40)) |"
        in text
    )
    assert "self" not in text.split("**Layer matching")[1]  # transplanted rows only


def test_maps_section_is_run_maps_own_table(report_module, tmp_path):
    assert report_module.maps_section(tmp_path)[-1] == "Not run."
    (tmp_path / "maps.md").write_text("stale text that the section does not copy\n")
    out = report_module.maps_section(tmp_path)
    assert out[0].startswith("## Maps that carry the concept")
    assert "stale text" not in "\n".join(out)
    assert any(line.startswith("| pair | variant | layers | R² own |") for line in out)
    assert out[-1].startswith("Not run yet: svd-wikisplit")  # no stored variant here
