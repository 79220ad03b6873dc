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
    "transplant_is_v_times_F",
    "logit_lens_at_last_block_is_the_output",
    "token_shifts_one_row_per_text",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, byte_tokenizer, meta_tokenizer):
    from conftest import tiny_gemma3_hf, tiny_llama_hf

    base = tmp_path_factory.mktemp("tutorial_models")
    out = []
    for name, model, tok in (
        ("src", tiny_llama_hf(byte_tokenizer), byte_tokenizer),
        ("tgt", tiny_gemma3_hf(meta_tokenizer), meta_tokenizer),
    ):
        model.save_pretrained(base / name)
        tok.save_pretrained(base / name)
        out.append(str(base / name))
    return out


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(
        [sys.executable, str(TUTORIAL), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
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
        "--max-new-tokens",
        "4",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for name in CHECKS:
        assert f"CHECK {name}: ok" in out, f"{name} missing or failed:\n{out[-3000:]}"
    assert "FAILED" not in out
    for n in range(1, 8):
        assert f"=== {n}. " in out  # every step ran, in order
    assert out.rstrip().endswith("all checks passed")


def test_tutorial_reports_a_bad_model_name(tmp_path):
    proc = _run("--source", str(tmp_path / "missing_folder/"), "--n-map-texts", "10")
    assert proc.returncode != 0
    assert "missing_folder" in proc.stderr
