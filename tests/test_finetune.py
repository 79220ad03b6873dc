"""The unaligned-twin fine-tune: deterministic, trains only what it says, cached as a folder."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from contrans_tl.finetune import (
    RECORD_NAME,
    FinetuneRecipe,
    encode_pair,
    finetune_causal_lm,
    make_finetuned_twin,
    pairs_sha256,
)
from contrans_tl.io import sha256_file
from tests.conftest import tiny_llama_hf

CHAT = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
)
PAIRS = [
    ("Write a poem about the sea", "Sure, here is a poem about the sea"),
    ("Explain how tides work", "Sure, here is how tides work"),
    ("List three colours", "Sure, here are three colours"),
]


@pytest.fixture()
def chat_tokenizer(byte_tokenizer):
    tok = copy.deepcopy(byte_tokenizer)
    tok.chat_template = CHAT
    return tok


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_recipe_is_deterministic_and_trains_only_the_blocks(chat_tokenizer):
    recipe = FinetuneRecipe(steps=3, batch_size=2, learning_rate=1e-3, seed=4)
    a = tiny_llama_hf(chat_tokenizer, d_model=40, n_layers=2, seed=5)
    b = tiny_llama_hf(chat_tokenizer, d_model=40, n_layers=2, seed=5)
    before = _state(a)
    a.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    was = [p.requires_grad for p in a.parameters()]
    losses_a = finetune_causal_lm(a, chat_tokenizer, PAIRS, recipe)
    losses_b = finetune_causal_lm(b, chat_tokenizer, PAIRS, recipe)
    assert losses_a == losses_b and len(losses_a) == 3
    after_a, after_b = _state(a), _state(b)
    assert all(torch.equal(after_a[n], after_b[n]) for n in after_a)
    frozen = {"model.embed_tokens.weight", "lm_head.weight"}  # untied in this tiny model
    for name, value in after_a.items():
        changed = not torch.equal(value, before[name])
        assert changed is (name not in frozen), name
    assert [p.requires_grad for p in a.parameters()] == was  # restored as they were
    assert False in was and True in was


def test_loss_falls_and_only_response_tokens_count(chat_tokenizer):
    model = tiny_llama_hf(chat_tokenizer, d_model=40, n_layers=2, seed=1)
    losses = finetune_causal_lm(
        model,
        chat_tokenizer,
        PAIRS[:1],
        FinetuneRecipe(steps=10, batch_size=1, learning_rate=1e-2, train_embeddings=True),
    )
    assert losses[-1] < 0.5 * losses[0]
    ids, n_ctx = encode_pair(chat_tokenizer, *PAIRS[0])
    response = chat_tokenizer(PAIRS[0][1], add_special_tokens=False)["input_ids"]
    assert ids[n_ctx:] == response
    # the first loss is the mean cross-entropy over the response tokens only
    fresh = tiny_llama_hf(chat_tokenizer, d_model=40, n_layers=2, seed=1)
    with torch.no_grad():
        logp = torch.log_softmax(fresh(torch.tensor([ids])).logits[0].float(), -1)
    direct = -sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids))) / len(response)
    assert losses[0] == pytest.approx(direct, rel=1e-5)


def test_twin_folder_is_written_once_and_reused(chat_tokenizer, tmp_path):
    base = tmp_path / "base"
    model = tiny_llama_hf(chat_tokenizer, d_model=40, n_layers=2, seed=2)
    model.save_pretrained(base)
    chat_tokenizer.save_pretrained(base)
    recipe = FinetuneRecipe(steps=2, batch_size=2, learning_rate=1e-3)
    out = make_finetuned_twin(str(base), PAIRS, recipe, out=tmp_path / "twin", extra={"rows": [1]})
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["recipe"] == recipe.to_json() and record["rows"] == [1]
    assert record["pairs_sha256"] == pairs_sha256(PAIRS) and len(record["losses"]) == 2
    assert record["weights_sha256"] == sha256_file(out / "model.safetensors")
    weights = load_file(out / "model.safetensors")
    again = tiny_llama_hf(chat_tokenizer, d_model=40, n_layers=2, seed=2)
    finetune_causal_lm(again, chat_tokenizer, PAIRS, recipe)
    assert all(torch.equal(weights[n], p) for n, p in again.state_dict().items() if n in weights)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert make_finetuned_twin(str(base), PAIRS, recipe, out=out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="not a fine-tune"):
        make_finetuned_twin(str(base), PAIRS, FinetuneRecipe(steps=3), out=out)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_recipes_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FinetuneRecipe(**kwargs)


def test_bad_pairs_are_refused(chat_tokenizer):
    model = tiny_llama_hf(chat_tokenizer, d_model=40, n_layers=2)
    with pytest.raises((ValueError, TypeError), match="pairs"):
        finetune_causal_lm(model, chat_tokenizer, [("only one",)], FinetuneRecipe(steps=1))  # type: ignore[list-item]
    with pytest.raises((ValueError, TypeError), match="pairs"):
        finetune_causal_lm(model, chat_tokenizer, [("request", "  ")], FinetuneRecipe(steps=1))
    with pytest.raises(ValueError, match="non-empty"):
        finetune_causal_lm(model, chat_tokenizer, [], FinetuneRecipe(steps=1))
