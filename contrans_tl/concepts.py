"""Concept vectors: one direction per layer, with the provenance to use them safely.

The paper's refinement (Eq. 1): run positive and negative prompts through a model, keep
the residual stream after block ``k`` at the last token, and take the mean of the
positive states minus the mean of the negative states.

Example:
    >>> v = mean_difference(model, positive=["... happy ..."], negative=["... sad ..."],
    ...                     concept="happiness")
    >>> v[12].shape       # the vector of block 12
    torch.Size([576])
    >>> v.save("vectors/happiness")  # happiness.safetensors + happiness.json

Several concepts whose prompts overlap (e.g. each emotion's negatives are the other
emotions' positives) are refined from one read of their distinct prompts with
:func:`mean_differences`.
"""

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.activations import Positions, read_resid_post
from contrans_tl.io import load_artifact, save_artifact
from contrans_tl.provenance import ModelProvenance, as_provenance, model_provenance
from contrans_tl.sites import RESID_POST, check_layers, layer_index
from contrans_tl.tokens import check_texts

__all__ = ["ConceptVector", "mean_difference", "mean_differences"]


@dataclass
class ConceptVector:
    """A concept direction for each of several layers of one model.

    Attributes:
        vectors: ``[n_vector_layers, d_model]``; row ``i`` belongs to ``layers[i]``.
        layers: block indices, ascending, one per row.
        model: the :class:`~contrans_tl.provenance.ModelProvenance` of the model the
            vectors live in: its residual stream is where they may be added (given as a
            provenance or its ``to_dict()``; stored as a provenance).
        concept: a name, e.g. ``"happiness"``.
        method: how the vectors were made (``"mean_difference"``, ``"transplanted"``, ...).
        hook_template: the hook point the vectors belong to.
        metadata: anything else worth keeping (counts, prompt template, the source vector
            and map for a transplanted vector, mean residual norms per layer).

    Example:
        >>> v = mean_difference(model, positive, negative, concept="fear")  # smollm2-135m-instruct
        >>> v.layers[:3], v[12].shape
        ((0, 1, 2), torch.Size([576]))
        >>> v.save("vectors/fear")                    # fear.safetensors + fear.json
        >>> ConceptVector.load("vectors/fear").select([10, 11, 12]).norms()  # {layer: |v_k|}
    """

    vectors: Float[Tensor, "n_vector_layers d_model"]
    layers: tuple[int, ...]
    model: ModelProvenance
    concept: str
    method: str = "mean_difference"
    hook_template: str = RESID_POST
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) or not isinstance(self.layers, Iterable):
            raise TypeError(f"layers must be a sequence of ints, got {self.layers!r}")
        self.layers = tuple(layer_index(k) for k in self.layers)
        if not isinstance(self.vectors, Tensor):
            raise TypeError(f"vectors must be a torch.Tensor, got {type(self.vectors).__name__}")
        if self.vectors.ndim != 2:
            raise ValueError(
                f"vectors must be [n_layers, d_model], got shape {tuple(self.vectors.shape)}"
            )
        if self.vectors.shape[0] != len(self.layers):
            raise ValueError(
                f"{self.vectors.shape[0]} vectors but {len(self.layers)} layers; one per layer"
            )
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be ascending and distinct, got {self.layers}")
        self.model = as_provenance(self.model, "ConceptVector.model")
        d = self.model.d_model
        if self.vectors.shape[1] != d:
            raise ValueError(
                f"vectors have width {self.vectors.shape[1]} but the model's d_model is {d}"
            )
        if not torch.isfinite(self.vectors).all():
            raise ValueError("vectors contain NaN or inf")

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[1])

    def __getitem__(self, layer: int) -> Float[Tensor, " d_model"]:
        try:
            return self.vectors[self.layers.index(layer)]
        except ValueError:
            raise KeyError(
                f"no vector for layer {layer}; this one has layers {self.layers}"
            ) from None

    def norms(self) -> dict[int, float]:
        """L2 norm of each layer's vector."""
        return {k: float(n) for k, n in zip(self.layers, self.vectors.norm(dim=-1))}

    def select(self, layers: Sequence[int]) -> "ConceptVector":
        """A copy restricted to ``layers`` (each must be present)."""
        if isinstance(layers, str) or not isinstance(layers, Iterable):
            raise TypeError(f"layers must be a sequence of ints, got {layers!r}")
        layers = sorted(layer_index(k) for k in layers)
        rows = torch.stack([self[k] for k in layers])
        return self.replace(vectors=rows, layers=tuple(layers))

    def replace(self, **changes: Any) -> "ConceptVector":
        """A copy with some fields changed (metadata is copied, not shared)."""
        changes.setdefault("metadata", dict(self.metadata))
        return dataclasses.replace(self, **changes)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``path.safetensors`` and ``path.json``."""
        meta = {
            "kind": "concept_vector",
            "concept": self.concept,
            "method": self.method,
            "layers": list(self.layers),
            "hook_template": self.hook_template,
            "model": self.model.to_dict(),
            "metadata": self.metadata,
        }
        save_artifact(path, {"vectors": self.vectors.float()}, meta)

    def to_gguf(
        self, path: str | os.PathLike[str], *, alpha: float = 1.0, drop_layer_0: bool = False
    ) -> Path:
        """Write ``alpha · self`` as a llama.cpp control vector (``--control-vector``).

        ``direction.N`` is the row of layer ``N`` (block ``N``'s output, as in llama.cpp
        and repeng); llama.cpp cannot steer block 0, so a layer-0 row is refused unless
        ``drop_layer_0``. See :func:`contrans_tl.gguf_vectors.write_control_vector`.

        Example:
            >>> v.select(v.layers[1:]).to_gguf("happiness.gguf")
            PosixPath('happiness.gguf')
        """
        from contrans_tl.gguf_vectors import write_control_vector

        return write_control_vector(self, path, alpha=alpha, drop_layer_0=drop_layer_0)

    @classmethod
    def from_gguf(
        cls, path: str | os.PathLike[str], model: Any, *, strict: bool = True
    ) -> "ConceptVector":
        """Read a llama.cpp control vector (ours or repeng's) as a vector of ``model``.

        Refuses a file whose layers or width do not fit ``model``. See
        :func:`contrans_tl.gguf_vectors.read_control_vector`.

        Example:
            >>> v = ConceptVector.from_gguf("happiness.gguf", model)
        """
        from contrans_tl.gguf_vectors import read_control_vector

        return read_control_vector(path, model, strict=strict)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ConceptVector":
        """Read a vector written by :meth:`save`."""
        tensors, meta = load_artifact(path, kind="concept_vector")
        return cls(
            vectors=tensors["vectors"],
            layers=tuple(meta["layers"]),
            model=as_provenance(meta["model"], "the vector's model"),
            concept=meta["concept"],
            method=meta["method"],
            hook_template=meta["hook_template"],
            metadata=meta.get("metadata", {}),
        )


def mean_difference(
    model: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    concept: str = "concept",
    positions: Positions = "last",
    batch_size: int = 16,
    progress: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ConceptVector:
    """Refine a concept vector by mean difference (paper Eq. 1).

    ``v_k = mean(h_k(positive)) - mean(h_k(negative))`` with ``h_k`` the residual stream
    after block ``k`` at the last token (or every token / word end, see ``positions``).
    With equally many positives and negatives this is the paper's mean of pairwise
    differences; unequal counts are allowed.

    The mean residual-stream norm per layer (over all prompts) is kept in
    ``metadata["resid_norms"]``, so strengths can be given relative to it.

    Args:
        model: a TransformerLens model with a tokenizer.
        positive: prompts that express the concept.
        negative: prompts that do not (or express its opposite).
        layers: blocks to refine at; ``None``: every block.
        concept: name stored with the vector.
        positions: where to read the states; the paper reads ``"last"``.
        batch_size: prompts per forward pass.
        progress: progress bar (``None``: automatic).
        metadata: extra entries to store with the vector.

    Returns:
        A :class:`ConceptVector` for ``model``.

    Example:
        >>> v = mean_difference(model, positive=["I won the prize!", "What a lovely day."],
        ...                     negative=["I lost my keys.", "A grey day."], concept="happiness")
        >>> v.layers == tuple(range(model.cfg.n_layers)), v.method
        (True, 'mean_difference')
    """
    check_texts(positive, "positive")
    check_texts(negative, "negative")
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError(
            f"need at least one positive and one negative prompt, got {len(positive)} and "
            f"{len(negative)}"
        )
    layer_list = check_layers(model, range(model.cfg.n_layers) if layers is None else layers)
    reads = read_resid_post(
        model,
        list(positive) + list(negative),
        layer_list,
        positions=positions,
        batch_size=batch_size,
        progress=progress,
    )
    is_pos = reads.text_index < len(positive)
    rows = []
    norms = {}
    for k in layer_list:
        h = reads.states[k].double()
        rows.append((h[is_pos].mean(0) - h[~is_pos].mean(0)).float())
        norms[str(k)] = float(h.norm(dim=-1).mean())
    meta = {
        "n_positive": len(positive),
        "n_negative": len(negative),
        "positions": positions,
        "resid_norms": norms,
        **(dict(metadata) if metadata else {}),
    }
    return ConceptVector(
        vectors=torch.stack(rows),
        layers=tuple(layer_list),
        model=model_provenance(model),
        concept=concept,
        method="mean_difference",
        metadata=meta,
    )


def mean_differences(
    model: Any,
    concepts: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    *,
    layers: Sequence[int] | None = None,
    positions: Positions = "last",
    batch_size: int = 16,
    progress: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, ConceptVector]:
    """Refine several concept vectors (paper Eq. 1) from one read of their distinct prompts.

    The same as ``{c: mean_difference(model, pos, neg, concept=c, ...)}`` for every
    ``c: (pos, neg)`` of ``concepts`` (same vectors and metadata, up to float rounding of
    the batched forward passes), but a prompt that several concepts use, or one concept
    uses twice, is run once: the six emotions' 1,200 refinement prompts are 600 distinct
    texts. Each concept's means, and its ``metadata["resid_norms"]`` (mean residual norm
    over *its* positive and negative prompts), count a prompt as often as that concept
    lists it, as :func:`mean_difference` does.

    Args:
        model: a TransformerLens model with a tokenizer.
        concepts: ``{name: (positive prompts, negative prompts)}``, at least one concept.
        layers: blocks to refine at; ``None``: every block.
        positions: where to read the states; the paper reads ``"last"``.
        batch_size: prompts per forward pass.
        progress: progress bar (``None``: automatic, on for more than 256 distinct prompts).
        metadata: extra entries stored with every vector.

    Returns:
        ``{name: ConceptVector}`` in the order of ``concepts``.

    Raises:
        TypeError: ``concepts`` is not a mapping of names to ``(positive, negative)`` lists.
        ValueError: no concepts, or a concept without a positive or a negative prompt.

    Example:
        >>> vs = mean_differences(model, {"fear": (fear, others), "anger": (anger, others)})
        >>> vs["fear"][12].shape
        torch.Size([576])
    """
    if not isinstance(concepts, Mapping):
        raise TypeError(
            f"concepts must be a mapping {{name: (positive, negative)}}, got "
            f"{type(concepts).__name__}"
        )
    if not concepts:
        raise ValueError("concepts is empty; give at least one {name: (positive, negative)}")
    for name, pair in concepts.items():
        if not isinstance(name, str):
            raise TypeError(f"concept names must be str, got {type(name).__name__} {name!r}")
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"concepts[{name!r}] must be (positive, negative), got {pair!r:.80}")
        check_texts(pair[0], f"concepts[{name!r}] positive")
        check_texts(pair[1], f"concepts[{name!r}] negative")
        if len(pair[0]) == 0 or len(pair[1]) == 0:
            raise ValueError(
                f"concept {name!r} needs at least one positive and one negative prompt, got "
                f"{len(pair[0])} and {len(pair[1])}"
            )
    layer_list = check_layers(model, range(model.cfg.n_layers) if layers is None else layers)
    distinct = list(dict.fromkeys(t for pos, neg in concepts.values() for t in (*pos, *neg)))
    reads = read_resid_post(
        model, distinct, layer_list, positions=positions, batch_size=batch_size, progress=progress
    )
    rows_of = _rows_by_text(reads.text_index, len(distinct))
    where = {t: i for i, t in enumerate(distinct)}
    provenance = model_provenance(model)
    states = {k: reads.states[k].double() for k in layer_list}
    out = {}
    for name, (positive, negative) in concepts.items():
        pos_rows = torch.cat([rows_of[where[t]] for t in positive])
        neg_rows = torch.cat([rows_of[where[t]] for t in negative])
        both = torch.cat([pos_rows, neg_rows])
        rows, norms = [], {}
        for k in layer_list:
            h = states[k]
            rows.append((h[pos_rows].mean(0) - h[neg_rows].mean(0)).float())
            norms[str(k)] = float(h[both].norm(dim=-1).mean())
        meta = {
            "n_positive": len(positive),
            "n_negative": len(negative),
            "positions": positions,
            "resid_norms": norms,
            **(dict(metadata) if metadata else {}),
        }
        out[name] = ConceptVector(
            vectors=torch.stack(rows),
            layers=tuple(layer_list),
            model=provenance,
            concept=name,
            method="mean_difference",
            metadata=meta,
        )
    return out


def _rows_by_text(text_index: Tensor, n_texts: int) -> list[Tensor]:
    """For each text, the indices of its rows in a :class:`ResidReads` (rows in text order)."""
    counts = torch.bincount(text_index, minlength=n_texts).tolist()
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    return [torch.arange(s, s + c) for s, c in zip(starts, counts)]
