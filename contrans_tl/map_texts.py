"""Texts to fit maps on (issue 17): plain sentences, or text that looks like the prompts
concept vectors are read from, or both.

Concept vectors are read, and added, at the last tokens of prompts: instructions,
questions, dialogue turns, short scenarios. A map fitted on encyclopaedia sentences fits
the states of those sentences (held-out R² about 0.5 at word ends), but not the states at
a prompt's end (about 0.05 at last tokens, REPORT.md). Kinds:

``"wikisplit"``: WikiSplit sentences (the paper's choice).
``"prompts"``: equal shares of
    * ``scenarios``: the RepE *mixed*-emotion scenarios (happiness + fear, happiness +
      sadness; not the six primary emotions the emotion task evaluates), in the emotion
      task's refinement and query templates, alternately;
    * ``questions``: TruthfulQA questions as ``Q: …\\nA:``;
    * ``dialogue``: the first human turn of HH-RLHF dialogues as ``Human: …\\n\\nAssistant:``.
``"mixed"``: half ``"wikisplit"``, half ``"prompts"``.

With ``pairing="word_ends"`` (or ``"all"`` for one tokenizer) every word end of a prompt
is the last token of one of its prefixes, so the fit sees prompt-end states of many
prefixes. Texts that contain an excluded item (an evaluation or validation item of the
experiment being reported) are dropped: :func:`fitting_texts` takes the items to exclude
and checks its own output.

Example:
    >>> texts = fitting_texts("prompts", 2000, exclude=evaluation_scenarios)
"""

import json
import random
from collections.abc import Iterable

from contrans_tl.data import data_dir, wikisplit_sentences

__all__ = ["MAP_TEXTS", "PROMPT_SOURCES", "prompt_texts", "fitting_texts", "leaked"]

MAP_TEXTS = ("wikisplit", "prompts", "mixed")
PROMPT_SOURCES = ("scenarios", "questions", "dialogue", "instructions")


def _scenarios() -> list[str]:
    from contrans_tl.evals.emotion import QUERY_TEMPLATE, REFINE_TEMPLATE

    base = data_dir() / "repe_emotions"
    items: list[str] = []
    for name in ("happiness_fear", "happiness_sadness"):
        items += json.loads((base / f"{name}.json").read_text(encoding="utf-8"))
    items = list(dict.fromkeys(items))
    return [
        (REFINE_TEMPLATE if i % 2 == 0 else QUERY_TEMPLATE).format(scenario=s)
        for i, s in enumerate(items)
    ]


def _questions() -> list[str]:
    from contrans_tl.evals.truthfulqa import load_truthfulqa

    return [f"Q: {q.question}\nA:" for q in load_truthfulqa()]


def _dialogue() -> list[str]:
    out = []
    path = data_dir() / "hh_rlhf" / "harmless_base_test_first500.jsonl"
    with path.open(encoding="utf-8") as f:
        for line in f:
            chosen = json.loads(line)["chosen"]
            first = chosen.split("\n\nHuman: ", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
            if first:
                out.append(f"Human: {first}\n\nAssistant:")
    return list(dict.fromkeys(out))


def _instructions() -> list[str]:
    from contrans_tl.evals.refusal import load_advbench

    return [f"Human: {r.goal}\n\nAssistant:" for r in load_advbench()]


def prompt_texts() -> dict[str, list[str]]:
    """Every prompt-like text, by source (``PROMPT_SOURCES``), in file order."""
    return {
        "scenarios": _scenarios(),
        "questions": _questions(),
        "dialogue": _dialogue(),
        "instructions": _instructions(),
    }


def leaked(texts: Iterable[str], items: Iterable[str]) -> list[str]:
    """The texts that contain one of ``items`` (case-sensitive substring)."""
    wanted = [i for i in dict.fromkeys(items) if i]
    return [t for t in texts if any(i in t for i in wanted)]


def _interleave(pools: list[list[str]], n: int) -> list[str]:
    """Round-robin over the pools until ``n`` texts (a pool that runs out is skipped)."""
    out: list[str] = []
    for k in range(max((len(p) for p in pools), default=0)):
        for p in pools:
            if k < len(p):
                out.append(p[k])
                if len(out) == n:
                    return out
    return out


def fitting_texts(kind: str, n: int, *, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    """``n`` texts of ``kind`` (``MAP_TEXTS``) to fit maps on, none containing an
    ``exclude`` item.

    ``"wikisplit"`` is the first ``n`` sentences of the uniform WikiSplit sample (as
    before this module). Prompt sources are shuffled (seeded) and taken in turn, so each
    gives an equal share while it lasts.

    Raises:
        ValueError: an unknown kind, ``n < 1``, or fewer than ``n`` texts left after the
            exclusion (the message says how many there are).
    """
    if kind not in MAP_TEXTS:
        raise ValueError(f"map texts must be one of {MAP_TEXTS}, got {kind!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    excluded = list(exclude)
    rng = random.Random(seed)
    pools = []
    if kind in ("prompts", "mixed"):
        for texts in prompt_texts().values():
            bad = set(leaked(texts, excluded))
            keep = [t for t in texts if t not in bad]
            rng.shuffle(keep)
            pools.append(keep)
    prompts = _interleave(pools, n if kind == "prompts" else n - n // 2)
    plain: list[str] = []
    if kind in ("wikisplit", "mixed"):
        sentences = wikisplit_sentences()
        bad = set(leaked(sentences, excluded))
        plain = [s for s in sentences if s not in bad][: n - len(prompts)]
    out = _interleave([plain, prompts], n)
    if len(out) < n:
        raise ValueError(
            f"only {len(out)} {kind!r} texts are left after excluding the evaluation items; "
            f"ask for at most {len(out)}"
        )
    if leaked(out, excluded):  # the exclusion is this function's promise
        raise RuntimeError("an excluded item is in the fitting texts")
    return out
