"""TruthfulQA MC1, ToxiGen toxic share and perplexity for one model pair (issue 4).

    python experiments/run_alignment.py --source S --target T [options]

The exact commands are in experiments/run_alignment.sh. Each option but --source,
--target and the three folders is a field of AlignmentConfig
(contrans_tl.pipelines.alignment; lists comma-separated, "none" for none). The pipeline
(run_alignment) writes <results-root>/<S>__<T>/results.json and one JSON per evaluation
under <S>__<T>/runs/ and target__<T>/runs/. Maps, vectors and evaluations are kept in
the result cache (--cache-dir), so a rerun redoes nothing it has.
"""

import argparse
import logging
import shlex
import sys
from pathlib import Path

import torch

import contrans_tl
from contrans_tl.cli_options import add_config_options, config_kwargs
from contrans_tl.pipelines.alignment import AlignmentConfig, run_alignment
from contrans_tl.pipelines.configs import check_out_dir

ROOT = Path(__file__).resolve().parent / "results" / "alignment"


def build_parser() -> argparse.ArgumentParser:
    """--source, --target, one option per AlignmentConfig field, and the folders."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", required=True, help="zoo name, hub id or folder")
    ap.add_argument("--target", required=True, help="zoo name, hub id or folder")
    add_config_options(ap, AlignmentConfig)
    ap.add_argument("--results-root", default=str(ROOT), help="where results go")
    ap.add_argument("--maps-dir", default="runs/maps", help="fitted maps are also saved here")
    ap.add_argument(
        "--cache-dir", default=None, help="result cache folder (default: the package's; 'off')"
    )
    return ap


def make_config(args: argparse.Namespace) -> AlignmentConfig:
    """The AlignmentConfig of the parsed options (ValueError naming a bad setting)."""
    return AlignmentConfig(**config_kwargs(args, AlignmentConfig))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        config = make_config(args)
        check_out_dir(args.results_root, name="--results-root")
    except (ValueError, OSError) as e:
        sys.exit(f"run_alignment.py: error: {e}")
    given = sys.argv[1:] if argv is None else argv
    logging.info("loading %s and %s", args.source, args.target)
    source = contrans_tl.load_model(args.source)
    target = contrans_tl.load_model(args.target)
    run_alignment(
        source,
        target,
        config,
        args.results_root,
        names=(args.source, args.target),
        command="python experiments/run_alignment.py " + shlex.join(given),
        cache=False if args.cache_dir == "off" else args.cache_dir,
        maps_dir=args.maps_dir,
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
