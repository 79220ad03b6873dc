"""DAPA against ConTrans on Qwen2.5-Coder-0.5B-Instruct and its harmful fine-tune (issue 15).

    python experiments/run_dapa.py                 # everything; resumes where it stopped
    python experiments/run_dapa.py --until ddmin   # stop after a step

Results (JSON, heatmap PNG, dapa.md) go to experiments/results/dapa/; every step is kept
with its inputs, so a rerun recomputes nothing (see contrans_tl.pipelines.dapa).
Steps: recipient, arms_base (donor, recipient), proxy, arms_fixed (whole-MLP and heuristic
transplants, ConTrans), ddmin (stage 1: attention / MLP modules), arms (ddmin set, random
controls), memory_space, ddmin_projections (stage 2: projections of stage 1's MLPs),
arms_projections, report. ``--search-kinds mlp attn`` limits the memory-space search to
those kinds this run (the others can follow in a later run; nothing is recomputed).
"""

import argparse
import dataclasses
import logging
from pathlib import Path

from contrans_tl.pipelines import dapa as P
from contrans_tl.pipelines.configs import MODULE_KINDS, DapaConfig

OUT = Path(__file__).parent / "results" / "dapa"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--until", choices=P.STEPS, default="report")
    parser.add_argument("--report-only", action="store_true", help="only rewrite dapa.md")
    parser.add_argument(
        "--search-kinds",
        nargs="+",
        choices=MODULE_KINDS,
        help="module kinds of the memory-space search this run (default: the config's)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    config = DapaConfig()
    if args.search_kinds:
        config = dataclasses.replace(config, search_kinds=tuple(args.search_kinds))
    if args.report_only:
        P.write_report(args.out)
        return
    P.run(config, args.out, stop_after=args.until)
    if args.until == "report":
        P.write_report(args.out)


if __name__ == "__main__":
    main()
