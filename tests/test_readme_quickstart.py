"""The README's Python quickstart runs as written: on tiny models (fast) and on the real
offline models (slow, the same code, and it prints base beside steered)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE, TARGET = "smollm2-135m-instruct", "gemma-3-270m"


def quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)\n```", readme, flags=re.S)
    assert blocks, "README has no python block"
    code = blocks[0]
    assert f'ct.load_model("{SOURCE}")' in code and f'ct.load_model("{TARGET}")' in code
    return code


def _run(code: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTRANS_TL_DATA": str(ROOT.parent / "shared" / "data")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_output(proc: subprocess.CompletedProcess, cwd: Path) -> dict[str, int]:
    """Checks the run and returns the printed shares, ``{"base": %, "steered": %}``."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    shares = {}
    for ln in lines:
        m = re.fullmatch(r"(base|steered): ' happiness' next for (\d+)% of them; .+", ln)
        if m:
            shares[m[1]] = int(m[2])
    assert set(shares) == {"base", "steered"}, lines
    assert (cwd / "happiness_gemma.safetensors").exists() and (
        cwd / "happiness_gemma.json"
    ).exists()
    return shares


def test_quickstart_runs_on_tiny_models(tmp_path, byte_tokenizer, meta_tokenizer):
    from conftest import tiny_gemma3_hf, tiny_llama_hf

    for name, model, tok in (
        ("src", tiny_llama_hf(byte_tokenizer), byte_tokenizer),
        ("tgt", tiny_gemma3_hf(meta_tokenizer), meta_tokenizer),
    ):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    code = quickstart().replace(f'"{SOURCE}"', repr(str(tmp_path / "src")))
    code = code.replace(f'"{TARGET}"', repr(str(tmp_path / "tgt")))
    work = tmp_path / "work"
    work.mkdir()
    _check_output(_run(code, work, timeout=300), work)


@pytest.mark.slow
def test_quickstart_runs_on_the_offline_models(tmp_path):
    proc = _run(quickstart(), tmp_path, timeout=1800)
    shares = _check_output(proc, tmp_path)
    print(proc.stdout)
    # the lesson shows its effect: measured 3% -> 100% (alpha 1, 30 scenarios)
    assert shares["steered"] >= shares["base"] + 30, shares
