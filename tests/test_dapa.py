"""DAPA: module references, transplant, resumable passes and the memory-space search."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import tiny_gemma3_hf, tiny_llama, tiny_llama_hf
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from contrans_tl.dapa import (
    KINDS,
    MemorySpace,
    ModuleTransplant,
    ResidualCache,
    all_modules,
    check_same_architecture,
    heuristic_modules,
    memory_space_search,
    module_parameters,
    n_parameters,
    parse_module,
    patch_effect,
    plot_memory_space,
    random_modules,
    set_log_odds,
)
from contrans_tl.interventions.weights import WeightSwap, donor_weights, parameter_table

VOCAB = 120
SCORE_IDS = [3, 17, 42]


def tiny_qwen2(seed: int, *, d_mlp: int = 80, n_layers: int = 4) -> Qwen2ForCausalLM:
    """A tiny random Qwen2 (48 wide, 4 heads, 2 key-value heads, q/k/v biases), with
    weights large enough that a swapped module visibly changes the output."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def prompts(n: int = 5, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 11, 5, 9, 4, 6][:n]
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def recipient() -> Qwen2ForCausalLM:
    return tiny_qwen2(0)


@pytest.fixture(scope="module")
def donor() -> Qwen2ForCausalLM:
    return tiny_qwen2(1)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bitwise(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n


def unbatched(model: torch.nn.Module, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own full pass on one prompt: final hidden state and logits, last token."""
    with torch.no_grad():
        out = model(torch.tensor([seq]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1], out.logits[0, -1]


# ---------------------------------------------------------------------------------------------
# Module references
# ---------------------------------------------------------------------------------------------


def test_parse_module_and_errors() -> None:
    assert parse_module("gate@12", 24) == ("gate", 12)
    assert parse_module(" mlp @ 0 ") == ("mlp", 0)
    with pytest.raises(ValueError, match="unknown kind 'ffn'.*valid kinds: q, k, v, o, attn"):
        parse_module("ffn@3")
    with pytest.raises(ValueError, match=r"layer 4 out of range; valid layers: 0\.\.3"):
        parse_module("gate@4", 4)
    with pytest.raises(ValueError, match="not of the form '<kind>@<layer>'"):
        parse_module("gate12")
    with pytest.raises(ValueError, match="out of range"):
        parse_module("gate@-1")


def test_module_parameters_qwen2(recipient) -> None:
    table = parameter_table(recipient)
    q = module_parameters(recipient, "q@2")
    assert q == ["model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.bias"]
    assert module_parameters(recipient, "o@2") == ["model.layers.2.self_attn.o_proj.weight"]
    attn = module_parameters(recipient, "attn@1")
    assert len(attn) == 7 and all(n in table for n in attn)
    mlp = module_parameters(recipient, "mlp@3")
    assert mlp == [f"model.layers.3.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert tuple(table[mlp[0]].shape) == (80, 48)
    with pytest.raises(ValueError, match=r"valid layers: 0\.\.3"):
        module_parameters(recipient, "gate@4")


def test_module_parameters_llama_and_bridge(byte_tokenizer) -> None:
    hf = tiny_llama_hf(byte_tokenizer, seed=0)
    assert module_parameters(hf, "attn@0") == [
        f"model.layers.0.self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")
    ]
    bridge = tiny_llama(byte_tokenizer, seed=0, name="dapa-llama")
    assert module_parameters(bridge, "mlp@2") == module_parameters(hf, "mlp@2")


def test_other_layout_is_refused_with_what_it_has() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"Llama/Qwen2/Gemma layout.*transformer\.h\.0\.ln_1"):
        module_parameters(gpt2, "gate@0")


def test_all_modules_heuristic_and_counts(recipient) -> None:
    assert all_modules(recipient, ("gate", "attn"), layers=[0, 1]) == [
        "gate@0",
        "attn@0",
        "gate@1",
        "attn@1",
    ]
    assert len(all_modules(recipient, KINDS)) == len(KINDS) * 4
    with pytest.raises(ValueError, match="unknown module kind.*valid kinds"):
        all_modules(recipient, ("gates",))
    assert heuristic_modules(24) == [f"gate@{i}" for i in range(8, 16)]
    assert heuristic_modules(3) == ["gate@1"]
    assert heuristic_modules(4) == ["gate@1"]
    assert heuristic_modules(6) == ["gate@2", "gate@3"]
    with pytest.raises(ValueError, match="n_layers >= 3"):
        heuristic_modules(2)
    table = parameter_table(recipient)
    direct = sum(
        table[n].numel()
        for n in table
        if ".layers.1.self_attn." in n and "_proj" in n or ".layers.2.mlp.gate_proj" in n
    )
    assert n_parameters(recipient, ["attn@1", "gate@2"]) == direct
    assert n_parameters(recipient, ["attn@1", "q@1", "gate@2"]) == direct  # q@1 counted once
    assert n_parameters(recipient, ["gate@0"]) == 80 * 48


def test_random_modules(recipient) -> None:
    heur = heuristic_modules(4)  # gate@1
    cands = [m for m in all_modules(recipient, ("gate", "up", "down")) if m not in heur]
    target = 3 * 80 * 48
    a = random_modules(cands, recipient, target, seed=3)
    assert len(a) == 3 and n_parameters(recipient, a) == target
    assert set(a) <= set(cands)
    assert random_modules(cands, recipient, target, seed=3) == a
    others = {tuple(random_modules(cands, recipient, target, seed=s)) for s in range(8)}
    assert len(others) > 1
    # mixed sizes: never above, and nothing unchosen would still fit
    mixed = all_modules(recipient, ("q", "k", "v", "o", "gate", "up", "down"))
    budget = 10_000
    chosen = random_modules(mixed, recipient, budget, seed=0)
    total = n_parameters(recipient, chosen)
    assert total <= budget
    for m in set(mixed) - set(chosen):
        assert total + n_parameters(recipient, [m]) > budget
    # impossible: the one smallest module
    tiny = random_modules(["gate@0", "k@2"], recipient, 10, seed=0)
    assert tiny == ["k@2"]
    assert random_modules(cands, recipient, 10**9) == sorted(
        cands, key=lambda m: (int(m.split("@")[1]), KINDS.index(m.split("@")[0]))
    )
    with pytest.raises(ValueError, match="share parameter"):
        random_modules(["attn@0", "q@0"], recipient, 1000)


# ---------------------------------------------------------------------------------------------
# Transplant
# ---------------------------------------------------------------------------------------------


def test_transplant_swaps_and_restores_bit_for_bit(recipient, donor) -> None:
    saved = snapshot(recipient)
    modules = ["attn@1", "gate@2"]
    names = module_parameters(recipient, "attn@1") + module_parameters(recipient, "gate@2")
    dapa = ModuleTransplant(recipient, donor, modules)
    r_table, d_table = parameter_table(recipient), parameter_table(donor)
    with dapa:
        for n in names:
            assert torch.equal(r_table[n], d_table[n]), n
        untouched = "model.layers.2.mlp.up_proj.weight"
        assert torch.equal(r_table[untouched], saved[untouched])
    assert_bitwise(recipient, saved)
    with pytest.raises(RuntimeError, match="boom"), dapa:
        assert torch.equal(r_table[names[0]], d_table[names[0]])
        raise RuntimeError("boom")
    assert_bitwise(recipient, saved)


def test_describe_fraction_is_a_direct_count(recipient, donor) -> None:
    modules = ["gate@1", "q@3"]
    d = ModuleTransplant(recipient, donor, modules).describe()
    changed = 80 * 48 + (48 * 48 + 48)
    total = sum(p.numel() for p in recipient.parameters())
    assert d["kind"] == "ModuleTransplant"
    assert d["modules"] == ["gate@1", "q@3"] and d["n_modules"] == 2
    assert d["n_parameters_changed"] == changed
    assert d["fraction_of_parameters"] == pytest.approx(changed / total, rel=1e-12)
    json.dumps(d)


def test_transplant_between_bridge_and_hf(byte_tokenizer) -> None:
    bridge = tiny_llama(byte_tokenizer, seed=0, name="dapa-recipient")
    hf_donor = tiny_llama_hf(byte_tokenizer, seed=5)
    saved = {n: p.detach().clone() for n, p in parameter_table(bridge).items()}
    name = "model.layers.1.mlp.gate_proj.weight"
    with ModuleTransplant(bridge, hf_donor, ["gate@1"]):
        assert torch.equal(parameter_table(bridge)[name], parameter_table(hf_donor)[name])
    for n, p in parameter_table(bridge).items():
        assert torch.equal(p, saved[n]), n


def test_mismatched_architectures_are_refused(recipient) -> None:
    with pytest.raises(
        ValueError, match=r"config\.intermediate_size \(d_mlp\): 80 in the recipient, 96"
    ):
        ModuleTransplant(recipient, tiny_qwen2(1, d_mlp=96), ["gate@0"])
    with pytest.raises(ValueError, match=r"num_hidden_layers \(n_layers\)"):
        check_same_architecture(recipient, tiny_qwen2(1, n_layers=3))
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="Qwen2ForCausalLM vs LlamaForCausalLM"):
        ModuleTransplant(recipient, llama, ["gate@0"])
    with pytest.raises(ValueError, match="at least one module"):
        ModuleTransplant(recipient, recipient, [])


# ---------------------------------------------------------------------------------------------
# Resumable passes
# ---------------------------------------------------------------------------------------------


def test_set_log_odds() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 0.5, 3.0]])
    p = torch.softmax(logits, -1)[:, [0, 2]].sum(-1)
    expected = torch.log(p) - torch.log1p(-p)
    assert torch.allclose(set_log_odds(logits, [2, 0]), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"out of range; valid ids: 0\.\.3"):
        set_log_odds(logits, [4])
    with pytest.raises(ValueError, match="whole vocabulary"):
        set_log_odds(logits, [0, 1, 2, 3])


@pytest.mark.parametrize("module", ["q@0", "attn@1", "gate@2", "down@3", "mlp@0", "o@3", "v@2"])
def test_resume_equals_a_full_pass_with_the_swap(recipient, donor, module) -> None:
    seqs = prompts(5)
    cache = ResidualCache(recipient, seqs, score_token_ids=SCORE_IDS, batch_size=3)
    layer = parse_module(module)[1]
    layers_before = list(recipient.model.layers)
    swap = WeightSwap(recipient, donor_weights(donor, module_parameters(recipient, module)))
    with swap:
        resumed = cache.resume(layer)
        for i, seq in enumerate(seqs):
            hidden, logits = unbatched(recipient, seq)
            assert torch.allclose(resumed.hidden[i], hidden, atol=1e-5), (module, i)
            score = set_log_odds(logits[None], SCORE_IDS)[0]
            assert torch.allclose(resumed.score[i], score, atol=1e-4), (module, i)
    assert list(recipient.model.layers) == layers_before
    # not vacuous: the swap changed the output
    assert (resumed.hidden - cache.base.hidden).norm(dim=-1).min() > 1e-3
    for i, seq in enumerate(seqs):  # and the base pass is the model's own
        hidden, _ = unbatched(recipient, seq)
        assert torch.allclose(cache.base.hidden[i], hidden, atol=1e-5)


def test_resume_is_exact_on_gemma3(meta_tokenizer) -> None:
    # Gemma 3: scaled embeddings, sliding-window and global layers, soft-capped logits
    recipient, donor = (
        tiny_gemma3_hf(meta_tokenizer, seed=1),
        tiny_gemma3_hf(meta_tokenizer, seed=2),
    )
    seqs = [[1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62, 63]]
    cache = ResidualCache(recipient, seqs, score_token_ids=[7, 8], batch_size=3)
    for module in ("attn@3", "gate@1"):
        layer = parse_module(module)[1]
        with WeightSwap(recipient, donor_weights(donor, module_parameters(recipient, module))):
            resumed = cache.resume(layer)
            for i, seq in enumerate(seqs):
                hidden, logits = unbatched(recipient, seq)
                assert torch.allclose(resumed.hidden[i], hidden, atol=1e-5), (module, i)
                score = set_log_odds(logits[None], [7, 8])[0]
                assert torch.allclose(resumed.score[i], score, atol=1e-4), (module, i)
        assert (resumed.hidden - cache.base.hidden).norm(dim=-1).min() > 1e-4


def test_identical_donor_gives_exactly_zero(recipient) -> None:
    twin = copy.deepcopy(recipient)
    space = memory_space_search(
        recipient, twin, prompts(5), score_token_ids=SCORE_IDS, batch_size=2
    )
    assert space.hidden_effect.shape == (5, 4)
    assert np.all(space.hidden_effect == 0.0)
    assert np.all(space.score_effect == 0.0)
    assert space.donor_score == space.base_score


def test_batched_effects_equal_unbatched(recipient, donor) -> None:
    seqs = prompts(7, seed=2)
    batched = ResidualCache(recipient, seqs, score_token_ids=SCORE_IDS, batch_size=4)
    single = ResidualCache(recipient, seqs, score_token_ids=SCORE_IDS, batch_size=1)
    saved = snapshot(recipient)
    for module in ("attn@0", "up@2", "mlp@3"):
        a, b = patch_effect(batched, donor, module), patch_effect(single, donor, module)
        assert a.hidden.shape == (7,)
        assert a.hidden.min() > 1e-3
        assert torch.allclose(a.hidden, b.hidden, atol=1e-5), module
        assert torch.allclose(a.score, b.score, atol=1e-4), module
    assert_bitwise(recipient, saved)


def test_memory_space_search_json_and_plot(recipient, donor, tmp_path) -> None:
    space = memory_space_search(
        recipient,
        donor,
        prompts(4),
        score_token_ids=SCORE_IDS,
        kinds=("attn", "gate"),
        layers=[1, 3],
        batch_size=4,
    )
    assert space.kinds == ("attn", "gate") and space.layers == (1, 3)
    assert space.n_prompts == 4 and space.score_token_ids == tuple(SCORE_IDS)
    assert np.all(space.hidden_effect > 0)
    # each cell is patch_effect's mean
    cache = ResidualCache(recipient, prompts(4), score_token_ids=SCORE_IDS)
    e = patch_effect(cache, donor, "gate@3")
    assert space.hidden_effect[1, 1] == pytest.approx(float(e.hidden.mean()), abs=1e-6)
    assert space.score_effect[1, 1] == pytest.approx(float(e.score.mean()), abs=1e-5)
    assert space.base_score == pytest.approx(float(cache.base.score.mean()), abs=1e-6)
    assert space.donor_score == pytest.approx(float(cache.full_pass(donor).score.mean()), abs=1e-6)
    data = json.loads(json.dumps(space.to_json()))
    assert MemorySpace.from_json(data) == space
    assert space.ranked("hidden_effect")[0][1] == space.hidden_effect.max()
    path = plot_memory_space(space, tmp_path / "space.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="lacks"):
        MemorySpace.from_json({"kinds": ["gate"]})
    with pytest.raises(ValueError, match=r"valid layers: 0\.\.3"):
        memory_space_search(recipient, donor, prompts(2), score_token_ids=SCORE_IDS, layers=[4])


def test_bridge_and_texts_match_plain_hf(byte_tokenizer) -> None:
    texts = ["The cat sat on the mat.", "Hello", "A longer sentence about the weather today."]
    kw = {"score_token_ids": [5, 9], "kinds": ("mlp", "q"), "layers": [0, 2]}
    plain = memory_space_search(
        tiny_llama_hf(byte_tokenizer, seed=0),
        tiny_llama_hf(byte_tokenizer, seed=4),
        texts,
        tokenizer=byte_tokenizer,
        **kw,
    )
    bridge = tiny_llama(byte_tokenizer, seed=0, name="dapa-r")
    bridged = memory_space_search(
        bridge,
        tiny_llama(byte_tokenizer, seed=4, name="dapa-d"),
        texts,
        tokenizer=byte_tokenizer,
        **kw,
    )
    assert np.allclose(plain.hidden_effect, bridged.hidden_effect, atol=1e-5)
    assert np.allclose(plain.score_effect, bridged.score_effect, atol=1e-5)
    assert plain.base_score == pytest.approx(bridged.base_score, abs=1e-5)
    assert np.all(plain.hidden_effect > 0)
    # without tokenizer=, texts are tokenized by the model's own tokenizer
    own = ResidualCache(bridge, texts, score_token_ids=[5, 9])
    expected = [bridge.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [s[-len(e) :] for s, e in zip(own.sequences, expected)] == expected


def test_bad_prompts_are_refused(recipient) -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        ResidualCache(recipient, [], score_token_ids=SCORE_IDS)
    with pytest.raises(ValueError, match="no tokens"):
        ResidualCache(recipient, [[1, 2], []], score_token_ids=SCORE_IDS)
    with pytest.raises(ValueError, match=r"score_token_ids \[500\] out of range"):
        ResidualCache(recipient, [[1, 2]], score_token_ids=[500])
