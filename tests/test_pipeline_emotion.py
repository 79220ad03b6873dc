"""The emotion pipeline: one read of the distinct refinement prompts, the config, the
result cache, and a repeated or interrupted run that redoes nothing it has."""

import dataclasses
import json
import re

import pytest
import torch

import contrans_tl.pipelines.emotion as pipeline
from contrans_tl.concepts import mean_difference, mean_differences
from contrans_tl.data import EMOTIONS, emotion_scenarios
from contrans_tl.evals.emotion import EmotionTask, refinement_prompts, split_scenarios
from contrans_tl.evals.emotion_run import check_emotion_args, run_emotion_experiment
from contrans_tl.pipelines.cache import (
    ResultCache,
    default_cache_dir,
    model_fingerprint,
    open_cache,
)
from contrans_tl.pipelines.emotion import EmotionConfig, run_emotion

SMALL = dict(
    alphas=(1.0, 4.0),
    pairings=("last", "word_ends"),
    n_map_texts=30,
    n_refine=6,
    n_fewshot=1,
    n_negatives=4,
    n_validation_negatives=3,
)


@pytest.fixture(scope="module")
def prompts():
    split = split_scenarios(emotion_scenarios(), n_fewshot=1, n_refine=6, n_validation=5)
    return {e: refinement_prompts(split, e) for e in EMOTIONS}


# ------------------------------------------------------------------ mean_differences


@pytest.mark.parametrize("model_name", ["small_llama", "small_gemma"])
@pytest.mark.parametrize("positions", ["last", "word_ends"])
def test_mean_differences_equal_mean_difference_per_concept(
    model_name, positions, prompts, request
):
    model = request.getfixturevalue(model_name)
    concepts = dict(prompts)
    pos, neg = concepts["fear"]
    concepts["repeats"] = (pos[:2] + pos[:1], neg[:1] * 3)  # a prompt counted as often as listed
    together = mean_differences(model, concepts, positions=positions, batch_size=4)
    assert list(together) == list(concepts)
    n_distinct = len({t for p, n in concepts.values() for t in (*p, *n)})
    assert n_distinct < sum(len(p) + len(n) for p, n in concepts.values())
    for name, (p, n) in concepts.items():
        alone = mean_difference(model, p, n, concept=name, positions=positions, batch_size=4)
        got = together[name]
        assert got.layers == alone.layers and got.concept == name
        assert got.method == alone.method and got.model == alone.model
        torch.testing.assert_close(got.vectors, alone.vectors, atol=1e-6, rtol=0)
        assert set(got.metadata) == set(alone.metadata)
        for key in ("n_positive", "n_negative", "positions"):
            assert got.metadata[key] == alone.metadata[key]
        norms, ref = got.metadata["resid_norms"], alone.metadata["resid_norms"]
        assert list(norms) == list(ref)
        for k in ref:
            assert norms[k] == pytest.approx(ref[k], abs=1e-6, rel=0)


def test_mean_differences_reads_each_distinct_prompt_once(small_llama, prompts, monkeypatch):
    import contrans_tl.concepts as concepts_module

    seen = []
    real = concepts_module.read_resid_post

    def spy(model, texts, *args, **kwargs):
        seen.append(list(texts))
        return real(model, texts, *args, **kwargs)

    monkeypatch.setattr(concepts_module, "read_resid_post", spy)
    mean_differences(small_llama, prompts, layers=[1])
    assert len(seen) == 1
    assert sorted(seen[0]) == sorted({t for p, n in prompts.values() for t in (*p, *n)})
    assert len(seen[0]) == len(set(seen[0])) == 6 * 6  # 72 prompts, 36 distinct


@pytest.mark.parametrize(
    ("concepts", "error", "match"),
    [
        ({}, ValueError, "concepts is empty"),
        ({"a": (["x"], [])}, ValueError, "concept 'a' needs at least one positive and one"),
        ({"a": ("x", ["y"])}, TypeError, r"concepts\['a'\] positive must be a list of texts"),
        # wrong types: refused by name (or, with runtime type checks on, by the checker)
        ([("a", (["x"], ["y"]))], TypeError, None),
        ({"a": (["x"],)}, TypeError, None),
        ({1: (["x"], ["y"])}, TypeError, None),
    ],
)
def test_mean_differences_refuses_bad_input(small_llama, concepts, error, match):
    with pytest.raises(error, match=match):
        mean_differences(small_llama, concepts)


# ------------------------------------------------------------------ EmotionConfig


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"alphas": [float("nan")]}, "finite"),
        ({"alphas": [0.0, 0.5]}, "alpha 0 is always run as the unsteered 'base'"),
        ({"alphas": []}, "alphas is empty"),
        ({"alphas": "0.5"}, "alphas must be a list"),
        ({"alphas": [True]}, "alphas must be real numbers"),
        ({"pairings": "last"}, "got the string 'last'"),
        ({"pairings": ("last", "bogus")}, "pairings must be a non-empty list"),
        ({"pairings": ("last", "last")}, "pairings must be distinct"),
        ({"map_method": "lsq"}, "map_method must be one of"),
        ({"n_map_texts": 9}, "n_map_texts must be an integer >= 10, got 9"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"n_refine": 1.5}, "n_refine must be an integer >= 1"),
        ({"seed": "0"}, "seed must be an integer"),
        ({"n_map_texts": 10**6}, "n_map_texts must be at most"),
        ({"n_refine": 10**4}, "leaves no evaluation scenarios"),
        ({"n_negatives": 10**4}, "n_negatives must be at most"),
        ({"n_validation_negatives": 10**4}, "n_validation_negatives must be at most"),
        ({"include_self": 1}, "include_self must be True or False"),
    ],
)
def test_config_refuses_bad_settings(changes, match):
    for make in (EmotionConfig, check_emotion_args):  # the keyword entry point says the same
        # a value of the wrong type is refused by name (with runtime type checks on, as in
        # this test suite, the checker may refuse it first: a TypeError)
        with pytest.raises((ValueError, TypeError)) as info:
            make(**changes)
        if info.type is ValueError:
            assert re.search(match, str(info.value)), str(info.value)
        else:
            assert "type" in str(info.value).lower()


def test_config_is_frozen_normalised_and_documented():
    config = EmotionConfig(alphas=[0.4, 0.1, 0.4], layers=[3, -1], pairings=["word_ends"])
    assert config.alphas == (0.1, 0.4) and config.layers == (3, -1)
    assert config.pairings == ("word_ends",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]
    assert dataclasses.replace(config, seed=2).seed == 2
    with pytest.raises((ValueError, TypeError), match="seed"):
        dataclasses.replace(config, seed=None)
    for f in dataclasses.fields(EmotionConfig):
        assert f.metadata.get("help"), f"{f.name} has no help"
    with pytest.raises(TypeError, match="layers"):
        EmotionConfig(layers=[1.5])


# ------------------------------------------------------------------ the cache


def test_cache_stores_loads_and_recomputes_incomplete_entries(tmp_path):
    cache = ResultCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(3.0)

    def save(t, folder):
        (folder / "t.json").write_text(json.dumps(t.tolist()))

    def load(folder):
        return torch.tensor(json.loads((folder / "t.json").read_text()))

    args = ("step", 1, {"x": [1, 2]}, compute)
    got, hit = cache.get_or_compute(*args, save=save, load=load)
    assert not hit and calls == [1]
    got, hit = cache.get_or_compute(*args, save=save, load=load)
    assert hit and calls == [1] and got.tolist() == [0.0, 1.0, 2.0]
    key = cache.key("step", 1, {"x": [1, 2]})
    assert key != cache.key("step", 2, {"x": [1, 2]}) != cache.key("step", 1, {"x": [2, 1]})
    entry = cache.entry("step", key)
    (entry / "complete.json").unlink()  # a save that died before it finished
    _, hit = cache.get_or_compute(*args, save=save, load=load)
    assert not hit and calls == [1, 1]
    (entry / "t.json").write_text("not json")  # an entry that no longer loads
    got, hit = cache.get_or_compute(*args, save=save, load=load)
    assert not hit and calls == [1, 1, 1] and got.tolist() == [0.0, 1.0, 2.0]


def test_open_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRANS_TL_CACHE", str(tmp_path / "c"))
    assert open_cache(None) == ResultCache(tmp_path / "c" / "results") == open_cache(True)
    assert default_cache_dir() == tmp_path / "c" / "results"
    assert open_cache(False) is None
    assert open_cache(tmp_path / "x") == ResultCache(tmp_path / "x")
    with pytest.raises(TypeError, match="cache must be"):
        open_cache(3)
    with pytest.raises(ValueError, match="empty path"):
        open_cache("")


def test_fingerprint_tells_same_named_models_apart(byte_tokenizer, small_llama):
    from conftest import tiny_llama

    other = tiny_llama(byte_tokenizer, d_model=48, n_layers=3, seed=5, name="tiny-llama-48")
    a, b = model_fingerprint(small_llama), model_fingerprint(other)
    assert a["model_id"] == b["model_id"] and a["weights_sha"] != b["weights_sha"]
    assert a == model_fingerprint(small_llama) and a["tokenizer_sha"] == b["tokenizer_sha"]
    json.dumps(a)


# ------------------------------------------------------------------ the run


def _numbers(result):
    keep = ("rows", "summary", "selected_alpha", "cosine_transplanted_vs_self", "protocol")
    out = {k: result[k] for k in keep}
    out["maps"] = {
        p: {k: m[k] for k in ("metrics", "info", "layer_pairs")} for p, m in result["maps"].items()
    }
    return json.loads(json.dumps(out))


def _refuse(monkeypatch):
    """Every expensive step fails the test: a cached run must not reach any."""

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(pipeline, "mean_differences", refuse)
    monkeypatch.setattr(pipeline, "fit_residual_map", refuse)
    monkeypatch.setattr(EmotionTask, "predict", refuse)


def test_repeated_run_reads_everything_from_the_cache(small_llama, small_gemma, tmp_path):
    config = EmotionConfig(**SMALL)
    cache = tmp_path / "cache"
    first = run_emotion(small_llama, small_gemma, config, tmp_path / "a", cache=cache)
    uncached = run_emotion(small_llama, small_gemma, config, tmp_path / "b", cache=False)
    assert _numbers(first) == _numbers(uncached)
    assert {m["cached"] for m in first["maps"].values()} == {False}
    assert set(first["step_seconds"]) >= {"refine source vectors", "fit maps", "score"}
    with pytest.MonkeyPatch.context() as mp:
        _refuse(mp)
        again = run_emotion(small_llama, small_gemma, config, tmp_path / "c", cache=cache)
    assert _numbers(again) == _numbers(first)
    assert {m["cached"] for m in again["maps"].values()} == {True}
    md = (tmp_path / "c" / "results.md").read_text()
    assert (
        md.split("Run time")[0] == (tmp_path / "a" / "results.md").read_text().split("Run time")[0]
    )
    # a change of a setting that changes the result is not served from the cache
    with pytest.MonkeyPatch.context() as mp:
        _refuse(mp)
        with pytest.raises(AssertionError, match="recomputed"):
            run_emotion(
                small_llama,
                small_gemma,
                dataclasses.replace(config, seed=1),
                tmp_path / "d",
                cache=cache,
            )


def test_interrupted_run_keeps_what_it_had(small_llama, small_gemma, tmp_path, monkeypatch):
    config = EmotionConfig(**{**SMALL, "pairings": ("word_ends",), "include_random": False})
    cache = tmp_path / "cache"
    calls = {"refine": 0, "fit": 0}
    real_md, real_fit = pipeline.mean_differences, pipeline.fit_residual_map

    def counted_md(*a, **k):
        calls["refine"] += 1
        return real_md(*a, **k)

    def counted_fit(*a, **k):
        calls["fit"] += 1
        return real_fit(*a, **k)

    monkeypatch.setattr(pipeline, "mean_differences", counted_md)
    monkeypatch.setattr(pipeline, "fit_residual_map", counted_fit)
    with pytest.MonkeyPatch.context() as mp:

        def killed(*a, **k):
            raise KeyboardInterrupt

        mp.setattr(EmotionTask, "predict", killed)
        with pytest.raises(KeyboardInterrupt):
            run_emotion(small_llama, small_gemma, config, tmp_path / "out", cache=cache)
    assert calls == {"refine": 2, "fit": 1}  # source and self vectors, one map
    assert not (tmp_path / "out").exists()
    result = run_emotion(small_llama, small_gemma, config, tmp_path / "out", cache=cache)
    assert calls == {"refine": 2, "fit": 1}
    assert (tmp_path / "out" / "results.json").exists()
    assert set(result["summary"]) == {"base", "contrans_word_ends", "self"}


def test_run_emotion_experiment_takes_keywords_or_a_config(small_llama, small_gemma, tmp_path):
    small = {**SMALL, "pairings": ["word_ends"], "include_self": False, "include_random": False}
    a = run_emotion_experiment(small_llama, small_gemma, tmp_path / "a", cache=False, **small)
    config = EmotionConfig(**small)
    b = run_emotion_experiment(small_llama, small_gemma, tmp_path / "b", config=config, cache=False)
    assert _numbers(a) == _numbers(b)
    assert set(a["summary"]) == {"base", "contrans_word_ends"}
    with pytest.raises(TypeError, match="either config or keyword settings"):
        run_emotion_experiment(small_llama, small_gemma, tmp_path / "c", config=config, seed=1)
    with pytest.raises(TypeError, match="EmotionConfig"):
        run_emotion(small_llama, small_gemma, dict(small), tmp_path / "d")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--cache-dir", "CACHE", "--no-cache"], "exclude each other"),
        (["--cache-dir", "FILE/sub"], "--cache-dir .* is under"),
    ],
)
def test_cli_cache_options_are_checked_before_loading(extra, match, tmp_path, capsys, monkeypatch):
    import contrans_tl.models
    from contrans_tl.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(contrans_tl.models, "load_model", refuse)
    (tmp_path / "FILE").write_text("")
    extra = [
        x.replace("CACHE", str(tmp_path / "c")).replace("FILE", str(tmp_path / "FILE"))
        for x in extra
    ]
    argv = ["emotion", "--source", "smollm2-135m-instruct", "--target", "gemma-3-270m"]
    code = main([*argv, "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err) and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_answer_matrix_diagonal_is_token_acc_and_off_diagonal_is_measured(
    small_llama, small_gemma, tmp_path
):
    result = run_emotion(small_llama, small_gemma, EmotionConfig(**SMALL), tmp_path, cache=False)
    assert set(result["confusion"]) == set(result["summary"]) - {"base"}
    for m, c in result["confusion"].items():
        alpha = result["selected_alpha"][m]
        assert c["alpha"] == alpha and len(c["matrix"]) == len(EMOTIONS)
        for j, e in enumerate(EMOTIONS):
            (row,) = [
                r
                for r in result["rows"]
                if (r["split"], r["method"], r["emotion"], r["alpha"])
                == ("evaluation", m, e, alpha)
            ]
            assert c["matrix"][j][j] == pytest.approx(row["token_acc"])  # the diagonal
            others = [c["matrix"][i][j] for i in range(len(EMOTIONS)) if i != j]
            want = row["token_acc"] - sum(others) / len(others)
            assert c["per_emotion"][e] == pytest.approx(want)
        assert result["summary"][m]["specificity"] == pytest.approx(c["mean"])
    assert "## Answers under each emotion's vector" in (tmp_path / "results.md").read_text()
    off = EmotionConfig(**SMALL, include_specificity=False)
    assert (
        run_emotion(small_llama, small_gemma, off, tmp_path / "off", cache=False)["confusion"] == {}
    )


@pytest.mark.parametrize("family", ["mlp", "anchor"])
def test_nonlinear_map_families_run_through_the_experiment_and_the_cache(
    small_llama, small_gemma, tmp_path, family, monkeypatch
):
    config = EmotionConfig(
        **{**SMALL, "pairings": ("word_ends",)}, map_method=family, include_specificity=False
    )
    cache = tmp_path / "cache"
    result = run_emotion(small_llama, small_gemma, config, tmp_path / "a", cache=cache)
    info = result["maps"]["word_ends"]
    assert info["method"] == family and info["metrics"]
    assert all({"r2", "r2_last", "cosine_last"} <= set(m) for m in info["metrics"].values())
    rows = [r for r in result["rows"] if r["method"] == "contrans_word_ends"]
    assert len(rows) == 2 * len(EMOTIONS) * len(config.alphas)  # both splits, every α
    _refuse(monkeypatch)  # a repeated run reads the state map back from the cache
    again = run_emotion(small_llama, small_gemma, config, tmp_path / "b", cache=cache)
    assert _numbers(again)["summary"] == _numbers(result)["summary"]


@pytest.mark.parametrize("method", ["svd", "anchor"])
def test_relative_scale_steers_every_method_by_the_layers_norm(
    small_llama, small_gemma, tmp_path, method
):
    settings = {**SMALL, "pairings": ("word_ends",), "include_specificity": False}
    raw = run_emotion(
        small_llama,
        small_gemma,
        EmotionConfig(**settings, map_method=method),
        tmp_path / "r",
        cache=False,
    )
    rel = run_emotion(
        small_llama,
        small_gemma,
        EmotionConfig(**settings, map_method=method, scale="relative"),
        tmp_path / "s",
        cache=False,
    )
    assert rel["protocol"]["scale"] == "relative"
    pick = lambda r: [  # noqa: E731
        (x["token_acc"], x["logit_acc"]) for x in r["rows"] if x["method"] != "base"
    ]
    assert pick(rel) != pick(raw)  # the norms differ from the vectors' own: other results
    base = lambda r: [x for x in r["rows"] if x["method"] == "base"]  # noqa: E731
    assert base(rel) == base(raw)
