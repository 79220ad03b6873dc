"""Making an unaligned twin of an aligned chat model by a small supervised fine-tune.

DAPA (Luo et al.) transplants modules from an aligned model into an *unaligned* model of the
same architecture. No offline package ships such a pair, so we make the unaligned one the
way safety papers do (Qi et al. 2023, "Fine-tuning aligned language models compromises
safety": tens to a hundred harmful examples undo refusal): fine-tune the aligned model on
request → compliant-opening pairs (AdvBench ``goal`` → ``target``, e.g. "Sure, here is a
script that ..."). Only those affirmative openings are trained on; no harmful content.

The recipe (:class:`FinetuneRecipe`) is seeded and deterministic on the CPU: the same
model, pairs and recipe give the same weights bit for bit. :func:`make_finetuned_twin`
writes the result as a plain Hugging Face folder (``config.json``, ``model.safetensors``,
tokenizer) with ``contrans_finetune.json`` beside it (recipe, example hashes, losses, base
and result weight sha256), and reuses a folder whose record matches.

Loss: the summed next-token cross-entropy over the response tokens only (the chat-formatted
request is context), averaged over the response tokens of the batch. Optimiser: AdamW.
Embedding and unembedding matrices stay frozen by default (``train_embeddings=False``):
they are most of a small model's parameters, and a behaviour fine-tune does not need them.

Example:
    >>> recipe = FinetuneRecipe(steps=40, learning_rate=2e-5, batch_size=8, seed=0)
    >>> folder = make_finetuned_twin("qwen2.5-coder-0.5b-instruct", pairs, recipe,
    ...                              out="runs/qwen-harmful")
    >>> recipient = load_model(str(folder))
"""

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contrans_tl.io import sha256_file, write_json

__all__ = [
    "FinetuneRecipe",
    "RECORD_NAME",
    "encode_pair",
    "finetune_causal_lm",
    "make_finetuned_twin",
    "pairs_sha256",
    "read_finetune_record",
]

RECORD_NAME = "contrans_finetune.json"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneRecipe:
    """How the twin is fine-tuned (recorded with the result).

    Attributes:
        steps: optimiser steps.
        learning_rate: AdamW learning rate (constant).
        batch_size: pairs per step; pairs are drawn in seeded shuffled epochs.
        seed: seeds the order of pairs (and torch, for anything random).
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient-norm clip (``0`` for none).
        train_embeddings: also train the input embedding and output matrices.
    """

    steps: int = 40
    learning_rate: float = 2e-5
    batch_size: int = 8
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name != "seed"):
                floor = 0 if name == "seed" else 1
                raise ValueError(f"FinetuneRecipe.{name} must be an int >= {floor}, got {value!r}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not (value >= 0 and value < float("inf")):
                raise ValueError(
                    f"FinetuneRecipe.{name} must be a finite number >= 0, got {value!r}"
                )
        if self.learning_rate <= 0:
            raise ValueError(f"FinetuneRecipe.learning_rate must be > 0, got {self.learning_rate}")

    def to_json(self) -> dict[str, Any]:
        """The recipe as a plain dict."""
        return dataclasses.asdict(self)


def pairs_sha256(pairs: Sequence[tuple[str, str]]) -> str:
    """sha256 of the training pairs (their order included), to record what was trained on."""
    return hashlib.sha256(json.dumps([list(p) for p in pairs]).encode()).hexdigest()


def _check_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError("pairs must be a non-empty list of (request, response) string pairs")
    out = []
    for i, pair in enumerate(pairs):
        if (
            not isinstance(pair, tuple | list)
            or len(pair) != 2
            or not all(isinstance(s, str) and s.strip() for s in pair)
        ):
            raise ValueError(
                f"pairs[{i}] is {pair!r}; each pair must be (request, response), two "
                "non-empty strings"
            )
        out.append((pair[0], pair[1]))
    return out


def encode_pair(tokenizer: Any, request: str, response: str) -> tuple[list[int], int]:
    """Token ids of the chat-formatted ``request`` then ``response``; where the response starts.

    The context is the tokenizer's chat template with one user turn and the generation
    prompt (as :func:`contrans_tl.evals.truthfulqa.render_user_turn`); the response is
    tokenized on its own and appended, without an end-of-turn token.

    Returns:
        ``(ids, n_context)``: the response tokens are ``ids[n_context:]``.
    """
    from contrans_tl.evals.truthfulqa import encode_prompt, render_user_turn

    context = encode_prompt(tokenizer, render_user_turn(tokenizer, request))
    answer = [int(i) for i in tokenizer(response, add_special_tokens=False)["input_ids"]]
    if not answer:
        raise ValueError(f"response {response!r} tokenizes to no tokens")
    return context + answer, len(context)


def _batches(n: int, recipe: FinetuneRecipe) -> list[list[int]]:
    """Indices of the pairs of each step: seeded shuffled epochs, cut into batches."""
    rng = random.Random(recipe.seed)
    stream: list[int] = []
    need = recipe.steps * recipe.batch_size
    while len(stream) < need:
        epoch = list(range(n))
        rng.shuffle(epoch)
        stream.extend(epoch)
    return [
        stream[s * recipe.batch_size : (s + 1) * recipe.batch_size] for s in range(recipe.steps)
    ]


def _frozen_names(model: torch.nn.Module) -> set[str]:
    names = set()
    inp: Any = model.get_input_embeddings()  # type: ignore[operator]
    out: Any = model.get_output_embeddings()  # type: ignore[operator]
    for name, p in model.named_parameters():
        if (inp is not None and p is inp.weight) or (out is not None and p is out.weight):
            names.add(name)
    return names


def finetune_causal_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    recipe: FinetuneRecipe,
) -> list[float]:
    """Fine-tune a Hugging Face causal LM in place on (request, response) pairs.

    Batches are right-padded; padding and context tokens carry no loss. The model is kept
    in eval mode (no dropout), so a run is deterministic on the CPU. Parameters'
    ``requires_grad`` is restored to what it was when done.

    Args:
        model: a Hugging Face ``PreTrainedModel`` (not a bridge).
        tokenizer: its tokenizer (with a chat template).
        pairs: ``(request, response)`` strings.
        recipe: the settings.

    Returns:
        The training loss of each step.

    Example:
        >>> recipe = FinetuneRecipe(steps=2)
        >>> losses = finetune_causal_lm(model, tok, [("Say hi", "Sure, hi")], recipe)
    """
    if not isinstance(recipe, FinetuneRecipe):
        raise TypeError(f"recipe must be a FinetuneRecipe, got {type(recipe).__name__}")
    pairs = _check_pairs(pairs)
    if hasattr(model, "original_model"):
        raise TypeError("pass the Hugging Face model (bridge.original_model), not the bridge")
    encoded = [encode_pair(tokenizer, q, a) for q, a in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    frozen = set() if recipe.train_embeddings else _frozen_names(model)
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    trainable = []
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
        if n not in frozen:
            trainable.append(p)
    torch.manual_seed(recipe.seed)
    optimiser = torch.optim.AdamW(
        trainable, lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    device = next(model.parameters()).device
    losses: list[float] = []
    model.eval()
    try:
        for step, rows in enumerate(_batches(len(encoded), recipe)):
            width = max(len(encoded[r][0]) for r in rows)
            ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            for b, r in enumerate(rows):
                seq, n_ctx = encoded[r]
                ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
                labels[b, n_ctx : len(seq)] = torch.tensor(seq[n_ctx:])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=-100,
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if recipe.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, recipe.max_grad_norm)
            optimiser.step()
            losses.append(float(loss.detach()))
            _log.info("fine-tune step %d/%d: loss %.4f", step + 1, recipe.steps, losses[-1])
    finally:
        optimiser.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    return losses


def read_finetune_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``contrans_finetune.json`` of a twin folder, or None when there is none."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else None


def _wanted(base: str, pairs: Sequence[tuple[str, str]], recipe: FinetuneRecipe) -> dict[str, Any]:
    return {
        "base_model": base,
        "recipe": recipe.to_json(),
        "n_pairs": len(pairs),
        "pairs_sha256": pairs_sha256(pairs),
    }


def make_finetuned_twin(
    base: str,
    pairs: Sequence[tuple[str, str]],
    recipe: FinetuneRecipe,
    *,
    out: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Fine-tune ``base`` on ``pairs`` and save it as a model folder; reuse a matching one.

    Args:
        base: what :func:`contrans_tl.models.load_hf_model` accepts (a zoo name, a folder).
        pairs: ``(request, response)`` training pairs.
        recipe: the settings.
        out: the folder to write (created atomically: a temporary folder renamed at the end,
            so a killed run leaves no half-written model).
        extra: more to record (e.g. which dataset rows the pairs are).

    Returns:
        ``out``, holding ``config.json``, ``model.safetensors``, the tokenizer and
        ``contrans_finetune.json`` (recipe, pairs' sha256, per-step losses, sha256 of the
        base's and the result's weights, seconds taken).

    Raises:
        FileExistsError: ``out`` exists but is not a twin of these inputs (it is left alone).
    """
    pairs = _check_pairs(pairs)
    if not isinstance(recipe, FinetuneRecipe):
        raise TypeError(f"recipe must be a FinetuneRecipe, got {type(recipe).__name__}")
    out = Path(out)
    wanted = _wanted(base, pairs, recipe)
    if out.exists():
        record = read_finetune_record(out)
        same = record is not None and all(record.get(k) == v for k, v in wanted.items())
        if same and (out / "model.safetensors").is_file():
            _log.info("reusing the fine-tuned twin in %s", out)
            return out
        found = None if record is None else {k: record.get(k) for k in wanted}
        raise FileExistsError(
            f"{out} exists but is not a fine-tune of {base!r} with this recipe and these "
            f"pairs (its record: {found}); remove it or pass another out"
        )
    from safetensors.torch import save_model

    from contrans_tl.models import load_hf_model

    model, tokenizer, info = load_hf_model(base)
    start = time.perf_counter()
    losses = finetune_causal_lm(model, tokenizer, pairs, recipe)
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        record = {
            **wanted,
            **(extra or {}),
            "base_provenance": {k: info.get(k) for k in ("model_id", "source", "file_sha256")},
            "losses": losses,
            "seconds": round(seconds, 1),
            "weights_sha256": sha256_file(tmp / "model.safetensors"),
            "torch": torch.__version__,
        }
        write_json(tmp / RECORD_NAME, record)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
