"""The tutorial in examples/ runs, start to end, on tiny random models saved as HF folders."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "examples" / "tutorial_steering.py"

CHECKS = [
    "read_resid_post_equals_run_with_cache",
    "mean_difference_by_hand",
    "hook_adds_exactly_alpha_v",
    "earlier_layers_unchanged",
    "run_with_hooks_equals_steer",
    "no_hooks_left",
    "generated_only_keeps_first_token",
    "generate_detaches",
    "no_evaluation_item_in_the_fitting_texts",
    "transplant_is_v_times_F",
    "logit_lens_at_last_block_is_the_output",
    "token_shifts_one_row_per_text",
]
#: the checks that the target moves towards the concept: real models only
EFFECT_CHECKS = ["transplant_raises_token_acc", "transplant_raises_the_emotion_on_most_queries"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(
        [sys.executable, str(TUTORIAL), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def test_tutorial_runs_and_every_check_passes(folders):
    src, tgt = folders
    proc = _run(
        "--source",
        src,
        "--target",
        tgt,
        "--n-refine",
        "4",
        "--n-map-texts",
        "30",
        "--n-eval",
        "4",
        "--max-new-tokens",
        "4",
        "--no-effect-check",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for name in CHECKS:
        assert f"CHECK {name}: ok" in out, f"{name} missing or failed:\n{out[-3000:]}"
    assert "FAILED" not in out and "effect not checked" in out
    for n in range(1, 9):
        assert f"=== {n}. " in out  # every step ran, in order
    assert out.rstrip().endswith(f"all checks passed ({len(CHECKS)})")


@pytest.mark.slow
def test_tutorial_on_the_offline_models_shows_the_effect():
    """The lesson's claim, on the models it is written for: the transplanted vector moves
    the target towards the concept on evaluation negatives, at the validation-picked α."""
    proc = _run()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in CHECKS + EFFECT_CHECKS:
        assert f"CHECK {name}: ok" in proc.stdout, name
    words = [line for line in proc.stdout.splitlines() if "words that rose most" in line]
    assert words and "[]" not in words[0]


def test_tutorial_reports_a_bad_model_name(tmp_path):
    proc = _run("--source", str(tmp_path / "missing_folder/"), "--n-map-texts", "10")
    assert proc.returncode != 0
    assert "missing_folder" in proc.stderr
