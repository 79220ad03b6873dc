"""Analyses of concept vectors and residual streams: logit-lens token shifts and geometry.

* :mod:`contrans_tl.analysis.logit_lens`: read states through the final norm and
  unembedding; which tokens a vector makes more and less likely (the paper's Table 8).
* :mod:`contrans_tl.analysis.diagnostics`: map diagnostics and layer choice: a source ×
  target layer matrix of linear CKA or held-out map R² with a suggested layer matching,
  cosines between vectors per layer, the residual-norm profile.
* :mod:`contrans_tl.analysis.geometry`: PCA and t-SNE coordinates, before/after arrows
  (Figs. 2b, 7, 8), and separation scores (silhouette, linear-probe accuracy) per layer.

Figures: :mod:`contrans_tl.analysis.plots` (matplotlib, PNG + the plotted numbers as
JSON), imported only when used.

This package is a library of functions: it imports nothing from :mod:`contrans_tl.evals`
or :mod:`contrans_tl.pipelines`. One run of everything for an emotion transplant is the
pipeline :func:`contrans_tl.pipelines.analysis.run_analysis` (`python -m contrans_tl
analyze`).

Example:
    >>> from contrans_tl.analysis import aggregate_shifts, separation_by_layer, token_shifts
    >>> up, down = aggregate_shifts(token_shifts(model, texts, v, alpha=4.0, layers=[12])[12])
    >>> separation_by_layer(model, {"fear": fear_texts, "joy": joy_texts}, layers=[6, 12])
"""

from contrans_tl.analysis.diagnostics import (
    LayerSimilarity,
    cosine_per_layer,
    layer_pairs_from_similarity,
    layer_similarity,
    linear_cka,
    residual_norm_profile,
    similarity_from_states,
)
from contrans_tl.analysis.geometry import (
    BeforeAfterPCA,
    before_after_pca,
    pca_2d,
    separation_by_layer,
    separation_scores,
    tsne_2d,
)
from contrans_tl.analysis.logit_lens import (
    TextShifts,
    TokenShift,
    aggregate_shifts,
    logit_lens,
    token_shifts,
)

__all__ = [
    "BeforeAfterPCA",
    "LayerSimilarity",
    "cosine_per_layer",
    "layer_pairs_from_similarity",
    "layer_similarity",
    "linear_cka",
    "residual_norm_profile",
    "similarity_from_states",
    "TextShifts",
    "TokenShift",
    "aggregate_shifts",
    "before_after_pca",
    "logit_lens",
    "pca_2d",
    "separation_by_layer",
    "separation_scores",
    "token_shifts",
    "tsne_2d",
]
