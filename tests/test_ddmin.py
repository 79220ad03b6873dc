"""Delta debugging (contrans_tl.ddmin) on synthetic predicates with planted answers.

Every predicate is wrapped in :class:`Counted`, which fails the test if a subset is asked
twice, is empty, is not a tuple in the candidates' order, and which can "kill" the run
after k calls. Results are checked against the predicate itself (passes, and removing any
single element fails), not against the trace.
"""

import hashlib
import json
from collections import Counter
from collections.abc import Callable

import pytest

from contrans_tl.ddmin import PHASES, DDMinCache, DDMinResult, DDMinStep, _check_candidates, ddmin

C16 = tuple(f"c{i}" for i in range(16))
Pred = Callable[[frozenset[str]], bool]


class Killed(RuntimeError):
    """Raised by a predicate to simulate a run killed midway."""


class Counted:
    """A predicate that checks how ddmin calls it."""

    def __init__(self, pred: Pred, order: tuple[str, ...], kill_after: int | None = None):
        self.pred, self.order, self.kill_after = pred, order, kill_after
        self.calls: Counter[frozenset[str]] = Counter()

    @property
    def n(self) -> int:
        return sum(self.calls.values())

    def __call__(self, subset: tuple[str, ...]) -> bool:
        assert isinstance(subset, tuple), f"subset is a {type(subset).__name__}"
        assert subset, "the empty set must never be tested"
        assert list(subset) == sorted(subset, key=self.order.index), f"{subset} out of order"
        if self.kill_after is not None and self.n >= self.kill_after:
            raise Killed(f"killed after {self.n} tests")
        key = frozenset(subset)
        self.calls[key] += 1
        assert self.calls[key] == 1, f"{subset} tested twice"
        return self.pred(key)


def assert_one_minimal(result: DDMinResult, pred: Pred) -> None:
    """``minimal`` passes, and every single removal fails (the empty set is assumed to)."""
    m = frozenset(result.minimal)
    assert pred(m)
    for x in result.minimal:
        assert len(m) == 1 or not pred(m - {x}), f"{x} can be removed from {result.minimal}"


def assert_trace_consistent(result: DDMinResult, pred: Pred, counted: Counted) -> None:
    trace = result.trace
    assert [s.index for s in trace] == list(range(len(trace)))
    assert all(s.passed == pred(frozenset(s.subset)) for s in trace)
    assert all(s.phase in PHASES for s in trace)
    assert trace[0].phase == "full" and trace[0].subset == counted.order
    fresh = [s for s in trace if not s.cached and not s.repeated]
    assert len(fresh) == result.n_tests_run == counted.n == len(counted.calls)
    seen: set[frozenset[str]] = set()
    for s in trace:  # repeated <=> asked earlier in this run
        assert s.repeated == (frozenset(s.subset) in seen)
        seen.add(frozenset(s.subset))
    checks = [s for s in trace if s.phase == "check"]
    if len(result.minimal) >= 2:
        expected = {frozenset(result.minimal) - {x} for x in result.minimal}
        assert {frozenset(s.subset) for s in checks} == expected
        assert all(s.repeated and not s.passed for s in checks)
        assert trace[-len(checks) :] == tuple(checks)
    else:
        assert checks == []


def run(pred: Pred, candidates: tuple[str, ...] = C16, **kw) -> tuple[DDMinResult, Counted]:
    counted = Counted(pred, candidates)
    result = ddmin(candidates, counted, **kw)
    assert_one_minimal(result, pred)
    assert_trace_consistent(result, pred, counted)
    return result, counted


# --- planted answers ---------------------------------------------------------------------


def test_planted_pair_among_16_is_found_with_few_tests():
    result, counted = run(lambda s: {"c3", "c7"} <= s)
    assert result.minimal == ("c3", "c7")
    # 16 tests measured here (of 2**16 = 65,536 subsets); ddmin needs O(k log n)
    assert result.n_tests_run == 16 < 2**16
    assert result.n_tests_cached == 0


def test_any_of_predicate_gives_one_element():
    result, _ = run(lambda s: "c2" in s or "c9" in s)
    assert result.minimal in (("c2",), ("c9",))
    assert result.n_tests_run <= 8  # 6 measured here


def test_threshold_predicate_gives_three_of_the_five():
    five = {"c1", "c4", "c8", "c11", "c15"}
    result, _ = run(lambda s: len(s & five) >= 3)
    assert len(result.minimal) == 3 and set(result.minimal) <= five
    assert result.n_tests_run <= 40  # 29 measured here


def test_candidates_order_is_kept_not_sorted():
    order = ("zeta", "alpha", "mu", "beta", "omega")
    result, _ = run(lambda s: {"mu", "alpha"} <= s, order)
    assert result.minimal == ("alpha", "mu")


def test_single_candidate_is_its_own_minimum():
    result, counted = run(lambda s: True, ("only",))
    assert result.minimal == ("only",) and counted.n == 1


@pytest.mark.parametrize("seed", range(12))
def test_non_monotone_predicates_still_give_one_minimal(seed):
    """Pseudo-random (non-monotone) predicates: 1-minimality holds at termination anyway."""
    cands = C16[: 6 + seed % 7]

    def pred(s: frozenset[str]) -> bool:
        digest = hashlib.sha256(f"{seed}:{sorted(s)}".encode()).digest()
        return len(s) == len(cands) or digest[0] < 110

    run(pred, cands)


def test_size_parity_predicate_is_not_monotone():
    """Passes iff the size is 2, 5 or 8: a superset of a passing set can fail."""
    result, _ = run(lambda s: len(s) in (2, 5, 8), C16[:8])
    assert len(result.minimal) == 2


# --- persistent cache --------------------------------------------------------------------

CTX = {"metric": "dsr", "tolerance": 0.01, "models": ["sha-a", "sha-b"]}


def planted(s: frozenset[str]) -> bool:
    return {"c3", "c7"} <= s


def test_rerun_with_the_cache_runs_no_test_and_repeats_the_trace(tmp_path):
    path = tmp_path / "cache.json"
    first, _ = run(planted, cache=DDMinCache(path, CTX))
    data = json.loads(path.read_text())  # JSON, not a pickle
    assert data["context"] == CTX and len(data["outcomes"]) == first.n_tests_run

    second, counted = run(planted, cache=DDMinCache(path, CTX))
    assert counted.n == second.n_tests_run == 0
    assert second.n_tests_cached == first.n_tests_run
    assert second.minimal == first.minimal

    def outcome(s: DDMinStep):
        return s.subset, s.passed, s.phase, s.granularity, s.repeated

    assert [outcome(s) for s in second.trace] == [outcome(s) for s in first.trace]
    assert all(s.cached != s.repeated for s in second.trace)


@pytest.mark.parametrize("k", [1, 5, 11])
def test_killed_run_resumes_from_the_cache(tmp_path, k):
    path = tmp_path / "cache.json"
    reference, _ = run(planted)
    killer = Counted(planted, C16, kill_after=k)
    with pytest.raises(Killed):
        ddmin(C16, killer, cache=DDMinCache(path, CTX))
    assert len(json.loads(path.read_text())["outcomes"]) == k  # written after each test

    resumed, counted = run(planted, cache=DDMinCache(path, CTX))
    assert resumed.minimal == reference.minimal
    assert resumed.n_tests_cached == k
    assert resumed.n_tests_run == counted.n == reference.n_tests_run - k
    assert not set(counted.calls) & set(killer.calls)  # nothing tested twice across runs


def test_context_mismatch_is_refused_unless_reset(tmp_path):
    path = tmp_path / "cache.json"
    run(planted, cache=DDMinCache(path, CTX))
    other = {**CTX, "tolerance": 0.05}
    with pytest.raises(ValueError, match=r"context keys \['tolerance'\] differ.*reset=True"):
        DDMinCache(path, other)
    fresh = DDMinCache(path, other, reset=True)
    assert len(fresh) == 0
    result, _ = run(planted, cache=fresh)
    assert result.n_tests_cached == 0 and result.n_tests_run == 16
    assert json.loads(path.read_text())["context"] == other


@pytest.mark.parametrize("text", ["not json{", "[1, 2]", '{"kind": "other"}'])
def test_a_file_that_is_not_a_ddmin_cache_is_refused(tmp_path, text):
    path = tmp_path / "cache.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="ddmin cache"):
        DDMinCache(path, CTX)
    assert path.read_text() == text  # left alone
    assert len(DDMinCache(path, CTX, reset=True)) == 0


def test_cache_keys_ignore_order_and_context_must_be_json(tmp_path):
    cache = DDMinCache(tmp_path / "c.json", CTX)
    cache.put(("b", "a"), True)
    assert cache.get(("a", "b")) is True and cache.get(("a",)) is None
    with pytest.raises(TypeError, match="JSON-serialisable"):
        DDMinCache(tmp_path / "d.json", {"model": object()})


# --- errors ------------------------------------------------------------------------------


def test_a_failing_full_set_is_refused():
    with pytest.raises(ValueError, match="full set of 16 candidates does not pass"):
        ddmin(C16, lambda s: False)


@pytest.mark.parametrize(
    ("candidates", "error", "match"),
    [
        ([], ValueError, "candidates is empty"),
        (["a", "b", "a"], ValueError, r"distinct; repeated: \['a'\]"),
        ("abc", TypeError, "sequence of names"),
    ],
)
def test_bad_candidates_are_refused(candidates, error, match):
    with pytest.raises(error, match=match):
        ddmin(candidates, lambda s: True)


def test_non_string_candidates_are_refused():
    # under the suite's runtime type checker (beartype samples one element) the public
    # call may fail there first: both are TypeErrors; the helper's message is checked too
    with pytest.raises(TypeError):
        ddmin(["a", 3, None], lambda s: True)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"not strings at 1: 3 \(int\), 2: None"):
        _check_candidates(["a", 3, None])


@pytest.mark.parametrize("value", [1, None, "yes"])
def test_a_non_bool_outcome_is_refused_and_not_cached(tmp_path, value):
    cache = DDMinCache(tmp_path / "c.json", CTX)
    with pytest.raises(TypeError, match="must return a bool"):
        ddmin(["a", "b"], lambda s: value, cache=cache)
    assert len(cache) == 0


def test_step_phase_is_validated_and_result_serialises():
    with pytest.raises(ValueError, match="is not one of"):
        DDMinStep(0, ("a",), True, 1, "bisect", cached=False)
    result, _ = run(planted)
    data = json.loads(json.dumps(result.to_json()))
    assert data["minimal"] == ["c3", "c7"] and len(data["trace"]) == len(result.trace)
    assert data["trace"][0] == {
        "index": 0,
        "subset": list(C16),
        "passed": True,
        "granularity": 1,
        "phase": "full",
        "cached": False,
        "repeated": False,
    }
