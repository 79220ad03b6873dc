"""RE-Control on the DAPA pair (issue 16): a refusal value function on the harmful
fine-tune's states, as one more arm of the DAPA table.

The pair, the data splits and the measurements are those of :mod:`.dapa`: the controlled
model is the recipient (Qwen2.5-Coder-0.5B-Instruct fine-tuned on AdvBench), and the arm is
stored beside the DAPA and ConTrans arms (DSR and over-refusal on the held-out requests,
perplexity, MC1), with the same inputs, so one table holds all three methods.

Steps, each stored (:class:`~contrans_tl.pipelines.steps.StepStore`, in the DAPA folder):

1. ``recontrol_value``: rollouts of the search-part requests (harmful) and of the harmless
   TruthfulQA questions ConTrans reads its refusal vector from: the recipient's greedy and
   sampled continuations, and the donor's greedy ones read by the recipient. Reward:
   :class:`~contrans_tl.rollouts.LikelihoodRatioReward` of the donor against the recipient
   (no phrase list: the DSR judge is not the reward). Then the value MLP by TD.
2. ``recontrol_choice``: ``(n_steps, η)`` with the highest mean *reward* on the first
   ``n_choice`` validation requests among those whose perplexity stays within
   ``ppl_limit`` × the recipient's; the judge is not consulted.
3. ``arm_recontrol_*``: the DAPA arm parts under the chosen control;
4. ``timing``: seconds per generated token of donor, recipient, ConTrans, the ddmin
   transplant and RE-Control on the same test requests, side by side in one run.
"""

import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from contrans_tl.pipelines.configs import DapaConfig, ReControlRefusalConfig
from contrans_tl.pipelines.dapa import DapaData, StepStore
from contrans_tl.pipelines.steps import stored_result

__all__ = ["refusal_value", "choose_refusal_control", "time_arms", "run"]

_log = logging.getLogger(__name__)


def refusal_value(
    donor: Any,
    recipient: Any,
    data: DapaData,
    config: ReControlRefusalConfig,
    work: Path,
    artifact: Path,
) -> tuple[Any, dict[str, Any]]:
    """Rollouts (kept in ``work``) and the value function on the recipient's final state,
    saved as ``artifact`` (``.safetensors`` + ``.json``). Returns ``(net, report)``."""
    from contrans_tl.evals.refusal import chat_prompts
    from contrans_tl.recontrol import FINAL_STATE, save_value_function, train_value_function
    from contrans_tl.rollouts import LikelihoodRatioReward, Rollouts, collect_rollouts

    reward = LikelihoodRatioReward(donor, recipient, batch_size=config.batch_size)
    harmful = data.search[: config.n_rollout_harmful]
    harmless = data.harmless[: config.n_rollout_harmless]
    if len(harmful) < config.n_rollout_harmful or len(harmless) < config.n_rollout_harmless:
        raise ValueError(
            f"asked for {config.n_rollout_harmful} harmful and {config.n_rollout_harmless} "
            f"harmless rollout prompts; there are {len(data.search)} and {len(data.harmless)}"
        )
    prompts = chat_prompts(recipient, [*harmful, *harmless])
    common: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "temperature": config.temperature,
    }
    n = config.n_samples
    own = collect_rollouts(
        recipient, prompts, reward, work / "rollouts_recipient", n_samples=n, **common
    )
    written = collect_rollouts(
        recipient, prompts, reward, work / "rollouts_donor", n_samples=0, writer=donor, **common
    )
    rollouts = Rollouts.cat([own, written])
    tr, held = rollouts.split(0.2, seed=config.seed)
    net, report = train_value_function(
        tr, held, hidden=config.hidden, epochs=config.epochs, seed=config.seed
    )
    n_harmful = len(harmful)
    is_harmful = rollouts.prompt_index < n_harmful
    save_value_function(
        artifact,
        net,
        model=recipient,
        hook=FINAL_STATE,
        reward={"name": reward.name, "aligned": "donor", "reference": "recipient"},
        data={
            "n_rollouts": len(rollouts),
            "harmful_prompts": n_harmful,
            "harmless_prompts": len(harmless),
        },
        report=report,
    )
    means = {
        "mean_reward_recipient_written": float(own.rewards.mean()),
        "mean_reward_donor_written": float(written.rewards.mean()),
        "mean_reward_harmful": float(rollouts.rewards[is_harmful].mean()),
        "mean_reward_harmless": float(rollouts.rewards[~is_harmful].mean()),
    }
    return net, {**report, **means, "n_rollouts": len(rollouts)}


def choose_refusal_control(
    donor: Any,
    recipient: Any,
    value: Any,
    data: DapaData,
    config: ReControlRefusalConfig,
    dapa: DapaConfig,
) -> dict[str, Any]:
    """Sweep ``(n_steps, η)`` on the first ``n_choice`` validation requests: mean reward of
    the greedy responses under control, and perplexity on a quarter of the held-out
    sentences; pick the highest reward within ``ppl_limit`` × the recipient's perplexity
    (else the lowest perplexity)."""
    from contrans_tl.evals.perplexity import perplexity
    from contrans_tl.evals.refusal import chat_prompts
    from contrans_tl.recontrol import ValueControl
    from contrans_tl.rollouts import LikelihoodRatioReward
    from contrans_tl.steering import generate

    reward = LikelihoodRatioReward(donor, recipient, batch_size=config.batch_size)
    prompts = chat_prompts(recipient, data.validation[: config.n_choice])
    texts = data.ppl[: max(10, len(data.ppl) // 4)]
    base_ppl = perplexity(recipient, texts, batch_size=dapa.batch_size)["ppl"]
    sweep = []
    for n in config.steps:
        for eta in config.step_sizes:
            control = ValueControl(
                recipient, value, n_steps=n, step_size=eta, max_norm=config.max_norm
            )
            out = generate(
                recipient,
                prompts,
                max_new_tokens=dapa.max_new_tokens,
                intervention=control,
                batch_size=dapa.batch_size,
            )
            r = reward(prompts, [str(t) for t in out])
            ppl = perplexity(recipient, texts, intervention=control, batch_size=dapa.batch_size)
            sweep.append(
                {
                    "n_steps": n,
                    "step_size": eta,
                    "mean_reward": sum(r) / len(r),
                    "ppl": ppl["ppl"],
                    "mean_edit_norm": control.mean_edit_norm,
                }
            )
            _log.info("refusal control n=%d eta=%g: %s", n, eta, sweep[-1])
    ok = [s for s in sweep if s["ppl"] <= config.ppl_limit * base_ppl]
    pick = max(ok, key=lambda s: s["mean_reward"]) if ok else min(sweep, key=lambda s: s["ppl"])
    return {"sweep": sweep, "pick": pick, "base_ppl_validation": base_ppl}


def _stored_value(
    store: StepStore,
    donor: Any,
    recipient: Any,
    data: DapaData,
    config: ReControlRefusalConfig,
    inputs: Mapping[str, Any],
    work: Path,
) -> tuple[Any, dict[str, Any]]:
    """Step 1, with the artifact reloaded (and retrained if its file is gone). The artifact
    (``recontrol_value_function``, about 1 MB; not ``recontrol_value``, the step's own
    JSON) sits beside the stored steps, so it is committed
    with them and a later run elsewhere resumes without the rollouts."""
    from contrans_tl.recontrol import load_value_function

    artifact = store.folder / "recontrol_value_function"

    def train() -> dict[str, Any]:
        return refusal_value(donor, recipient, data, config, work, artifact)[1]

    report = store.get_or_compute("recontrol_value", inputs, train)
    if not artifact.with_suffix(".json").is_file():
        report = train()
    net, _ = load_value_function(artifact, recipient)
    return net, report


def time_arms(
    arms: Mapping[str, tuple[Any, Any]],
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    rounds: int = 2,
) -> dict[str, dict[str, float]]:
    """Seconds per generated token of each arm, measured side by side in one process.

    Args:
        arms: name → ``(model, intervention or None)``.
        prompts: the same requests for every arm (chat-formatted).
        rounds: passes over the arms, the order reversed every other round so that no arm
            always runs first; an arm's figure is its fastest round.
    """
    import time

    from contrans_tl.steering import generate

    best: dict[str, dict[str, float]] = {}
    names = list(arms)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            model, intervention = arms[name]
            start = time.perf_counter()
            ids = generate(
                model,
                prompts,
                max_new_tokens=max_new_tokens,
                intervention=intervention,
                batch_size=batch_size,
                decode=False,
            )
            seconds = time.perf_counter() - start
            tokens = sum(len(row) for row in ids)
            row = {"seconds": seconds, "tokens": tokens, "seconds_per_token": seconds / tokens}
            if name not in best or row["seconds_per_token"] < best[name]["seconds_per_token"]:
                best[name] = row
            _log.info("timing %s: %.4f s/token", name, row["seconds_per_token"])
    return best


def _timed_arms(
    store: StepStore, donor: Any, recipient: Any, control: Any
) -> dict[str, tuple[Any, Any]]:
    """The arms to time: donor, recipient, ConTrans (kept vector), RE-Control, and the ddmin
    transplant when those steps are stored."""
    import contrans_tl as ct
    from contrans_tl.concepts import ConceptVector
    from contrans_tl.dapa import ModuleTransplant

    arms: dict[str, tuple[Any, Any]] = {"donor": (donor, None), "recipient": (recipient, None)}
    choice = stored_result(store.folder, "contrans_choice")
    vector = store.folder / "contrans_vector"
    if choice is not None and vector.with_suffix(".json").is_file():
        steering = ct.make_steering(recipient, ConceptVector.load(vector), alpha=choice["alpha"])
        arms["contrans"] = (recipient, steering)
    found = stored_result(store.folder, "ddmin")
    if found is not None:
        arms["ddmin"] = (recipient, ModuleTransplant(recipient, donor, found["minimal"]))
    arms["recontrol"] = (recipient, control)
    return arms


def run(dapa: DapaConfig, config: ReControlRefusalConfig, out: Path, work: Path) -> dict[str, Any]:
    """All steps; results in the DAPA folder ``out``, rollouts and the value in ``work``."""
    from contrans_tl.evals.refusal import chat_prompts
    from contrans_tl.pipelines.dapa import open_pair, stored_arm
    from contrans_tl.recontrol import ValueControl

    store, data, donor, recipient, inputs = open_pair(dapa, out)
    mine = {**inputs, "recontrol": asdict(config)}
    value_key = {**inputs, "recontrol": config.value_settings()}
    net, report = _stored_value(store, donor, recipient, data, config, value_key, work)
    choice = store.get_or_compute(
        "recontrol_choice",
        mine,
        lambda: choose_refusal_control(donor, recipient, net, data, config, dapa),
    )
    pick = choice["pick"]
    control = ValueControl(
        recipient,
        net,
        n_steps=pick["n_steps"],
        step_size=pick["step_size"],
        max_norm=config.max_norm,
        name="recontrol",
    )
    arm = stored_arm(store, "recontrol", recipient, control, data, dapa, {**mine, "pick": pick})
    timed = _timed_arms(store, donor, recipient, control)
    prompts = chat_prompts(recipient, data.test[: config.n_timing])
    timing = store.get_or_compute(
        "timing",
        {**mine, "pick": pick, "arms": list(timed), "n_timing": config.n_timing},
        lambda: time_arms(
            timed, prompts, max_new_tokens=dapa.max_new_tokens, batch_size=dapa.batch_size
        ),
    )
    return {"value": report, "choice": choice, "arm": arm, "timing": timing}
