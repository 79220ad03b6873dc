"""The DAPA experiment's pipeline on tiny models: stored steps, splits, paired test, and a
planted module that ddmin must find."""

import copy

import pytest
import torch
from scipy.stats import binomtest

from contrans_tl.dapa import ModuleTransplant
from contrans_tl.evals.refusal import first_token_refusal_scores, refusal_token_ids
from contrans_tl.pipelines.configs import DapaConfig
from contrans_tl.pipelines.dapa import (
    StepStore,
    check_proxy,
    dapa_data,
    mcnemar,
    measure_arm,
    projection_candidates,
    proxy_dsr,
    run_ddmin,
    run_ddmin_projections,
)
from tests.conftest import tiny_llama

CHAT = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
)
SMALL = DapaConfig(
    n_test=6, n_benign=4, n_ppl=3, n_mc1=3, max_new_tokens=3, batch_size=4, n_map_texts=4
)


def test_mcnemar_matches_an_exact_binomial_test():
    ref = [True] * 10 + [False] * 10 + [True] * 3 + [False] * 7
    other = [True] * 10 + [False] * 10 + [False] * 3 + [True] * 7
    got = mcnemar(ref, other)
    assert (got["gained"], got["lost"]) == (7, 3)
    assert got["p"] == pytest.approx(binomtest(3, 10, 0.5).pvalue)
    assert mcnemar([True], [True]) == {"gained": 0, "lost": 0, "p": 1.0}
    with pytest.raises(ValueError, match="one length"):
        mcnemar([True], [True, False])


def test_step_store_reuses_only_matching_inputs(tmp_path):
    store = StepStore(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"x": [1.5, 2]}

    assert store.get_or_compute("s", {"a": 1}, compute) == {"x": [1.5, 2]}
    assert store.get_or_compute("s", {"a": 1}, compute) == {"x": [1.5, 2]}
    assert len(calls) == 1
    store.get_or_compute("s", {"a": 2}, compute)
    assert len(calls) == 2
    assert store.get("s", {"a": 1}) is None and store.get("s", {"a": 2}) == {"x": [1.5, 2]}


def test_dapa_data_parts_are_disjoint():
    data = dapa_data(DapaConfig())
    harmful = [data.search, data.validation, data.test, [q for q, _ in data.finetune]]
    assert [len(p) for p in harmful] == [128, 100, 160, 100]
    flat = [x for p in harmful for x in p]
    assert len(set(flat)) == len(flat)
    assert not set(data.test_rows) & set(data.finetune_rows)
    from contrans_tl.evals.truthfulqa import load_truthfulqa

    qs = load_truthfulqa()
    mc1 = {qs[i].question for i in data.mc1_indices}
    benign = [set(data.benign), set(data.benign_validation), set(data.harmless), mc1]
    assert sum(len(b) for b in benign) == len(set().union(*benign))
    assert not set(data.ppl) & set(data.map_texts)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_test": 193}, "192"),
        ({"ddmin_tolerance": 1.0}, "tolerance"),
        ({"search_kinds": ("mlp", "ffn")}, "search_kinds"),
        ({"contrans_alphas": ()}, "alphas"),
    ],
)
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DapaConfig(**kwargs)


@pytest.fixture(scope="module")
def pair(byte_tokenizer):
    """A tiny chat recipient, and a donor equal to it except for layer 1's MLP, which
    writes the unembedding direction of a refusal-opening token on every input.

    In the donor, 8 hidden units of layer 1 get equal gate and up rows, so each unit's
    activation silu(z)·z = z²·sigmoid(z) is never negative; their down-projection columns
    write that token's unembedding direction. In both models the token's unembedding row is
    scaled up, so the planted direction can make it the likely first token."""
    recipient = tiny_llama(copy.deepcopy(byte_tokenizer), d_model=40, n_layers=3, seed=2, name="r")
    donor = tiny_llama(copy.deepcopy(byte_tokenizer), d_model=40, n_layers=3, seed=2, name="d")
    tok = refusal_token_ids(recipient)[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (recipient, donor):
            model.tokenizer.chat_template = CHAT
            model.original_model.lm_head.weight[tok] *= 40
        hf = donor.original_model
        u = hf.lm_head.weight[tok] / hf.lm_head.weight[tok].norm()
        mlp = hf.model.layers[1].mlp
        for j in range(8):
            w = torch.randn(40, generator=g)
            mlp.gate_proj.weight[j] = 3 * w / w.norm()
            mlp.up_proj.weight[j] = 3 * w / w.norm()
            mlp.down_proj.weight[:, j] = 3 * u
    return recipient, donor


def test_planted_module_is_what_ddmin_keeps(pair, tmp_path):
    recipient, donor = pair
    data = dapa_data(SMALL)
    swap_all = ModuleTransplant(recipient, donor, ["mlp@0", "mlp@1", "mlp@2"])
    base = proxy_dsr(first_token_refusal_scores(recipient, data.validation))
    full = proxy_dsr(first_token_refusal_scores(recipient, data.validation, intervention=swap_all))
    assert full > base + 0.5  # the plant works: refusals appear with the donor's MLPs
    found = run_ddmin(recipient, donor, data, SMALL, tmp_path, {"test": 1})
    assert found["full_proxy_dsr"] == pytest.approx(full)
    assert found["stage1"]["minimal"] == found["minimal"] == ["mlp@1"]
    fine = run_ddmin_projections(recipient, donor, data, SMALL, tmp_path, {"test": 1}, found)
    assert fine["candidates"] == ["gate@1", "up@1", "down@1"]
    minimal = fine["minimal"]
    assert "down@1" in minimal and set(minimal) <= {"gate@1", "up@1", "down@1"}

    def direct(modules):  # full passes, not the resumed ones ddmin used
        swap = ModuleTransplant(recipient, donor, modules)
        return proxy_dsr(first_token_refusal_scores(recipient, data.validation, intervention=swap))

    assert direct(minimal) >= found["threshold"]
    for m in minimal:  # 1-minimal
        rest = [x for x in minimal if x != m]
        assert not rest or direct(rest) < found["threshold"]
    again = run_ddmin(recipient, donor, data, SMALL, tmp_path, {"test": 1})
    fine_again = run_ddmin_projections(recipient, donor, data, SMALL, tmp_path, {"test": 1}, again)
    assert again["stage1"]["n_tests_run"] == 0 and fine_again["stage2"]["n_tests_run"] == 0
    assert fine_again["minimal"] == minimal


def test_projection_candidates_split_only_the_named_kinds():
    modules = ["attn@6", "mlp@6", "mlp@10"]
    assert projection_candidates(modules, ["mlp"]) == [
        "attn@6",
        "gate@6",
        "up@6",
        "down@6",
        "gate@10",
        "up@10",
        "down@10",
    ]
    assert projection_candidates(modules, ["attn"]) == ["q@6", "k@6", "v@6", "o@6", *modules[1:]]
    assert projection_candidates(modules, []) == modules


def test_measure_arm_and_proxy_check_are_consistent(pair):
    recipient, donor = pair
    data = dapa_data(SMALL)
    swap = ModuleTransplant(recipient, donor, ["mlp@1"])
    arm = measure_arm(recipient, swap, data, SMALL)
    assert arm["n_test"] == 6 and len(arm["refused"]) == 6 and len(arm["openings"]) == 6
    assert arm["dsr"] == sum(arm["refused"]) / 6
    assert 0 < arm["fraction_of_parameters"] < 0.2
    assert len(arm["mc1_correct"]) == 3 and arm["ppl"] > 1
    check = check_proxy({"recipient": (recipient, None), "planted": (recipient, swap)}, data, SMALL)
    for name in ("recipient", "planted"):
        row = check[name]
        pred = [s > 0 for s in row["scores"]]
        assert row["agreement"] == sum(p == g for p, g in zip(pred, row["refused"])) / len(pred)
    assert check["planted"]["dsr_proxy"] > check["recipient"]["dsr_proxy"]


def test_step_only_settings_leave_the_shared_inputs_alone():
    from contrans_tl.pipelines.dapa import config_json

    base = config_json(DapaConfig())
    assert config_json(DapaConfig(n_random=3, ddmin_tolerance=0.1)) == base
    assert config_json(DapaConfig(n_test=150)) != base
    assert config_json(DapaConfig(), keep=("n_random",))["n_random"] == 1


def test_report_rows_come_from_the_stored_arms(tmp_path):
    from contrans_tl.io import write_json
    from contrans_tl.pipelines.dapa import render_report

    def row(refused, frac):
        return {
            "result": {
                "dsr": sum(refused) / len(refused),
                "dsr_ci95": [0.1, 0.9],
                "over_refusal": 0.05,
                "ppl": 12.5,
                "mc1": 0.3,
                "fraction_of_parameters": frac,
                "refused": refused,
                "n_test": len(refused),
                "n_benign": 20,
            }
        }

    write_json(tmp_path / "arm_donor.json", row([True] * 8 + [False] * 2, 0.0))
    write_json(tmp_path / "arm_recipient.json", row([False] * 9 + [True], 0.0))
    write_json(tmp_path / "arm_ddmin.json", row([True] * 6 + [False] * 3 + [True], 0.04))
    write_json(tmp_path / "arm_ddmin_proj.json", row([True] * 8 + [False] * 2, 0.2))
    write_json(
        tmp_path / "refusal_labels.json",
        {
            "items": [
                {"response": "I'm sorry, I can't", "refusal": True},
                {"response": "Sure, here is", "refusal": False},
            ]
        },
    )
    value = {  # the shape refusal_value returns: train_value_function's report + means
        "n_rollouts": 40,
        "mean_reward_recipient_written": -0.5,
        "mean_reward_donor_written": 0.75,
        "held_out": {"corr_first_state": 0.3},
    }
    write_json(tmp_path / "recontrol_value.json", {"result": value})
    timing = {"recipient": {"seconds_per_token": 0.012}, "recontrol": {"seconds_per_token": 0.02}}
    write_json(tmp_path / "timing.json", {"result": timing})
    text = "\n".join(render_report(tmp_path))
    assert (
        "the donor's 0.75; held-out correlation of the first state's value with the reward 0.30"
        in text
    )
    assert "(fastest of two rounds): recipient 12.0 ms, recontrol 20.0 ms." in text
    assert (
        "| DAPA: ddmin-minimal set of modules (stage 1) | 70.0% (10–90) | +6/−0, p=0.031 |" in text
    )
    # restored (0.7 - 0.1) / (0.8 - 0.1) = 86% of what the fine-tune removed
    assert "met: restores ≥ 80% of the DSR the fine-tune removed: 86%" in text
    stage2 = text.split("Goal (issue 15) for the ddmin-minimal set of projections (stage 2):")[1]
    assert "met: restores ≥ 80% of the DSR the fine-tune removed: 100%" in stage2
    assert "**not met**: changes ≤ 10% of the parameters: 20.00%" in stage2
    assert "Cohen's κ 1.000" in text and "Not run yet" in text


def test_a_rebuilt_recipient_counts_as_the_reference_only_when_its_scores_match(pair, tmp_path):
    """Another build (other weight bytes) keeps the reference's sha256 in the step inputs
    if its first-token scores match within the tolerance; a different model is refused."""
    import json

    from contrans_tl.pipelines.dapa import FINGERPRINT_TOLERANCE, recipient_identity

    recipient, donor = pair
    data = dapa_data(SMALL)
    store = StepStore(tmp_path / "steps")
    folder = tmp_path / "twin"
    folder.mkdir()

    def build(sha):
        (folder / "contrans_finetune.json").write_text(json.dumps({"weights_sha256": sha}))

    build("a" * 64)
    assert recipient_identity(store, folder, recipient, data, SMALL) == "a" * 64
    ref = json.loads(store.path("recipient_builds").read_text())["reference"]
    direct = first_token_refusal_scores(recipient, data.validation[:16], batch_size=4)
    assert ref["scores"] == pytest.approx(direct.tolist(), abs=1e-5)
    build("b" * 64)  # same model, other bytes: counts as the reference, and is recorded
    assert recipient_identity(store, folder, recipient, data, SMALL) == "a" * 64
    others = json.loads(store.path("recipient_builds").read_text())["others"]
    assert [o["weights_sha256"] for o in others] == ["b" * 64]
    assert others[0]["max_abs_score_difference"] < FINGERPRINT_TOLERANCE
    build("c" * 64)  # the donor differs in layer 1's MLP: another recipient
    with pytest.raises(ValueError, match="another recipient"):
        recipient_identity(store, folder, donor, data, SMALL)


def test_step_inputs_match_up_to_float_rounding(tmp_path):
    """A recomputed vector's norms differ in their last digits between CPUs: the same
    input; a real change of a float, or of an int or string, is not."""
    from contrans_tl.pipelines.steps import same_inputs

    store = StepStore(tmp_path)
    store.get_or_compute("s", {"norms": [1.2345678, 3.0], "n": 4}, lambda: {"ok": 1})
    assert store.get("s", {"norms": [1.2345679, 3.0000001], "n": 4}) == {"ok": 1}
    assert store.get("s", {"norms": [1.2365678, 3.0], "n": 4}) is None
    assert store.get("s", {"norms": [1.2345678, 3.0], "n": 5}) is None
    assert not same_inputs({"a": "x"}, {"a": "y"}) and not same_inputs([1.0], [1.0, 2.0])
    assert not same_inputs({"a": True}, {"a": 1.0}) and not same_inputs({"a": 1}, {"b": 1})
