"""RE-Control on tiny models: TD targets, the value network, control steps, generation
under control (cache, zero steps, hooks on errors), rollouts and the value artifact."""

import pytest
import torch

from contrans_tl.recontrol import (
    FINAL_STATE,
    ValueControl,
    ValueNetwork,
    control_step,
    last_real_index,
    load_value_function,
    save_value_function,
    td_loss,
    td_targets,
    train_value_function,
)
from contrans_tl.rollouts import Rollouts, collect_rollouts, read_states, sample_continuations
from contrans_tl.steering import generate

PROMPTS = ["The weather today is", "My favourite food is a", "Once upon a time", "Hi"]


def _hooks_on(model) -> int:
    return sum(len(p.fwd_hooks) for p in model.hook_dict.values())


def test_last_real_index_is_the_last_one_under_both_paddings():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_real_index(mask).tolist() == [1, 3, 3, 1]
    assert mask.argmax(-1).tolist() != [1, 3, 3, 1]  # the public code's bug would fail here
    with pytest.raises(ValueError, match="no real state"):
        last_real_index(torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="contiguous"):
        last_real_index(torch.tensor([[1, 0, 1]]))


def test_td_targets_on_a_hand_made_trajectory():
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0], [9.0, 5.0, 6.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]).bool()  # right, then left padding
    rewards = torch.tensor([10.0, 20.0])
    target = td_targets(values, rewards, mask)
    assert target.tolist() == [[2.0, 3.0, 10.0, 0.0], [0.0, 6.0, 7.0, 20.0]]
    assert not target.requires_grad  # the bootstrap carries no gradient

    class Identity(torch.nn.Module):
        def forward(self, s):
            return s[..., 0]

    states = values.detach()[..., None].clone().requires_grad_(True)
    loss = td_loss(Identity(), states, rewards, mask)
    (grad,) = torch.autograd.grad(loss, states)
    direct = 2 * (values.detach() - target) * mask / mask.sum()  # only through V(s_t)
    assert torch.allclose(grad[..., 0], direct)
    assert loss.item() == pytest.approx(float(((values.detach() - target) ** 2 * mask).sum() / 6))


def test_control_step_raises_the_value_and_respects_the_norm_bound():
    torch.manual_seed(0)
    net = ValueNetwork(24, (32, 16)).eval()
    states = torch.randn(7, 24)
    edit = control_step(net, states, n_steps=5, step_size=0.05)
    assert bool((net(states + edit) > net(states)).all())
    bounded = control_step(net, states, n_steps=50, step_size=1.0, max_norm=0.3)
    assert float(bounded.norm(dim=-1).max()) <= 0.3 + 1e-5
    assert float(bounded.norm(dim=-1).min()) > 0.29  # the bound binds: a long walk
    assert control_step(net, states, n_steps=0, step_size=1.0).abs().max() == 0
    with torch.inference_mode():  # also under inference mode and no_grad
        again = control_step(net, states, n_steps=5, step_size=0.05)
    assert torch.allclose(again, edit)
    assert all(p.grad is None for p in net.parameters())


def test_value_network_learns_a_chain_mdp():
    """Chains of 6 states that drift along a class direction; the terminal reward is the
    class. The TD fixed point is V = reward at every state of a chain."""
    g = torch.Generator().manual_seed(1)
    d, n, length = 12, 160, 6
    cls = torch.randint(0, 2, (n,), generator=g)
    u = torch.randn(d, generator=g)
    states, offsets = [], [0]
    for i in range(n):
        t = torch.arange(length, dtype=torch.float32)[:, None]
        s = 0.3 * torch.randn(length, d, generator=g) + (2 * cls[i] - 1) * u + 0.2 * t
        states.append(s)
        offsets.append(offsets[-1] + length)
    data = Rollouts(
        torch.cat(states), torch.tensor(offsets), cls.float(), torch.arange(n), [""] * n
    )
    train, held = data.split(0.25, seed=0)
    net, report = train_value_function(
        train, held, hidden=(32,), epochs=100, learning_rate=3e-3, batch_size=8, patience=20
    )
    # the true value of every state is its chain's reward; a constant would be off by 0.25
    with torch.no_grad():
        err = torch.cat([(net(held.rollout(i)) - held.rewards[i]) ** 2 for i in range(len(held))])
    assert float(err.mean()) < 0.02
    assert report["held_out"]["td_loss"] < 0.02
    assert report["held_out"]["corr_first_state"] > 0.95
    assert len(report["history"]) >= 1 and report["best_epoch"] < len(report["history"])


def test_zero_steps_is_unsteered_generation_exactly(small_llama):
    net = ValueNetwork(48, (16,))
    plain = generate(small_llama, PROMPTS, max_new_tokens=6, decode=False)
    control = ValueControl(small_llama, net, n_steps=0)
    assert (
        generate(small_llama, PROMPTS, max_new_tokens=6, decode=False, intervention=control)
        == plain
    )


# step sizes that change some tokens of the tiny model, not all to one token
STEP = {FINAL_STATE: 2.0, "blocks.1.hook_resid_post": 0.1}


@pytest.mark.parametrize("hook", list(STEP))
def test_cached_and_uncached_generation_agree_under_control(small_llama, hook):
    torch.manual_seed(3)
    net = ValueNetwork(48, (16,))
    control = ValueControl(small_llama, net, n_steps=3, step_size=STEP[hook], hook=hook)
    plain = generate(small_llama, PROMPTS, max_new_tokens=6, decode=False)
    cached = generate(small_llama, PROMPTS, max_new_tokens=6, decode=False, intervention=control)
    uncached = generate(
        small_llama, PROMPTS, max_new_tokens=6, decode=False, intervention=control, use_cache=False
    )
    assert cached != plain  # the control is strong enough to change tokens
    assert uncached == cached
    assert _hooks_on(small_llama) == 0


@pytest.mark.parametrize("hook, enters", [(FINAL_STATE, False), ("blocks.1.hook_resid_post", True)])
def test_whether_an_edit_enters_the_cache(small_llama, hook, enters):
    """A controller that forgot the edits of earlier positions when the sequence is rerun
    without a cache: harmless for the final state (its edits reach no key or value),
    wrong for an earlier layer (they do)."""

    class Forgetful(ValueControl):
        def _replay(self, x, first):
            pass

    torch.manual_seed(3)
    net = ValueNetwork(48, (16,))
    args = dict(n_steps=3, step_size=STEP[hook], hook=hook)
    cached = generate(
        small_llama,
        PROMPTS,
        max_new_tokens=6,
        decode=False,
        intervention=ValueControl(small_llama, net, **args),
    )
    forgot = generate(
        small_llama,
        PROMPTS,
        max_new_tokens=6,
        decode=False,
        use_cache=False,
        intervention=Forgetful(small_llama, net, **args),
    )
    assert (forgot != cached) == enters


def test_hooks_are_removed_when_generation_raises(small_llama):
    class Broken(ValueNetwork):
        def forward(self, states):
            raise RuntimeError("value network broke")

    control = ValueControl(small_llama, Broken(48, (8,)), n_steps=2)
    with pytest.raises(RuntimeError, match="value network broke"):
        generate(small_llama, PROMPTS, max_new_tokens=3, intervention=control)
    assert _hooks_on(small_llama) == 0 and not control.active


def test_control_refuses_bad_settings(small_llama):
    net = ValueNetwork(48, (8,))
    with pytest.raises(ValueError, match="n_steps"):
        ValueControl(small_llama, net, n_steps=-1)
    with pytest.raises(ValueError, match="step_size"):
        ValueControl(small_llama, net, step_size=float("nan"))
    with pytest.raises(ValueError, match="no hook point"):
        ValueControl(small_llama, net, hook="blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match="48"):
        ValueControl(small_llama, ValueNetwork(40, (8,)))


def test_read_states_match_a_direct_forward_pass(small_llama):
    conts = sample_continuations(small_llama, PROMPTS[:3], n_samples=1, max_new_tokens=4, seed=0)
    assert len(conts) == 6 and [i for i, _ in conts] == [0, 1, 2, 0, 1, 2]
    states = read_states(small_llama, PROMPTS[:3], conts, hook=FINAL_STATE, batch_size=4)
    tok = small_llama.tokenizer
    for (i, ids), got in zip(conts, states):
        full = torch.tensor([tok(PROMPTS[i])["input_ids"] + ids])
        _, cache = small_llama.run_with_cache(full, names_filter=FINAL_STATE)
        want = cache[FINAL_STATE][0, -len(ids) - 1 :]
        assert got.shape == (len(ids) + 1, 48)
        assert torch.allclose(got, want, atol=1e-4)


def test_collect_rollouts_resumes_without_recomputing(small_llama, tmp_path):
    calls = []

    class Length:
        name = "length"

        def __call__(self, prompts, continuations):
            calls.append(len(continuations))
            return [len(c) / 10 for c in continuations]

    kwargs = dict(n_samples=1, max_new_tokens=4, chunk_size=2, batch_size=4)
    data = collect_rollouts(small_llama, PROMPTS, Length(), tmp_path, **kwargs)
    assert len(calls) == 2 and len(data) <= 8
    assert sorted(p.name for p in tmp_path.glob("chunk_*.json")) == [
        "chunk_0000.json",
        "chunk_0001.json",
    ]
    again = collect_rollouts(small_llama, PROMPTS, Length(), tmp_path, **kwargs)
    assert len(calls) == 2  # nothing made again
    assert torch.allclose(again.states.float(), data.states.half().float())
    assert again.prompt_index.tolist() == data.prompt_index.tolist()
    collect_rollouts(small_llama, PROMPTS, Length(), tmp_path, **{**kwargs, "max_new_tokens": 3})
    assert len(calls) == 4  # other settings: made again
    train, held = data.split(0.5, seed=0)
    assert not set(train.prompt_index.tolist()) & set(held.prompt_index.tolist())


def test_value_artifact_round_trip_and_refuses_another_model(small_llama, wide_llama, tmp_path):
    torch.manual_seed(0)
    net = ValueNetwork(48, (20, 12))
    net.set_standardisation(torch.randn(30, 48) * 3)
    save_value_function(
        tmp_path / "v",
        net,
        model=small_llama,
        hook=FINAL_STATE,
        reward={"name": "r"},
        data={"n": 1},
    )
    loaded, meta = load_value_function(tmp_path / "v", small_llama)
    x = torch.randn(4, 48)
    assert torch.equal(loaded(x), net(x)) and loaded.hidden == (20, 12)
    assert meta["hook"] == FINAL_STATE
    with pytest.raises(ValueError, match="does not fit"):
        load_value_function(tmp_path / "v", wide_llama)


def test_classifier_reward_scores_the_transformed_text():
    from contrans_tl.rollouts import ClassifierReward

    class Bad:
        def score(self, texts):
            return [0.9 if "bad" in t else 0.1 for t in texts]

    reward = ClassifierReward(Bad(), transform=lambda t: t.split("\n")[0].strip())
    got = reward(["p"] * 3, ["bad thing", "fine\nbad later", "\nbad"])
    assert got == pytest.approx([0.1, 0.9, 1.0])  # the empty first line counts as clean


def test_control_stacks_with_a_steering(small_llama):
    """RE-Control + ConTrans: both position-aware; the stack tells both where tokens are."""
    from contrans_tl.concepts import ConceptVector
    from contrans_tl.interventions.base import Stack
    from contrans_tl.provenance import model_provenance
    from contrans_tl.steering import make_steering

    torch.manual_seed(3)
    net = ValueNetwork(48, (16,))
    v = ConceptVector(
        vectors=torch.randn(3, 48),
        layers=(0, 1, 2),
        model=model_provenance(small_llama),
        concept="c",
        method="test",
    )
    steering = make_steering(small_llama, v, 0.1)
    control = ValueControl(small_llama, net, n_steps=3, step_size=STEP[FINAL_STATE])
    both = Stack([steering, control])
    got = generate(small_llama, PROMPTS, max_new_tokens=5, decode=False, intervention=both)
    again = generate(
        small_llama, PROMPTS, max_new_tokens=5, decode=False, intervention=both, use_cache=False
    )
    alone = generate(small_llama, PROMPTS, max_new_tokens=5, decode=False, intervention=steering)
    assert got == again and got != alone
    assert _hooks_on(small_llama) == 0


def test_continuation_logprob_matches_a_direct_forward_pass(small_llama):
    from contrans_tl.rollouts import continuation_logprob

    conts = ["ab", "", "hello there", "x"]
    got = continuation_logprob(small_llama, PROMPTS[:4], conts, batch_size=3)
    tok = small_llama.tokenizer
    for p, c, g in zip(PROMPTS[:4], conts, got):
        if not c:
            assert g == 0.0
            continue
        head = tok(p)["input_ids"]
        tail = tok(c, add_special_tokens=False)["input_ids"]
        logits = small_llama(torch.tensor([head + tail]))[0].log_softmax(-1)
        want = torch.stack([logits[len(head) - 1 + t, tail[t]] for t in range(len(tail))]).mean()
        assert g == pytest.approx(float(want), abs=1e-4)


def test_likelihood_ratio_reward_prefers_what_the_aligned_model_writes(small_llama, byte_tokenizer):
    from contrans_tl.rollouts import LikelihoodRatioReward
    from tests.conftest import tiny_llama

    other = tiny_llama(byte_tokenizer, d_model=48, n_layers=3, seed=5, name="tiny-llama-48b")
    assert LikelihoodRatioReward(small_llama, small_llama)(PROMPTS[:2], ["ab", "c"]) == [0.0, 0.0]
    ids = generate(small_llama, PROMPTS[:3], max_new_tokens=6, decode=False)
    own = [small_llama.tokenizer.decode(r) for r in ids]
    reward = LikelihoodRatioReward(small_llama, other)
    flipped = LikelihoodRatioReward(other, small_llama)
    got = reward(PROMPTS[:3], own)
    assert all(r > 0 for r in got)  # its own greedy text is likelier under the aligned model
    assert flipped(PROMPTS[:3], own) == pytest.approx([-r for r in got])


def test_rollouts_written_by_another_model_are_read_by_the_model(
    small_llama, byte_tokenizer, tmp_path
):
    from tests.conftest import tiny_llama

    writer = tiny_llama(byte_tokenizer, d_model=48, n_layers=3, seed=5, name="tiny-llama-48b")

    class Zero:
        name = "zero"

        def __call__(self, prompts, continuations):
            return [0.0] * len(continuations)

    data = collect_rollouts(
        small_llama, PROMPTS[:2], Zero(), tmp_path, n_samples=0, max_new_tokens=4, writer=writer
    )
    written = generate(writer, PROMPTS[:2], max_new_tokens=4, decode=False)
    assert written != generate(small_llama, PROMPTS[:2], max_new_tokens=4, decode=False)
    for k, ids in enumerate(written):
        want = read_states(small_llama, PROMPTS[:2], [(k, ids)], hook=FINAL_STATE)[0]
        got = data.states[data.offsets[k] : data.offsets[k + 1]].float()
        assert torch.allclose(got, want, atol=2e-3)  # states kept in float16


def test_mean_edit_norm_counts_the_generated_positions_only(small_llama):
    import math

    from contrans_tl.evals.perplexity import perplexity

    torch.manual_seed(4)
    net = ValueNetwork(48, (16,))
    control = ValueControl(small_llama, net, n_steps=40, step_size=5.0, max_norm=0.25)
    assert math.isnan(control.mean_edit_norm)
    perplexity(small_llama, PROMPTS, intervention=control)  # a scoring pass: not counted
    assert math.isnan(control.mean_edit_norm)
    generate(small_llama, PROMPTS, max_new_tokens=5, decode=False, intervention=control)
    # a long walk under the bound: every edit ends on it
    assert control.mean_edit_norm == pytest.approx(0.25, rel=1e-3)
    assert control._norms[1] == len(PROMPTS) * 5  # one edit per generated token


@pytest.mark.parametrize("hook", list(STEP))
def test_control_under_teacher_forced_answer_scoring(small_llama, hook):
    """TruthfulQA-style scoring (a cached context, then all answer tokens in one pass)
    under control: the shared-prefix path equals the one-at-a-time reference, and equals
    the log-probabilities of generating the answer token by token under control."""
    from contrans_tl.evals.truthfulqa import score_many

    torch.manual_seed(5)
    net = ValueNetwork(48, (16,))
    control = ValueControl(small_llama, net, n_steps=3, step_size=STEP[hook], hook=hook)
    tok = small_llama.tokenizer
    items = [
        (tok(q)["input_ids"], [tok(a, add_special_tokens=False)["input_ids"] for a in answers])
        for q, answers in [("Q: Is the sky blue? A:", [" yes", " no it is not"]), ("Hi", [" x y"])]
    ]
    fast = score_many(small_llama, items, intervention=control, batch_size=2)
    slow = score_many(small_llama, items, intervention=control, reuse_prefix=False)
    plain = score_many(small_llama, items)
    for f, s, p in zip(fast, slow, plain):
        assert f == pytest.approx(s, abs=1e-4)
        assert f != pytest.approx(p, abs=1e-4)  # the control acts
