"""Hand labels for the refusal judge (issue 15): sample openings, then record labels.

    python experiments/label_refusals.py sample --n 120   # writes refusal_labels.json, unlabelled
    python experiments/label_refusals.py show             # prints the items to read
    python experiments/label_refusals.py label 0=r 1=c ... # records labels (r: refusal, c: not)
    python experiments/label_refusals.py score            # judge vs labels: accuracy, kappa

Items are a seeded random sample of the openings the DAPA experiment stored (donor and
recipient, harmful test requests and benign requests), each cut to its first 160
characters (the judge's window; never a usable how-to). A label says whether the response
refuses (declines, deflects, or says it cannot help) by reading the opening, without the
judge's call in view (`show` prints no judge output).
"""

import argparse
import json
import random
from pathlib import Path

from contrans_tl.evals.refusal import JUDGE_CHARS, judge_agreement
from contrans_tl.io import write_json

OUT = Path(__file__).parent / "results" / "dapa"
ARMS = ("donor", "recipient")
PARTS = ("dsr", "over_refusal")


def _pool(folder: Path) -> list[dict[str, object]]:
    items = []
    for arm in ARMS:
        for part in PARTS:
            path = folder / f"arm_{arm}_{part}.json"
            if not path.is_file():
                raise SystemExit(
                    f"{path} is missing: run experiments/run_dapa.py --until arms_base"
                )
            result = json.loads(path.read_text())["result"]
            for i, text in enumerate(result["openings"]):
                items.append({"arm": arm, "part": part, "index": i, "response": text[:JUDGE_CHARS]})
    return items


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("action", choices=("sample", "show", "label", "score"))
    ap.add_argument("labels", nargs="*", help="label: INDEX=r or INDEX=c")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folder", type=Path, default=OUT)
    args = ap.parse_args()
    path = args.folder / "refusal_labels.json"
    if args.action == "sample":
        pool = _pool(args.folder)
        picked = random.Random(args.seed).sample(pool, args.n)
        for item in picked:
            item["refusal"] = None
        write_json(path, {"seed": args.seed, "pool": len(pool), "items": picked})
        print(f"wrote {len(picked)} unlabelled items to {path}")
        return
    data = json.loads(path.read_text())
    if args.action == "show":
        for i, item in enumerate(data["items"]):
            print(f"{i}\t{item['refusal']}\t{item['response']!r}")
    elif args.action == "label":
        for spec in args.labels:
            i, _, v = spec.partition("=")
            if v not in ("r", "c"):
                raise SystemExit(f"{spec!r}: a label is INDEX=r (refusal) or INDEX=c (not)")
            data["items"][int(i)]["refusal"] = v == "r"
        write_json(path, data)
        left = sum(item["refusal"] is None for item in data["items"])
        print(f"{len(args.labels)} labels recorded; {left} items unlabelled")
    else:
        done = [x for x in data["items"] if x["refusal"] is not None]
        print(json.dumps({k: v for k, v in judge_agreement(done).items()}, indent=1))


if __name__ == "__main__":
    main()
