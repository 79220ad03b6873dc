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
    assert "Not run yet: " + ", ".join(m.VARIANTS) + ", qwen/svd-wikisplit" in m.report()
    name = "ridge-mixed"
    metrics = {"3": {"r2": 0.5, "r2_last": 0.1}, "5": {"r2": 0.7, "r2_last": 0.3}}
    result = {
        "config": json.loads(json.dumps(asdict(configs[name]))),
        "maps": {"word_ends": {"metrics": metrics, "seconds": 12.0}},
        "summary": {
            "contrans_word_ends": {
                "alpha": 1.0,
                "token_acc": 0.25,
                "logit_acc": 0.5,
                "specificity": 0.125,
            }
        },
    }
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(result))
    row = [line for line in m.report().splitlines() if line.startswith(f"| gemma | {name} |")]
    assert row == [
        f"| gemma | {name} | all, raw α 1 | 0.600 | 0.200 | 0.250 | 0.500 | 0.125 | - | - | - "
        "| - | 12 |"
    ]
    ppl = {"contrans_word_ends": {"mean_ratio": 1.125, "max_ratio": 1.5}}
    (tmp_path / name / "perplexity.json").write_text(json.dumps(ppl))
    row = [line for line in m.report().splitlines() if line.startswith(f"| gemma | {name} |")]
    assert row == [
        f"| gemma | {name} | all, raw α 1 | 0.600 | 0.200 | 0.250 | 0.500 | 0.125 | - | - | - "
        "| 1.12 (1.50) | 12 |"
    ]
    search = {
        "pair": "gemma",
        "variant": name,
        "picked": {"layers": "6-17", "scale": "relative", "alpha": 0.2},
        "evaluation": {"token_acc": 0.75, "logit_acc": 0.875},
        "confusion": {"mean": 0.5},
    }
    (tmp_path / name / "layer_search.json").write_text(json.dumps(search))
    rows = [line for line in m.report().splitlines() if line.startswith(f"| gemma | {name} |")]
    assert rows[1] == (
        f"| gemma | {name} | searched: 6-17, relative α 0.2 | 0.600 | 0.200 | 0.750 | 0.875 "
        "| 0.500 | - | - | - | - | - |"
    )
    result["config"]["n_negatives"] = 3  # a run with other settings is not this variant
    (tmp_path / name / "results.json").write_text(json.dumps(result))
    assert not [line for line in m.report().splitlines() if f"| {name} |" in line]


def test_qwen_variants_live_in_their_own_folder_with_every_token_pairs(tmp_path, monkeypatch):
    m = _script()
    monkeypatch.setattr(m, "OUT", tmp_path)
    config = m.config_of("ridge-prompts", "qwen")
    assert config.pairings == ("all",) and config.map_texts == "prompts"
    assert config.n_negatives == 20 and m.method_of("qwen") == "contrans_all"
    assert m.folder("ridge-prompts", "qwen") == tmp_path / "qwen" / "ridge-prompts"
    assert m.folder("ridge-prompts") == tmp_path / "ridge-prompts"
    result = {
        "config": json.loads(json.dumps(asdict(config))),
        "maps": {"all": {"metrics": {"2": {"r2": 0.5, "r2_last": 0.25}}, "seconds": 3.0}},
        "summary": {
            "contrans_all": {"alpha": 2.0, "token_acc": 0.5, "logit_acc": 0.5},
            "self": {"alpha": 1.0, "token_acc": 0.625, "logit_acc": 1.0},
        },
    }
    (tmp_path / "qwen" / "ridge-prompts").mkdir(parents=True)
    (tmp_path / "qwen" / "ridge-prompts" / "results.json").write_text(json.dumps(result))
    rows = [line for line in m.report().splitlines() if line.startswith("| qwen |")]
    assert rows == [
        "| qwen | ridge-prompts | all, raw α 2 | 0.500 | 0.250 | 0.500 | 0.500 | - | 0.625 | - "
        "| - | - | 3 |"
    ]
