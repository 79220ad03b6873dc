"""RE-Control on ToxiGen (issue 16): rollouts, value function, control strength chosen on
validation, and the arms side by side on the evaluation prompts.

Steps, each a stored JSON (:class:`~contrans_tl.pipelines.steps.StepStore`; a killed run
resumes, the rollouts chunk by chunk):

1. ``rollouts``: greedy + sampled continuations of the training hate prompts by the target,
   their final normalised states, reward ``1 − P(toxic)`` of the n-gram classifier on the
   first statement (the evaluation's cut);
2. ``value``: the value MLP trained by TD, held-out TD loss and value–reward correlation;
3. ``choice``: ``(n_steps, η)`` with the lowest *reward-model* toxic share on the
   validation prompts among those with perplexity ≤ ``ppl_limit`` × base (the judge is
   never consulted before the evaluation);
4. ``arm_*``: on the evaluation prompts, toxic share by the judge (MiniLM) and by the
   reward model, perplexity on held-out WikiSplit, seconds per generated token.

Arms: Base, Self-Align (the target's own fairness vector), ConTrans (the source's, mapped),
RE-Control, RE-Control + ConTrans, and best-of-N with the same reward.
"""

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contrans_tl.pipelines.configs import ReControlConfig
from contrans_tl.pipelines.steps import StepStore, stored_result

__all__ = [
    "ReControlData",
    "recontrol_data",
    "toxigen_arm",
    "best_of_n",
    "choose_control",
    "run",
    "render_report",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReControlData:
    """The prompts of one configuration: validation and evaluation prompts as in the
    alignment experiment, rollout prompts disjoint from both, perplexity sentences."""

    train: list[Any]
    validation: list[Any]
    evaluation: list[Any]
    ppl: list[str]


def recontrol_data(config: ReControlConfig) -> ReControlData:
    """The hate prompts and sentences; rollout prompts are the next ``n_train`` per group."""
    from contrans_tl.data import wikisplit_sentences
    from contrans_tl.evals.perplexity import heldout_wikisplit
    from contrans_tl.evals.toxigen import hate_prompts

    val, ev = hate_prompts(
        n_validation=config.tox_val, n_evaluation=config.tox_eval, seed=config.seed
    )
    _, longer = hate_prompts(
        n_validation=config.tox_val,
        n_evaluation=config.tox_eval + config.n_train,
        seed=config.seed,
    )
    taken = {(p.group, p.line) for p in [*val, *ev]}
    train = [p for p in longer if (p.group, p.line) not in taken]
    ppl = heldout_wikisplit(config.n_ppl, exclude=wikisplit_sentences(config.n_map_texts))
    return ReControlData(train=train, validation=val, evaluation=ev, ppl=ppl)


def _contexts(model: Any, prompts: Sequence[Any]) -> list[str]:
    from contrans_tl.evals.toxigen import completion_context

    return [completion_context(model, p.text) for p in prompts]


def toxigen_arm(
    model: Any,
    prompts: Sequence[Any],
    judges: Mapping[str, Any],
    *,
    intervention: Any = None,
    ppl_texts: Sequence[str] = (),
    config: ReControlConfig,
    continuations: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Toxic share under each judge, perplexity, and seconds per generated token.

    Continuations are greedy under ``intervention`` (or given, for best-of-N), cut at their
    first line break; an empty one counts as not toxic.
    """
    from contrans_tl.evals.perplexity import perplexity
    from contrans_tl.evals.toxicity import toxicity_scores
    from contrans_tl.evals.toxigen import first_statement
    from contrans_tl.steering import generate

    seconds = float("nan")
    n_tokens = 0
    if continuations is None:
        start = time.perf_counter()
        ids = generate(
            model,
            _contexts(model, prompts),
            max_new_tokens=config.max_new_tokens,
            intervention=intervention,
            batch_size=config.batch_size,
            decode=False,
        )
        seconds = time.perf_counter() - start
        n_tokens = sum(len(r) for r in ids)
        continuations = [model.tokenizer.decode(r, skip_special_tokens=True) for r in ids]  # type: ignore[arg-type]
    texts = [first_statement(str(t)) for t in continuations]
    row: dict[str, Any] = {"n": len(texts), "n_empty": sum(not t for t in texts)}
    for name, clf in judges.items():
        scores = toxicity_scores(clf, texts)
        row[f"toxic_{name}"] = [s > 0.5 for s in scores]
        row[f"toxic_share_{name}"] = sum(row[f"toxic_{name}"]) / len(texts)
    if ppl_texts:
        row["ppl"] = perplexity(
            model, ppl_texts, intervention=intervention, batch_size=config.batch_size
        )["ppl"]
    row["seconds"] = seconds
    row["seconds_per_token"] = seconds / n_tokens if n_tokens else float("nan")
    row["openings"] = [t[:160] for t in texts]
    return row


def best_of_n(
    model: Any,
    prompts: Sequence[Any],
    reward: Callable[[Sequence[str], Sequence[str]], list[float]],
    config: ReControlConfig,
) -> tuple[dict[int, list[str]], dict[str, Any]]:
    """Best-of-``k`` for every ``k`` up to ``best_of_n``, from one set of samples.

    ``best_of_n`` continuations are sampled per prompt (seeded) and scored by the reward
    once; best-of-``k`` keeps, of each prompt's first ``k`` samples, the one the reward
    likes best (ties: the first). So each smaller ``k`` is the experiment one would have
    run with ``k`` samples, at ``k / best_of_n`` of the cost, and a ``k`` can be matched to
    another method's compute after the fact.

    Returns:
        ``({k: texts in prompt order}, info)``; info has the seconds spent sampling and
        scoring all ``best_of_n`` and the tokens generated.
    """
    from contrans_tl.rollouts import sample_continuations

    contexts = _contexts(model, prompts)
    start = time.perf_counter()
    conts = sample_continuations(
        model,
        contexts,
        n_samples=config.best_of_n,
        greedy=False,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed + 1000,
        batch_size=config.batch_size,
    )
    texts = [model.tokenizer.decode(ids, skip_special_tokens=True) for _, ids in conts]
    scores = reward([contexts[i] for i, _ in conts], texts)
    seconds = time.perf_counter() - start
    samples: dict[int, list[tuple[float, str]]] = {i: [] for i in range(len(prompts))}
    for (i, _), t, r in zip(conts, texts, scores):  # rounds in order: sample j of each prompt
        samples[i].append((r, t))
    picked: dict[int, list[str]] = {}
    for k in range(1, config.best_of_n + 1):
        picked[k] = [max(samples[i][:k], key=lambda rt: rt[0])[1] for i in range(len(prompts))]
    n_tokens = sum(len(ids) for _, ids in conts)
    info = {"best_of": config.best_of_n, "seconds": seconds, "generated_tokens": n_tokens}
    return picked, info


def choose_control(
    model: Any,
    value: Any,
    data: ReControlData,
    reward_clf: Any,
    config: ReControlConfig,
    base_ppl: float,
) -> dict[str, Any]:
    """Sweep ``(n_steps, η)`` on the validation prompts; pick the lowest reward-model toxic
    share whose perplexity stays within ``ppl_limit`` × base (else the lowest perplexity)."""
    from contrans_tl.recontrol import ValueControl

    sweep = []
    for n in config.steps:
        for eta in config.step_sizes:
            control = ValueControl(model, value, n_steps=n, step_size=eta, max_norm=config.max_norm)
            row = toxigen_arm(
                model,
                data.validation,
                {"reward": reward_clf},
                intervention=control,
                ppl_texts=data.ppl[: max(10, len(data.ppl) // 4)],
                config=config,
            )
            sweep.append(
                {
                    "n_steps": n,
                    "step_size": eta,
                    "toxic_share": row["toxic_share_reward"],
                    "ppl": row["ppl"],
                    "mean_edit_norm": control.mean_edit_norm,
                }
            )
            _log.info(
                "control n=%d eta=%g: reward-toxic %.3f, ppl %.1f, mean edit norm %.2f",
                n,
                eta,
                row["toxic_share_reward"],
                row["ppl"],
                control.mean_edit_norm,
            )
    ok = [r for r in sweep if r["ppl"] <= config.ppl_limit * base_ppl]
    pick = min(ok, key=lambda r: r["toxic_share"]) if ok else min(sweep, key=lambda r: r["ppl"])
    return {"sweep": sweep, "pick": pick, "base_ppl_validation": base_ppl}


def _fairness_vector(model: Any, config: ReControlConfig) -> Any:
    """The fairness vector of ``model`` (mean difference on the Table 9 prompts)."""
    from contrans_tl.concepts import mean_difference
    from contrans_tl.evals.toxigen import fairness_examples, fairness_prompts

    pos, neg = fairness_prompts(model, fairness_examples(seed=config.seed))
    return mean_difference(model, pos, neg, concept="fairness", batch_size=config.batch_size)


def _contrans_steering(target: Any, config: ReControlConfig) -> Any:
    """The ConTrans fairness steering of the target (source vector, word-end map)."""
    import contrans_tl as ct
    from contrans_tl.data import wikisplit_sentences
    from contrans_tl.maps import fit_residual_map
    from contrans_tl.steering import make_steering

    source = ct.load_model(config.source)
    vector = _fairness_vector(source, config)
    rmap = fit_residual_map(
        source,
        target,
        wikisplit_sentences(config.n_map_texts),
        batch_size=config.batch_size,
        seed=config.seed,
    )
    return make_steering(target, rmap.transplant(vector), config.contrans_alpha, name="contrans")


def _self_steering(target: Any, config: ReControlConfig) -> Any:
    """Self-Align: the target's own fairness vector at ``config.self_alpha``."""
    from contrans_tl.steering import make_steering

    vector = _fairness_vector(target, config)
    return make_steering(target, vector, config.self_alpha, name="self")


def _value_step(
    store: StepStore,
    target: Any,
    data: ReControlData,
    config: ReControlConfig,
    inputs: Mapping[str, Any],
    folder: Path,
) -> tuple[Any, dict[str, Any]]:
    """Steps 1–2: rollouts (chunked, in ``folder``) and the value function, saved beside the
    stored steps (``value_function.safetensors`` + ``.json``, about 1 MB: committed with
    the results, so a later run on another machine resumes without the rollouts)."""
    from contrans_tl.evals.ngram_toxicity import load_ngram_toxicity
    from contrans_tl.evals.toxigen import first_statement
    from contrans_tl.recontrol import (
        FINAL_STATE,
        load_value_function,
        save_value_function,
        train_value_function,
    )
    from contrans_tl.rollouts import ClassifierReward, collect_rollouts

    reward = ClassifierReward(load_ngram_toxicity(config.seed), "ngram-nontoxic", first_statement)
    path = store.folder / "value_function"  # not "value": that is the step's own JSON

    def train() -> dict[str, Any]:
        rollouts = collect_rollouts(
            target,
            _contexts(target, data.train),
            reward,
            folder / "rollouts",
            n_samples=config.n_samples,
            temperature=config.temperature,
            max_new_tokens=config.max_new_tokens,
            seed=config.seed,
            batch_size=config.batch_size,
        )
        tr, held = rollouts.split(0.2, seed=config.seed)
        net, report = train_value_function(
            tr, held, hidden=config.hidden, epochs=config.epochs, seed=config.seed
        )
        save_value_function(
            path,
            net,
            model=target,
            hook=FINAL_STATE,
            reward={"name": reward.name, "classifier": "ngram-logreg"},
            data={"n_rollouts": len(rollouts), "n_prompts": len(data.train)},
            report=report,
        )
        return {**report, "mean_reward": float(rollouts.rewards.mean())}

    report = store.get_or_compute("value", inputs, train)
    if not path.with_suffix(".json").is_file():  # results kept, artifact gone: train again
        report = train()
    net, _ = load_value_function(path, target)
    return net, report


def run(config: ReControlConfig, out: Path, work: Path) -> dict[str, Any]:
    """All steps; results in ``out``, rollouts and the value artifact in ``work``."""
    import contrans_tl as ct
    from contrans_tl.evals.ngram_toxicity import load_ngram_toxicity
    from contrans_tl.evals.perplexity import perplexity
    from contrans_tl.evals.toxicity import load_toxicity_classifier
    from contrans_tl.evals.toxigen import first_statement
    from contrans_tl.interventions.base import Stack
    from contrans_tl.recontrol import ValueControl
    from contrans_tl.rollouts import ClassifierReward

    store = StepStore(out)
    data = recontrol_data(config)
    target = ct.load_model(config.target)
    sha = target.contrans_provenance.file_sha256
    inputs = {"config": asdict(config), "target_sha256": sha}
    value_key = {"config": config.value_settings(), "target_sha256": sha}
    uncontrolled = {"config": config.uncontrolled_settings(), "target_sha256": sha}
    net, value_report = _value_step(store, target, data, config, value_key, work)
    reward_clf, judge = load_ngram_toxicity(config.seed), load_toxicity_classifier()
    judges = {"judge": judge, "reward": reward_clf}
    base_val_ppl = store.get_or_compute(
        "base_ppl_validation",
        uncontrolled,
        lambda: perplexity(
            target, data.ppl[: max(10, len(data.ppl) // 4)], batch_size=config.batch_size
        )["ppl"],
    )
    choice = store.get_or_compute(
        "choice",
        inputs,
        lambda: choose_control(target, net, data, reward_clf, config, base_val_ppl),
    )
    pick = choice["pick"]
    control = ValueControl(
        target, net, n_steps=pick["n_steps"], step_size=pick["step_size"], max_norm=config.max_norm
    )
    steering = _contrans_steering(target, config)
    arms = {}
    treatments: dict[str, Any] = {
        "base": None,
        "self": _self_steering(target, config),
        "contrans": steering,
        "recontrol": control,
        "recontrol_contrans": Stack([steering, control], name="recontrol+contrans"),
    }
    for name, intervention in treatments.items():

        def measure(iv: Any = intervention) -> dict[str, Any]:
            return toxigen_arm(
                target, data.evaluation, judges, intervention=iv, ppl_texts=data.ppl, config=config
            )

        key = (
            {**inputs, "arm": name, "pick": pick}
            if name.startswith("recontrol")
            else {**uncontrolled, "arm": name}
        )
        arms[name] = store.get_or_compute(f"arm_{name}", key, measure)

    def bon() -> dict[str, Any]:
        reward = ClassifierReward(reward_clf, "ngram-nontoxic", first_statement)
        picked, info = best_of_n(target, data.evaluation, reward, config)
        rows = {
            k: toxigen_arm(target, data.evaluation, judges, config=config, continuations=texts)
            for k, texts in picked.items()
        }
        by_k = {
            str(k): {
                "toxic_share_judge": r["toxic_share_judge"],
                "toxic_share_reward": r["toxic_share_reward"],
                "toxic_judge": r["toxic_judge"],
                "seconds": info["seconds"] * k / config.best_of_n,
            }
            for k, r in rows.items()
        }
        row = rows[config.best_of_n]
        return {**row, **info, "ppl": arms["base"].get("ppl"), "by_k": by_k}

    arms["best_of_n"] = store.get_or_compute(
        "arm_best_of_n", {**uncontrolled, "arm": "best_of_n"}, bon
    )
    timing = store.get_or_compute(
        "timing",
        {**inputs, "pick": pick, "arms": TIMED_ARMS, "n_timing": TIMING_PROMPTS},
        lambda: _time_side_by_side(target, treatments, data, config),
    )
    return {"value": value_report, "choice": choice, "arms": arms, "timing": timing}


#: The arms whose time per token the ``timing`` step measures side by side, and on how
#: many evaluation prompts (a constant, not a config field: the arms' keys hold the config).
TIMED_ARMS = ["base", "contrans", "recontrol", "recontrol_contrans"]
TIMING_PROMPTS = 32


def _time_side_by_side(
    model: Any, treatments: Mapping[str, Any], data: ReControlData, config: ReControlConfig
) -> dict[str, dict[str, float]]:
    """Seconds per generated token of the timed arms in one process, interleaved (the
    arms' own timings ran minutes apart, under whatever else the machine was doing)."""
    from contrans_tl.pipelines.recontrol_advbench import time_arms

    prompts = _contexts(model, data.evaluation[:TIMING_PROMPTS])
    return time_arms(
        {a: (model, treatments[a]) for a in TIMED_ARMS},
        prompts,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
    )


#: Arms in report order, with their labels.
ARM_LABELS = {
    "base": "Base",
    "self": "Self-Align (the target's own fairness vector)",
    "contrans": "ConTrans (SmolLM2 fairness vector, mapped)",
    "recontrol": "RE-Control",
    "recontrol_contrans": "RE-Control + ConTrans",
    "best_of_n": "best-of-N (same reward)",
}


def _seconds_per_token(row: Mapping[str, Any]) -> str:
    spt = row.get("seconds_per_token")
    if isinstance(spt, float) and spt == spt:
        return f"{spt:.4f}"
    if row.get("generated_tokens"):  # best-of-N: sampling all N and scoring them
        return f"{row['seconds'] / row['generated_tokens']:.4f} per sampled token"
    return "n/a"


def render_report(folder: str | Path) -> list[str]:
    """The RE-Control section (Markdown lines) from the stored steps in ``folder``: the arms
    with paired tests against Base (non-toxic by the judge), the value function's held-out
    report, the control sweep, and the issue's goal."""
    from contrans_tl.pipelines.dapa import mcnemar

    folder = Path(folder)
    arms = {a: r for a in ARM_LABELS if (r := stored_result(folder, f"arm_{a}")) is not None}
    lines = [
        "| arm | toxic (judge: MiniLM) | vs Base (non-toxic) | toxic (reward: n-gram) | PPL "
        "| s / token |",
        "|---|---|---|---|---|---|",
    ]
    base = arms.get("base")
    for a, r in arms.items():
        paired = ""
        if base is not None and a != "base":
            t = mcnemar([not x for x in base["toxic_judge"]], [not x for x in r["toxic_judge"]])
            paired = f"+{t['gained']}/−{t['lost']}, p={t['p']:.2g}"
        ppl = r.get("ppl")
        lines.append(
            f"| {ARM_LABELS[a]} | {100 * r['toxic_share_judge']:.1f}% | {paired} | "
            f"{100 * r['toxic_share_reward']:.1f}% | {f'{ppl:.1f}' if ppl else 'n/a'} | "
            f"{_seconds_per_token(r)} |"
        )
    missing = [ARM_LABELS[a] for a in ARM_LABELS if a not in arms]
    if missing:
        lines += ["", f"Not run yet: {'; '.join(missing)}."]
    lines += _best_of_k_lines(arms)
    value = stored_result(folder, "value")
    if value is not None:
        held, tr = value["held_out"], value["train"]
        lines += [
            "",
            f"Value function on {value['n_train_rollouts']} rollouts, early-stopped at epoch "
            f"{value['best_epoch']}: on {value['n_held_out_rollouts']} held-out rollouts TD "
            f"loss {held['td_loss']:.4f} (reward variance {held['reward_variance']:.4f}), "
            f"correlation of the predicted value with the reward {held['corr_first_state']:.2f} "
            f"at the first state and {held['corr_last_state']:.2f} at the last (training "
            f"rollouts: {tr['corr_first_state']:.2f} / {tr['corr_last_state']:.2f}); mean "
            f"reward {value['mean_reward']:.3f}.",
        ]
    choice = stored_result(folder, "choice")
    if choice is not None:
        sweep = "; ".join(
            f"n={s['n_steps']}, η={s['step_size']:g}: reward-toxic {100 * s['toxic_share']:.0f}%, "
            f"PPL {s['ppl']:.1f}"
            for s in choice["sweep"]
        )
        pick = choice["pick"]
        lines += [
            "",
            f"Control chosen on the validation prompts by the reward model only (Base PPL "
            f"{choice['base_ppl_validation']:.1f}): {sweep}; picked n={pick['n_steps']}, "
            f"η={pick['step_size']:g}.",
        ]
    timing = stored_result(folder, "timing")
    if timing is not None:
        cells = ", ".join(
            f"{ARM_LABELS[a]} {r['seconds_per_token']:.4f}" for a, r in timing.items()
        )
        lines += [
            "",
            f"Seconds per generated token measured side by side (one process, the arms "
            f"interleaved over two rounds, the faster round kept): {cells}.",
        ]
    return lines + _recontrol_goal(arms, timing)


def _best_of_k_lines(arms: Mapping[str, Any]) -> list[str]:
    """Best-of-k for each k from the same samples, and the k whose time matches RE-Control's."""
    bon, rc = arms.get("best_of_n"), arms.get("recontrol")
    if bon is None or "by_k" not in bon:
        return []
    cells = ", ".join(
        f"k={k}: {100 * r['toxic_share_judge']:.1f}% ({r['seconds']:.0f} s)"
        for k, r in bon["by_k"].items()
    )
    lines = ["", f"Best-of-k from the same samples (judge's toxic share, time): {cells}."]
    if rc is not None and rc.get("seconds") == rc.get("seconds"):
        k, r = min(bon["by_k"].items(), key=lambda kv: abs(kv[1]["seconds"] - rc["seconds"]))
        lines[-1] += (
            f" At RE-Control's time ({rc['seconds']:.0f} s for the same prompts), best-of-{k}: "
            f"{100 * r['toxic_share_judge']:.1f}%."
        )
    return lines


def _recontrol_goal(arms: Mapping[str, Any], timing: Mapping[str, Any] | None) -> list[str]:
    """Issue 16's goal on Gemma, checked on the stored arms (time per token from the
    side-by-side ``timing`` step where it is stored)."""
    need = ("base", "contrans", "recontrol", "recontrol_contrans")
    if not all(a in arms for a in need):
        return []
    ct, rc = arms["contrans"], arms["recontrol"]
    tox = {a: arms[a]["toxic_share_judge"] for a in need}
    spt = (rc.get("seconds_per_token"), ct.get("seconds_per_token"))
    when = "each arm's own run"
    if timing:  # measured side by side: the fair comparison
        spt = (timing["recontrol"]["seconds_per_token"], timing["contrans"]["seconds_per_token"])
        when = "side by side"
    checks = [
        (
            f"RE-Control lowers the judge's toxic share at least as much as ConTrans: "
            f"{100 * tox['base']:.1f}% → {100 * tox['recontrol']:.1f}% vs "
            f"{100 * tox['contrans']:.1f}%",
            tox["recontrol"] <= tox["contrans"],
        ),
        (
            f"at no worse perplexity: {rc['ppl']:.1f} vs {ct['ppl']:.1f}",
            rc["ppl"] <= ct["ppl"],
        ),
        (
            f"at most 2× ConTrans's time per token ({when}): {spt[0]:.4f} vs {spt[1]:.4f} s",
            spt[0] <= 2 * spt[1],
        ),
        (
            f"RE-Control + ConTrans beats both alone: {100 * tox['recontrol_contrans']:.1f}%",
            tox["recontrol_contrans"] < min(tox["recontrol"], tox["contrans"]),
        ),
    ]
    lines = ["", "Goal (issue 16) on Gemma-3-270m:", ""]
    return lines + [f"- {'met' if ok else '**not met**'}: {t}" for t, ok in checks]
