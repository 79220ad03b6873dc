"""RE-Control on the DAPA pair, on the planted tiny pair of the DAPA tests: the refusal
value function and the control choice."""

import dataclasses

import pytest
import torch

from contrans_tl.evals.refusal import first_token_refusal_scores
from contrans_tl.pipelines.configs import ReControlRefusalConfig
from contrans_tl.pipelines.dapa import dapa_data
from contrans_tl.pipelines.recontrol_advbench import choose_refusal_control, refusal_value
from contrans_tl.recontrol import ValueControl, load_value_function
from tests.test_dapa_pipeline import SMALL, pair  # noqa: F401  (pair is a fixture)

TINY = ReControlRefusalConfig(
    n_rollout_harmful=6,
    n_rollout_harmless=4,
    n_samples=1,
    max_new_tokens=3,
    hidden=(16,),
    epochs=3,
    step_sizes=(0.5, 4.0),
    n_choice=4,
)


def _small_data():
    data = dapa_data(SMALL)
    return dataclasses.replace(data, search=data.search[:6], harmless=data.harmless[:4])


def test_refusal_value_rewards_the_donors_writing_and_saves_a_loadable_artifact(pair, tmp_path):  # noqa: F811
    recipient, donor = pair
    data = _small_data()
    net, report = refusal_value(donor, recipient, data, TINY, tmp_path, tmp_path / "value")
    # 10 prompts: greedy + 1 sample by the recipient, greedy by the donor (empty ones dropped)
    assert 0 < report["n_rollouts"] <= 30
    # the donor writes what it likes better than the recipient does: reward > 0 on average;
    # the recipient's own writing the reverse
    assert report["mean_reward_donor_written"] > 0 > report["mean_reward_recipient_written"]
    loaded, meta = load_value_function(tmp_path / "value", recipient)
    assert meta["data"]["harmful_prompts"] == 6 and meta["data"]["harmless_prompts"] == 4
    x = torch.randn(5, 40)
    assert torch.allclose(loaded(x), net(x))
    _, report2 = refusal_value(donor, recipient, data, TINY, tmp_path, tmp_path / "v2")  # reread
    assert report2["n_rollouts"] == report["n_rollouts"]
    fewer = dataclasses.replace(TINY, n_rollout_harmful=2, n_rollout_harmless=1)
    refusal_value(donor, recipient, data, fewer, tmp_path / "few", tmp_path / "v3")
    _, meta = load_value_function(tmp_path / "v3", recipient)
    assert meta["data"]["harmful_prompts"] == 2 and meta["data"]["harmless_prompts"] == 1
    with pytest.raises(ValueError, match="there are 6 and 4"):
        refusal_value(
            donor,
            recipient,
            data,
            dataclasses.replace(TINY, n_rollout_harmful=7),
            tmp_path,
            tmp_path / "v4",
        )


def test_choice_picks_from_its_sweep_within_the_perplexity_limit(pair, tmp_path):  # noqa: F811
    recipient, donor = pair
    data = _small_data()
    net, _ = refusal_value(donor, recipient, data, TINY, tmp_path, tmp_path / "value")
    choice = choose_refusal_control(donor, recipient, net, data, TINY, SMALL)
    assert [(s["n_steps"], s["step_size"]) for s in choice["sweep"]] == [(10, 0.5), (10, 4.0)]
    ok = [s for s in choice["sweep"] if s["ppl"] <= TINY.ppl_limit * choice["base_ppl_validation"]]
    if ok:
        assert choice["pick"] == max(ok, key=lambda s: s["mean_reward"])
    else:
        assert choice["pick"] == min(choice["sweep"], key=lambda s: s["ppl"])
    # the controller acts on the first-token refusal score the DSR proxy reads
    control = ValueControl(recipient, net, n_steps=10, step_size=4.0)
    base = first_token_refusal_scores(recipient, data.validation[:4])
    steered = first_token_refusal_scores(recipient, data.validation[:4], intervention=control)
    assert not torch.allclose(base, steered)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": ()}, "steps"),
        ({"n_choice": 0}, "n_choice"),
        ({"ppl_limit": 0}, "ppl_limit"),
        ({"n_rollout_harmful": 0}, "n_rollout_harmful"),
    ],
)
def test_bad_refusal_control_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReControlRefusalConfig(**kwargs)


def test_time_arms_counts_the_generated_tokens(pair):  # noqa: F811
    from contrans_tl.evals.refusal import chat_prompts
    from contrans_tl.pipelines.recontrol_advbench import time_arms
    from contrans_tl.steering import generate

    recipient, donor = pair
    prompts = chat_prompts(recipient, _small_data().test[:3])
    got = time_arms(
        {"recipient": (recipient, None), "donor": (donor, None)},
        prompts,
        max_new_tokens=4,
        batch_size=2,
    )
    for name, model in (("recipient", recipient), ("donor", donor)):
        ids = generate(model, prompts, max_new_tokens=4, decode=False)
        assert got[name]["tokens"] == sum(len(r) for r in ids)
        assert got[name]["seconds_per_token"] == got[name]["seconds"] / got[name]["tokens"] > 0
