"""The bad-input and fault table of RELIABILITY.md, from a run of the tests that probe them.

Runs the bad-input and fault tests with pytest (JUnit XML to a temporary file), then writes
``experiments/results/reliability/reliability.json`` and ``reliability.md``: per test
function, the cases tried and how many held (the right exception type, a message naming
the problem and a valid alternative; for the CLI, exit 2 with one line and nothing loaded
or written), and the counts of the kill test (saves killed, loads that gave the old or the
new artifact, artifacts lost, temp files left behind).

Usage:
    python experiments/reliability.py            # about 1-2 min on a 2-core CPU
"""

import argparse
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

from contrans_tl.io import write_json

ROOT = Path(__file__).resolve().parent.parent
FILES = (
    "tests/test_bad_input.py",
    "tests/test_cli_errors.py",
    "tests/test_model_load_errors.py",
    "tests/test_artifact_safety.py",
)
OUT = ROOT / "experiments" / "results" / "reliability"


# What each probe test shows, for the summary lines of RELIABILITY.md. A test not named
# here is counted under "other checks".
REFUSED = "bad input refused with a clear error"
STEERING = "steering left as it was found"
KILLS = "artifact saves killed"
CATEGORY = {
    REFUSED: {
        "test_bad_input_is_refused_by_name",
        "test_steering_of_another_model_is_refused",
        "test_addition_made_non_finite_in_place_is_refused_at_the_next_pass",
        "test_bad_setting_refused_before_loading",
        "test_bad_setting_still_refused_before_loading",
        "test_unwritable_out_refused_before_loading",
        "test_out_in_read_only_folder_refused",
        "test_bad_model_name_refused_before_loading",
        "test_fetch_bad_name_refused_before_loading",
        "test_load_model_refusal_is_one_line",
        "test_layers_out_of_range_after_loading",
        "test_layers_out_of_range_after_loading_still_refused",
        "test_emotion_experiment_leaves_nothing_on_bad_input",
        "test_bad_gguf_header_is_refused_before_reading",
        "test_truncated_gguf_body_is_named",
        "test_unknown_device_is_refused_before_loading",
        "test_cuda_on_cpu_only_torch_is_refused_before_loading",
        "test_cuda_without_gpu_is_refused_anywhere",
        "test_cuda_index_beyond_the_devices_present_is_refused",
        "test_mps_without_mps_is_refused",
        "test_edited_vector_json_is_refused_naming_the_field",
        "test_edited_map_layer_pairs_are_refused",
        "test_edited_map_metric_is_refused",
        "test_broken_json_sidecar_is_named",
        "test_truncated_tensor_file_is_named_corrupt",
        "test_version_1_artifact_is_cross_checked",
        "test_version_2_json_without_header_copy_is_refused",
    },
    STEERING: {
        "test_entry_point_leaves_steering_as_it_found_it",
        "test_generate_inside_steer_leaves_the_block_steered",
        "test_nested_same_handle_keeps_the_outer_block_steered",
        "test_user_hook_survives_steering",
        "test_position_state_is_fresh_after_each_call",
    },
    KILLS: {"test_killed_saves_always_leave_the_old_or_the_new_artifact"},
}


def category(test: str) -> str:
    for name, tests in CATEGORY.items():
        if test in tests:
            return name
    return "other checks (valid input accepted, loads during saves, ...)"


def run_tests(xml_path: Path) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES]
    cmd.append(f"--junitxml={xml_path}")
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


def tabulate(xml_path: Path) -> dict[str, Any]:
    rows: dict[tuple[str, str], dict[str, int]] = defaultdict(
        lambda: {"cases": 0, "passed": 0, "failed": 0, "skipped": 0}
    )
    properties: dict[str, dict[str, str]] = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        name = case.get("name", "").split("[", 1)[0]
        row = rows[(module, name)]
        row["cases"] += 1
        if case.find("skipped") is not None:
            row["skipped"] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            row["failed"] += 1
        else:
            row["passed"] += 1
        props = case.find("properties")
        if props is not None:
            properties[f"{module}::{case.get('name')}"] = {
                p.get("name", ""): p.get("value", "") for p in props.iter("property")
            }
    table = [
        {"module": m, "test": t, "category": category(t), **counts}
        for (m, t), counts in sorted(rows.items())
    ]
    keys = ("cases", "passed", "failed", "skipped")
    totals = {k: sum(r[k] for r in table) for k in keys}
    by_category = {
        c: {k: sum(r[k] for r in table if r["category"] == c) for k in keys}
        for c in sorted({r["category"] for r in table})
    }
    return {"rows": table, "totals": totals, "by_category": by_category, "properties": properties}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Bad input and faults: what the probe tests found",
        "",
        f"Command: `{result['command']}` ({result['seconds']:.0f} s on {result['machine']}, "
        f"pytest exit status {result['pytest_exit_status']}).",
        "",
        "| what | cases | held | failed | skipped |",
        "|---|---|---|---|---|",
    ]
    for c, n in result["by_category"].items():
        lines.append(f"| {c} | {n['cases']} | {n['passed']} | {n['failed']} | {n['skipped']} |")
    lines += [
        "",
        "| module | test | cases | held | failed | skipped |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['module']} | `{r['test']}` | {r['cases']} | {r['passed']} | "
            f"{r['failed']} | {r['skipped']} |"
        )
    t = result["totals"]
    lines += [
        f"| **all** | | **{t['cases']}** | **{t['passed']}** | **{t['failed']}** | "
        f"**{t['skipped']}** |",
        "",
    ]
    for test, props in sorted(result["properties"].items()):
        lines.append(f"`{test}`: " + ", ".join(f"{k} = {v}" for k, v in props.items()))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "report.xml"
        status = run_tests(xml_path)
        if not xml_path.exists():
            print(f"pytest wrote no report (exit status {status})", file=sys.stderr)
            return 1
        result = tabulate(xml_path)
    result.update(
        command="python experiments/reliability.py",
        seconds=round(time.time() - t0, 1),
        machine=f"{platform.machine()}, {platform.python_version()}",
        pytest_exit_status=status,
    )
    write_json(OUT / "reliability.json", result)
    md = OUT / "reliability.md"
    tmp_md = md.with_suffix(".md.tmp")
    tmp_md.write_text(markdown(result))
    tmp_md.replace(md)
    print(markdown(result))
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
