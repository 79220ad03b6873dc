"""RE-Control (Kong et al. 2024): a value function on hidden states, and test-time control.

Generation is read as a dynamical system on hidden states: ``s_t`` is the state at the
position whose logits choose token ``t + 1`` (by default the final normalised state that
feeds the unembedding, ``ln_final.hook_out``; optionally an earlier ``resid_post``). A
small value network ``V(s)`` predicts the reward the finished completion will get. It is
trained by temporal differences on rollouts of the model itself (:mod:`contrans_tl.rollouts`)
with the Bellman equation of a terminal reward ``r`` and no discount:

    target_t = r                 at the rollout's last real state            (terminal)
    target_t = V(s_{t+1})        before it, with no gradient through it      (bootstrap)
    loss     = mean over real states of (V(s_t) - target_t)²

At test time (:class:`ValueControl`), before each next token the newest state is moved by
``n_steps`` gradient-ascent steps of size ``step_size`` on the value,

    s ← s + η ∇_s V(s),        optionally ‖s − s_0‖ ≤ max_norm after each step,

where the gradient flows through the value network only, never through the LLM.

Pitfalls of the public code not repeated here: the last real position is found from the
mask's *last* one (``mask.argmax`` finds the first), the bootstrap target is detached,
the width comes from the model, and the saved artifact records the network's shape so
that what is loaded is what was trained (:func:`save_value_function`).

Example:
    >>> net, report = train_value_function(train_rollouts, held_out_rollouts)
    >>> control = ValueControl(model, net, n_steps=10, step_size=0.5)
    >>> generate(model, prompts, intervention=control)
"""

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Shaped
from torch import Tensor, nn

from contrans_tl.forward import FINAL_STATE
from contrans_tl.interventions.base import CountedIntervention
from contrans_tl.io import load_artifact, save_artifact
from contrans_tl.provenance import as_provenance, check_compatible, model_provenance
from contrans_tl.steering import PositionState

if TYPE_CHECKING:
    from contrans_tl.rollouts import Rollouts

__all__ = [
    "FINAL_STATE",
    "VALUE_KIND",
    "ValueNetwork",
    "last_real_index",
    "td_targets",
    "td_loss",
    "train_value_function",
    "save_value_function",
    "load_value_function",
    "ValueControl",
    "control_step",
]

VALUE_KIND = "recontrol_value"
"""The ``kind`` of a saved value function artifact."""


class ValueNetwork(nn.Module):
    """``V(s)``: an MLP from a hidden state to a scalar value.

    Inputs are standardised with the training states' per-feature mean and standard
    deviation (buffers ``mean`` and ``std``, set by :meth:`set_standardisation`), so one
    learning rate suits models whose states have very different scales.

    Args:
        d_model: width of the states (the model's ``cfg.d_model``).
        hidden: widths of the hidden layers (e.g. ``(256, 256)``: a 3-layer MLP).

    Example:
        >>> net = ValueNetwork(640, (256, 256))
        >>> net(torch.randn(5, 640)).shape
        torch.Size([5])
    """

    mean: Tensor
    std: Tensor

    def __init__(self, d_model: int, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        hidden = tuple(hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be positive ints, got {hidden!r}")
        self.d_model, self.hidden = d_model, hidden
        widths = (d_model, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        layers.append(nn.Linear(widths[-1], 1))
        self.layers = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(d_model))
        self.register_buffer("std", torch.ones(d_model))

    def set_standardisation(self, states: Float[Tensor, "n d_model"]) -> None:
        """Standardise inputs with these states' mean and standard deviation."""
        states = states.float()
        self.mean.copy_(states.mean(0))
        self.std.copy_(states.std(0).clamp_min(1e-6))

    def forward(self, states: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows"]:
        x = (states.to(self.mean.dtype) - self.mean) / self.std
        return self.layers(x).squeeze(-1)

    def spec(self) -> dict[str, Any]:
        """The shape, as saved: ``{"d_model", "hidden"}``."""
        return {"d_model": self.d_model, "hidden": list(self.hidden)}


def last_real_index(mask: Shaped[Tensor, "batch pos"]) -> Tensor:
    """For each row, the column of its last real position (left or right padding).

    The last one of the mask, found from the end (``mask.argmax`` would find the first).

    Raises:
        ValueError: a row has no real position, or its real positions are not contiguous.
    """
    mask = mask.bool()
    n = mask.sum(-1)
    if bool((n == 0).any()):
        raise ValueError(f"rows {torch.nonzero(n == 0).flatten().tolist()[:5]} have no real state")
    width = mask.shape[-1]
    last = width - 1 - mask.flip(-1).int().argmax(-1)
    first = mask.int().argmax(-1)
    if bool((last - first + 1 != n).any()):
        raise ValueError("each row's real positions must be contiguous (left or right padding)")
    return last


def td_targets(
    values: Float[Tensor, "batch pos"],
    rewards: Float[Tensor, " batch"],
    mask: Shaped[Tensor, "batch pos"],
) -> Float[Tensor, "batch pos"]:
    """Bellman targets of a terminal reward, undiscounted, with no gradient.

    ``target[b, t] = rewards[b]`` at row ``b``'s last real position, ``values[b, t + 1]``
    (detached) at its other real positions, and 0 at padding.
    """
    mask = mask.bool()
    last = last_real_index(mask)
    nxt = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1).detach()
    target = torch.where(mask, nxt, torch.zeros_like(nxt))
    rows = torch.arange(values.shape[0], device=values.device)
    target[rows, last] = rewards.to(target.dtype).detach()
    return target


def td_loss(
    net: nn.Module,
    states: Float[Tensor, "batch pos d_model"],
    rewards: Float[Tensor, " batch"],
    mask: Shaped[Tensor, "batch pos"],
) -> Tensor:
    """Mean squared TD error over the real states (padding masked out)."""
    values = net(states)
    target = td_targets(values, rewards, mask)
    m = mask.to(values.dtype)
    return ((values - target) ** 2 * m).sum() / m.sum()


def _corr(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def _evaluate(net: ValueNetwork, data: "Rollouts", batch_size: int) -> dict[str, float]:
    """Held-out TD loss, and the correlation of V at the first / last state with r."""
    total = count = 0.0
    first, last = [], []
    net.eval()
    with torch.no_grad():
        for states, rewards, mask in data.batches(batch_size):
            values = net(states)
            target = td_targets(values, rewards, mask)
            m = mask.float()
            total += float(((values - target) ** 2 * m).sum())
            count += float(m.sum())
            first.append(values[:, 0])
            last.append(values[torch.arange(len(values)), last_real_index(mask)])
    r = data.rewards.float()
    return {
        "td_loss": total / max(count, 1.0),
        "corr_first_state": _corr(torch.cat(first), r),
        "corr_last_state": _corr(torch.cat(last), r),
        "reward_variance": float(r.var()) if len(r) > 1 else float("nan"),
    }


def train_value_function(
    train: "Rollouts",
    held_out: "Rollouts",
    *,
    hidden: Sequence[int] = (256, 256),
    epochs: int = 30,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    patience: int = 5,
    seed: int = 0,
) -> tuple[ValueNetwork, dict[str, Any]]:
    """Train ``V`` by TD on ``train``; early-stop on ``held_out``'s TD loss.

    Rollouts are batched whole (a state's bootstrap target is the next state of the same
    rollout), right-padded, shuffled with ``seed`` each epoch; AdamW. The network of the
    epoch with the lowest held-out TD loss is returned.

    Returns:
        ``(net, report)``: the report has per-epoch train / held-out TD loss, the best
        epoch, and on the held-out rollouts the correlation of the predicted value at the
        first and at the last state with the reward.

    Raises:
        ValueError: empty rollouts, or train and held-out of different widths.
    """
    if len(train) == 0 or len(held_out) == 0:
        raise ValueError(
            f"need rollouts to train on and to hold out, got {len(train)} and {len(held_out)}"
        )
    if train.d_model != held_out.d_model:
        raise ValueError(f"train states are {train.d_model} wide, held-out {held_out.d_model}")
    torch.manual_seed(seed)
    net = ValueNetwork(train.d_model, hidden)
    net.set_standardisation(train.states)
    opt = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        losses = []
        for states, rewards, mask in train.batches(batch_size, shuffle=gen):
            loss = td_loss(net, states, rewards, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        row = {"epoch": epoch, "train_td_loss": sum(losses) / len(losses)}
        row.update({f"held_out_{k}": v for k, v in _evaluate(net, held_out, batch_size).items()})
        history.append(row)
        if best is None or row["held_out_td_loss"] < best[0]:
            best = (
                row["held_out_td_loss"],
                epoch,
                {k: v.clone() for k, v in net.state_dict().items()},
            )
        elif epoch - best[1] >= patience:
            break
    assert best is not None
    net.load_state_dict(best[2])
    net.eval()
    report = {
        "best_epoch": best[1],
        "held_out": _evaluate(net, held_out, batch_size),
        "train": _evaluate(net, train, batch_size),
        "history": history,
        "n_train_rollouts": len(train),
        "n_held_out_rollouts": len(held_out),
        "seconds": time.perf_counter() - start,
        "settings": {
            "hidden": list(hidden),
            "epochs": epochs,
            "learning_rate": learning_rate,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "patience": patience,
            "seed": seed,
        },
    }
    return net, report


def save_value_function(
    path: str | os.PathLike[str],
    net: ValueNetwork,
    *,
    model: Any,
    hook: str,
    reward: Mapping[str, Any],
    data: Mapping[str, Any],
    report: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Save ``net`` as ``PATH.safetensors`` + ``PATH.json`` (atomically, as a unit).

    The JSON records the network's shape (so a load builds the network that was
    trained), the model it reads (provenance), the hook point, the reward and the data.
    """
    meta = {
        "kind": VALUE_KIND,
        "network": net.spec(),
        "model": model_provenance(model).to_dict(),
        "hook": hook,
        "reward": dict(reward),
        "data": dict(data),
        "report": dict(report or {}),
    }
    return save_artifact(path, net.state_dict(), meta)


def load_value_function(
    path: str | os.PathLike[str], model: Any | None = None, *, strict: bool = True
) -> tuple[ValueNetwork, dict[str, Any]]:
    """Load a value function saved by :func:`save_value_function`.

    Args:
        path: the artifact (without or with an extension).
        model: the model it will control; refused unless it is the one the value function
            was trained on (width, layers; with ``strict`` also model id and weight
            processing).

    Raises:
        ValueError: another kind of artifact, or a model it was not trained for.
    """
    tensors, meta = load_artifact(path, kind=VALUE_KIND)
    spec = meta["network"]
    if model is not None:
        check_compatible(meta["model"], model, what=f"value function {str(path)!r}", strict=strict)
        if meta["hook"] not in model.hook_dict:
            raise ValueError(
                f"value function {str(path)!r} reads {meta['hook']!r}, which the model has "
                "no hook for"
            )
    net = ValueNetwork(int(spec["d_model"]), tuple(spec["hidden"]))
    net.load_state_dict(tensors)
    net.eval()
    as_provenance(meta["model"], "value function model")
    return net, meta


def control_step(
    value: nn.Module,
    states: Float[Tensor, "n d_model"],
    *,
    n_steps: int,
    step_size: float,
    max_norm: float | None = None,
) -> Float[Tensor, "n d_model"]:
    """The edit ``s* − s`` after ``n_steps`` gradient-ascent steps on ``value``.

    Each step moves every row by ``step_size · ∇V(s)``; with ``max_norm`` the total edit
    of a row is projected back onto the ball of that radius after each step. Runs in
    float32 with gradients on, also when called under ``torch.no_grad`` or inference
    mode; the gradient reaches neither the value network's weights nor ``states``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        s0 = states.detach().clone().float()
        s = s0.clone()
        for _ in range(n_steps):
            s.requires_grad_(True)
            (grad,) = torch.autograd.grad(value(s).sum(), s)
            s = (s + step_size * grad).detach()
            if max_norm is not None:
                d = s - s0
                norm = d.norm(dim=-1, keepdim=True)
                s = s0 + d * torch.clamp(max_norm / norm.clamp_min(1e-12), max=1.0)
        return (s - s0).detach()


class ValueControl(CountedIntervention):
    """RE-Control at test time, as an intervention: inside the block, the state that
    chooses each next token is pushed up the value function before the logits are made.

    Which positions: every position whose logits choose a generated token, i.e. absolute
    positions from ``prompt_length − 1`` (the last prompt token) on. On a pass with no
    generation in it (:class:`contrans_tl.forward.Forward` told no ``prompt_length``,
    e.g. perplexity scoring), every position is controlled at once.

    KV cache. An edit of the final normalised state (the default hook) changes only that
    position's logits; it enters no key or value, so nothing of it is cached. An edit of
    an earlier ``resid_post`` does enter the keys and values of later layers. Either way
    each edit is computed once, when its position is the newest, and kept: a pass without
    a cache (rerunning the whole sequence) adds the kept edits at the earlier positions
    again, so cached and uncached generation see the same states. A pass whose tokens are
    all prompt starts a new sequence and forgets the kept edits; so does a pass that starts
    inside the prompt (teacher-forced answers after a cached context, as TruthfulQA's
    scoring runs them), whose answer positions are all edited at once. That equals editing
    them one by one: an edit at one hook point changes no state at that hook point at
    another position, only later layers (or, at the final state, nothing but the logits).

    Args:
        model: the model to control.
        value: the value network (e.g. from :func:`load_value_function`); not trained here.
        n_steps: gradient steps per token (0: the model runs unchanged).
        step_size: ``η``.
        max_norm: bound on the norm of each position's total edit (``None``: no bound).
        hook: the hook point whose states ``value`` reads.
        name: label for results tables.
        metadata: recorded by :meth:`describe` (e.g. the value artifact's provenance).

    Raises:
        ValueError: a hook the model lacks, a width that differs from the value network's,
            or a negative or non-finite setting.
    """

    def __init__(
        self,
        model: Any,
        value: ValueNetwork,
        *,
        n_steps: int = 10,
        step_size: float = 0.5,
        max_norm: float | None = None,
        hook: str = FINAL_STATE,
        name: str = "recontrol",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
        for label, x in (("step_size", step_size), ("max_norm", max_norm)):
            if x is not None and (not math.isfinite(float(x)) or float(x) <= 0):
                raise ValueError(f"{label} must be a finite number > 0, got {x!r}")
        if hook not in model.hook_dict:
            raise ValueError(
                f"the model has no hook point {hook!r}; e.g. {FINAL_STATE!r} or "
                "'blocks.3.hook_resid_post'"
            )
        if value.d_model != int(model.cfg.d_model):
            raise ValueError(
                f"the value network reads {value.d_model}-wide states, the model's are "
                f"{model.cfg.d_model}"
            )
        self.value = value.eval().requires_grad_(False)
        self.n_steps, self.step_size = n_steps, float(step_size)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.hook_name, self.name = hook, name
        self.metadata = dict(metadata or {})
        self.state = PositionState()
        self._edits: list[Tensor] = []  # edits of positions prompt_length-1, prompt_length, ...
        self._last: Tensor | None = None  # unedited states of the last pass from position 0
        self._context: Any = None
        self.seconds = 0.0  # time spent in control steps (for time-per-token reports)
        self._norms = [0.0, 0]  # sum and count of the edit norms at generated positions

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "ValueControl",
            "hook": self.hook_name,
            "n_steps": self.n_steps,
            "step_size": self.step_size,
            "max_norm": self.max_norm,
            "value_network": self.value.spec(),
            **self.metadata,
        }

    @property
    def mean_edit_norm(self) -> float:
        """Mean norm of the edits made after a prompt so far (generated or teacher-forced
        answer positions; NaN before any): how
        far the control moved the states, to compare with their own norm."""
        total, count = self._norms
        return total / count if count else float("nan")

    def position_states(self) -> list[PositionState]:
        """``[self.state]``: set by :class:`contrans_tl.forward.Forward` before each pass."""
        return [self.state]

    def edit(self, states: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        """The control edit of these states (see :func:`control_step`)."""
        start = time.perf_counter()
        out = control_step(
            self.value,
            states,
            n_steps=self.n_steps,
            step_size=self.step_size,
            max_norm=self.max_norm,
        )
        self.seconds += time.perf_counter() - start
        return out

    def _hook(self, x: Tensor, *, hook: Any) -> Tensor:
        if self.n_steps == 0:
            return x
        st = self.state
        seq = int(x.shape[1])
        if st.prompt_length is None:  # a scoring pass: control every position at once
            flat = x.reshape(-1, x.shape[-1])
            return x + self.edit(flat).reshape(x.shape).to(x.dtype)
        first = st.prompt_length - 1  # the position that chooses the first generated token
        end = st.offset + seq  # absolute positions offset .. end-1 are in this pass
        if self._starts_a_sequence(x, first, end):
            self._edits = []
        known = first + len(self._edits)  # positions first .. known-1 have kept edits
        if st.offset > known:
            raise RuntimeError(
                f"ValueControl saw positions from {st.offset} but kept edits only up to "
                f"{known - 1}: passes must go through contrans_tl.forward.Forward (as "
                "generate() does), which tells the hooks where tokens are"
            )
        x = x.clone()
        self._replay(x, first)
        lo = max(known, st.offset)
        if end > lo:  # new positions: one when decoding, all answer tokens when scoring
            new = x[:, lo - st.offset :]
            d = self.edit(new.reshape(-1, new.shape[-1])).reshape(new.shape)
            self._edits += list(d.unbind(1))
            self._norms[0] += float(d.float().norm(dim=-1).sum())
            self._norms[1] += int(d.shape[0] * d.shape[1])
            x[:, lo - st.offset :] += d.to(x.dtype)
        return x

    def _starts_a_sequence(self, x: Tensor, first: int, end: int) -> bool:
        """Whether this pass begins a new sequence, so the kept edits are forgotten: it
        starts inside the prompt after a cache (teacher-forced answers, as TruthfulQA's
        scoring runs them), or at position 0 without being a cacheless rerun of the
        previous pass plus one token (recognised by its states: at this hook point they
        are the previous pass's states, unedited, with one more position)."""
        offset, last = self.state.offset, self._last
        if offset == 0:
            self._last = x.detach().clone()
        if 0 < offset <= first:
            return True
        if offset > 0:
            return False
        if not (
            self._edits
            and last is not None
            and end == first + len(self._edits) + 1
            and last.shape[0] == x.shape[0]
            and last.shape[1] == x.shape[1] - 1
        ):
            return True
        mask = self.state.attention_mask  # padding states are not compared (they vary)
        real = (
            torch.ones(last.shape[:2], dtype=torch.bool, device=x.device)
            if mask is None
            else mask[:, : last.shape[1]].bool().to(x.device)
        )
        return not torch.allclose(last[real], x[:, :-1][real], rtol=1e-4, atol=1e-5)

    def _replay(self, x: Tensor, first: int) -> None:
        """Add the kept edits at the earlier positions this pass holds (a pass without a
        cache reruns them)."""
        offset, seq = self.state.offset, int(x.shape[1])
        for k, d in enumerate(self._edits):
            col = first + k - offset
            if 0 <= col < seq:
                x[:, col] += d.to(x.dtype)

    def _apply(self) -> None:
        context = self.model.hooks(fwd_hooks=[(self.hook_name, self._hook)])
        context.__enter__()
        self._context = context

    def _undo(self) -> None:
        context, self._context = self._context, None
        self._edits, self._last = [], None
        if context is not None:
            context.__exit__(None, None, None)
