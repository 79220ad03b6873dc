"""The alignment pipeline (AlignmentConfig, run_alignment), its thin script and the α rules
of contrans_tl.pipelines.alpha, on tiny random models.

TruthfulQA is cut to its first 24 questions here (the refinement sets are then 12 and 24
questions), so a whole run takes seconds; the toxicity classifier is a fake that scores
by length (the MiniLM one needs minutes to fit).
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import random
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import pytest

import contrans_tl
import contrans_tl.pipelines.alignment as pipeline
from contrans_tl.concepts import mean_difference
from contrans_tl.evals.toxigen import evaluate_toxigen
from contrans_tl.evals.truthfulqa import evaluate_mc, honesty_prompts, load_truthfulqa
from contrans_tl.maps import ResidualMap
from contrans_tl.pipelines.alignment import AlignmentConfig, run_alignment
from contrans_tl.pipelines.alpha import (
    best_alpha,
    best_alpha_within_fluency,
    control_alphas,
    fluent_alphas,
)
from contrans_tl.pipelines.analysis import pick_alpha
from contrans_tl.pipelines.emotion import pick_alphas
from contrans_tl.steering import make_steering

REPO = Path(__file__).resolve().parents[1]
N_QUESTIONS = 24
SMALL = dict(
    n_map_texts=20,
    tqa_eval=3,
    tqa_val=2,
    tqa_alphas=(1.0, 4.0),
    tox_eval=1,
    tox_val=1,
    tox_alphas=(1.0, 8.0),
    fair_per_group=1,
    max_new_tokens=3,
    n_ppl=3,
    batch_size=4,
    tqa_batch_size=8,
)


class LengthClassifier:
    """A deterministic stand-in for the toxicity classifier: longer means more toxic."""

    name = "fake-length"

    def score(self, texts):
        return [min(1.0, len(t) / 12) for t in texts]


@contextlib.contextmanager
def few_questions():
    """TruthfulQA cut to its first questions, for the pipeline (config checks included)."""
    questions = load_truthfulqa()[:N_QUESTIONS]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "load_truthfulqa", lambda: list(questions))
        yield


def _run(source, target, out, cache, **changes):
    with few_questions():
        config = AlignmentConfig(**{**SMALL, **changes})
        return run_alignment(
            source,
            target,
            config,
            out,
            names=("src", "tgt"),
            command="test",
            cache=cache,
            classifier=LengthClassifier(),
            maps_dir=out / "maps",
        )


def _numbers(result):
    """results.json without its timings (the rest must repeat exactly)."""
    out = json.loads(json.dumps(result))
    out.pop("step_seconds")
    for where in ("results_root", "maps_dir"):
        out["settings"].pop(where)
    return out


@pytest.fixture(scope="module")
def first_run(small_llama, small_gemma, tmp_path_factory):
    root = tmp_path_factory.mktemp("alignment")
    result = _run(small_llama, small_gemma, root / "out", root / "cache")
    return root, result


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"parts": ("truthfulqa", "bogus")}, r"parts has \['bogus'\]; valid: \['truthfulqa'"),
        ({"parts": "truthfulqa"}, "parts must be a list of names"),
        ({"parts": ()}, "parts is empty"),
        ({"protocols": ("clean", "clean")}, "protocols must not repeat"),
        ({"target_methods": ("align",)}, "target_methods has"),
        ({"ppl_methods": ("random",)}, "ppl_methods has"),
        ({"controls": ("shuffled",)}, "controls has"),
        ({"tqa_alphas": (0.5, -1.0)}, "tqa_alphas must hold finite numbers > 0"),
        ({"tqa_alphas": ()}, "tqa_alphas must be a non-empty list"),
        ({"tox_alphas": (1.0, 1.0)}, "tox_alphas must not repeat"),
        ({"tox_alphas": (math.inf,)}, "tox_alphas must hold finite"),
        ({"pairing": "diagonal"}, "pairing must be one of"),
        ({"n_map_texts": 5}, "n_map_texts must be an integer >= 10"),
        ({"n_map_texts": 10**6}, "n_map_texts must be at most"),
        ({"tqa_eval": 0}, "tqa_eval must be an integer >= 1"),
        ({"tqa_eval": 10**4}, r"tqa_eval must be at most 409 \(the held-out half"),
        ({"tqa_val": 10**4}, r"tqa_val must be at most 408 \(the refine half"),
        ({"tox_eval": 10**4}, "tox_eval . tox_val is too large for the data"),
        ({"fair_per_group": 10**4}, "fair_per_group is too large for the data"),
        ({"n_ppl": 10**5}, "n_ppl is too large for the data"),
        ({"ppl_limit": 0.0}, "ppl_limit must be a number > 0"),
        ({"ppl_limit": math.nan}, "ppl_limit must be a number > 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"seed": "0"}, "seed must be an integer"),
        ({"honest_instruction": " "}, "honest_instruction must be a non-empty string"),
        ({"parts": ("both", "truthfulqa")}, "parts has 'both'.*needs 'truthfulqa' and 'toxigen'"),
        ({"protocols": ("paper",)}, "'clean' in protocols"),
    ],
)
def test_config_refuses_bad_settings(changes, match, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(contrans_tl, "load_model", refuse)
    monkeypatch.setattr(contrans_tl.models, "load_model", refuse)
    # a value of the wrong type may be refused first by the suite's runtime type checker
    with pytest.raises((ValueError, TypeError)) as info:
        AlignmentConfig(**changes)
    if info.type is ValueError:
        assert re.search(match, str(info.value)), str(info.value)
    else:
        assert "type" in str(info.value).lower()


def test_config_is_frozen_normalised_and_documented():
    config = AlignmentConfig(ppl_methods=("none",), controls=["none"], self_protocols=())
    assert config.ppl_methods == () and config.controls == () and config.self_protocols == ()
    assert AlignmentConfig(tqa_alphas=[1, 0.5]).tqa_alphas == (1.0, 0.5)  # tuples, in order
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]
    for f in dataclasses.fields(AlignmentConfig):
        assert f.metadata.get("help"), f"{f.name} has no help"
        assert f.type in (int, float, str, bool, Sequence[str], Sequence[float]), f.name
    settings = config.settings()
    assert settings["ppl_methods"] == "none" and settings["controls"] == "none"
    assert settings["tqa_alphas"] == "0.25,0.5,1" and settings["parts"].startswith("truthfulqa,")
    with pytest.raises((ValueError, TypeError), match="seed"):
        dataclasses.replace(config, seed=None)


# ------------------------------------------------------------------ the thin script


def _script():
    spec = importlib.util.spec_from_file_location(
        "run_alignment_script", REPO / "experiments" / "run_alignment.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OLD_FLAGS = [
    "--source",
    "--target",
    "--parts",
    "--protocols",
    "--self-protocols",
    "--target-methods",
    "--pairing",
    "--n-map-texts",
    "--tqa-eval",
    "--tqa-val",
    "--tqa-alphas",
    "--tox-eval",
    "--tox-val",
    "--tox-alphas",
    "--fair-per-group",
    "--max-new-tokens",
    "--n-ppl",
    "--ppl-limit",
    "--ppl-methods",
    "--controls",
    "--batch-size",
    "--seed",
    "--results-root",
    "--maps-dir",
]


def test_script_takes_the_old_flags_and_the_commands_of_run_alignment_sh():
    script = _script()
    sh = (REPO / "experiments" / "run_alignment.sh").read_text().replace("\\\n", " ")
    commands = [line.split("run_alignment.py", 1)[1] for line in sh.splitlines() if ".py" in line]
    assert len(commands) == 3
    for cmd in commands:
        args = script.build_parser().parse_args(shlex.split(cmd))
        config = script.make_config(args)
        assert isinstance(config, AlignmentConfig)
    assert config.ppl_methods == () and config.tox_alphas == (0.3, 1.5)
    assert config.protocols == ("clean",) and config.fair_per_group == 10
    args = script.build_parser().parse_args(["--source", "a", "--target", "b"])
    assert script.make_config(args) == AlignmentConfig()  # the defaults are the config's
    assert set(OLD_FLAGS) <= set(script.build_parser()._option_string_actions)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--tqa-alphas", "0.5,x"], "--tqa-alphas: expected numbers"),
        (["--pairing", "diagonal"], "--pairing: invalid choice"),
        (["--tox-alphas", "-1"], "tox_alphas must hold finite numbers > 0"),
        (["--parts", "truthfulqa,tqa"], r"parts has \['tqa'\]"),
        (["--tqa-eval", "5000"], "tqa_eval must be at most 409"),
        (["--results-root", str(REPO / "pyproject.toml")], "--results-root .* existing file"),
    ],
)
def test_script_refuses_bad_flags_before_loading_a_model(argv, match, monkeypatch, capsys):
    script = _script()

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(contrans_tl, "load_model", refuse)
    with pytest.raises(SystemExit) as info:
        script.main(["--source", "a", "--target", "b", *argv])
    said = f"{info.value} {capsys.readouterr().err}"
    assert re.search(match, said), said


# ------------------------------------------------------------------ a run end to end


def test_run_writes_the_result_files(first_run):
    root, result = first_run
    out = root / "out"
    pair, tgt = out / "src__tgt", out / "target__tgt"
    assert json.loads((pair / "results.json").read_text()) == json.loads(json.dumps(result))
    tq, tx = result["truthfulqa"], result["toxigen"]
    assert list(tq) == [
        "base",
        "base_val",
        "inst",
        "contrans_clean",
        "contrans_paper",
        "self_clean",
        "random",
    ]
    assert list(tx) == ["base", "base_val", "inst", "contrans", "self", "random"]
    assert set(result["perplexity"]) == {
        "base",
        "contrans_clean_honesty",
        "contrans_paper_honesty",
        "self_clean_honesty",
        "contrans_fairness",
        "self_fairness",
        "random_fairness",
    }
    assert set(result["both"]) == set(pipeline.BothResult.__annotations__)
    assert result["settings"]["source"] == "src" and result["command"] == "test"
    assert result["classifier"] == {"name": "fake-length"}
    # each row's evaluation is in runs/ with its records: the pair's or the target's folder
    for rows in (tq, tx):
        for name, row in rows.items():
            assert "records" not in row
            folder = pair if name.startswith(("contrans", "random")) else tgt
            stored = json.loads((folder / "runs" / f"{row['key']}.json").read_text())
            assert stored["records"] and stored["key"] == row["key"]
            assert {k: v for k, v in stored.items() if k != "records"}.items() <= row.items()
    assert tq["inst"]["instruction"] == pipeline.HONEST_INSTRUCTION
    assert tx["base"]["n"] == 13 and tx["base_val"]["n"] == 13
    assert list((out / "maps").glob("src__tgt__auto__20.*"))
    assert not list(out.rglob("*.tmp"))


def test_run_picks_alpha_by_the_rules(first_run):
    _, result = first_run
    tq, tx = result["truthfulqa"], result["toxigen"]
    for name in ("contrans_clean", "contrans_paper", "self_clean"):
        grid = {float(a): m for a, m in tq[name]["val_grid"].items()}
        assert tq[name]["alpha"] == best_alpha(grid)
    assert tq["random"]["alpha"] == tq["contrans_clean"]["alpha"]
    base_ppl = result["perplexity"]["base"]["ppl"]
    for name in ("contrans", "self"):
        grid = {float(a): g for a, g in tx[name]["val_grid"].items()}
        fluent = [a for a, g in grid.items() if g["ppl"] / base_ppl <= 2.0]
        pool = fluent or [min(grid)]
        want = min(pool, key=lambda a: (grid[a]["toxic_share"] + grid[a]["empty_share"], a))
        assert tx[name]["alpha"] == want
        assert result["perplexity"][f"{name}_fairness"]["ppl"] == grid[want]["ppl"]
    assert tx["random"]["alpha"] == tx["contrans"]["alpha"]
    both = result["both"]
    assert (both["alpha_honesty"], both["alpha_fairness"]) == (
        tq["contrans_clean"]["alpha"],
        tx["contrans"]["alpha"],
    )


def test_run_numbers_equal_direct_evaluation(first_run, small_llama, small_gemma):
    """Base, Inst-Align and ConTrans rows recomputed with the library, not the pipeline."""
    root, result = first_run
    with few_questions():
        data = pipeline.prepare_data(AlignmentConfig(**SMALL))
    tq = result["truthfulqa"]
    assert [q.index for q in data.tqa_eval] == tq["base"]["question_indices"]
    base = evaluate_mc(small_gemma, data.tqa_eval, batch_size=8)
    assert tq["base"]["mc1"] == base["mc1"]
    inst = evaluate_mc(
        small_gemma, data.tqa_eval, instruction=pipeline.HONEST_INSTRUCTION, batch_size=8
    )
    assert tq["inst"]["mc1"] == inst["mc1"]
    rmap = ResidualMap.load(root / "out" / "maps" / "src__tgt__auto__20")
    pos, neg = honesty_prompts(data.refine_sets["clean"], model_or_tokenizer=small_llama)
    v = rmap.transplant(mean_difference(small_llama, pos, neg, concept="honesty", batch_size=4))
    alpha = tq["contrans_clean"]["alpha"]
    steering = make_steering(small_gemma, v, alpha)
    steered = evaluate_mc(small_gemma, data.tqa_eval, intervention=steering, batch_size=8)
    run_file = root / "out" / "src__tgt" / "runs" / f"{tq['contrans_clean']['key']}.json"
    stored = json.loads(run_file.read_text())
    got = [s for r in stored["records"] for s in r["scores"]]
    assert got == pytest.approx([s for r in steered["records"] for s in r["scores"]], abs=1e-5)
    assert stored["mc1"] == steered["mc1"]
    tox = evaluate_toxigen(
        small_gemma, data.tox_eval, LengthClassifier(), max_new_tokens=3, batch_size=4
    )
    assert result["toxigen"]["base"]["toxic_share"] == tox["toxic_share"]


def _count_calls(mp):
    calls = {"evaluate_mc": 0, "evaluate_toxigen": 0, "perplexity": 0, "mean_difference": 0}
    calls["fit_residual_map"] = 0
    for name in list(calls):
        real = getattr(pipeline, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        mp.setattr(pipeline, name, counted)
    return calls


def test_rerun_reads_everything_from_the_cache(first_run, small_llama, small_gemma):
    root, first = first_run
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_calls(mp)
        again = _run(small_llama, small_gemma, root / "again", root / "cache")
    assert calls == dict.fromkeys(calls, 0)
    assert _numbers(again) == _numbers(first)
    for name in ("src__tgt", "target__tgt"):
        a = sorted(p.name for p in (root / "out" / name / "runs").iterdir())
        b = sorted(p.name for p in (root / "again" / name / "runs").iterdir())
        assert a == b and a
    # a setting that changes some results computes those again, and only those
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_calls(mp)
        _run(
            small_llama,
            small_gemma,
            root / "alpha2",
            root / "cache",
            parts=("truthfulqa",),
            protocols=("clean",),
            target_methods=("base",),
            controls=(),
            tqa_alphas=(2.0,),
        )
    assert calls == {**dict.fromkeys(calls, 0), "evaluate_mc": 2}  # validation and evaluation


def test_interrupted_run_keeps_what_it_had(small_llama, small_gemma, tmp_path):
    changes = dict(parts=("truthfulqa",), protocols=("clean",), target_methods=("base", "inst"))
    n_mc = 3 + 3 + 1  # base, base_val, inst; two alphas and the best; the random control
    real = pipeline.evaluate_mc
    with pytest.MonkeyPatch.context() as mp:
        seen = []

        def dies_on_the_fifth(*args, **kwargs):
            seen.append(1)
            if len(seen) == 5:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        mp.setattr(pipeline, "evaluate_mc", dies_on_the_fifth)
        with pytest.raises(KeyboardInterrupt):
            _run(small_llama, small_gemma, tmp_path / "out", tmp_path / "cache", **changes)
    assert not (tmp_path / "out" / "src__tgt" / "results.json").exists()
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_calls(mp)
        result = _run(small_llama, small_gemma, tmp_path / "out", tmp_path / "cache", **changes)
    assert calls == {**dict.fromkeys(calls, 0), "evaluate_mc": n_mc - 4}
    assert list(result["truthfulqa"]) == ["base", "base_val", "inst", "contrans_clean", "random"]
    assert (tmp_path / "out" / "src__tgt" / "results.json").exists()


# ------------------------------------------------------------------ the α rules


def test_best_alpha_ties_go_to_the_smaller_alpha():
    assert best_alpha({0.25: 0.30, 0.5: 0.34, 1.0: 0.34}) == 0.5
    assert best_alpha({1.0: 0.34, 0.5: 0.34, 0.25: 0.30}) == 0.5  # order does not matter
    assert best_alpha({0.3: 0.4, 0.9: 0.1, 1.5: 0.1}, higher_is_better=False) == 0.9
    assert best_alpha({2.0: 0.1}) == 2.0
    with pytest.raises(ValueError, match="no scores to pick an alpha from"):
        best_alpha({})
    with pytest.raises(ValueError, match=r"NaN at alpha \[1.0\]"):
        best_alpha({0.5: 0.2, 1.0: math.nan})


def test_best_alpha_within_fluency_and_its_fallback():
    scores = {1.0: 0.6, 2.0: 0.6, 4.0: 0.9}
    ppl = {1.0: 25.0, 2.0: 29.0, 4.0: 300.0}
    kw = dict(base_fluency=20.0, max_ratio=1.5)
    assert fluent_alphas(ppl, **kw) == [1.0, 2.0]
    assert best_alpha_within_fluency(scores, ppl, **kw) == 1.0  # tie at 0.6, 4 not fluent
    assert best_alpha_within_fluency(scores, ppl, base_fluency=20.0, max_ratio=20) == 4.0
    assert best_alpha_within_fluency(scores, ppl, base_fluency=None, max_ratio=1.5) == 4.0
    assert best_alpha_within_fluency(scores, {4.0: None}, **kw) == 4.0  # not measured: fluent
    low = {1.0: 0.4, 2.0: 0.1}
    assert best_alpha_within_fluency(low, ppl, **kw, higher_is_better=False) == 2.0
    # nothing fluent: None, or the smallest alpha with the fallback
    too_high = {1.0: 99.0, 2.0: 99.0, 4.0: 99.0}
    assert best_alpha_within_fluency(scores, too_high, **kw) is None
    assert best_alpha_within_fluency(scores, too_high, **kw, fallback="smallest") == 1.0
    assert fluent_alphas({1.0: 31.0}, base_fluency=20.0, max_ratio=1.5) == []
    assert fluent_alphas({1.0: 30.0}, base_fluency=20.0, max_ratio=1.5) == [1.0]  # at the bound
    with pytest.raises((ValueError, TypeError), match="fallback"):
        best_alpha_within_fluency(scores, ppl, **kw, fallback="largest")  # type: ignore[arg-type]


def test_control_alphas():
    picked = {"contrans_last": 0.4, "contrans_all": 0.8}
    assert control_alphas(picked, {"random_last": "contrans_last"}) == {"random_last": 0.4}
    with pytest.raises(KeyError, match=r"no alpha was picked for \['contrans_word_ends'\]"):
        control_alphas(picked, {"random_word_ends": "contrans_word_ends"})


# The four rules as they were before alpha.py, to check that the same alpha is chosen.


def _old_pick_alpha(rows, max_ppl_ratio=1.5):
    base = [r for r in rows if float(r["alpha"]) == 0]
    base_f = base[0].get("ppl") if base else None
    ok = []
    for r in rows:
        if float(r["alpha"]) <= 0 or r.get("token_acc") is None:
            continue
        f = r.get("ppl")
        if base_f is not None and f is not None and not f <= max_ppl_ratio * base_f:
            continue
        ok.append(r)
    if not ok:
        return None
    return float(max(ok, key=lambda r: (float(r["token_acc"]), -float(r["alpha"])))["alpha"])


def _old_tox_rule(grid, alphas, limit):
    ok = [a for a in alphas if grid[a]["ppl_ratio"] <= limit]
    pool = ok or [min(alphas)]
    return min(pool, key=lambda a: (grid[a]["toxic_share"] + grid[a]["empty_share"], a))


def test_the_four_call_sites_choose_what_they_chose_before():
    rng = random.Random(0)
    alphas = [0.25, 0.5, 1.0, 2.0]
    for _ in range(300):
        coarse = [rng.choice([0.0, 0.25, 0.5]) for _ in alphas]  # many ties
        # analysis sweep
        rows = [{"alpha": 0.0, "token_acc": 0.1, "ppl": rng.choice([None, 20.0])}]
        for a, s in zip(alphas, coarse):
            rows.append({"alpha": a, "token_acc": s, "ppl": rng.choice([None, 21.0, 25.0, 90.0])})
        assert pick_alpha(rows) == _old_pick_alpha(rows)
        # TruthfulQA
        grid = dict(zip(alphas, coarse))
        assert best_alpha(grid) == max(alphas, key=lambda a: (grid[a], -a))
        # ToxiGen
        base_ppl = 50.0
        tox = {
            a: {
                "toxic_share": s,
                "empty_share": rng.choice([0.0, 0.25]),
                "ppl": (p := rng.choice([60.0, 100.0, 150.0])),
                "ppl_ratio": p / base_ppl,
            }
            for a, s in zip(alphas, coarse)
        }
        new = best_alpha_within_fluency(
            {a: g["toxic_share"] + g["empty_share"] for a, g in tox.items()},
            {a: g["ppl"] for a, g in tox.items()},
            base_fluency=base_ppl,
            max_ratio=2.0,
            higher_is_better=False,
            fallback="smallest",
        )
        assert new == _old_tox_rule(tox, alphas, 2.0)
    # emotion: the mean validation Token Acc over emotions, random_* at contrans_*'s alpha
    rows = []
    for m in ("contrans_last", "self"):
        for a in alphas:
            for e in ("fear", "anger"):
                acc = rng.choice([0.0, 0.5])
                rows.append(
                    {"split": "validation", "method": m, "emotion": e, "alpha": a, "token_acc": acc}
                )
    got = pick_alphas(rows, ["contrans_last", "random_last", "self"], alphas)
    assert list(got) == ["contrans_last", "self", "random_last"]  # as before: controls last
    for m in ("contrans_last", "self"):
        mean = {
            a: sum(r["token_acc"] for r in rows if r["method"] == m and r["alpha"] == a) / 2
            for a in alphas
        }
        assert got[m] == max(alphas, key=lambda a: (mean[a], -a))
    assert got["random_last"] == got["contrans_last"]
