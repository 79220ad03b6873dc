"""Show the results of earlier runs, and render their Markdown again (``contrans report``).

What a path may be:

* an emotion run folder (``results.json`` with ``rows``): ``results.md`` is rendered
  again from it (:func:`contrans_tl.pipelines.emotion.write_markdown`);
* an analysis folder (``analysis.json``): ``summary.md``
  (:func:`contrans_tl.pipelines.analysis.summary_markdown`);
* a ``contrans evaluate`` result (``.json`` with ``task`` and ``results``): a table of
  its metrics, base beside the intervention.

The Markdown is made from the JSON alone (no model is loaded), so an edited renderer can
be applied to old runs; files are written atomically.

Example:
    >>> print(render_report("runs/emotion-demo"))
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contrans_tl.io import write_text

__all__ = ["evaluation_markdown", "render_report"]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a results object")
    return data


def evaluation_markdown(result: Mapping[str, Any]) -> str:
    """A ``contrans evaluate`` result as a Markdown table (one row per run)."""
    runs = result["results"]
    keys = list(dict.fromkeys(k for m in runs.values() for k, v in m.items() if _is_number(v)))
    model = result.get("model", {}).get("model_id", "?")
    lines = [
        f"# {result['task']} on {model}",
        "",
        "| run | " + " | ".join(keys) + " | seconds |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    seconds = result.get("seconds", {})
    for name, metrics in runs.items():
        cells = [_cell(metrics.get(k)) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(seconds.get(name))} |")
    if result.get("command"):
        lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: object) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_report(path: str | Path, *, write: bool = True) -> str:
    """Render the Markdown of the run at ``path`` and return it.

    Args:
        path: a run folder or a result ``.json`` (see the module docstring).
        write: also write the rendered file next to the JSON (``results.md``,
            ``summary.md``, or ``NAME.md`` for ``NAME.json``).

    Raises:
        FileNotFoundError: ``path`` holds no results this module knows.
        ValueError: the JSON is not one of the result kinds above.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "results.json").is_file():
            return _render_file(p / "results.json", write)
        if (p / "analysis.json").is_file():
            return _render_file(p / "analysis.json", write)
        raise FileNotFoundError(f"{p} holds neither results.json nor analysis.json")
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; give a run folder or a results .json")
    return _render_file(p, write)


def _render_file(path: Path, write: bool) -> str:
    data = _read(path)
    if "rows" in data and "summary" in data:
        from contrans_tl.pipelines.emotion import write_markdown

        text, out = write_markdown(data), path.with_name("results.md")
    elif "alpha_sweep" in data:
        from contrans_tl.pipelines.analysis import summary_markdown

        text, out = summary_markdown(data), path.with_name("summary.md")
    elif "task" in data and "results" in data:
        text, out = evaluation_markdown(data), path.with_suffix(".md")
    else:
        raise ValueError(
            f"{path}: not an emotion run (rows, summary), an analysis (alpha_sweep) or a "
            f"'contrans evaluate' result (task, results); keys: {sorted(data)[:8]}"
        )
    if write:
        write_text(out, text)
    return text
