"""experiments/run_maps.py: every variant is a valid configuration, and the table reads
only runs made with today's settings."""

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("run_maps", ROOT / "experiments" / "run_maps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_are_valid_and_the_table_skips_stale_runs(tmp_path, monkeypatch):
    m = _script()
    configs = {name: m.config_of(name) for name in m.VARIANTS}
    assert len({(c.map_method, c.map_texts) for c in configs.values()}) == len(configs)
    monkeypatch.setattr(m, "OUT", tmp_path)
    assert "Not run yet: " + ", ".join(m.VARIANTS) in m.report()
    name = "ridge-mixed"
    metrics = {"3": {"r2": 0.5, "r2_last": 0.1}, "5": {"r2": 0.7, "r2_last": 0.3}}
    result = {
        "config": json.loads(json.dumps(asdict(configs[name]))),
        "maps": {"word_ends": {"metrics": metrics, "seconds": 12.0}},
        "summary": {
            "contrans_word_ends": {"token_acc": 0.25, "logit_acc": 0.5, "specificity": 0.125}
        },
    }
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(result))
    row = [line for line in m.report().splitlines() if line.startswith(f"| {name} |")]
    assert row == [f"| {name} | 0.600 | 0.200 | 0.250 | 0.500 | 0.125 | - | - | - | - | 12 |"]
    ppl = {"contrans_word_ends": {"mean_ratio": 1.125, "max_ratio": 1.5}}
    (tmp_path / name / "perplexity.json").write_text(json.dumps(ppl))
    row = [line for line in m.report().splitlines() if line.startswith(f"| {name} |")]
    assert row == [
        f"| {name} | 0.600 | 0.200 | 0.250 | 0.500 | 0.125 | - | - | - | 1.12 (1.50) | 12 |"
    ]
    result["config"]["n_negatives"] = 3  # a run with other settings is not this variant
    (tmp_path / name / "results.json").write_text(json.dumps(result))
    assert not [line for line in m.report().splitlines() if line.startswith(f"| {name} |")]
