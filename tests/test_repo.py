"""The README's commands are what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert len(blocks) >= 2, "README must open with the demo command and the test command"
    test_command = blocks[1].strip()
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci


def test_readme_demo_uses_offline_zoo_models():
    readme = (ROOT / "README.md").read_text()
    demo = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[0]
    assert "pip install torch==2.13.0" in demo
    assert "--source smollm2-135m-instruct --target gemma-3-270m" in demo
