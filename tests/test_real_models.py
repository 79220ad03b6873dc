"""Real weights (random weights hide bugs). Minutes on a CPU: marked ``slow``.

Run with ``pytest -m slow`` (``-m "not large"`` adds them to the fast suite; ``large``
ones need the 1.5B model, ~7 GB of memory).
"""

import pytest
import torch

from contrans_tl.activations import read_resid_post
from contrans_tl.concepts import mean_difference
from contrans_tl.data import emotion_scenarios, wikisplit_sentences
from contrans_tl.evals.emotion import (
    EmotionTask,
    negatives,
    refinement_prompts,
    score,
    split_scenarios,
)
from contrans_tl.maps import fit_residual_map
from contrans_tl.models import load_model
from contrans_tl.sites import resid_post_name
from contrans_tl.steering import generate, make_steering

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m")


def test_batched_reads_equal_run_with_cache_on_gemma(gemma):
    texts = wikisplit_sentences(6)
    reads = read_resid_post(gemma, texts, [3, 17], positions="all", batch_size=6)
    for i, text in enumerate(texts):
        ids = torch.tensor([gemma.tokenizer(text)["input_ids"]])
        _, cache = gemma.run_with_cache(ids, names_filter=[resid_post_name(3), resid_post_name(17)])
        for k in (3, 17):
            want = cache[resid_post_name(k)][0][reads.token_index[reads.text_index == i]]
            got = reads.states[k][reads.text_index == i]
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, atol=2e-4 * scale, rtol=0)


def test_cached_and_uncached_steered_generation_agree_on_smollm(smol):
    v = mean_difference(smol, ["I love this, it is wonderful."], ["I hate this, it is awful."])
    s = make_steering(smol, v, 0.5, layers=range(10, 20))
    prompts = ["My day was", "The weather today is very"]
    a = generate(smol, prompts, max_new_tokens=8, intervention=s, use_cache=True, decode=False)
    b = generate(smol, prompts, max_new_tokens=8, intervention=s, use_cache=False, decode=False)
    assert a == b
    assert a != generate(smol, prompts, max_new_tokens=8, decode=False)


def test_transplanted_happiness_moves_gemma(smol, gemma):
    """A word-end map from SmolLM2 to Gemma carries 'happiness' over: Gemma calls other
    emotions' scenarios happy far more often than without it (validation scenarios)."""
    split = split_scenarios(emotion_scenarios())
    rmap = fit_residual_map(smol, gemma, wikisplit_sentences(300), pairing="word_ends")
    assert rmap.pairing == "word_ends" and len(rmap.layer_pairs) == 18
    deep = [rmap.metrics[t]["r2"] for t in range(9, 18)]
    assert min(deep) > 0.3, deep  # states of the two models are linearly related at all
    v = mean_difference(smol, *refinement_prompts(split, "happiness"), concept="happiness")
    v_gemma = rmap.transplant(v)
    task = EmotionTask.build(gemma, split)
    q = task.query_ids(gemma, negatives(split, "happiness", 20, "validation"))
    base = score(task.predict(gemma, q), "happiness", task.emotion_ids)
    steered = score(
        task.predict(gemma, q, intervention=make_steering(gemma, v_gemma, 1.0)),
        "happiness",
        task.emotion_ids,
    )
    assert base["token_acc"] <= 0.2
    assert steered["token_acc"] >= base["token_acc"] + 0.4, (base, steered)


def test_prefix_cache_reuse_equals_recompute_on_gemma(gemma):
    """Gemma 3 mixes sliding-window and global layers; the prefilled cache must still match."""
    split = split_scenarios(emotion_scenarios())
    task = EmotionTask.build(gemma, split)
    q = task.query_ids(gemma, negatives(split, "fear", 4, "validation"))
    fast = task.predict(gemma, q, batch_size=2)
    slow = task.predict(gemma, q, batch_size=2, reuse_prefix=False)
    torch.testing.assert_close(fast.emotion_logits, slow.emotion_logits, atol=2e-3, rtol=1e-4)
    assert torch.equal(fast.top_token, slow.top_token)
