"""Geometry of residual-stream states: 2-D projections and how well labels separate.

* :func:`pca_2d` and :func:`tsne_2d`: 2-D coordinates for scatter plots (the paper's
  Figs. 7 and 8 project states of each emotion per model with t-SNE).
* :func:`before_after_pca`: one PCA for states before and after steering, so arrows can be
  drawn from each state to its shifted self (the paper's Fig. 2b).
* :func:`separation_scores` and :func:`separation_by_layer`: a number for "the concepts
  form clusters": the silhouette coefficient and the held-out accuracy of a linear probe.

Inputs are ``[n, d]`` torch tensors or NumPy arrays; outputs are NumPy float64 arrays
(ready for matplotlib). No plotting happens here. scikit-learn is imported on first use.

Example:
    >>> reads = read_resid_post(model, texts, layers=[12])
    >>> xy = tsne_2d(reads.states[12], seed=0, perplexity=20)
    >>> separation_scores({"happy": h_happy, "sad": h_sad})
    {'silhouette': 0.41, 'probe_accuracy': 0.98, 'chance': 0.5}
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.activations import read_resid_post
from contrans_tl.sites import check_layers

__all__ = [
    "BeforeAfterPCA",
    "pca_2d",
    "tsne_2d",
    "before_after_pca",
    "separation_scores",
    "separation_by_layer",
]

States = Float[Tensor, "n d"] | Float[np.ndarray, "n d"]
LabelStates = Float[Tensor, "_ d"] | Float[np.ndarray, "_ d"]  # row counts differ by label


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """A finite float64 ``[n, d]`` NumPy copy of a tensor or array."""
    if isinstance(x, Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [n, d] matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def pca_2d(X: States) -> Float[np.ndarray, "n 2"]:
    """Project states onto their first two principal components.

    Args:
        X: ``[n, d]`` states, ``n >= 2``, ``d >= 2``.

    Returns:
        ``[n, 2]`` coordinates (centred; signs fixed by scikit-learn's ``svd_flip``, so
        the result is deterministic).

    Raises:
        ValueError: ``X`` is not 2-D, has fewer than 2 rows or columns, or is not finite.

    Example:
        >>> xy = pca_2d(reads.states[12])
    """
    from sklearn.decomposition import PCA

    arr = _as_matrix(X, "X")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"PCA to 2-D needs at least 2 rows and 2 columns, got {arr.shape}")
    return np.asarray(PCA(n_components=2, svd_solver="full").fit_transform(arr))


def tsne_2d(
    X: States,
    seed: int = 0,
    perplexity: float = 30.0,
    *,
    pca_dims: int | None = None,
    max_iter: int = 1000,
) -> Float[np.ndarray, "n 2"]:
    """Embed states in 2-D with t-SNE (scikit-learn, PCA initialisation).

    Args:
        X: ``[n, d]`` states.
        seed: random state of the optimisation (same seed, same picture).
        perplexity: effective number of neighbours; must be below ``n``
            (5 to 50 is usual; the paper's figures use scikit-learn's default, 30).
        pca_dims: reduce to this many principal components first (common practice for
            wide states, e.g. 50); ``None``: use the states as they are.
        max_iter: optimisation steps.

    Returns:
        ``[n, 2]`` coordinates.

    Raises:
        ValueError: ``perplexity`` not in ``(0, n)``, fewer than 3 states, or
            ``pca_dims < 2``.

    Example:
        >>> xy = tsne_2d(states, seed=0, perplexity=20, pca_dims=50)
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    arr = _as_matrix(X, "X")
    n = arr.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 states, got {n}")
    if not 0 < perplexity < n:
        raise ValueError(
            f"perplexity must be in (0, n_states={n}), got {perplexity}; lower it for "
            "small sets (e.g. n_states / 4)"
        )
    if pca_dims is not None:
        if pca_dims < 2:
            raise ValueError(f"pca_dims must be >= 2 or None, got {pca_dims}")
        if pca_dims < min(arr.shape):
            arr = PCA(n_components=pca_dims, svd_solver="full").fit_transform(arr)
    tsne = TSNE(
        n_components=2,
        perplexity=perplexity,
        init="pca",
        learning_rate="auto",
        max_iter=max_iter,
        random_state=seed,
    )
    return np.asarray(tsne.fit_transform(arr), dtype=np.float64)


@dataclass
class BeforeAfterPCA:
    """2-D coordinates of paired states before and after a shift, in one PCA frame.

    Attributes:
        before: ``[n, 2]`` coordinates of the states before.
        after: ``[n, 2]`` coordinates of the same states after; draw arrows from
            ``before[i]`` to ``after[i]``.
        components: ``[2, d]`` principal axes (rows).
        mean: ``[d]`` centre subtracted before projecting.
        explained_variance_ratio: ``[2]`` share of the fitted states' variance on each axis.
        fit_on: ``"before"`` or ``"both"``: the states the PCA was fitted on.
    """

    before: Float[np.ndarray, "n 2"]
    after: Float[np.ndarray, "n 2"]
    components: Float[np.ndarray, "2 d"]
    mean: Float[np.ndarray, " d"]
    explained_variance_ratio: Float[np.ndarray, " 2"]
    fit_on: str


def before_after_pca(
    states_before: States,
    states_after: States,
    *,
    fit_on: Literal["before", "both"] = "before",
) -> BeforeAfterPCA:
    """Project states before and after steering with one PCA, for before→after arrows.

    Fitting on ``"before"`` (the default) keeps the axes of the unsteered model, so the
    arrows show where steering moves the states within that picture; ``"both"`` fits on
    the union, so the shift itself can become an axis.

    Args:
        states_before: ``[n, d]`` states without steering.
        states_after: ``[n, d]`` the same inputs' states with steering, row for row.
        fit_on: ``"before"`` or ``"both"``.

    Returns:
        A :class:`BeforeAfterPCA`.

    Raises:
        ValueError: the two shapes differ, fewer than 2 rows or columns, or an unknown
            ``fit_on``.

    Example:
        >>> pa = before_after_pca(before.states[12], after.states[12])
        >>> for (x0, y0), (x1, y1) in zip(pa.before, pa.after): ...  # arrows
    """
    from sklearn.decomposition import PCA

    if fit_on not in ("before", "both"):
        raise ValueError(f"fit_on must be 'before' or 'both', got {fit_on!r}")
    b = _as_matrix(states_before, "states_before")
    a = _as_matrix(states_after, "states_after")
    if a.shape != b.shape:
        raise ValueError(
            f"states_before {b.shape} and states_after {a.shape} must have the same shape: "
            "row i of both is the same input, before and after"
        )
    if b.shape[0] < 2 or b.shape[1] < 2:
        raise ValueError(f"PCA to 2-D needs at least 2 rows and 2 columns, got {b.shape}")
    pca = PCA(n_components=2, svd_solver="full").fit(b if fit_on == "before" else np.vstack([b, a]))
    return BeforeAfterPCA(
        before=np.asarray(pca.transform(b)),
        after=np.asarray(pca.transform(a)),
        components=np.asarray(pca.components_, dtype=np.float64),
        mean=np.asarray(pca.mean_, dtype=np.float64),
        explained_variance_ratio=np.asarray(pca.explained_variance_ratio_, dtype=np.float64),
        fit_on=fit_on,
    )


def separation_scores(
    states_by_label: Mapping[str, LabelStates],
    *,
    folds: int = 5,
    seed: int = 0,
    C: float = 1.0,
    metric: str = "euclidean",
) -> dict[str, float]:
    """How well states with different labels separate: silhouette and a linear probe.

    * ``silhouette``: scikit-learn's mean silhouette coefficient of the labelled states
      (``metric`` distance), in ``[-1, 1]``: near 1 for tight, far-apart clusters, near 0
      when labels do not cluster.
    * ``probe_accuracy``: mean held-out accuracy of a logistic-regression probe
      (standardised features, L2 penalty ``1/C``) over seeded, shuffled, stratified
      ``folds``-fold cross-validation: near 1 when a linear direction separates the
      labels, near ``chance`` when none does.
    * ``chance``: share of the largest label, the accuracy of always guessing it.

    Args:
        states_by_label: ``{label: [n_label, d]}``; at least two labels, each with at
            least two states, all of one width.
        folds: cross-validation folds (lowered to the smallest label's count if needed).
        seed: seed of the fold shuffle.
        C: inverse regularisation strength of the probe.
        metric: silhouette distance (``"euclidean"``, ``"cosine"``, ...).

    Returns:
        ``{"silhouette": float, "probe_accuracy": float, "chance": float}``.

    Raises:
        ValueError: fewer than two labels, a label with fewer than two states, differing
            widths, or ``folds < 2``.

    Example:
        >>> separation_scores({"fear": h_fear, "joy": h_joy})["probe_accuracy"]
        0.97
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if len(states_by_label) < 2:
        raise ValueError(
            f"need at least two labels to separate, got {list(states_by_label)}; pass "
            "{label: states, ...}"
        )
    mats = {
        str(label): _as_matrix(x, f"states of {label!r}") for label, x in states_by_label.items()
    }
    widths = {label: m.shape[1] for label, m in mats.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(f"all states must have one width; got widths {widths}")
    small = {label: m.shape[0] for label, m in mats.items() if m.shape[0] < 2}
    if small:
        raise ValueError(f"every label needs at least two states; these have fewer: {small}")
    X = np.vstack(list(mats.values()))
    y = np.concatenate([np.full(m.shape[0], i) for i, m in enumerate(mats.values())])
    counts = np.bincount(y)
    silhouette = float(silhouette_score(X, y, metric=metric))
    cv = StratifiedKFold(n_splits=min(folds, int(counts.min())), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
    accuracy = float(cross_val_score(probe, X, y, cv=cv, scoring="accuracy").mean())
    return {
        "silhouette": silhouette,
        "probe_accuracy": accuracy,
        "chance": float(counts.max() / counts.sum()),
    }


def separation_by_layer(
    model: Any,
    texts_by_label: Mapping[str, Sequence[str]],
    layers: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
    folds: int = 5,
    seed: int = 0,
    C: float = 1.0,
    metric: str = "euclidean",
    progress: bool | None = None,
) -> dict[int, dict[str, float]]:
    """:func:`separation_scores` of last-token ``resid_post`` states, layer by layer.

    All texts are read in one pass of :func:`contrans_tl.activations.read_resid_post`
    (last token, batched with left padding), then split by label.

    Args:
        model: a TransformerLens model with a tokenizer.
        texts_by_label: ``{label: texts}``; at least two labels, two texts each.
        layers: blocks to score; ``None``: every block.
        batch_size: texts per forward pass.
        folds, seed, C, metric: as in :func:`separation_scores`.
        progress: progress bar (``None``: automatic).

    Returns:
        ``{layer: {"silhouette": ..., "probe_accuracy": ..., "chance": ...}}``.

    Raises:
        TypeError: a label's texts are one string.
        ValueError: as :func:`separation_scores`, or a layer out of range.

    Example:
        >>> scores = separation_by_layer(model, {"fear": fear_texts, "joy": joy_texts})
        >>> max(scores, key=lambda k: scores[k]["silhouette"])   # the most separated layer
    """
    for label, texts in texts_by_label.items():
        if isinstance(texts, str):
            raise TypeError(f"texts of label {label!r} must be a list of texts, got one str")
    if len(texts_by_label) < 2:
        raise ValueError(f"need at least two labels, got {list(texts_by_label)}")
    layer_list = check_layers(model, range(model.cfg.n_layers) if layers is None else layers)
    labels = list(texts_by_label)
    all_texts = [t for label in labels for t in texts_by_label[label]]
    owner = np.concatenate(
        [np.full(len(texts_by_label[label]), i) for i, label in enumerate(labels)]
    )
    reads = read_resid_post(model, all_texts, layer_list, batch_size=batch_size, progress=progress)
    out: dict[int, dict[str, float]] = {}
    for layer in layer_list:
        states = reads.states[layer].numpy()
        by_label = {label: states[owner == i] for i, label in enumerate(labels)}
        out[layer] = separation_scores(by_label, folds=folds, seed=seed, C=C, metric=metric)
    return out
