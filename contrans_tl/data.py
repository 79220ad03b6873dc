"""Readers for the data sets the experiments use (files, no downloads).

The data folder is ``$CONTRANS_TL_DATA`` if set, else the first ``shared/data`` found
beside the current directory or beside the repository (``../shared/data``).

Example:
    >>> sentences = wikisplit_sentences()          # 2,000 WikiSplit sentences
    >>> scenarios = emotion_scenarios()["fear"]    # RepE fear scenarios, file order
"""

import json
import os
from pathlib import Path

__all__ = ["EMOTIONS", "data_dir", "wikisplit_sentences", "emotion_scenarios"]

EMOTIONS = ("happiness", "sadness", "anger", "fear", "disgust", "surprise")


def data_dir() -> Path:
    """The shared data folder.

    Raises:
        FileNotFoundError: none was found; names the places looked at.
    """
    env = os.environ.get("CONTRANS_TL_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), Path.cwd().parent, here, here.parent):
        candidates.append(base / "shared" / "data")
    for c in candidates:
        if (c / "wikisplit").is_dir():
            return c
    raise FileNotFoundError(
        "no shared data folder found; looked at "
        + ", ".join(str(c) for c in candidates)
        + ". Set CONTRANS_TL_DATA to the folder that holds wikisplit/, repe_emotions/, ..."
    )


def wikisplit_sentences(n: int | None = None, *, subset: str = "random2000_seed0") -> list[str]:
    """The unsplit sentences (first column) of a WikiSplit subset, in file order.

    Args:
        n: keep the first ``n`` (``None``: all 2,000).
        subset: ``"random2000_seed0"`` (uniform sample, the default) or ``"first2000"``
            (alphabetically sorted upstream; biased toward A..In).

    Example:
        >>> len(wikisplit_sentences(5)), len(wikisplit_sentences())
        (5, 2000)
    """
    path = data_dir() / "wikisplit" / f"validation_{subset}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; subsets: random2000_seed0, first2000")
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            first = line.rstrip("\n").split("\t")[0].strip()
            if first:
                out.append(first)
    return out if n is None else out[:n]


def emotion_scenarios() -> dict[str, list[str]]:
    """RepE scenarios for the six primary emotions, de-duplicated in file order.

    Example:
        >>> scenarios = emotion_scenarios()
        >>> list(scenarios)
        ['happiness', 'sadness', 'anger', 'fear', 'disgust', 'surprise']
    """
    base = data_dir() / "repe_emotions"
    out = {}
    for e in EMOTIONS:
        items = json.loads((base / f"{e}.json").read_text(encoding="utf-8"))
        out[e] = list(dict.fromkeys(items))
    return out
