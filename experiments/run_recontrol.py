"""RE-Control on ToxiGen with Gemma-3-270m, next to ConTrans and best-of-N (issue 16).

    python experiments/run_recontrol.py                # everything; resumes where it stopped
    python experiments/run_recontrol.py --report-only  # rewrite recontrol.md from stored steps
    python experiments/run_recontrol.py --advbench     # on the DAPA pair, an arm of its table

With ``--advbench`` the controlled model is the DAPA recipient (the harmful fine-tune of
Qwen2.5-Coder-0.5B-Instruct) with a refusal reward (donor vs recipient likelihood ratio);
its arm is stored in experiments/results/dapa/ beside DAPA's and ConTrans's
(``python experiments/run_dapa.py --report-only`` rewrites dapa.md with it).

Results go to experiments/results/recontrol/ (JSON per step, the value artifact, and
recontrol.md); rollouts to ~/.cache/contrans_tl/recontrol/ (not committed).
"""

import argparse
import logging
from pathlib import Path

from contrans_tl.io import write_text
from contrans_tl.pipelines.configs import ReControlConfig

OUT = Path(__file__).parent / "results" / "recontrol"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--advbench", action="store_true", help="RE-Control on the DAPA pair")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if args.advbench:
        from contrans_tl.models import cache_dir
        from contrans_tl.pipelines import recontrol_advbench
        from contrans_tl.pipelines.configs import DapaConfig, ReControlRefusalConfig

        dapa_out = Path(__file__).parent / "results" / "dapa"
        work = cache_dir() / "recontrol" / "dapa-recipient-seed0"
        recontrol_advbench.run(DapaConfig(), ReControlRefusalConfig(), dapa_out, work)
        return
    if not args.report_only:
        from contrans_tl.models import cache_dir
        from contrans_tl.pipelines import recontrol as P

        config = ReControlConfig()
        P.run(config, args.out, cache_dir() / "recontrol" / f"{config.target}-seed{config.seed}")
    from contrans_tl.pipelines.recontrol import render_report

    text = ["# RE-Control on ToxiGen (issue 16)", "", *render_report(args.out), ""]
    write_text(args.out / "recontrol.md", "\n".join(text))


if __name__ == "__main__":
    main()
