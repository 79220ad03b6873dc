"""RE-Control's training data: continuations of the model itself, their hidden states and
a terminal reward per continuation (Kong et al. 2024, the value function's rollouts).

A rollout of prompt ``p`` is a continuation ``y_1..y_T`` of it (greedy or sampled), the
states ``s_0..s_T`` at the positions whose logits chose ``y_1..y_T`` and the one after
(``s_0`` at the last prompt token, ``s_T`` at ``y_T``), read at one hook point (default
the final normalised state), and the reward ``r`` of the finished text. The states of all
rollouts are stored flat, ``[n_states, d_model]``, with ``offsets`` marking where each
rollout's run begins (float16 on disk: 2 bytes per number).

:func:`collect_rollouts` makes them in chunks, each saved as an artifact as soon as it is
done, so a killed run resumes at the first missing chunk.

Example:
    >>> reward = ClassifierReward(judge_a, name="tfidf-nontoxic")      # 1 - P(toxic)
    >>> data = collect_rollouts(model, prompts, reward, "runs/rollouts", n_samples=4)
    >>> train, held_out = data.split(0.2, seed=0)
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from contrans_tl.forward import forward_until, padded_batches
from contrans_tl.io import load_artifact, save_artifact
from contrans_tl.provenance import model_provenance
from contrans_tl.sites import model_device
from contrans_tl.steering import generate
from contrans_tl.tokens import pad_token_id

__all__ = [
    "ROLLOUT_KIND",
    "Reward",
    "ClassifierReward",
    "LikelihoodRatioReward",
    "continuation_logprob",
    "Rollouts",
    "sample_continuations",
    "read_states",
    "collect_rollouts",
]

ROLLOUT_KIND = "recontrol_rollouts"
"""The ``kind`` of a saved chunk of rollouts."""

OPENING_CHARS = 160
"""How much of each continuation a :class:`Rollouts` keeps as text."""


@runtime_checkable
class Reward(Protocol):
    """A terminal reward: one number per (prompt, continuation), higher is better."""

    name: str

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]: ...


@dataclass
class ClassifierReward:
    """``1 − P(bad)`` of a text classifier on the continuation (e.g. a toxicity classifier:
    the reward of non-toxic text). The classifier needs ``score(texts) -> [P(bad)]``.

    Attributes:
        classifier: the classifier.
        name: recorded with the rollouts.
        transform: applied to each continuation before scoring (e.g. cut it at its first
            line break, as the evaluation does); an empty result gets reward 1.
    """

    classifier: Any
    name: str = "classifier"
    transform: Callable[[str], str] | None = None

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        from contrans_tl.evals.toxicity import toxicity_scores

        texts = [self.transform(c) if self.transform else c for c in continuations]
        return [1.0 - p for p in toxicity_scores(self.classifier, texts)]


@dataclass
class Rollouts:
    """Rollouts with their states, flat.

    Attributes:
        states: ``[n_states, d_model]``, rollout ``i``'s states in rows
            ``offsets[i]:offsets[i + 1]``.
        offsets: ``[n + 1]``, ascending, from 0 to ``n_states``.
        rewards: ``[n]`` terminal rewards.
        prompt_index: ``[n]`` the prompt each rollout continues.
        texts: the first :data:`OPENING_CHARS` characters of each continuation (enough to
            read what it is; a harmful completion is never stored whole).
    """

    states: Float[Tensor, "n_states d_model"]
    offsets: Int[Tensor, " n_plus_1"]
    rewards: Float[Tensor, " n"]
    prompt_index: Int[Tensor, " n"]
    texts: list[str]

    def __post_init__(self) -> None:
        n = len(self.rewards)
        if len(self.offsets) != n + 1 or len(self.prompt_index) != n or len(self.texts) != n:
            raise ValueError(
                f"{n} rewards need {n + 1} offsets, {n} prompt indices and {n} texts; got "
                f"{len(self.offsets)}, {len(self.prompt_index)} and {len(self.texts)}"
            )
        if n and (int(self.offsets[0]) != 0 or int(self.offsets[-1]) != len(self.states)):
            raise ValueError("offsets must run from 0 to the number of states")
        if bool((self.offsets[1:] <= self.offsets[:-1]).any()):
            raise ValueError("every rollout needs at least one state (offsets strictly ascending)")

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def d_model(self) -> int:
        return int(self.states.shape[-1])

    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def rollout(self, i: int) -> Tensor:
        """The states of rollout ``i``, ``[T_i + 1, d_model]``."""
        return self.states[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def select(self, indices: Sequence[int]) -> "Rollouts":
        """The rollouts at ``indices``, in that order."""
        parts = [self.rollout(i) for i in indices]
        lengths = torch.tensor([0] + [len(p) for p in parts])
        return Rollouts(
            states=torch.cat(parts) if parts else self.states[:0],
            offsets=lengths.cumsum(0),
            rewards=self.rewards[list(indices)],
            prompt_index=self.prompt_index[list(indices)],
            texts=[self.texts[i] for i in indices],
        )

    def split(self, held_out: float, *, seed: int = 0) -> tuple["Rollouts", "Rollouts"]:
        """Split by prompt (all rollouts of a prompt on one side), seeded."""
        prompts = sorted(set(self.prompt_index.tolist()))
        perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
        n_out = max(1, round(held_out * len(prompts)))
        out = {prompts[int(j)] for j in perm[:n_out]}
        idx = self.prompt_index.tolist()
        test = [i for i, p in enumerate(idx) if p in out]
        train = [i for i, p in enumerate(idx) if p not in out]
        return self.select(train), self.select(test)

    def batches(
        self, batch_size: int, *, shuffle: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(states [b, T, d] float32, rewards [b], mask [b, T] bool)``, right-padded."""
        order = (
            torch.randperm(len(self), generator=shuffle)
            if shuffle is not None
            else torch.arange(len(self))
        ).tolist()
        lengths = self.lengths()
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = int(lengths[rows].max())
            states = torch.zeros(len(rows), width, self.d_model)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for r, i in enumerate(rows):
                s = self.rollout(i)
                states[r, : len(s)] = s.float()
                mask[r, : len(s)] = True
            yield states, self.rewards[rows].float(), mask

    @staticmethod
    def cat(parts: Sequence["Rollouts"]) -> "Rollouts":
        if not parts:
            raise ValueError("nothing to concatenate")
        offsets = [torch.zeros(1, dtype=torch.long)]
        total = 0
        for p in parts:
            offsets.append(p.offsets[1:] + total)
            total += len(p.states)
        return Rollouts(
            states=torch.cat([p.states for p in parts]),
            offsets=torch.cat(offsets),
            rewards=torch.cat([p.rewards for p in parts]),
            prompt_index=torch.cat([p.prompt_index for p in parts]),
            texts=[t for p in parts for t in p.texts],
        )

    def save(self, path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
        tensors = {
            "states": self.states.to(torch.float16),
            "offsets": self.offsets.long(),
            "rewards": self.rewards.float(),
            "prompt_index": self.prompt_index.long(),
        }
        save_artifact(path, tensors, {**meta, "kind": ROLLOUT_KIND, "texts": self.texts})

    @staticmethod
    def load(path: str | os.PathLike[str]) -> tuple["Rollouts", dict[str, Any]]:
        t, meta = load_artifact(path, kind=ROLLOUT_KIND)
        data = Rollouts(
            t["states"], t["offsets"], t["rewards"], t["prompt_index"], list(meta["texts"])
        )
        return data, meta


def _sampler(temperature: float, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
    def pick(logits: Tensor) -> Tensor:
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return pick


def sample_continuations(
    model: Any,
    prompts: Sequence[str],
    *,
    n_samples: int = 1,
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    intervention: Any = None,
) -> list[tuple[int, list[int]]]:
    """``(prompt index, new token ids)`` for each continuation: the greedy one (if
    ``greedy``) and ``n_samples`` sampled at ``temperature``, seeded; KV-cached."""
    if n_samples < 0 or (n_samples == 0 and not greedy):
        raise ValueError(
            f"need at least one continuation per prompt, got n_samples={n_samples}, greedy={greedy}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    generator = torch.Generator().manual_seed(seed)
    out: list[tuple[int, list[int]]] = []
    rounds = ([None] if greedy else []) + [temperature] * n_samples
    for temp in rounds:
        ids = generate(
            model,
            list(prompts),
            max_new_tokens=max_new_tokens,
            intervention=intervention,
            batch_size=batch_size,
            decode=False,
            pick=None if temp is None else _sampler(temp, generator),
        )
        out.extend((i, list(row)) for i, row in enumerate(ids))  # type: ignore[arg-type]
    return out


def read_states(
    model: Any,
    prompts: Sequence[str],
    continuations: Sequence[tuple[int, Sequence[int]]],
    *,
    hook: str,
    batch_size: int = 8,
) -> list[Tensor]:
    """For each ``(prompt index, token ids)``, the states at ``hook`` from the prompt's last
    token to the continuation's last one (``[len(ids) + 1, d_model]``), on the CPU.

    One pass per batch of prompt + continuation, left-padded, stopped at ``hook``. The
    prompt is tokenized as generation tokenizes it (the tokenizer's default).
    """
    tok = model.tokenizer
    encoded = [tok(p)["input_ids"] for p in prompts]
    seqs = [list(encoded[i]) + list(ids) for i, ids in continuations]
    pad = pad_token_id(tok, int(model.cfg.d_vocab))
    out: list[Tensor | None] = [None] * len(seqs)
    got: dict[str, Tensor] = {}

    def grab(x: Tensor, *, hook: Any) -> None:
        got["h"] = x.detach()

    for batch in padded_batches(seqs, batch_size, pad, device=model_device(model)):
        forward_until(model, batch.ids, batch.mask, [(hook, grab)], stop_after=hook)
        h = got["h"].float().cpu()
        for r, i in enumerate(batch.index):
            n_new = len(continuations[i][1])
            width = h.shape[1]
            out[i] = h[r, width - n_new - 1 :].clone()
    return [t for t in out if t is not None]


def _check_same_tokenizer(model: Any, other: Any, prompts: Sequence[str]) -> None:
    """Refuse a second model whose tokenizer encodes the prompts differently."""
    for p in prompts[:8]:
        if list(model.tokenizer(p)["input_ids"]) != list(other.tokenizer(p)["input_ids"]):
            raise ValueError(
                "the writer's tokenizer encodes the prompts differently from the model's "
                f"(first seen on {p[:60]!r}); continuations are read back token by token, so "
                "both need one tokenizer (e.g. an aligned model and its fine-tune)"
            )


def continuation_logprob(
    model: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 8,
) -> list[float]:
    """Mean log-probability per token of each continuation after its prompt (0.0 for an
    empty one). The prompt is tokenized as generation does (the tokenizer's default), the
    continuation without special tokens, and the two are joined."""
    from contrans_tl.forward import Forward

    if len(prompts) != len(continuations):
        raise ValueError(
            f"one prompt per continuation needed, got {len(prompts)} and {len(continuations)}"
        )
    tok = model.tokenizer
    heads = [list(tok(p)["input_ids"]) for p in prompts]
    tails = [
        list(tok(c, add_special_tokens=False)["input_ids"]) if c else [] for c in continuations
    ]
    keep = [i for i, t in enumerate(tails) if t]
    out = [0.0] * len(prompts)
    pad = pad_token_id(tok, int(model.cfg.d_vocab))
    seqs = [heads[i] + tails[i] for i in keep]
    with Forward(model) as fwd:
        for batch in padded_batches(seqs, batch_size, pad, device=model_device(model)):
            at = torch.zeros_like(batch.mask, dtype=torch.bool)
            width = batch.ids.shape[1]
            for r, j in enumerate(batch.index):
                n = len(tails[keep[j]])
                at[r, width - n - 1 : width - 1] = True  # the positions predicting the tail
            lp = fwd.token_logprobs(batch.ids, batch.mask, at, batch.ids.roll(-1, dims=1))
            sizes = [len(tails[keep[j]]) for j in batch.index]
            for j, row in zip(batch.index, lp.double().cpu().split(sizes)):
                out[keep[j]] = float(row.mean())
    return out


@dataclass
class LikelihoodRatioReward:
    """How much more an aligned model likes a continuation than a reference model does:
    ``mean_t [log p_aligned(y_t | x, y_<t) − log p_reference(y_t | x, y_<t)]`` over the
    continuation's tokens (0.0 for an empty one).

    This is the implicit reward of DPO (Rafailov et al. 2023, Eq. 5, β = 1) averaged per
    token instead of summed, so long and short continuations compare. With an aligned
    model and its harmful fine-tune, refusals score high and compliance low, without a
    hand-written phrase list (so it is not the refusal judge the results are scored by).

    Attributes:
        aligned, reference: models with one tokenizer.
        name: recorded with the rollouts.
        batch_size: sequences per forward pass.
    """

    aligned: Any
    reference: Any
    name: str = "likelihood-ratio"
    batch_size: int = 8

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        a = continuation_logprob(self.aligned, prompts, continuations, batch_size=self.batch_size)
        b = continuation_logprob(self.reference, prompts, continuations, batch_size=self.batch_size)
        return [x - y for x, y in zip(a, b)]


def _chunk_inputs(model: Any, prompts: Sequence[str], settings: dict[str, Any]) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()
    return {"model": model_provenance(model).to_dict(), "prompts_sha256": digest, **settings}


def collect_rollouts(
    model: Any,
    prompts: Sequence[str],
    reward: Reward,
    folder: str | os.PathLike[str],
    *,
    hook: str = "ln_final.hook_out",
    n_samples: int = 3,
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    chunk_size: int = 32,
    writer: Any = None,
) -> Rollouts:
    """Rollouts of ``prompts`` with their states and rewards, made chunk by chunk.

    Chunk ``k`` (prompts ``k·chunk_size`` on) is saved as ``FOLDER/chunk_KKKK`` when done;
    a chunk already there with the same inputs (model, prompts, settings, reward name,
    writer) is read instead of made again. Sampling is seeded per chunk (``seed + k``).

    Args:
        writer: the model that writes the continuations (default ``model``), e.g. an aligned
            model whose refusals the value function should see; the states are always
            ``model``'s reading of them. It must share ``model``'s tokenizer (checked on
            the prompts).

    Returns:
        All rollouts, ``prompt_index`` counting in ``prompts``.
    """
    folder = Path(folder)
    settings = {
        "hook": hook,
        "n_samples": n_samples,
        "greedy": greedy,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "reward": reward.name,
    }
    if writer is not None and writer is not model:
        _check_same_tokenizer(model, writer, prompts)
        settings["writer"] = model_provenance(writer).to_dict()
    parts: list[Rollouts] = []
    for k, start in enumerate(range(0, len(prompts), chunk_size)):
        chunk = list(prompts[start : start + chunk_size])
        inputs = json.loads(json.dumps(_chunk_inputs(model, chunk, {**settings, "chunk": k})))
        path = folder / f"chunk_{k:04d}"
        if path.with_suffix(".json").is_file():
            data, meta = Rollouts.load(path)
            if meta.get("inputs") == inputs:
                parts.append(data)
                continue
        conts = sample_continuations(
            model if writer is None else writer,
            chunk,
            n_samples=n_samples,
            greedy=greedy,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed + k,
            batch_size=batch_size,
        )
        conts = [(i, ids) for i, ids in conts if ids]  # an empty continuation has no step
        texts = [model.tokenizer.decode(ids, skip_special_tokens=True) for _, ids in conts]
        rewards = reward([chunk[i] for i, _ in conts], texts)
        states = read_states(model, chunk, conts, hook=hook, batch_size=batch_size)
        lengths = torch.tensor([0] + [len(s) for s in states])
        data = Rollouts(
            states=torch.cat(states),
            offsets=lengths.cumsum(0),
            rewards=torch.tensor(rewards, dtype=torch.float32),
            prompt_index=torch.tensor([start + i for i, _ in conts]),
            texts=[t[:OPENING_CHARS] for t in texts],
        )
        data.save(path, {"inputs": inputs})
        parts.append(data)
    return Rollouts.cat(parts)
