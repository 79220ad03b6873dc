"""The steerable-layer search (issue 17, step 3): candidate layer sets, a search that
reads validation negatives only and picks the best of what it scored, and evaluation
scores at the picked setting that equal steering those layers directly."""

import dataclasses

import pytest
import torch

import contrans_tl.pipelines.layer_search as ls
from contrans_tl.data import EMOTIONS
from contrans_tl.evals.emotion import score
from contrans_tl.pipelines.emotion import EmotionConfig
from contrans_tl.steering import make_steering

SMALL = dict(
    alphas=(1.0, 4.0),
    pairings=("word_ends",),
    n_map_texts=30,
    n_refine=6,
    n_fewshot=1,
    n_negatives=4,
    n_validation_negatives=3,
)


@pytest.mark.parametrize(
    "n_layers, n_bands, want",
    [
        (2, 2, {"all": [0, 1], "0-0": [0], "1-1": [1]}),  # the union of both bands is all
        (
            7,
            3,
            {
                "all": [0, 1, 2, 3, 4, 5, 6],
                "0-2": [0, 1, 2],
                "3-4": [3, 4],
                "5-6": [5, 6],
                "0-4": [0, 1, 2, 3, 4],
                "3-6": [3, 4, 5, 6],
            },
        ),
    ],
)
def test_layer_candidates_are_all_bands_and_neighbouring_unions(n_layers, n_bands, want):
    assert ls.layer_candidates(n_layers, n_bands) == want


@pytest.mark.parametrize("n_bands", [1, 8])
def test_layer_candidates_refuse_a_band_count_out_of_range(n_bands):
    with pytest.raises(ValueError, match="n_bands must be between 2 and the 7 layers"):
        ls.layer_candidates(7, n_bands)


def test_search_reads_only_validation_and_the_evaluation_equals_direct_steering(
    small_llama, small_gemma, monkeypatch
):
    seen = []
    real = ls.predict_jobs

    def spy(target, fingerprint, queries, jobs, layers, config, cache):
        seen.append(({e: q for e, (q, _, _) in jobs.items()}, layers, config.scale))
        return real(target, fingerprint, queries, jobs, layers, config, cache)

    monkeypatch.setattr(ls, "predict_jobs", spy)
    config = EmotionConfig(**SMALL)
    got = ls.run_layer_search(
        small_llama,
        small_gemma,
        config,
        n_bands=2,
        raw_alphas=(4.0,),
        relative_alphas=(0.1,),
        cache=False,
    )
    n_layers = small_gemma.cfg.n_layers
    candidates = ls.layer_candidates(n_layers, 2)
    assert got["candidates"] == candidates
    rows = got["validation"]
    assert [(r["layers"], r["scale"], r["alpha"]) for r in rows] == [
        (name, scale, a)
        for name in candidates
        for scale, grid in (("raw", (4.0,)), ("relative", (0.1,)))
        for a in grid
    ]
    best = max(r["token_acc"] for r in rows)
    first = next(r for r in rows if r["token_acc"] == best)
    assert {k: got["picked"][k] for k in first} == first
    # every search call is on validation queries; only the picked setting sees evaluation
    split = config.split()
    queries = ls.build_queries(small_gemma, split, config)
    n_search = len(rows)
    assert all(q == queries.validation for q, _, _ in seen[:n_search])
    assert all(q is not queries.validation for q, _, _ in seen[n_search:])
    assert seen[n_search][0] == queries.evaluation
    # the evaluation scores equal steering the picked layers by hand
    p = got["picked"]
    vectors = got["picked_vectors"]
    for e in EMOTIONS:
        steer = make_steering(
            small_gemma, vectors[e], p["alpha"], layers=p["layer_list"], scale=p["scale"]
        )
        pred = queries.task.predict(small_gemma, queries.evaluation[e], intervention=steer)
        want = score(pred, e, queries.task.emotion_ids)
        assert got["evaluation"]["per_emotion"][e]["token_acc"] == pytest.approx(want["token_acc"])
        assert got["evaluation"]["per_emotion"][e]["logit_acc"] == pytest.approx(want["logit_acc"])
    diag = [got["confusion"]["matrix"][j][j] for j in range(len(EMOTIONS))]
    assert diag == pytest.approx(
        [got["evaluation"]["per_emotion"][e]["token_acc"] for e in EMOTIONS]
    )


def test_search_settings_change_the_predictions(small_llama, small_gemma):
    """A layer set or scale that the search tries is really what is steered: a band and
    the whole stack, raw and relative, give different emotion logits."""
    config = EmotionConfig(**SMALL)
    got = ls.run_layer_search(
        small_llama, small_gemma, config, n_bands=2, relative_alphas=(0.5,), cache=False
    )
    queries = ls.build_queries(small_gemma, config.split(), config)
    v = got["picked_vectors"]["fear"]
    logits = {}
    for layers in (None, [0]):
        for scale in ("raw", "relative"):
            steer = make_steering(small_gemma, v, 4.0, layers=layers, scale=scale)
            pred = queries.task.predict(small_gemma, queries.validation["fear"], intervention=steer)
            logits[(str(layers), scale)] = pred.emotion_logits
    values = list(logits.values())
    assert all(not torch.allclose(a, b) for i, a in enumerate(values) for b in values[i + 1 :])


def test_run_layer_search_refuses_bad_input_before_model_work(small_llama, small_gemma):
    with pytest.raises(TypeError, match="config"):
        ls.run_layer_search(small_llama, small_gemma, dataclasses.asdict(EmotionConfig(**SMALL)))
    with pytest.raises(ValueError, match="n_bands must be between 2"):
        ls.run_layer_search(small_llama, small_gemma, EmotionConfig(**SMALL), n_bands=99)
