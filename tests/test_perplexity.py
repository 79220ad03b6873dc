"""Perplexity against a hand computation, batched = unbatched, steering, held-out text."""

import pytest
import torch

from contrans_tl.concepts import ConceptVector
from contrans_tl.data import wikisplit_sentences
from contrans_tl.evals.perplexity import heldout_wikisplit, perplexity
from contrans_tl.models import model_provenance
from contrans_tl.sites import resid_post_name
from contrans_tl.steering import make_steering

TEXTS = [
    "The cat sat on the mat.",
    "It was built in 1890 and later rebuilt after a fire destroyed the east wing of it.",
    "Rain.",
    "He moved to Paris , where he studied painting .",
]


def _vector(model, layers=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = tuple(range(model.cfg.n_layers)) if layers is None else tuple(layers)
    v = torch.randn(len(layers), model.cfg.d_model, generator=g)
    return ConceptVector(v, layers, model_provenance(model), "x")


def _by_hand(model, texts, max_length=128):
    nll, n = 0.0, 0
    for t in texts:
        ids = model.tokenizer(t)["input_ids"][:max_length]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))
        lp = torch.log_softmax(logits[0].float(), -1)
        nll -= sum(float(lp[j - 1, ids[j]]) for j in range(1, len(ids)))
        n += len(ids) - 1
    return nll, n


@pytest.mark.parametrize("model_name", ["small_llama", "small_gemma"])
def test_perplexity_matches_hand_computation(model_name, request):
    model = request.getfixturevalue(model_name)
    nll, n = _by_hand(model, TEXTS)
    res = perplexity(model, TEXTS, batch_size=1)
    assert res["n_tokens"] == n and res["n_texts"] == len(TEXTS)
    assert res["nll_sum"] == pytest.approx(nll, abs=1e-3)
    assert res["ppl"] == pytest.approx(float(torch.tensor(nll / n).exp()), rel=1e-5)
    assert res["per_text_tokens"] == [len(model.tokenizer(t)["input_ids"]) - 1 for t in TEXTS]
    assert sum(res["per_text_nll"]) == pytest.approx(res["nll_sum"])
    bos = model.tokenizer.bos_token_id
    if model.tokenizer(TEXTS[0])["input_ids"][0] == bos:  # BOS is never a target
        assert n == sum(
            len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS
        )


@pytest.mark.parametrize("model_name", ["small_llama", "small_gemma"])
def test_batched_equals_unbatched_under_left_padding(model_name, request):
    model = request.getfixturevalue(model_name)
    one = perplexity(model, TEXTS, batch_size=1)
    four = perplexity(model, TEXTS, batch_size=4)
    assert four["n_tokens"] == one["n_tokens"]
    assert four["per_text_nll"] == pytest.approx(one["per_text_nll"], abs=1e-3)
    assert four["ppl"] == pytest.approx(one["ppl"], rel=1e-5)


def test_truncation(small_llama):
    res = perplexity(small_llama, TEXTS, max_length=6)
    lens = [min(len(small_llama.tokenizer(t)["input_ids"]), 6) - 1 for t in TEXTS]
    assert res["per_text_tokens"] == lens
    nll, n = _by_hand(small_llama, TEXTS, max_length=6)
    assert res["nll_sum"] == pytest.approx(nll, abs=1e-3) and res["n_tokens"] == n


def test_steering_changes_ppl_deterministically(small_gemma):
    model = small_gemma
    steering = make_steering(model, _vector(model), alpha=2.0)
    base = perplexity(model, TEXTS)
    a = perplexity(model, TEXTS, intervention=steering, batch_size=4)
    b = perplexity(model, TEXTS, intervention=steering, batch_size=4)
    assert not steering.attached
    assert a["ppl"] == b["ppl"] and a["ppl"] != pytest.approx(base["ppl"], rel=1e-3)
    with steering:
        nll, n = _by_hand(model, TEXTS)
        c = perplexity(model, TEXTS, intervention=steering, batch_size=1)
        assert steering.attached
    assert a["nll_sum"] == pytest.approx(nll, abs=1e-3) and a["n_tokens"] == n
    assert c["per_text_nll"] == pytest.approx(a["per_text_nll"], abs=1e-3)


def test_padding_is_never_steered(small_llama):
    model = small_llama
    vec = _vector(model, layers=[0], seed=5)
    steering = make_steering(model, vec, alpha=3.0)
    runs = {}
    for name, s in (("plain", None), ("steered", steering)):
        store: list = []

        def hook(resid, *, hook, store=store):
            store.append(resid.detach().clone())

        if s is not None:
            s.attach()  # before the capture hook: the capture sees the steered stream
        try:
            with model.hooks(fwd_hooks=[(resid_post_name(0), hook)]):
                perplexity(model, TEXTS, intervention=s, batch_size=4)
        finally:
            if s is not None:
                s.remove()
        runs[name] = store[0]
    diff = runs["steered"] - runs["plain"]
    lens = sorted((len(model.tokenizer(t)["input_ids"]) for t in TEXTS), reverse=True)
    width = diff.shape[1]
    real = torch.arange(width)[None, :] >= (width - torch.tensor(lens))[:, None]
    assert bool((~real).any())
    torch.testing.assert_close(diff[real], (3.0 * vec[0]).expand(int(real.sum()), -1))
    assert float(diff[~real].abs().max()) == 0.0


def test_errors(small_llama):
    with pytest.raises(TypeError, match="one str"):
        perplexity(small_llama, "The cat.")
    with pytest.raises(ValueError, match="empty"):
        perplexity(small_llama, ["The cat.", "  "])
    with pytest.raises(ValueError, match="no texts"):
        perplexity(small_llama, [])
    with pytest.raises(ValueError, match="max_length"):
        perplexity(small_llama, ["The cat."], max_length=1)


def test_heldout_never_intersects_exclude():
    fit = set(wikisplit_sentences(subset="random2000_seed0"))
    first = wikisplit_sentences(subset="first2000")
    assert len(fit & set(first)) == 796  # why exclusion matters
    held = heldout_wikisplit(200)
    assert len(held) == 200 == len(set(held)) and not set(held) & fit
    assert held == [s for s in dict.fromkeys(first) if s not in fit][:200]  # file order
    everything = heldout_wikisplit(50, exclude=())
    assert everything == list(dict.fromkeys(first))[:50]
    mine = first[:30]
    held2 = heldout_wikisplit(100, exclude=mine)
    assert not set(held2) & set(mine) and held2[0] == first[30]
    with pytest.raises(ValueError, match="remain"):
        heldout_wikisplit(5000)
    with pytest.raises(TypeError):
        heldout_wikisplit(10, exclude="a sentence")
