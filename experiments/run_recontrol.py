"""RE-Control on ToxiGen with Gemma-3-270m, next to ConTrans and best-of-N (issue 16).

    python experiments/run_recontrol.py                # everything; resumes where it stopped
    python experiments/run_recontrol.py --report-only  # rewrite recontrol.md from stored steps

Results go to experiments/results/recontrol/ (JSON per step and recontrol.md); rollouts
and the value artifact to ~/.cache/contrans_tl/recontrol/ (not committed).
"""

import argparse
import json
import logging
from pathlib import Path

from contrans_tl.io import write_text
from contrans_tl.pipelines.configs import ReControlConfig

OUT = Path(__file__).parent / "results" / "recontrol"
ARMS = (
    ("base", "Base"),
    ("contrans", "ConTrans (SmolLM2 → Gemma fairness)"),
    ("recontrol", "RE-Control"),
    ("recontrol_contrans", "RE-Control + ConTrans"),
    ("best_of_n", "best-of-N (same reward)"),
)


def report(out: Path) -> list[str]:
    """The table of the stored arms (no model is loaded)."""
    lines = [
        "| arm | toxic (judge: MiniLM) | toxic (reward: n-gram) | PPL | s / token |",
        "|---|---|---|---|---|",
    ]
    for name, label in ARMS:
        path = out / f"arm_{name}.json"
        if not path.is_file():
            lines.append(f"| {label} | not run | | | |")
            continue
        r = json.loads(path.read_text())["result"]
        spt = r.get("seconds_per_token")
        timing = (
            f"{spt:.3f}"
            if isinstance(spt, float) and spt == spt
            else (
                f"{r['seconds'] / max(r.get('generated_tokens', 1), 1):.3f} (all N samples)"
                if "generated_tokens" in r
                else "n/a"
            )
        )
        ppl = r.get("ppl") or float("nan")
        judge, rew = 100 * r["toxic_share_judge"], 100 * r["toxic_share_reward"]
        lines.append(f"| {label} | {judge:.1f}% | {rew:.1f}% | {ppl:.1f} | {timing} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if not args.report_only:
        from contrans_tl.models import cache_dir
        from contrans_tl.pipelines import recontrol as P

        config = ReControlConfig()
        P.run(config, args.out, cache_dir() / "recontrol" / f"{config.target}-seed{config.seed}")
    text = ["# RE-Control on ToxiGen (issue 16)", "", *report(args.out), ""]
    write_text(args.out / "recontrol.md", "\n".join(text))


if __name__ == "__main__":
    main()
