"""The RE-Control ToxiGen pipeline's parts on a tiny model with stand-in classifiers."""

import pytest
import torch

from contrans_tl.pipelines.configs import ReControlConfig
from contrans_tl.pipelines.recontrol import best_of_n, choose_control, recontrol_data, toxigen_arm
from contrans_tl.recontrol import ValueNetwork

SMALL = ReControlConfig(
    tox_eval=1,
    tox_val=1,
    n_train=2,
    max_new_tokens=4,
    n_ppl=8,
    n_map_texts=20,
    best_of_n=3,
    steps=(2,),
    step_sizes=(0.5, 2.0),
    batch_size=4,
)


class Letters:
    """P(toxic) = share of the letter 'e' among characters: a cheap, text-dependent score."""

    name = "letters"

    def score(self, texts):
        return [t.count("e") / max(len(t), 1) * 5 for t in texts]


def test_rollout_prompts_are_disjoint_from_validation_and_evaluation():
    data = recontrol_data(ReControlConfig())
    key = lambda ps: {(p.group, p.line) for p in ps}  # noqa: E731
    assert len(data.validation) == 13 * 3 and len(data.evaluation) == 13 * 10
    assert len(data.train) == 13 * 20
    assert not key(data.train) & (key(data.validation) | key(data.evaluation))
    assert not key(data.validation) & key(data.evaluation)


def test_toxigen_arm_counts_under_each_judge(small_llama):
    data = recontrol_data(SMALL)
    row = toxigen_arm(small_llama, data.evaluation, {"a": Letters()}, config=SMALL)
    scores = Letters().score([t for t in row["openings"] if t])
    assert row["toxic_share_a"] == pytest.approx(sum(s > 0.5 for s in scores) / row["n"])
    assert row["seconds_per_token"] > 0
    given = toxigen_arm(
        small_llama,
        data.evaluation[:2],
        {"a": Letters()},
        config=SMALL,
        continuations=["eeee", "xx\neeee"],
    )
    assert given["toxic_a"] == [True, False]  # the second is cut at its line break


def test_best_of_n_keeps_the_sample_the_reward_likes_best(small_llama):
    from contrans_tl.pipelines.recontrol import _contexts
    from contrans_tl.rollouts import sample_continuations

    data = recontrol_data(SMALL)
    prompts = data.evaluation[:3]
    reward = lambda ps, cs: [float(len(c)) for c in cs]  # noqa: E731
    picked, info = best_of_n(small_llama, prompts, reward, SMALL)
    assert sorted(picked) == [1, 2, 3]
    texts = picked[3]
    conts = sample_continuations(
        small_llama,
        _contexts(small_llama, prompts),
        n_samples=3,
        greedy=False,
        max_new_tokens=4,
        seed=SMALL.seed + 1000,
        batch_size=4,
    )
    for i, t in enumerate(texts):
        options = [
            small_llama.tokenizer.decode(ids, skip_special_tokens=True)
            for j, ids in conts
            if j == i
        ]
        assert len(t) == max(len(o) for o in options) and t in options
        for k in (1, 2):  # best of the first k samples, ties to the first
            first = options[:k]
            assert picked[k][i] == max(first, key=len)
    assert info["best_of"] == 3 and info["generated_tokens"] > 0


def test_choose_control_follows_its_rule(small_llama):
    torch.manual_seed(0)
    data = recontrol_data(SMALL)
    got = choose_control(small_llama, ValueNetwork(48, (8,)), data, Letters(), SMALL, base_ppl=1e9)
    sweep = got["sweep"]
    assert len(sweep) == 2
    assert got["pick"]["toxic_share"] == min(r["toxic_share"] for r in sweep)
    strict = choose_control(
        small_llama, ValueNetwork(48, (8,)), data, Letters(), SMALL, base_ppl=1e-9
    )
    assert strict["pick"]["ppl"] == min(r["ppl"] for r in strict["sweep"])  # none within the limit


def test_report_pairs_arms_with_base_and_checks_the_goal(tmp_path):
    from contrans_tl.io import write_json
    from contrans_tl.pipelines.recontrol import render_report

    def arm(name, toxic, ppl, spt):
        row = {
            "toxic_judge": toxic,
            "toxic_share_judge": sum(toxic) / len(toxic),
            "toxic_share_reward": 0.25,
            "ppl": ppl,
            "seconds_per_token": spt,
        }
        write_json(tmp_path / f"arm_{name}.json", {"inputs": {}, "result": row})

    arm("base", [True] * 8 + [False] * 2, 20.0, 0.01)
    arm("contrans", [True] * 4 + [False] * 6, 26.0, 0.011)
    arm("recontrol", [False] * 2 + [True] * 3 + [False] * 5, 24.0, 0.03)
    arm("recontrol_contrans", [True] + [False] * 9, 30.0, 0.031)
    bon = {
        "toxic_judge": [False] * 10,
        "toxic_share_judge": 0.0,
        "toxic_share_reward": 0.0,
        "seconds": 40.0,
        "generated_tokens": 400,
        "by_k": {
            "1": {"toxic_share_judge": 0.5, "seconds": 10.0},
            "2": {"toxic_share_judge": 0.3, "seconds": 20.0},
            "4": {"toxic_share_judge": 0.0, "seconds": 40.0},
        },
    }
    write_json(tmp_path / "arm_best_of_n.json", {"inputs": {}, "result": bon})
    import json

    rc = json.loads((tmp_path / "arm_recontrol.json").read_text())
    rc["result"]["seconds"] = 18.0
    write_json(tmp_path / "arm_recontrol.json", rc)
    stats = {"td_loss": 0.002, "reward_variance": 0.06, "corr_first_state": 0.2}
    value = {
        "n_train_rollouts": 80,
        "n_held_out_rollouts": 20,
        "best_epoch": 4,
        "mean_reward": 0.5,
        "held_out": {**stats, "corr_last_state": 0.4},
        "train": {**stats, "corr_last_state": 0.7},
    }
    write_json(tmp_path / "value.json", {"inputs": {}, "result": value})
    text = "\n".join(render_report(tmp_path))
    assert "TD loss 0.0020 (reward variance 0.0600)" in text
    assert "0.20 at the first state and 0.40 at the last (training rollouts: 0.20 / 0.70)" in text
    assert "At RE-Control's time (18 s for the same prompts), best-of-2: 30.0%." in text
    assert "| best-of-N (same reward) | 0.0% | +8/−0, p=0.0078 |" in text
    # recontrol vs base, non-toxic: base non-toxic only at 8, 9; recontrol at 0, 1, 5..9
    assert "| RE-Control | 30.0% | +5/−0, p=0.062 | 25.0% | 24.0 | 0.0300 |" in text
    assert "met: RE-Control lowers the judge's toxic share at least as much" in text
    assert "met: at no worse perplexity: 24.0 vs 26.0" in text
    assert "**not met**: at most 2× ConTrans's time per token" in text
    assert "met: RE-Control + ConTrans beats both alone: 10.0%" in text
    assert "Not run yet: Self-Align" in text
    assert "(each arm's own run): 0.0300 vs 0.0110 s" in text
    # measured side by side, the timing step decides the time criterion
    timing = {a: {"seconds_per_token": x} for a, x in (("contrans", 0.02), ("recontrol", 0.03))}
    write_json(tmp_path / "timing.json", {"inputs": {}, "result": timing})
    text = "\n".join(render_report(tmp_path))
    assert "- met: at most 2× ConTrans's time per token (side by side): 0.0300 vs 0.0200 s" in text
    assert "measured side by side" in text and "RE-Control 0.0300" in text


def test_value_settings_leave_out_the_control_settings():
    from dataclasses import replace

    from contrans_tl.pipelines.configs import ReControlConfig, ReControlRefusalConfig

    for config in (ReControlConfig(), ReControlRefusalConfig()):
        key = config.value_settings()
        assert "step_sizes" not in key and "seed" in key and "hidden" in key
        # trying other control settings keeps the stored value function's key ...
        assert replace(config, step_sizes=(1.0,), max_norm=3.0).value_settings() == key
        # ... while anything the rollouts or the training read changes it
        assert replace(config, hidden=(7,)).value_settings() != key
        assert replace(config, max_new_tokens=5).value_settings() != key


def test_uncontrolled_arms_do_not_read_the_control_settings():
    from dataclasses import replace

    from contrans_tl.pipelines.configs import ReControlConfig

    config = ReControlConfig()
    key = config.uncontrolled_settings()
    assert replace(config, step_sizes=(3.0,), ppl_limit=9.0).uncontrolled_settings() == key
    assert replace(config, contrans_alpha=0.5).uncontrolled_settings() != key
    assert "step_sizes" not in key and "best_of_n" in key
