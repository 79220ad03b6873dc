"""The batched forward loop: every pass the package makes over a model goes through here.

* :func:`padded_batches`: token-id sequences sorted longest first and padded (left for
  reads and generation, right behind a shared prefix's cache), with their original
  indices, so a batch wastes little compute on padding.
* :func:`forward_until`: a pass with capture hooks that stops right after a chosen hook
  point (the deepest one a read needs), so later blocks and the unembedding never run.
* :func:`logits_at`, :func:`token_logprobs` and :func:`target_scores`: logits (or the
  log-probabilities of given tokens, and whether each is the argmax) only at chosen
  positions. The pass stops at the final norm and only those rows are unembedded, then
  given the model's output transform (:func:`head_logits`: e.g. Gemma 2's final logit
  soft-cap), so they equal the model's own logits there.
* :func:`prefill_cache` and :func:`repeat_cache`: a shared prefix's KV cache, computed
  once without logits and repeated for every row of a batch.
* :class:`Forward`: the only code that tells position-aware hooks (a steering's) where
  the prompt and the generated tokens of each pass are. It enters an intervention for a
  block, and each of its passes sets the intervention's position states (``offset``,
  ``attention_mask``, ``prompt_length``) first; evaluations call it and never touch
  that state.

Example:
    >>> pad = pad_token_id(model.tokenizer, model.cfg.d_vocab)
    >>> with Forward(model, steering) as fwd:
    ...     for batch in padded_batches(seqs, 8, pad):
    ...         last = torch.zeros_like(batch.mask, dtype=torch.bool)
    ...         last[:, -1] = True
    ...         logits = fwd.logits_at(batch.ids, batch.mask, last)  # [8, d_vocab]
"""

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from contrans_tl.sites import model_device

if TYPE_CHECKING:  # steering imports concepts, which read activations through this module
    import contrans_tl.interventions

__all__ = [
    "FINAL_STATE",
    "Batch",
    "padded_batches",
    "forward_until",
    "head_logits",
    "logits_at",
    "target_scores",
    "token_logprobs",
    "prefill_cache",
    "repeat_cache",
    "Forward",
]

PadSide = Literal["left", "right"]
Hook = tuple[str, Callable[..., Any]]

FINAL_STATE = "ln_final.hook_out"
"""The hook point after the final norm: the states the unembedding reads. A pass that
needs only logits stops here, and the unembedding runs on the rows asked for."""
_FINAL = FINAL_STATE

# Positions unembedded per matrix product in token_logprobs (bounds the log-softmax's
# memory to this many rows of d_vocab floats).
_UNEMBED_ROWS = 256


class _StopForward(Exception):
    """Raised after the hook a pass stops at: everything needed has been read."""


@dataclass(frozen=True)
class Batch:
    """One padded batch of :func:`padded_batches`.

    Attributes:
        index: for each row, the position of its sequence in the list given.
        ids: ``[batch, width]`` token ids, padding where the mask is 0.
        mask: ``[batch, width]`` long, 1 on real tokens.
        offsets: for each row, the column of its first token (``width - length`` under
            left padding, 0 under right padding).
        lengths: for each row, the number of real tokens.
    """

    index: list[int]
    ids: Int[Tensor, "batch width"]
    mask: Int[Tensor, "batch width"]
    offsets: list[int]
    lengths: list[int]


def padded_batches(
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    *,
    side: PadSide = "left",
    device: torch.device | str | None = None,
    allow_empty: bool = False,
) -> Iterator[Batch]:
    """Yield ``sequences`` longest first, ``batch_size`` at a time, padded to one width.

    Sequences of one length keep the order given (a stable sort), so the batches depend
    only on the lengths. Left padding puts every row's last token in the last column
    (reads, generation); right padding puts every row's first token in the first column
    (rows that continue a shared prefix's KV cache).

    Args:
        sequences: token ids.
        batch_size: rows per batch (at least 1).
        pad_id: the id at padded positions (masked out; see
            :func:`contrans_tl.tokens.pad_token_id`).
        side: ``"left"`` or ``"right"``.
        device: where the tensors go (``None``: the CPU).
        allow_empty: accept empty sequences (rows with a mask of zeros).

    Raises:
        ValueError: ``batch_size < 1``, an unknown ``side``, or an empty sequence without
            ``allow_empty``.

    Example:
        >>> b = next(padded_batches([[5, 6], [7, 8, 9]], 2, pad_id=0))
        >>> b.index, b.ids.tolist(), b.offsets
        ([1, 0], [[7, 8, 9], [0, 5, 6]], [0, 1])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not allow_empty:
        empty = [i for i, s in enumerate(sequences) if len(s) == 0]
        if empty:
            raise ValueError(f"sequences {empty[:5]} are empty; every row needs a token")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        lengths = [len(sequences[i]) for i in index]
        width = max(lengths)
        ids = torch.full((len(index), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        offsets = [width - n if side == "left" else 0 for n in lengths]
        for r, (i, lo, n) in enumerate(zip(index, offsets, lengths)):
            if n:
                ids[r, lo : lo + n] = torch.tensor(list(sequences[i]), dtype=torch.long)
                mask[r, lo : lo + n] = 1
        yield Batch(index, ids.to(device), mask.to(device), offsets, lengths)


def _then_stop(fn: Callable[..., Any]) -> Callable[..., None]:
    def hook(x: Tensor, *, hook: Any) -> None:
        fn(x, hook=hook)
        raise _StopForward

    return hook


def _ignore(x: Tensor, *, hook: Any) -> None:
    """A hook that only marks where a pass stops."""


def forward_until(
    model: Any,
    ids: Int[Tensor, "batch pos"],
    mask: Tensor | None,
    hooks: Sequence[Hook],
    *,
    stop_after: str | None = None,
    **kwargs: Any,
) -> None:
    """Run ``model`` on a batch with ``hooks``, stopping once ``stop_after`` has run.

    The hooks (``(hook_name, fn)`` as for ``model.hooks``) are removed whatever happens.
    With ``stop_after``, the pass ends right after the last hook at that hook point, so
    nothing after it runs (not even the unembedding). Without a KV cache in ``kwargs``,
    a ``TransformerBridge`` is told ``use_cache=False``: its Hugging Face model would
    otherwise build a cache (keys and values of every layer) that nothing uses.

    Args:
        model: a TransformerLens model.
        ids: token ids; moved to the model's device.
        mask: ``[batch, cache + pos]`` attention mask, 1 on real tokens (``None``: no mask).
        hooks: capture hooks.
        stop_after: the hook point to stop after; it must be one of ``hooks``' names.
        **kwargs: passed to the model (e.g. ``past_key_values``).

    Raises:
        ValueError: ``stop_after`` is not the name of one of ``hooks``.

    Example:
        >>> seen = {}
        >>> hook = ("blocks.1.hook_resid_post", lambda x, hook: seen.update(h=x))
        >>> forward_until(model, ids, mask, [hook], stop_after="blocks.1.hook_resid_post")
    """
    hooks = list(hooks)
    if stop_after is not None:
        names = [name for name, _ in hooks]
        if stop_after not in names:
            raise ValueError(f"stop_after={stop_after!r} is not one of the hooks {names}")
        last = len(names) - 1 - names[::-1].index(stop_after)
        hooks[last] = (stop_after, _then_stop(hooks[last][1]))
    device = model_device(model)
    if hasattr(model, "original_model") and "past_key_values" not in kwargs:
        kwargs.setdefault("use_cache", False)
    if mask is not None:
        kwargs["attention_mask"] = mask.to(device).long()
    with model.hooks(fwd_hooks=hooks), contextlib.suppress(_StopForward):
        model(ids.to(device), return_type=None, **kwargs)


def head_logits(model: Any, states: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows vocab"]:
    """The model's logits from final-normed states: unembedding and output transform.

    The output transform is what the model applies to its logits after the unembedding:
    a ``TransformerBridge``'s adapter (``apply_output_logits_transform``: a final logit
    soft-cap, a logit scale), or a ``HookedTransformer``'s ``output_logits_soft_cap``.

    Example:
        >>> head_logits(model, final_normed_states)  # == model(ids) at those positions
    """
    logits = model.unembed(states)
    transform = getattr(getattr(model, "adapter", None), "apply_output_logits_transform", None)
    if transform is not None:
        return transform(logits)
    cap = float(getattr(getattr(model, "cfg", None), "output_logits_soft_cap", 0.0) or 0.0)
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def _states_at(
    model: Any, ids: Tensor, mask: Tensor | None, at: Tensor, **kwargs: Any
) -> Tensor | None:
    """Final-normed states at ``at`` (row-major), or ``None`` without a final-norm hook."""
    if _FINAL not in model.hook_dict:
        return None
    got: dict[str, Tensor] = {}

    def grab(x: Tensor, *, hook: Any) -> None:
        got["h"] = x[at.to(x.device)]

    forward_until(model, ids, mask, [(_FINAL, grab)], stop_after=_FINAL, **kwargs)
    return got["h"]


def _call(model: Any, ids: Tensor, mask: Tensor | None, **kwargs: Any) -> Any:
    """``model(ids, attention_mask=mask, **kwargs)`` on the model's device."""
    device = model_device(model)
    if mask is not None:
        kwargs["attention_mask"] = mask.to(device).long()
    return model(ids.to(device), **kwargs)


def logits_at(
    model: Any,
    ids: Int[Tensor, "batch pos"],
    mask: Tensor | None,
    at: Bool[Tensor, "batch pos"],
    **kwargs: Any,
) -> Float[Tensor, "n vocab"]:
    """The model's logits at the positions where ``at`` is True, nothing else unembedded.

    Args:
        model: a TransformerLens model.
        ids: token ids of the pass.
        mask: ``[batch, cache + pos]`` attention mask (``None``: no mask).
        at: the positions wanted.
        **kwargs: passed to the model (e.g. ``past_key_values``).

    Returns:
        ``[n, d_vocab]`` float32, rows in row-major order of ``at`` (row by row, then by
        position): the model's own logits there, output transform included.

    Example:
        >>> at = torch.zeros_like(ids, dtype=torch.bool)
        >>> at[:, -1] = True
        >>> logits_at(model, ids, mask, at)  # == model(ids, attention_mask=mask)[:, -1]
    """
    states = _states_at(model, ids, mask, at, **kwargs)
    if states is None:
        return _call(model, ids, mask, **kwargs)[at.to(model_device(model))].float()
    return head_logits(model, states[None])[0].float()


def token_logprobs(
    model: Any,
    ids: Int[Tensor, "batch pos"],
    mask: Tensor | None,
    at: Bool[Tensor, "batch pos"],
    targets: Int[Tensor, "batch pos"],
    **kwargs: Any,
) -> Float[Tensor, " n"]:
    """``log p(targets[r, j])`` at each position ``(r, j)`` where ``at`` is True.

    As :func:`logits_at`, but the logits are unembedded a few hundred rows at a time and
    only the target's log-probability is kept, so the memory is bounded whatever the
    number of positions.

    Returns:
        ``[n]`` float32 in row-major order of ``at``.

    Example:
        >>> at = mask.bool()
        >>> at[:, -1] = False                      # the last token predicts nothing
        >>> nll = -token_logprobs(model, ids, mask, at, ids.roll(-1, dims=1)).sum()
    """
    return target_scores(model, ids, mask, at, targets, **kwargs)[0]


def target_scores(
    model: Any,
    ids: Int[Tensor, "batch pos"],
    mask: Tensor | None,
    at: Bool[Tensor, "batch pos"],
    targets: Int[Tensor, "batch pos"],
    **kwargs: Any,
) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"]]:
    """:func:`token_logprobs`, and whether each target is the greedy (argmax) token.

    Returns:
        ``(logprobs, is_greedy)``, each ``[n]`` in row-major order of ``at``; a target
        tied with another token for the top logit counts as greedy.

    Example:
        >>> lp, top = target_scores(model, ids, mask, at, ids.roll(-1, dims=1))
        >>> bool(top.all())                        # is the text the greedy continuation?
    """
    device = model_device(model)
    wanted = targets.to(device)[at.to(device)]
    states = _states_at(model, ids, mask, at, **kwargs)
    chunks: Iterable[Tensor]
    if states is None:
        chunks = [_call(model, ids, mask, **kwargs)[at.to(device)].float()]
    else:
        chunks = (
            head_logits(model, states[None, lo : lo + _UNEMBED_ROWS])[0].float()
            for lo in range(0, states.shape[0], _UNEMBED_ROWS)
        )
    lps, tops = [], []
    lo = 0
    for logits in chunks:
        want = wanted[lo : lo + logits.shape[0], None].to(logits.device)
        lo += logits.shape[0]
        lp = torch.log_softmax(logits, dim=-1)
        lps.append(lp.gather(-1, want)[:, 0])
        tops.append(logits.gather(-1, want)[:, 0] >= logits.max(dim=-1).values)
    if not lps:
        return torch.empty(0, device=device), torch.empty(0, dtype=torch.bool, device=device)
    return torch.cat(lps), torch.cat(tops)


def prefill_cache(
    model: Any, ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None
) -> Any:
    """The KV cache of ``ids`` without computing any logits.

    An empty Hugging Face ``DynamicCache`` is filled in place by the forward pass, which
    stops at the final norm: the unembedding (262k columns for Gemma) never runs.
    ``attention_mask`` (``[batch, pos]``, 0 at padding) is needed for left-padded rows.
    A model without a Hugging Face config or a final-norm hook runs in full.

    Example:
        >>> cache = prefill_cache(model, torch.tensor([prefix_ids]))
        >>> logits = model(query_ids, past_key_values=repeat_cache(cache, rows))
    """
    from transformers import DynamicCache

    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    if hf_config is None or _FINAL not in model.hook_dict:
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        return model(ids, return_type="logits_and_cache", **kwargs)[1]
    cache = DynamicCache(config=hf_config)
    forward_until(
        model, ids, attention_mask, [(_FINAL, _ignore)], stop_after=_FINAL, past_key_values=cache
    )
    return cache


def repeat_cache(cache: Any, rows: Int[Tensor, " n"]) -> Any:
    """A cache holding ``rows`` of ``cache``'s batch (repeats allowed); ``cache`` is kept.

    Row ``i`` of the result is row ``rows[i]`` of ``cache``: ``torch.zeros(n)`` repeats a
    one-row prefix ``n`` times. Later passes add to the new cache only.

    Example:
        >>> prefix = prefill_cache(model, torch.tensor([prefix_ids]))
        >>> cache = repeat_cache(prefix, torch.zeros(8, dtype=torch.long))  # 8 rows
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        out = copy.deepcopy(cache)
        out.batch_select_indices(rows)
        return out
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in layers]
    for layer in out.layers:
        # reassigns keys/values to new tensors; the shared originals are untouched, and
        # later updates concatenate into new tensors too
        layer.batch_select_indices(rows)
    return out


class Forward:
    """Forward passes over one model, under an intervention that is told where tokens are.

    Inside ``with Forward(model, intervention) as fwd:`` the intervention is entered
    (counted: one the caller entered stays in force after the block), and each pass first
    sets the position state of its position-aware hooks
    (:func:`contrans_tl.interventions.position_states`, e.g. a steering's): ``offset``
    (absolute position of the pass's first token, the cache length), ``attention_mask``
    (``[batch, offset + pos]``) and ``prompt_length`` (padded prompt length; positions
    from it on are generated; ``None``: all prompt). The states are reset when the block
    ends. Without an intervention the passes need no ``with``.

    Args:
        model: the TransformerLens model.
        intervention: any :class:`~contrans_tl.interventions.Intervention` for ``model``
            (a steering, a weight swap, a stack of them), or ``None``.

    Raises:
        ValueError: on entering, ``intervention`` was made for another model.

    Example:
        >>> with Forward(model, steering) as fwd:
        ...     cache = fwd.prefill(prefix)                       # positions 0..p-1
        ...     logits = fwd.logits_at(ids, mask, at, offset=p,
        ...                            past_key_values=repeat_cache(cache, rows))
    """

    def __init__(
        self, model: Any, intervention: "contrans_tl.interventions.Intervention | None" = None
    ) -> None:
        self.model = model
        self.intervention = intervention
        self._states: list[Any] | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "Forward":
        from contrans_tl.interventions.base import applied, position_states

        if self._stack is not None:
            raise RuntimeError("this Forward is in use already; make another one")
        states = position_states(self.intervention)
        stack = contextlib.ExitStack()
        stack.enter_context(applied(self.intervention, self.model))
        for state in states:
            stack.callback(state.reset)
        self._stack, self._states = stack, states
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack, self._states = self._stack, None, None
        if stack is not None:
            stack.__exit__(*exc)

    def _tell(self, mask: Tensor | None, offset: int, prompt_length: int | None) -> Tensor | None:
        """Set the position states for the next pass; returns the mask on the model's device."""
        if mask is not None:
            mask = mask.to(model_device(self.model)).long()
        if self.intervention is None:
            return mask  # no position-aware hooks of ours to tell
        if self._states is None:
            raise RuntimeError(
                "a Forward with an intervention runs only inside `with Forward(model, "
                "intervention) as fwd:` (the intervention is in force there)"
            )
        for state in self._states:
            state.offset, state.attention_mask, state.prompt_length = offset, mask, prompt_length
        return mask

    def run(
        self,
        ids: Int[Tensor, "batch pos"],
        mask: Tensor | None = None,
        *,
        offset: int = 0,
        prompt_length: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """The model's own forward pass (``model(ids, attention_mask=mask, **kwargs)``).

        Args:
            ids: token ids of the pass.
            mask: ``[batch, offset + pos]`` attention mask (``None``: all real).
            offset: absolute position of ``ids``' first column (the cache length).
            prompt_length: padded prompt length (``None``: every position is prompt).
            **kwargs: passed to the model (``past_key_values``, ``return_type``).
        """
        mask = self._tell(mask, offset, prompt_length)
        return _call(self.model, ids, mask, **kwargs)

    def logits_at(
        self,
        ids: Int[Tensor, "batch pos"],
        mask: Tensor | None,
        at: Bool[Tensor, "batch pos"],
        *,
        offset: int = 0,
        prompt_length: int | None = None,
        **kwargs: Any,
    ) -> Float[Tensor, "n vocab"]:
        """:func:`logits_at` with the positions told (arguments as in :meth:`run`)."""
        mask = self._tell(mask, offset, prompt_length)
        return logits_at(self.model, ids, mask, at, **kwargs)

    def token_logprobs(
        self,
        ids: Int[Tensor, "batch pos"],
        mask: Tensor | None,
        at: Bool[Tensor, "batch pos"],
        targets: Int[Tensor, "batch pos"],
        *,
        offset: int = 0,
        prompt_length: int | None = None,
        **kwargs: Any,
    ) -> Float[Tensor, " n"]:
        """:func:`token_logprobs` with the positions told (arguments as in :meth:`run`)."""
        got = self.target_scores(
            ids, mask, at, targets, offset=offset, prompt_length=prompt_length, **kwargs
        )
        return got[0]

    def target_scores(
        self,
        ids: Int[Tensor, "batch pos"],
        mask: Tensor | None,
        at: Bool[Tensor, "batch pos"],
        targets: Int[Tensor, "batch pos"],
        *,
        offset: int = 0,
        prompt_length: int | None = None,
        **kwargs: Any,
    ) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"]]:
        """:func:`target_scores` with the positions told (arguments as in :meth:`run`)."""
        mask = self._tell(mask, offset, prompt_length)
        return target_scores(self.model, ids, mask, at, targets, **kwargs)

    def prefill(
        self,
        ids: Int[Tensor, "batch pos"],
        mask: Tensor | None = None,
        *,
        prompt_length: int | None = None,
    ) -> Any:
        """:func:`prefill_cache` of ``ids`` (absolute positions from 0)."""
        mask = self._tell(mask, 0, prompt_length)
        device = model_device(self.model)
        return prefill_cache(self.model, ids.to(device), attention_mask=mask)

    def decoder(
        self, prompt_length: int, *, use_cache: bool = True
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """A ``step(ids, mask) -> [batch, d_vocab]`` giving next-token logits, for
        :func:`contrans_tl.steering.greedy_decode`.

        ``ids`` and ``mask`` are the whole sequences so far (prompt of ``prompt_length``
        columns, then the generated tokens). With ``use_cache`` the first step runs the
        prompt and keeps its KV cache, and each later step feeds only the last token;
        without, every step reruns the whole sequence. Only the last position is unembedded
        (``logits_to_keep=1``): on a 262k-token vocabulary the prompt's other positions
        would cost more than the rest of the model.
        """
        cache: Any = None

        def step(ids: Tensor, mask: Tensor) -> Tensor:
            nonlocal cache
            if not use_cache:
                return self.run(ids, mask, prompt_length=prompt_length, logits_to_keep=1)[:, -1]
            if cache is None:
                logits, cache = self.run(
                    ids,
                    mask,
                    prompt_length=prompt_length,
                    return_type="logits_and_cache",
                    logits_to_keep=1,
                )
            else:
                logits, cache = self.run(
                    ids[:, -1:],
                    mask,
                    offset=ids.shape[1] - 1,
                    prompt_length=prompt_length,
                    past_key_values=cache,
                    return_type="logits_and_cache",
                )
            return logits[:, -1]

        return step
