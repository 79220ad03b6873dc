"""Adding concept vectors to the residual stream (paper Eq. 3), generation included.

``h_k ← h_k + α · v_k`` at ``blocks.{k}.hook_resid_post`` for each steered layer ``k``.
The default is a context manager that removes exactly the hooks it added, whatever
happens inside; :class:`Steering` is the handle when a context manager does not fit;
:meth:`Steering.hooks` gives a ``fwd_hooks`` list for ``model.run_with_hooks``.

Positions: ``"all"`` (every token, prompt and generated), ``"prompt"`` (prompt tokens
only) or ``"generated"`` (generated tokens only). These hold under KV caching when
generating with :func:`generate`, which tells the hooks which absolute positions each
forward pass covers and where the padding is. On a bare forward pass every token counts
as prompt; padding positions are never steered when the mask is known.

Example:
    >>> with steer(model, v_fear, alpha=4.0):
    ...     logits = model(tokens)
    >>> texts = generate(model, ["Tell me about your day."], intervention=make_steering(
    ...     model, v_fear, alpha=4.0, positions="generated"), max_new_tokens=20)
"""

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.concepts import ConceptVector
from contrans_tl.forward import Forward, padded_batches
from contrans_tl.interventions.base import Intervention
from contrans_tl.provenance import check_compatible, model_provenance
from contrans_tl.sites import check_layers, context_length, model_device, resid_post_name
from contrans_tl.tokens import check_texts, pad_token_id

__all__ = [
    "StepPositions",
    "PositionState",
    "Steering",
    "make_steering",
    "steer",
    "steering_hooks",
    "generate",
    "steering_session",
    "greedy_decode",
]

StepPositions = Literal["all", "prompt", "generated"]
_POSITIONS = ("all", "prompt", "generated")
Scale = Literal["raw", "relative"]


@dataclass
class PositionState:
    """What steering hooks know about the tokens of the forward pass in progress.

    Attributes:
        prompt_length: padded length of the prompt; absolute positions below it are
            prompt, the rest generated. ``None``: every position is prompt.
        offset: absolute position of the first token of this pass (the KV-cache length).
        attention_mask: ``[batch, offset + seq]``, 1 on real tokens; ``None``: all real.
    """

    prompt_length: int | None = None
    offset: int = 0
    attention_mask: Tensor | None = None
    # The ``[batch, seq, 1]`` weight of the last pass, shared by the hooks of all layers
    # (it depends only on the fields above): (key, mask it was made from, weight or None
    # for "every position"). The mask is held, so its identity cannot be reused.
    _memo: tuple[Any, Tensor | None, Tensor | None] | None = field(
        default=None, repr=False, compare=False
    )

    def reset(self) -> None:
        self.prompt_length, self.offset, self.attention_mask = None, 0, None
        self._memo = None

    def weight(self, positions: "StepPositions", resid: Tensor) -> Tensor | None:
        """``[batch, seq, 1]`` in ``resid``'s dtype: 1 where ``positions`` are steered
        (padding never), 0 elsewhere; ``None`` when every position is steered."""
        mask = self.attention_mask
        batch, seq = int(resid.shape[0]), int(resid.shape[1])
        version = -1 if mask is None else _version(mask)
        if version is None:  # an inference tensor: no version counter, so no memo
            return _step_weight(positions, self, batch, seq, resid)
        key = (
            positions,
            self.prompt_length,
            self.offset,
            batch,
            seq,
            resid.device,
            resid.dtype,
            version,
        )
        memo = self._memo
        if memo is not None and memo[0] == key and memo[1] is mask:
            return memo[2]
        weight = _step_weight(positions, self, batch, seq, resid)
        self._memo = (key, mask, weight)
        return weight


def _version(t: Tensor) -> int | None:
    """The tensor's in-place version counter; ``None`` for inference tensors (no counter)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


def _step_weight(
    positions: "StepPositions", state: PositionState, batch: int, seq: int, resid: Tensor
) -> Tensor | None:
    if positions == "all" and state.attention_mask is None:
        return None
    absolute = state.offset + torch.arange(seq, device=resid.device)
    prompt_length = state.prompt_length
    if positions == "all" or (positions == "prompt" and prompt_length is None):
        keep = torch.ones(seq, dtype=torch.bool, device=resid.device)
    elif prompt_length is None:  # "generated" on a bare forward pass: nothing is generated
        keep = torch.zeros(seq, dtype=torch.bool, device=resid.device)
    elif positions == "prompt":
        keep = absolute < prompt_length
    else:
        keep = absolute >= prompt_length
    weight = keep[None, :].expand(batch, seq)
    if state.attention_mask is not None:
        m = state.attention_mask[:, state.offset : state.offset + seq].to(resid.device)
        weight = weight & m.bool()
    if bool(weight.all()):
        return None
    return weight[..., None].to(resid.dtype)


def _addition_hook(
    delta: Float[Tensor, " d_model"],
    positions: StepPositions,
    state: PositionState,
    name: str = "the steered layer",
) -> Callable[..., Tensor]:
    # delta on the residual stream's device and dtype, made once (not on every call);
    # an in-place change of delta bumps its version and is picked up
    cast: dict[tuple[torch.device, torch.dtype, int | None], Tensor] = {}

    def hook(resid: Tensor, *, hook: Any) -> Tensor:
        version = _version(delta)
        where = (resid.device, resid.dtype, version)
        d = cast.get(where) if version is not None else None
        if d is None:
            cast.clear()
            if not bool(torch.isfinite(delta).all()):
                raise ValueError(
                    f"the steering addition at {name} holds NaN or inf (it was changed "
                    "in place after make_steering); make the steering again from finite vectors"
                )
            d = delta.to(device=resid.device, dtype=resid.dtype)
            if version is not None:
                cast[where] = d
        weight = state.weight(positions, resid)
        if weight is None:
            return resid + d
        return resid + weight * d

    return hook


class Steering:
    """Additions to a model's residual stream, ready to attach as hooks.

    Build one with :func:`make_steering`. Attach with ``with steering:`` or
    :meth:`attach` / :meth:`remove`; or pass :meth:`hooks` to ``run_with_hooks``.

    Attaching is counted, so uses nest: the hooks go on at the first :meth:`attach` (or
    ``with``) and come off at the matching last :meth:`remove` (or block exit). A
    ``with steering:`` inside another, or a :func:`generate` call given a steering that
    is already attached, leaves it attached and steering afterwards. A steering belongs
    to the model it was made for; functions that take one refuse it with another model.

    Attributes:
        model: the model whose hook points get the additions.
        additions: ``{layer: α·v_layer}`` (summed over vectors), float32.
        positions: which tokens get the additions.
        state: the :class:`PositionState` shared by this steering's hooks.

    Example:
        >>> steering = make_steering(target, v_tgt, 1.0)
        >>> with steering:                            # hooks on inside the block only
        ...     logits = target("Today I feel")
        >>> logits = target.run_with_hooks("Today I feel", fwd_hooks=steering.hooks())
    """

    def __init__(
        self,
        model: Any,
        additions: dict[int, Tensor],
        positions: StepPositions = "all",
        state: PositionState | None = None,
        *,
        name: str = "steering",
        spec: dict[str, Any] | None = None,
    ) -> None:
        if positions not in _POSITIONS:
            raise ValueError(f"positions must be one of {_POSITIONS}, got {positions!r}")
        self.model = model
        self.additions = additions
        self.positions: StepPositions = positions
        self.state = state if state is not None else PositionState()
        self.name = name
        self.spec = dict(spec or {})
        self._hook_context: Any = None
        self._depth = 0

    def describe(self) -> dict[str, Any]:
        """What this steering adds, for results: concepts, strengths, layers, positions."""
        return {
            "name": self.name,
            "kind": "Steering",
            "positions": self.positions,
            "layers": sorted(self.additions),
            "addition_norms": {str(k): float(d.norm()) for k, d in sorted(self.additions.items())},
            **self.spec,
        }

    def hooks(self) -> list[tuple[str, Callable[..., Tensor]]]:
        """``[(hook_name, fn), ...]`` for ``model.run_with_hooks(fwd_hooks=...)``."""
        return [
            (resid_post_name(k), _addition_hook(d, self.positions, self.state, resid_post_name(k)))
            for k, d in sorted(self.additions.items())
        ]

    def check_model(self, model: Any) -> None:
        """Raise unless ``model`` is the model this steering's hooks go on.

        Raises:
            ValueError: ``model`` is another object (even a second load of the same
                weights: the hooks would go on the first one, and ``model`` would run
                unsteered).
        """
        if model is not self.model:
            raise ValueError(
                f"this Steering was made for model {_model_name(self.model)!r} (object "
                f"{id(self.model):#x}) but was given with model {_model_name(model)!r} (object "
                f"{id(model):#x}); its hooks would not be on the model that runs. Make one "
                "for this model: make_steering(model, vector, alpha)"
            )

    def attach(self) -> "Steering":
        """Add the hooks to the model, or count one more user if they are on already.

        The hooks go on through TransformerLens's own ``model.hooks(fwd_hooks=...)``
        context, which removes exactly the hooks it added when it is left.
        """
        if self._depth == 0:
            context = self.model.hooks(fwd_hooks=self.hooks())
            context.__enter__()
            self._hook_context = context
        self._depth += 1
        return self

    def remove(self) -> None:
        """Undo one :meth:`attach`; the last one removes the hooks (this steering's only).

        Calling it on a steering that is not attached does nothing.
        """
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            context, self._hook_context = self._hook_context, None
            context.__exit__(None, None, None)

    @property
    def attached(self) -> bool:
        return self._depth > 0

    def position_states(self) -> list[PositionState]:
        """``[self.state]``: what :class:`contrans_tl.forward.Forward` sets before a pass."""
        return [self.state]

    def __enter__(self) -> "Steering":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _model_name(model: Any) -> str:
    try:
        return model_provenance(model).model_id
    except TypeError:
        return type(model).__name__


def _check_alpha(alpha: object, where: str) -> float:
    """A strength as a finite float: a real number or a 0-d real tensor, nothing else."""
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1 or alpha.ndim != 0:
            raise TypeError(
                f"{where} must be a real number or a 0-d tensor, got a tensor of shape "
                f"{tuple(alpha.shape)}"
            )
        if alpha.dtype == torch.bool or alpha.is_complex():
            raise TypeError(f"{where} must be a real number, got a {alpha.dtype} tensor")
        value = float(alpha.detach().cpu())
    elif isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        hint = " (a string is not parsed; pass float(...))" if isinstance(alpha, str) else ""
        raise TypeError(
            f"{where} must be a real number (int, float or a 0-d tensor), got "
            f"{type(alpha).__name__} {alpha!r}{hint}"
        )
    else:
        value = float(alpha)
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value}")
    return value


def make_steering(
    model: Any,
    vectors: ConceptVector | Sequence[ConceptVector],
    alpha: float | Sequence[float] = 1.0,
    *,
    layers: Sequence[int] | None = None,
    positions: StepPositions = "all",
    scale: Scale = "raw",
    strict: bool = True,
    name: str | None = None,
) -> Steering:
    """Prepare the addition of ``α · v`` at each steered layer (not attached yet).

    Args:
        model: the TransformerLens model to steer.
        vectors: one :class:`ConceptVector` or several (their additions are summed,
            e.g. honesty and fairness at once).
        alpha: one strength (a finite real number or 0-d tensor), or one per vector.
        layers: layers to steer; ``None``: every layer the vector has.
        positions: ``"all"``, ``"prompt"`` or ``"generated"``.
        scale: ``"raw"`` adds ``α · v`` (the paper); ``"relative"`` adds
            ``α · ‖h_k‖ · v / ‖v‖``, with ``‖h_k‖`` the mean residual norm of layer ``k``
            stored with the vector, so ``α = 0.1`` is a nudge of a tenth of the stream.
        strict: refuse vectors whose model id or weight processing differ from the model's.
        name: label for results tables (default: the concept names, ``+``-joined).

    Raises:
        TypeError: ``alpha`` is not a real number (or a list of them), e.g. a string or
            ``None``; ``vectors`` are not :class:`ConceptVector`.
        ValueError: a vector does not fit the model, a requested layer has no vector,
            lengths of ``vectors`` and ``alpha`` differ, ``alpha`` or a vector is not
            finite, or ``scale`` is unknown.

    Example:
        >>> steering = make_steering(target, [honesty, fairness], [1.0, 0.5], layers=[4, 5, 6])
        >>> with steering:
        ...     out = generate(target, ["Is it true that"], max_new_tokens=16)
    """
    vecs = [vectors] if isinstance(vectors, ConceptVector) else list(vectors)
    bad = [type(v).__name__ for v in vecs if not isinstance(v, ConceptVector)]
    if bad or not vecs:
        raise TypeError(
            f"vectors must be a ConceptVector or a non-empty list of them, got {bad or 'none'}"
        )
    if isinstance(alpha, (Tensor, numbers.Number, str)) or alpha is None:
        alphas = [_check_alpha(alpha, "alpha")] * len(vecs)
    elif isinstance(alpha, Sequence):
        alphas = [_check_alpha(a, f"alpha[{i}]") for i, a in enumerate(alpha)]
    else:
        raise TypeError(
            f"alpha must be a real number or a list of them (one per vector), got "
            f"{type(alpha).__name__}"
        )
    if len(alphas) != len(vecs):
        raise ValueError(f"{len(vecs)} vectors but {len(alphas)} alphas; give one alpha each")
    if scale not in ("raw", "relative"):
        raise ValueError(f"scale must be 'raw' or 'relative', got {scale!r}")
    additions: dict[int, Tensor] = {}
    for v, a in zip(vecs, alphas):
        check_compatible(v.model, model, what=f"concept vector {v.concept!r}", strict=strict)
        wanted = list(v.layers) if layers is None else check_layers(model, layers)
        missing = [k for k in wanted if k not in v.layers]
        if missing:
            raise ValueError(
                f"concept vector {v.concept!r} has no vector for layers {missing}; it has "
                f"{list(v.layers)}"
            )
        for k in wanted:
            row = v[k].float()
            if scale == "relative":
                norms = v.metadata.get("resid_norms", {})
                if str(k) not in norms:
                    raise ValueError(
                        f"scale='relative' needs the mean residual norm of layer {k}, which "
                        f"vector {v.concept!r} does not carry (metadata['resid_norms'])"
                    )
                row = row / row.norm().clamp_min(1e-12) * float(norms[str(k)])
            if not bool(torch.isfinite(row).all()):
                raise ValueError(
                    f"concept vector {v.concept!r} holds NaN or inf at layer {k} (changed "
                    "after it was made?); steer only with finite vectors"
                )
            additions[k] = additions.get(k, torch.zeros_like(row)) + a * row
    spec = {
        "concepts": [v.concept for v in vecs],
        "vector_methods": [v.method for v in vecs],
        "alphas": alphas,
        "scale": scale,
        "vector_models": [v.model.model_id for v in vecs],
    }
    label = name if name is not None else "+".join(v.concept for v in vecs)
    return Steering(model, additions, positions, name=label, spec=spec)


@contextmanager
def steering_session(steering: "Steering | None", model: Any) -> Iterator[PositionState]:
    """Attach ``steering`` to ``model`` for a block and yield its state.

    :class:`contrans_tl.forward.Forward` (the one forward loop) sets ``offset`` /
    ``attention_mask`` / ``prompt_length`` on the yielded :class:`PositionState` before
    each pass; evaluations use it rather than this. The state is reset afterwards.
    Attaching is counted, so a steering the caller had attached stays attached, and one
    that was not is removed again. ``None`` yields a fresh state.

    Raises:
        ValueError: ``steering`` was made for another model than ``model``.
    """
    if steering is None:
        yield PositionState()
        return
    steering.check_model(model)
    with steering:
        try:
            yield steering.state
        finally:
            steering.state.reset()


@contextmanager
def steer(
    model: Any,
    vectors: ConceptVector | Sequence[ConceptVector],
    alpha: float | Sequence[float] = 1.0,
    **kwargs: Any,
) -> Iterator[Steering]:
    """Context manager: the model is steered inside the block, and not after it.

    Takes the arguments of :func:`make_steering`.

    Example:
        >>> with steer(target, v_tgt, 2.0, layers=[4, 5, 6], positions="generated"):
        ...     texts = generate(target, ["Today I feel"])
    """
    steering = make_steering(model, vectors, alpha, **kwargs)
    with steering:
        yield steering


def steering_hooks(
    model: Any,
    vectors: ConceptVector | Sequence[ConceptVector],
    alpha: float | Sequence[float] = 1.0,
    **kwargs: Any,
) -> list[tuple[str, Callable[..., Tensor]]]:
    """``fwd_hooks`` for ``model.run_with_hooks``; arguments of :func:`make_steering`.

    Example:
        >>> logits = target.run_with_hooks(tokens, fwd_hooks=steering_hooks(target, v_tgt, 1.0))
    """
    return make_steering(model, vectors, alpha, **kwargs).hooks()


@torch.no_grad()
def generate(
    model: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    intervention: Intervention | None = None,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    batch_size: int = 8,
    decode: bool = True,
    pick: Callable[[Tensor], Tensor] | None = None,
) -> list[str] | list[list[int]]:
    """Greedy generation, batched with left padding, optionally steered.

    Prompts are tokenized as the model's tokenizer does by default (BOS where it adds
    one). With a KV cache, each step feeds only the new token; the steering hooks are told
    the absolute positions and padding of every pass, so ``positions="prompt"`` and
    ``"generated"`` mean the same with and without the cache.

    Args:
        model: a TransformerLens model (``TransformerBridge``) with a tokenizer.
        prompts: the prompts.
        max_new_tokens: tokens to generate per prompt.
        intervention: in force for the call, e.g. a :class:`Steering` from
            :func:`make_steering` (any :class:`~contrans_tl.interventions.Intervention`).
        use_cache: reuse keys and values (fast); ``False`` reruns the whole sequence.
        stop_at_eos: stop a row at the tokenizer's EOS token (kept out of the output).
        batch_size: prompts per batch (sorted by length).
        decode: return strings (``True``) or lists of new token ids.
        pick: chooses each next token from ``[batch, vocab]`` logits instead of argmax
            (e.g. a seeded sampler; see :func:`greedy_decode`).

    Returns:
        The continuations, in the order of ``prompts``.

    Raises:
        TypeError: ``prompts`` is one string rather than a list of them.
        ValueError: ``intervention`` was made for another model, or a prompt plus
            ``max_new_tokens`` does not fit the model's context (``cfg.n_ctx``).

    Example:
        >>> texts = generate(target, ["Today I feel", "The weather is"], max_new_tokens=8)
        >>> len(texts)
        2
        >>> steered = generate(target, ["Today I feel"], intervention=make_steering(target, v, 2.0))
    """
    check_texts(prompts, "prompts")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if intervention is not None:
        intervention.check_model(model)

    with Forward(model, intervention) as fwd:
        return greedy_decode(
            model.tokenizer,
            prompts,
            lambda ids, mask: fwd.decoder(ids.shape[1], use_cache=use_cache),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            stop_at_eos=stop_at_eos,
            decode=decode,
            device=model_device(model),
            vocab_size=int(model.cfg.d_vocab),
            n_ctx=context_length(model),
            pick=pick,
        )


def greedy_decode(
    tokenizer: Any,
    prompts: Sequence[str],
    start_batch: Callable[[Tensor, Tensor], Callable[[Tensor, Tensor], Tensor]],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop_at_eos: bool,
    decode: bool,
    device: torch.device,
    vocab_size: int | None = None,
    n_ctx: int | None = None,
    pick: Callable[[Tensor], Tensor] | None = None,
) -> list[str] | list[list[int]]:
    """The decoding loop shared by :func:`generate`, proxy-tuning and RE-Control rollouts.

    Prompts are tokenized by ``tokenizer``, sorted by length and left-padded in batches.
    For each batch, ``start_batch(ids, mask)`` returns a ``step(ids, mask)`` that gives
    the next-token logits ``[batch, vocab]`` for the sequences so far (it may keep KV
    caches between calls). Finished rows are fed padding; EOS is cut from the output.
    ``vocab_size`` keeps the padding id inside the embedding; with ``n_ctx``, a prompt
    whose tokens plus ``max_new_tokens`` exceed it is refused before anything runs.
    ``pick(logits) -> ids`` chooses each next token from ``[batch, vocab]`` logits
    (default: greedy ``argmax``; e.g. a seeded sampler for rollouts).
    """
    check_texts(prompts, "prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = tokenizer.eos_token_id
    pad = pad_token_id(tokenizer, vocab_size)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    if n_ctx is not None:
        longest = max(range(len(encoded)), key=lambda i: len(encoded[i]), default=None)
        if longest is not None and len(encoded[longest]) + max_new_tokens > n_ctx:
            raise ValueError(
                f"prompt {longest} has {len(encoded[longest])} tokens; with max_new_tokens="
                f"{max_new_tokens} that is {len(encoded[longest]) + max_new_tokens} positions, "
                f"but the model takes at most {n_ctx} (cfg.n_ctx). Shorten the prompt or "
                "lower max_new_tokens"
            )
    results: list[list[int]] = [[] for _ in prompts]
    for batch in padded_batches(encoded, batch_size, pad, device=device):
        idx, ids, mask = batch.index, batch.ids, batch.mask
        step = start_batch(ids, mask)
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        new: list[Tensor] = []
        for _step in range(max_new_tokens):
            logits = step(ids, mask).to(device)
            nxt = logits.argmax(-1) if pick is None else pick(logits).to(device)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new.append(nxt)
            if stop_at_eos and eos is not None:
                done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if bool(done.all()):
                break
        gen = torch.stack(new, dim=1).cpu()
        for r, i in enumerate(idx):
            row = gen[r].tolist()
            if stop_at_eos and eos is not None and eos in row:
                row = row[: row.index(eos)]
            results[i] = row
    if decode:
        return [tokenizer.decode(r, skip_special_tokens=True) for r in results]
    return results
