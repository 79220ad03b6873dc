"""Delta debugging minimisation (ddmin) of a set of named candidates.

Zeller & Hildebrandt (2002), "Simplifying and isolating failure-inducing input", §3.3.
Given candidates (e.g. the MLP modules DAPA transplants) and a ``test(subset) -> bool``
that is True when ``subset`` still has the property to keep (e.g. the defence success rate
stays within tolerance), :func:`ddmin` returns a *1-minimal* subset: it passes, and
removing any single element of it fails. Monotonicity is not assumed.

The algorithm, with granularity ``n`` starting at 2 and the current set ``c``:

1. split ``c`` into ``n`` subsets of nearly equal size (contiguous, in the candidates'
   order);
2. if one subset passes, reduce to it and set ``n = 2``;
3. else if one complement (``c`` minus one subset) passes, reduce to it and set
   ``n = max(n - 1, 2)`` (at ``n = 2`` the complements are the subsets: not retried);
4. else if ``n < len(c)``, set ``n = min(2 n, len(c))``; else stop.

At the stop ``n == len(c)``, so step 3 has tried every single-element removal: the result
is 1-minimal. Those checks are recorded again in the trace (phase ``"check"``, answered
from the memo). The empty set is never tested: as in Zeller's precondition, it is assumed
not to pass (an empty set of transplanted modules is the unchanged model), so a result of
one element counts as 1-minimal. Every distinct subset is tested at most once per run;
with a :class:`DDMinCache` outcomes persist across runs, so a killed run resumes and a
rerun tests nothing.

Example:
    >>> res = ddmin([f"c{i}" for i in range(16)], lambda s: {"c3", "c7"} <= set(s))
    >>> res.minimal
    ('c3', 'c7')
"""

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contrans_tl.io import write_json

__all__ = ["PHASES", "DDMinCache", "DDMinResult", "DDMinStep", "ddmin"]

PHASES = ("full", "subset", "complement", "check")
"""Valid values of :attr:`DDMinStep.phase`."""

_LOG = logging.getLogger(__name__)
_CACHE_KIND = "ddmin_cache"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class DDMinStep:
    """One question ddmin asked of the test, in the order asked.

    Attributes:
        index: Position in the trace, from 0.
        subset: The subset asked about, in the candidates' order.
        passed: The test's answer.
        granularity: ``n`` when asked (1 for the full set, ``len(minimal)`` for checks).
        phase: One of :data:`PHASES`.
        cached: The answer came from the persistent cache file, not from running the test.
        repeated: The subset was already asked in this run; the memo answered (no test).

    Example:
        >>> DDMinStep(0, ("a", "b"), True, 1, "full", cached=False)
    """

    index: int
    subset: tuple[str, ...]
    passed: bool
    granularity: int
    phase: str
    cached: bool
    repeated: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r} is not one of {PHASES}")


@dataclass(frozen=True)
class DDMinResult:
    """What :func:`ddmin` found and how.

    Attributes:
        minimal: The 1-minimal passing subset, in the candidates' order.
        trace: Every question asked, in order (see :class:`DDMinStep`).
        n_tests_run: Tests actually run (fresh outcomes).
        n_tests_cached: Distinct subsets answered by the cache file instead.

    Example:
        >>> res = ddmin(["a", "b", "c"], lambda s: "b" in s)
        >>> res.minimal, res.n_tests_run
        (('b',), 4)
    """

    minimal: tuple[str, ...]
    trace: tuple[DDMinStep, ...]
    n_tests_run: int
    n_tests_cached: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples as lists), e.g. for :func:`contrans_tl.io.write_json`.

        Example:
            >>> write_json("out/ddmin.json", res.to_json())
        """
        return json.loads(json.dumps(asdict(self)))


def _key(subset: Sequence[str]) -> str:
    """Canonical, order-free key of a subset: the JSON list of its sorted elements."""
    return json.dumps(sorted(subset))


def _normalised(context: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(context, Mapping):
        raise TypeError(f"context must be a dict, e.g. {{'metric': 'dsr'}}, not {context!r}")
    try:
        return json.loads(json.dumps(dict(context), sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"context must be JSON-serialisable (str, number, list, dict): {e}"
        ) from None


class DDMinCache:
    """Outcomes of ``test`` on subsets, persisted as a JSON file.

    The file holds ``{"kind", "version", "context", "outcomes"}``; ``outcomes`` maps the
    JSON list of a subset's sorted elements to its outcome. ``context`` says what the
    outcomes mean (what the test measures, tolerance, model hashes, ...): a file written
    under another context is refused, unless ``reset=True`` starts it afresh. The file is
    rewritten atomically after each new outcome (:func:`contrans_tl.io.write_json`).

    Args:
        path: The JSON file; created (with its folders) if missing.
        context: JSON-serialisable description of the test.
        reset: Discard a file whose context differs (or that is unreadable) instead of
            raising.

    Raises:
        ValueError: the file is not a ddmin cache, or its context differs from ``context``.
        TypeError: ``context`` is not a JSON-serialisable dict.

    Example:
        >>> cache = DDMinCache("out/ddmin_cache.json", {"metric": "dsr", "tol": 0.01})
        >>> ddmin(modules, keeps_dsr, cache=cache)
    """

    def __init__(
        self, path: str | os.PathLike[str], context: Mapping[str, Any], *, reset: bool = False
    ) -> None:
        self.path = Path(path)
        self.context = _normalised(context)
        self._outcomes: dict[str, bool] = {}
        if self.path.exists():
            try:
                self._outcomes = self._read()
            except ValueError:
                if not reset:
                    raise
        self._write()

    def _read(self) -> dict[str, bool]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{self.path} is not a readable ddmin cache ({e}); delete it, pass another "
                "path, or reset=True"
            ) from None
        if not isinstance(data, dict):
            data = {}
        outcomes = data.get("outcomes")
        if (
            data.get("kind") != _CACHE_KIND
            or data.get("version") != _CACHE_VERSION
            or not isinstance(outcomes, dict)
            or not all(isinstance(v, bool) for v in outcomes.values())
        ):
            raise ValueError(
                f"{self.path} is not a ddmin cache: expected a JSON object with kind "
                f"{_CACHE_KIND!r}, version {_CACHE_VERSION}, 'context' and 'outcomes' "
                "(subset -> true/false); pass another path or reset=True"
            )
        if data.get("context") != self.context:
            theirs = data.get("context") or {}
            differ = sorted(
                k for k in set(theirs) | set(self.context) if theirs.get(k) != self.context.get(k)
            )
            raise ValueError(
                f"{self.path} was written for another test: context keys {differ} differ "
                f"(file: {json.dumps(theirs, sort_keys=True)}, given: "
                f"{json.dumps(self.context, sort_keys=True)}); use another path, or "
                "reset=True to discard its outcomes"
            )
        return outcomes

    def _write(self) -> None:
        data = {"kind": _CACHE_KIND, "version": _CACHE_VERSION, "context": self.context}
        write_json(self.path, {**data, "outcomes": self._outcomes})

    def __len__(self) -> int:
        return len(self._outcomes)

    def get(self, subset: Sequence[str]) -> bool | None:
        """The recorded outcome of ``subset`` (any order), or None if not recorded."""
        return self._outcomes.get(_key(subset))

    def put(self, subset: Sequence[str], passed: bool) -> None:
        """Record an outcome and rewrite the file atomically."""
        self._outcomes[_key(subset)] = bool(passed)
        self._write()


class _Oracle:
    """Answers ``test`` once per distinct subset (memo, then cache, then run); keeps the trace."""

    def __init__(
        self,
        test: Callable[[tuple[str, ...]], bool],
        cache: DDMinCache | None,
        log: logging.Logger,
    ) -> None:
        self.test, self.cache, self.log = test, cache, log
        self.memo: dict[frozenset[str], bool] = {}
        self.trace: list[DDMinStep] = []
        self.n_run = self.n_cached = 0

    def __call__(self, subset: tuple[str, ...], granularity: int, phase: str) -> bool:
        key = frozenset(subset)
        repeated = key in self.memo
        stored = self.cache.get(subset) if self.cache is not None and not repeated else None
        if repeated:
            passed = self.memo[key]
        elif stored is not None:
            passed = stored
            self.n_cached += 1
        else:
            passed = self.test(subset)
            if not isinstance(passed, bool):
                raise TypeError(
                    f"test returned {passed!r} ({type(passed).__name__}) for subset "
                    f"{list(subset)}; it must return a bool (True: the subset passes), "
                    "e.g. wrap it in bool(...)"
                )
            self.n_run += 1
            if self.cache is not None:
                self.cache.put(subset, passed)
        self.memo[key] = passed
        step = DDMinStep(
            len(self.trace), subset, passed, granularity, phase, stored is not None, repeated
        )
        self.trace.append(step)
        how = "memo" if repeated else "cache" if stored is not None else "run"
        self.log.info(
            "ddmin %d: %s, %d element(s), n=%d, %s -> %s",
            step.index,
            phase,
            len(subset),
            granularity,
            how,
            "pass" if passed else "fail",
        )
        return passed


def _check_candidates(candidates: Sequence[object]) -> tuple[str, ...]:
    if isinstance(candidates, str):
        raise TypeError(
            f"candidates is the string {candidates!r}; pass a sequence of names, e.g. "
            f"[{candidates!r}]"
        )
    items = tuple(candidates)
    if not items:
        raise ValueError("candidates is empty; ddmin needs at least one candidate name")
    bad = [
        f"{i}: {c!r} ({type(c).__name__})" for i, c in enumerate(items) if not isinstance(c, str)
    ]
    if bad:
        raise TypeError(f"candidates must be strings (names); not strings at {', '.join(bad)}")
    dups = sorted(str(c) for c, k in Counter(items).items() if k > 1)
    if dups:
        raise ValueError(f"candidates must be distinct; repeated: {dups}")
    return tuple(str(c) for c in items)


def _split(items: tuple[str, ...], n: int) -> list[tuple[str, ...]]:
    """``n`` contiguous, non-empty parts of nearly equal size (``1 <= n <= len(items)``)."""
    return [items[i * len(items) // n : (i + 1) * len(items) // n] for i in range(n)]


def _without(items: tuple[str, ...], part: tuple[str, ...]) -> tuple[str, ...]:
    drop = set(part)
    return tuple(c for c in items if c not in drop)


def ddmin(
    candidates: Sequence[str],
    test: Callable[[tuple[str, ...]], bool],
    *,
    cache: DDMinCache | None = None,
    log: logging.Logger = _LOG,
) -> DDMinResult:
    """Find a 1-minimal subset of ``candidates`` that still passes ``test`` (Zeller's ddmin).

    Args:
        candidates: Distinct names, e.g. ``["blocks.10.mlp.gate_proj", ...]``.
        test: ``test(subset) -> bool``, True when ``subset`` (a tuple in the candidates'
            order) keeps the property. Called at most once per distinct subset, never on
            the empty set; it need not be monotone.
        cache: Persistent outcomes, to resume a killed run and to repeat no test.
        log: Logger for one INFO line per question asked.

    Returns:
        The :class:`DDMinResult`: ``minimal`` passes, and removing any one element fails.

    Raises:
        ValueError: ``candidates`` is empty or has duplicates, or the full set fails.
        TypeError: a candidate is not a string, or ``test`` returns a non-bool.

    Example:
        >>> res = ddmin([f"c{i}" for i in range(16)], lambda s: {"c3", "c7"} <= set(s))
        >>> res.minimal, res.n_tests_run
        (('c3', 'c7'), 16)
    """
    current = _check_candidates(candidates)
    ask = _Oracle(test, cache, log)
    if not ask(current, 1, "full"):
        raise ValueError(
            f"the full set of {len(current)} candidates does not pass the test; ddmin "
            "needs a starting set that has the property to keep (check the test, its "
            "tolerance, or the candidates)"
        )
    n = 2
    while len(current) >= 2:
        n = min(n, len(current))
        parts = _split(current, n)
        found = next((p for p in parts if ask(p, n, "subset")), None)
        if found is not None:
            current, n = found, 2
            continue
        if n > 2:  # at n = 2 each complement is the other subset, already asked
            complements = (_without(current, p) for p in parts)
            found = next((c for c in complements if ask(c, n, "complement")), None)
        if found is not None:
            current, n = found, max(n - 1, 2)
        elif n < len(current):
            n = min(2 * n, len(current))
        else:
            break
    if len(current) >= 2:
        for x in current:
            if ask(_without(current, (x,)), len(current), "check"):
                raise AssertionError(f"ddmin bug: {list(current)} without {x!r} passes")
    return DDMinResult(current, tuple(ask.trace), ask.n_run, ask.n_cached)
