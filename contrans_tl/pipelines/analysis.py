"""The analysis of one emotion transplant, end to end: numbers, figures and a summary.

Every setting is a field of :class:`AnalysisConfig` (checked when the config is made, so
before any model is loaded); :func:`run_analysis` takes a source and a target model and
the config and writes into ``out_dir``:

============================  ==============================================================
``layer_similarity``          linear CKA of every (thinned) source x target layer pair, with
                              the suggested monotone matching and the relative-depth one
``layer_similarity_r2``       with ``layer_match="r2"`` only: the held-out map R² matrix
                              whose matching the map was fitted on
``vector_cosines``            cosine per target layer, transplanted vs the target's own
                              (Self) vector, per emotion
``norm_profile``              mean residual norm per relative depth of both models, and the
                              norms of the vectors (what α is measured against)
``token_shifts_L{t}``         logit-lens token shifts (the paper's Table 8, direct view) at
                              a middle and a late target layer, transplanted vector on the
                              target and the source's own vector on the source (paired layer)
``pca_before_after``          PCA of the target's states on negative scenarios before and
                              after adding the transplanted vector at every layer (Fig. 2b)
``tsne``                      t-SNE of both models' states of the six emotions (Figs. 7, 8)
``separation``                silhouette and probe accuracy per layer, both models
``alpha_sweep``               emotion Token Acc (validation negatives) and perplexity on
                              held-out WikiSplit per α and per steered layer set: the curve
                              to pick α from
``summary.md``                the headline numbers and every file
``analysis.json``             everything above, the inputs used and the settings
``artifacts/``                the residual map, the similarity matrix and every vector
============================  ==============================================================

Every figure is ``NAME.png`` with ``NAME.json`` (the plotted numbers) beside it; token
tables are ``NAME.md`` + ``NAME.json``. The defaults finish in roughly 15-25 minutes on a
2-core CPU for SmolLM2-135M-Instruct → Gemma-3-270m.

The steps, in order (each a function of this module with a typed result):
:func:`plan_layers`, :func:`load_map`, :func:`map_step` (:func:`fit_or_load_map`, then
:func:`fit_layers_to_map`), :func:`layer_similarity_step`, :func:`refine_vectors_step`,
:func:`vector_cosines_step`, :func:`norm_profile_step`, :func:`token_shift_step`,
:func:`pca_step`, :func:`label_states_step`, :func:`separation_step`, :func:`tsne_step`,
:func:`alpha_sweep_step`, :func:`assemble_result` and :func:`write_summary`. Progress is
logged (``logging``, logger ``contrans_tl.pipelines.analysis``) at INFO, or at DEBUG with
``verbose=False``.

Example:
    >>> src, tgt = load_model("smollm2-135m-instruct"), load_model("gemma-3-270m")
    >>> config = AnalysisConfig(emotions=["happiness", "fear"])
    >>> res = run_analysis(src, tgt, config, "runs/analysis")
    >>> res["alpha_sweep"]["picked"]
"""

import dataclasses
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from contrans_tl.activations import read_resid_post
from contrans_tl.analysis.diagnostics import (
    LayerSimilarity,
    cosine_per_layer,
    layer_pairs_from_similarity,
    layer_similarity,
    residual_norm_profile,
)
from contrans_tl.analysis.geometry import (
    BeforeAfterPCA,
    before_after_pca,
    separation_scores,
    tsne_2d,
)
from contrans_tl.analysis.logit_lens import aggregate_shifts, token_shifts
from contrans_tl.analysis.plots import (
    plot_alpha_sweep,
    plot_before_after_pca,
    plot_layer_similarity,
    plot_norm_profile,
    plot_separation,
    plot_tsne,
    plot_vector_cosines,
    write_shift_table,
)
from contrans_tl.concepts import ConceptVector, mean_difference
from contrans_tl.data import EMOTIONS, wikisplit_sentences
from contrans_tl.evals.emotion import (
    REFINE_TEMPLATE,
    EmotionSplit,
    EmotionTask,
    negatives,
    refinement_prompts,
    score,
)
from contrans_tl.evals.perplexity import heldout_wikisplit, perplexity
from contrans_tl.io import write_json, write_text
from contrans_tl.maps import MapMethod, Pairing, ResidualMap, fit_residual_map
from contrans_tl.models import model_provenance
from contrans_tl.pipelines.alpha import best_alpha_within_fluency
from contrans_tl.pipelines.configs import (
    DEFAULT_ALPHAS,
    LAYER_MATCHES,
    MAP_METHODS,
    SWEEP_METHODS,
    AnalysisConfig,
    LayerMatch,
    check_out_dir,
    scenario_split,
)
from contrans_tl.pipelines.emotion import random_like
from contrans_tl.sites import check_layers
from contrans_tl.steering import make_steering

__all__ = [
    "DEFAULT_ALPHAS",
    "LAYER_MATCHES",
    "MAP_METHODS",
    "SWEEP_METHODS",
    "AnalysisConfig",
    "LayerMatch",
    "LayerPlan",
    "alpha_sweep_step",
    "assemble_result",
    "default_lens_layers",
    "fit_layers_to_map",
    "fit_or_load_map",
    "label_states_step",
    "layer_similarity_step",
    "load_map",
    "map_step",
    "norm_profile_step",
    "pca_step",
    "pick_alpha",
    "plan_layers",
    "refine_vectors_step",
    "run_analysis",
    "scenario_split",
    "separation_step",
    "similarity_layers",
    "summary_markdown",
    "token_shift_step",
    "tsne_step",
    "vector_cosines_step",
    "write_summary",
]

logger = logging.getLogger(__name__)

Log = Callable[[str], None]
"""A progress callback: one message per call."""


# --- layers ------------------------------------------------------------------------------


def default_lens_layers(n_layers: int) -> list[int]:
    """A middle and a late layer: ``(n - 1) // 2`` and ``round(0.8 · (n - 1))``."""
    return sorted({(n_layers - 1) // 2, int(round(0.8 * (n_layers - 1)))})


def _spread(n: int, m: int) -> list[int]:
    """``m`` of the layers ``0..n-1``, evenly spread, always keeping the last."""
    if m >= n:
        return list(range(n))
    if m == 1:
        return [n - 1]
    return sorted({int(round(i * (n - 1) / (m - 1))) for i in range(m)})


def similarity_layers(
    n_source: int, n_target: int, d_source: int, d_target: int, max_gb: float
) -> tuple[list[int], list[int]]:
    """Source and target layers for a CKA matrix whose moments fit in ``max_gb`` GiB.

    The float64 moments of :func:`~contrans_tl.analysis.layer_similarity` take
    ``8 · (S·d_src · T·d_tgt + S·d_src² + T·d_tgt²)`` bytes for ``S`` source and ``T``
    target layers. Layers are dropped one at a time, keeping first and last layers and
    even spacing: source layers while there are more of them than target layers (so
    every target layer keeps a column, as long as possible), else the side with more
    floats.

    Example:
        >>> s, t = similarity_layers(30, 18, 576, 640, max_gb=1.0)
        >>> len(s), len(t)
        (18, 18)
    """
    budget = max_gb * 2**30

    def need(s: int, t: int) -> float:
        return 8.0 * (s * d_source * t * d_target + s * d_source**2 + t * d_target**2)

    s, t = n_source, n_target
    while need(s, t) > budget and (s > 2 or t > 2):
        if (s > t or s * d_source >= t * d_target) and s > 2 or t <= 2:
            s -= 1
        else:
            t -= 1
    return _spread(n_source, s), _spread(n_target, t)


@dataclass(frozen=True)
class LayerPlan:
    """The target layers a run reads and steers, checked against the target.

    Attributes:
        lens_layers: target layers of the token-shift tables, sorted.
        pca_layer: target layer of the PCA and the target's t-SNE panel.
        pca_emotion: whose vector the PCA adds.
        layer_sets: ``{name: sorted target layers, or None for every layer}`` of the sweep.
    """

    lens_layers: list[int]
    pca_layer: int
    pca_emotion: str
    layer_sets: dict[str, list[int] | None]


def plan_layers(config: AnalysisConfig, target: Any) -> LayerPlan:
    """Step 0: the config's layers (or their defaults) checked against ``target``.

    Raises:
        ValueError, TypeError: a layer out of range, a duplicate, or not an integer
            (:func:`~contrans_tl.sites.check_layers`).
    """
    n_tgt = int(target.cfg.n_layers)
    lens = config.layers_for_lens
    lens_layers = check_layers(target, default_lens_layers(n_tgt) if lens is None else lens)
    if config.pca_layer is None:
        pca_layer = lens_layers[-1]
    else:
        pca_layer = check_layers(target, [config.pca_layer])[0]
    sets: dict[str, list[int] | None] = {}
    for set_name, layers in config.layer_set_dict().items():
        sets[str(set_name)] = None if layers is None else check_layers(target, list(layers))
    return LayerPlan(lens_layers, pca_layer, config.pca_emotion or config.emotions[0], sets)


def fit_layers_to_map(plan: LayerPlan, rmap: ResidualMap, config: AnalysisConfig) -> LayerPlan:
    """Step 1b: move default lens and PCA layers onto mapped ones; check every layer is.

    With a similarity ``layer_match`` on thinned layers only some target layers get a map;
    the default lens layers (and a default PCA layer) move to the nearest mapped ones.

    Raises:
        ValueError: a lens layer, the PCA layer or a steered layer has no map.
    """
    mapped = [tl for _, tl in rmap.layer_pairs]
    lens_layers, pca_layer = plan.lens_layers, plan.pca_layer
    if config.layers_for_lens is None and config.layer_match != "depth":
        # the defaults may fall between the thinned similarity's target layers
        lens_layers = sorted({min(mapped, key=lambda m: (abs(m - k), m)) for k in lens_layers})
        if config.pca_layer is None:
            pca_layer = lens_layers[-1]
    for what, layers in [("layers_for_lens", lens_layers), ("pca_layer", [pca_layer])] + [
        (f"layer set {k!r}", v) for k, v in plan.layer_sets.items() if v is not None
    ]:
        missing = [k for k in layers if k not in mapped]
        if missing:
            raise ValueError(
                f"{what} has target layers {missing} that the map does not reach; mapped "
                f"target layers: {mapped}"
            )
    return dataclasses.replace(plan, lens_layers=lens_layers, pca_layer=pca_layer)


# --- the map and the layer similarity ------------------------------------------------------


@dataclass(frozen=True)
class ModelNames:
    """How the two models are named in figures (prefixed when both have one name)."""

    source: str
    target: str
    n_source: int
    n_target: int

    @classmethod
    def of(cls, source: Any, target: Any) -> "ModelNames":
        src, tgt = _name(source), _name(target)
        if src == tgt:
            src, tgt = f"source {src}", f"target {tgt}"
        return cls(src, tgt, int(source.cfg.n_layers), int(target.cfg.n_layers))


def _name(model: Any) -> str:
    return str(model_provenance(model).model_id)


def load_map(config: AnalysisConfig, source: Any, target: Any) -> ResidualMap | None:
    """``config.map_path`` loaded and checked against the two models (None: fit one).

    Raises:
        FileNotFoundError: the map does not exist.
        ValueError: a broken map, or a map of other models.
    """
    if config.map_path is None:
        return None
    loaded = ResidualMap.load(config.map_path)
    loaded.check_models(source, target)
    return loaded


@dataclass(frozen=True)
class MapResult:
    """The residual map of the run.

    Attributes:
        rmap: the fitted or loaded map.
        info: what ``analysis.json`` records under ``"map"``.
        match_sim: the similarity matrix the layer pairs were matched on (None for
            ``layer_match="depth"`` and for a loaded map).
        similarity_layers: the (thinned) source and target layers of every similarity matrix.
    """

    rmap: ResidualMap
    info: dict[str, Any]
    match_sim: LayerSimilarity | None
    similarity_layers: tuple[list[int], list[int]]


def _similarity(
    source: Any,
    target: Any,
    config: AnalysisConfig,
    metric: str,
    pairing: str,
    layers: tuple[list[int], list[int]],
) -> LayerSimilarity:
    return layer_similarity(
        source,
        target,
        wikisplit_sentences(config.n_similarity_texts),
        pairing=pairing,  # type: ignore[arg-type]
        metric=metric,  # type: ignore[arg-type]
        source_layers=layers[0],
        target_layers=layers[1],
        batch_size=config.batch_size,
        seed=config.seed,
    )


def fit_or_load_map(
    source: Any, target: Any, config: AnalysisConfig, loaded: ResidualMap | None, log: Log
) -> MapResult:
    """Step 1: the map (paper Eq. 2), its layer pairs by relative depth or by similarity.

    Args:
        source, target: the two models.
        config: the settings (``layer_match``, ``n_map_texts``, ``map_pairing`` ...).
        loaded: a map from :func:`load_map`, used as it is; None: fit one on
            ``n_map_texts`` WikiSplit sentences, with the layer pairs of
            ``config.layer_match`` (a similarity matrix is computed first for cka/r2).
        log: progress messages.
    """
    layers = similarity_layers(
        int(source.cfg.n_layers),
        int(target.cfg.n_layers),
        int(source.cfg.d_model),
        int(target.cfg.d_model),
        config.similarity_max_gb,
    )
    match_sim = None
    if loaded is not None:
        rmap = loaded
        info: dict[str, Any] = {"loaded_from": str(config.map_path), "layer_match": "loaded"}
    else:
        pairs = None
        if config.layer_match != "depth":
            log(
                f"{config.layer_match} on {config.n_similarity_texts} texts, "
                f"{len(layers[0])} x {len(layers[1])} layers, to choose the map's layer pairs"
            )
            match_sim = _similarity(
                source, target, config, config.layer_match, config.map_pairing, layers
            )
            pairs = layer_pairs_from_similarity(match_sim, source=source, target=target)
        log(f"fitting the residual map on {config.n_map_texts} WikiSplit sentences")
        rmap = fit_residual_map(
            source,
            target,
            wikisplit_sentences(config.n_map_texts),
            layer_pairs=pairs,
            pairing=cast(Pairing, config.map_pairing),  # checked by AnalysisConfig
            method=cast(MapMethod, config.map_method),
            seed=config.seed,
            batch_size=config.batch_size,
        )
        info = {"fitted_on_texts": config.n_map_texts, "layer_match": config.layer_match}
    info.update(
        {
            "pairing": rmap.pairing,
            "method": rmap.method,
            "layer_pairs": rmap.layer_pairs,
            "info": rmap.info,
            "metrics": {str(k): v for k, v in rmap.metrics.items()},
        }
    )
    return MapResult(rmap, info, match_sim, layers)


def map_step(
    source: Any,
    target: Any,
    config: AnalysisConfig,
    plan: LayerPlan,
    loaded: ResidualMap | None,
    out: Path,
    log: Log,
) -> tuple[MapResult, LayerPlan]:
    """Step 1: :func:`fit_or_load_map`, then :func:`fit_layers_to_map`; creates ``out``.

    A fitted map is saved as ``artifacts/residual_map`` (a loaded one is not copied).

    Returns:
        The map and the layer plan moved onto (and checked against) its mapped layers.
    """
    mapped = fit_or_load_map(source, target, config, loaded, log)
    plan = fit_layers_to_map(plan, mapped.rmap, config)
    out.mkdir(parents=True, exist_ok=True)
    if config.map_path is None:
        mapped.rmap.save(out / "artifacts" / "residual_map")
    return mapped, plan


@dataclass(frozen=True)
class SimilarityResult:
    """The CKA matrix, and the files of it and of the matching's R² matrix (if any)."""

    sim: LayerSimilarity
    files: list[Path]
    match_files: list[Path]


def layer_similarity_step(
    source: Any, target: Any, config: AnalysisConfig, mapped: MapResult, out: Path, log: Log
) -> SimilarityResult:
    """Step 2: the CKA layer-similarity matrix (the matching's own when it was CKA).

    Writes ``layer_similarity.{png,json}`` and ``artifacts/layer_similarity``; with
    ``layer_match="r2"`` also the R² matrix the map was matched on
    (``layer_similarity_r2``).
    """
    art = out / "artifacts"
    if mapped.match_sim is not None and config.layer_match == "cka":
        sim = mapped.match_sim
    else:
        s_layers, t_layers = mapped.similarity_layers
        log(f"CKA on {config.n_similarity_texts} texts, {len(s_layers)} x {len(t_layers)} layers")
        sim = _similarity(
            source, target, config, "cka", mapped.rmap.pairing, mapped.similarity_layers
        )
    match_files: list[Path] = []
    if mapped.match_sim is not None and config.layer_match == "r2":
        mapped.match_sim.save(art / "layer_similarity_r2")
        match_files = list(plot_layer_similarity(mapped.match_sim, out / "layer_similarity_r2"))
    sim.save(art / "layer_similarity")
    files = list(plot_layer_similarity(sim, out / "layer_similarity"))
    return SimilarityResult(sim, files, match_files)


# --- vectors, norms, token shifts, PCA ---------------------------------------------------------


@dataclass(frozen=True)
class Vectors:
    """The concept vectors of every emotion.

    Attributes:
        source: refined in the source (Eq. 1).
        transplanted: ``source`` through the map (Eq. 2).
        own: refined in the target itself (the Self reference).
    """

    source: dict[str, ConceptVector]
    transplanted: dict[str, ConceptVector]
    own: dict[str, ConceptVector]


def refine_vectors_step(
    source: Any,
    target: Any,
    config: AnalysisConfig,
    split: EmotionSplit,
    rmap: ResidualMap,
    out: Path,
    log: Log,
) -> Vectors:
    """Step 3: vectors (Eq. 1, mean difference on the refinement prompts) and transplants.

    Saves each as ``artifacts/vectors/{source,transplanted,self}_{emotion}``.
    """
    emotions, bs = config.emotions, config.batch_size
    log(f"refining vectors for {list(emotions)} in both models")
    prompts = {e: refinement_prompts(split, e) for e in emotions}
    src = {e: mean_difference(source, *prompts[e], concept=e, batch_size=bs) for e in emotions}
    transplanted = {e: rmap.transplant(src[e]) for e in emotions}
    own = {e: mean_difference(target, *prompts[e], concept=e, batch_size=bs) for e in emotions}
    folder = out / "artifacts" / "vectors"
    for e in emotions:
        src[e].save(folder / f"source_{e}")
        transplanted[e].save(folder / f"transplanted_{e}")
        own[e].save(folder / f"self_{e}")
    return Vectors(src, transplanted, own)


def vector_cosines_step(
    vectors: Vectors, names: ModelNames, out: Path
) -> tuple[dict[str, dict[int, float]], list[Path]]:
    """Step 3b: cosine per target layer of transplanted vs Self, per emotion.

    Returns:
        ``{emotion: {target layer: cosine}}`` and the files of ``vector_cosines``.
    """
    cosines = {e: cosine_per_layer(vectors.transplanted[e], vectors.own[e]) for e in vectors.own}
    files = plot_vector_cosines(
        cosines,
        out / "vector_cosines",
        title=f"cosine per target layer: transplanted ({names.source} → {names.target}) vs Self",
    )
    return cosines, list(files)


@dataclass(frozen=True)
class NormProfiles:
    """Residual-norm and vector-norm profiles.

    Attributes:
        profiles: ``{series: {layer: mean norm}}``, both models' residuals and the vectors.
        texts: the held-out WikiSplit sentences of the residual norms.
        files: ``norm_profile.{png,json}``.
    """

    profiles: dict[str, dict[int, float]]
    texts: list[str]
    files: list[Path]


def _mean_norms(vecs: Mapping[str, ConceptVector]) -> dict[int, float]:
    per = [v.norms() for v in vecs.values()]
    return {k: sum(p[k] for p in per) / len(per) for k in per[0]}


def norm_profile_step(
    source: Any,
    target: Any,
    config: AnalysisConfig,
    vectors: Vectors,
    names: ModelNames,
    out: Path,
) -> NormProfiles:
    """Step 4: mean residual norm per layer of both models, and the vectors' norms."""
    texts = heldout_wikisplit(config.n_norm_texts)
    resid_src = residual_norm_profile(source, texts, batch_size=config.batch_size)
    resid_tgt = residual_norm_profile(target, texts, batch_size=config.batch_size)
    src, tgt = names.source, names.target
    profiles = {
        f"{src}: residual": resid_src,
        f"{tgt}: residual": resid_tgt,
        f"{src}: source vector (mean)": _mean_norms(vectors.source),
        f"{tgt}: transplanted vector (mean)": _mean_norms(vectors.transplanted),
        f"{tgt}: Self vector (mean)": _mean_norms(vectors.own),
    }
    counts = {k: (names.n_source if k.startswith(f"{src}:") else names.n_target) for k in profiles}
    files = plot_norm_profile(
        profiles,
        out / "norm_profile",
        n_layers=counts,
        title="mean residual norm (last token, held-out WikiSplit) and concept-vector norms",
    )
    return NormProfiles(profiles, texts, list(files))


@dataclass(frozen=True)
class Negatives:
    """Negative evaluation scenarios of each emotion (the other emotions' scenarios).

    Attributes:
        scenarios: ``{emotion: n_per_emotion scenarios of other emotions}``.
        texts: the same in the refinement template.
        owner: ``{scenario: its own emotion}`` for every evaluation scenario.
    """

    scenarios: dict[str, list[str]]
    texts: dict[str, list[str]]
    owner: dict[str, str]


def negative_scenarios(config: AnalysisConfig, split: EmotionSplit) -> Negatives:
    """The negatives the token shifts and the PCA read (evaluation part of ``split``)."""
    owner = {s: e for e in EMOTIONS for s in split.evaluation[e]}
    neg = {e: negatives(split, e, config.n_per_emotion, "evaluation") for e in config.emotions}
    texts = {e: [REFINE_TEMPLATE.format(scenario=s) for s in neg[e]] for e in config.emotions}
    return Negatives(neg, texts, owner)


def token_shift_step(
    source: Any,
    target: Any,
    config: AnalysisConfig,
    vectors: Vectors,
    rmap: ResidualMap,
    plan: LayerPlan,
    negs: Negatives,
    names: ModelNames,
    out: Path,
) -> tuple[dict[str, dict[str, Any]], list[Path]]:
    """Step 5: token shifts (the paper's Table 8), direct logit-lens view, per lens layer.

    Returns:
        ``{str(target layer): {"source_layer": s, "tables": {name: {"increased": ...,
        "decreased": ...}}}}`` and the files of every ``token_shifts_L{t}.{md,json}``.
    """
    alpha, k, top = config.alpha, config.top_k, config.top_tokens
    files: list[Path] = []
    tables_of: dict[str, dict[str, Any]] = {}
    for tl in plan.lens_layers:
        sl = rmap.source_layer(tl)
        tables = {}
        for e in config.emotions:
            tr = token_shifts(
                target,
                negs.texts[e],
                vectors.transplanted[e],
                alpha,
                layers=[tl],
                k=k,
                mode="direct",
            )[tl]
            sr = token_shifts(
                source, negs.texts[e], vectors.source[e], alpha, layers=[sl], k=k, mode="direct"
            )[sl]
            tables[f"{e}: transplanted, {names.target} L{tl}"] = aggregate_shifts(tr, top=top)
            tables[f"{e}: source vector, {names.source} L{sl}"] = aggregate_shifts(sr, top=top)
        note = (
            f"Logit lens, direct view: each of {config.n_per_emotion} negative scenarios per "
            f"emotion (prompt: the refinement template) is read at the last token after block "
            f"L; α·v (α = {alpha:g}) is added to that state and the change of every token's "
            f"probability is ranked. Count: in how many inputs the token is among the top "
            f"{k} risers (fallers). Target layer {tl} is mapped from source layer {sl}."
        )
        md, js = write_shift_table(
            tables,
            out / f"token_shifts_L{tl}",
            title=f"Token shifts at target layer {tl} / source layer {sl}",
            note=note,
        )
        files += [md, js]
        tables_of[str(tl)] = {
            "source_layer": sl,
            "tables": {name: {"increased": u, "decreased": d} for name, (u, d) in tables.items()},
        }
    return tables_of, files


def pca_step(
    target: Any,
    config: AnalysisConfig,
    split: EmotionSplit,
    vectors: Vectors,
    plan: LayerPlan,
    negs: Negatives,
    names: ModelNames,
    out: Path,
) -> tuple[BeforeAfterPCA, list[Path]]:
    """Step 6: PCA of the target's states on negatives before/after steering (Fig. 2b).

    The negatives of ``plan.pca_emotion`` are read at ``plan.pca_layer`` without and with
    ``alpha`` times its transplanted vector added at every layer; the PCA is fitted on the
    states before. The emotion's own scenarios (unsteered) are drawn as a reference.
    """
    emotion, layer, bs = plan.pca_emotion, plan.pca_layer, config.batch_size
    texts = negs.texts[emotion]
    labels = [negs.owner[s] for s in negs.scenarios[emotion]]
    before = read_resid_post(target, texts, [layer], batch_size=bs)
    with make_steering(target, vectors.transplanted[emotion], config.alpha):
        after = read_resid_post(target, texts, [layer], batch_size=bs)
    pca = before_after_pca(before.states[layer], after.states[layer], fit_on="before")
    own = [REFINE_TEMPLATE.format(scenario=s) for s in split.evaluation[emotion]]
    own_states = read_resid_post(
        target, own[: config.n_per_emotion], [layer], batch_size=bs
    ).states[layer]
    own_xy = (own_states.double().numpy() - pca.mean) @ pca.components.T
    files = plot_before_after_pca(
        pca,
        labels,
        out / "pca_before_after",
        reference={emotion: own_xy},
        title=f"{names.target} L{layer}: negatives of {emotion!r} (colour: their own "
        f"emotion) before → after adding {config.alpha:g}·v̂({emotion}) at every layer; "
        f"triangles: {emotion!r} scenarios, unsteered",
    )
    return pca, list(files)


# --- geometry: separation and t-SNE ------------------------------------------------------------


@dataclass(frozen=True)
class LabelStates:
    """Both models' states (every layer, last token) of scenarios of all six emotions.

    Attributes:
        texts: ``{emotion: n_per_emotion evaluation scenarios in the refinement template}``.
        labels: the emotion of each row, in the order of ``texts``.
        source, target: ``{layer: [n, d_model]}`` states of each model.
    """

    texts: dict[str, list[str]]
    labels: list[str]
    source: dict[int, torch.Tensor]
    target: dict[int, torch.Tensor]

    def by_label(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows of ``states`` grouped by emotion."""
        idx = {e: [i for i, x in enumerate(self.labels) if x == e] for e in EMOTIONS}
        return {e: states[idx[e]] for e in EMOTIONS}


def label_states_step(
    source: Any, target: Any, config: AnalysisConfig, split: EmotionSplit
) -> LabelStates:
    """Step 7: read both models on ``n_per_emotion`` scenarios of each of the six emotions."""
    scen = {e: split.evaluation[e][: config.n_per_emotion] for e in EMOTIONS}
    texts = {e: [REFINE_TEMPLATE.format(scenario=s) for s in scen[e]] for e in EMOTIONS}
    all_texts = [x for e in EMOTIONS for x in texts[e]]
    labels = [e for e in EMOTIONS for _ in texts[e]]
    src = read_resid_post(source, all_texts, None, batch_size=config.batch_size)
    tgt = read_resid_post(target, all_texts, None, batch_size=config.batch_size)
    return LabelStates(texts, labels, dict(src.states), dict(tgt.states))


def separation_step(
    states: LabelStates, config: AnalysisConfig, names: ModelNames, out: Path
) -> tuple[dict[str, dict[int, dict[str, float]]], list[Path]]:
    """Step 7b: silhouette and probe accuracy of the six emotions, every layer, both models.

    Returns:
        ``{model name: {layer: scores}}`` and the files of ``separation``.
    """
    separation = {
        names.source: {
            k: separation_scores(states.by_label(states.source[k]), seed=config.seed)
            for k in range(names.n_source)
        },
        names.target: {
            k: separation_scores(states.by_label(states.target[k]), seed=config.seed)
            for k in range(names.n_target)
        },
    }
    files = plot_separation(
        separation,
        out / "separation",
        n_layers={names.source: names.n_source, names.target: names.n_target},
        title="separation of the six emotions (last token of the refinement prompt)",
    )
    return separation, list(files)


def tsne_step(
    states: LabelStates,
    config: AnalysisConfig,
    rmap: ResidualMap,
    plan: LayerPlan,
    names: ModelNames,
    out: Path,
) -> tuple[float, list[Path]]:
    """Step 7c: t-SNE of both models' states, at the PCA layer and its source layer (Figs. 7, 8).

    Returns:
        The perplexity used (``config.tsne_perplexity`` or ``min(30, points / 4)``) and
        the files of ``tsne``.
    """
    perp = config.tsne_perplexity or min(30.0, len(states.labels) / 4)
    src_layer = rmap.source_layer(plan.pca_layer)
    coords = {
        f"{names.source} L{src_layer}": tsne_2d(
            states.source[src_layer], seed=config.seed, perplexity=perp, pca_dims=50
        ),
        f"{names.target} L{plan.pca_layer}": tsne_2d(
            states.target[plan.pca_layer], seed=config.seed, perplexity=perp, pca_dims=50
        ),
    }
    files = plot_tsne(
        coords,
        states.labels,
        out / "tsne",
        title=f"t-SNE of the six emotions (perplexity {perp:g})",
    )
    return perp, list(files)


# --- the α sweep -------------------------------------------------------------------------------


def pick_alpha(
    rows: Sequence[Mapping[str, Any]],
    *,
    effect: str = "token_acc",
    fluency: str = "ppl",
    max_ppl_ratio: float = 1.5,
) -> float | None:
    """The α with the largest effect whose perplexity stays within a factor of base.

    Among rows with ``alpha > 0`` whose ``fluency`` is at most ``max_ppl_ratio`` times
    the ``alpha == 0`` row's (any, when fluency was not measured), the one with the
    highest ``effect``; ties go to the smaller α
    (:func:`contrans_tl.pipelines.alpha.best_alpha_within_fluency`).

    Args:
        rows: one series of :func:`run_analysis`'s sweep (dicts with ``alpha``, the
            effect key and optionally the fluency key), the α = 0 row included.
        effect, fluency: keys of the two measures.
        max_ppl_ratio: how much perplexity may grow over base.

    Returns:
        The α, or ``None`` when no α keeps perplexity within bounds.

    Example:
        >>> pick_alpha([{"alpha": 0, "token_acc": .1, "ppl": 20},
        ...             {"alpha": 1, "token_acc": .6, "ppl": 25},
        ...             {"alpha": 4, "token_acc": .9, "ppl": 300}])
        1
    """
    base = [r for r in rows if float(r["alpha"]) == 0]
    steered = [r for r in rows if float(r["alpha"]) > 0 and r.get(effect) is not None]
    if not steered:
        return None
    return best_alpha_within_fluency(
        {float(r["alpha"]): float(r[effect]) for r in steered},
        {float(r["alpha"]): r.get(fluency) for r in steered},
        base_fluency=base[0].get(fluency) if base else None,
        max_ratio=max_ppl_ratio,
    )


@dataclass(frozen=True)
class SweepInputs:
    """What every point of the sweep is measured on.

    Attributes:
        task: the Token Acc prompt of the target.
        queries: ``{emotion: token ids of its validation negatives}``.
        ppl_texts: held-out WikiSplit sentences for perplexity (empty: none measured).
        vectors: ``{method: {emotion: vector}}`` for transplanted, self and (if swept) random.
    """

    task: EmotionTask
    queries: dict[str, Any]
    ppl_texts: list[str]
    vectors: dict[str, dict[str, ConceptVector]]


def sweep_inputs(
    target: Any, config: AnalysisConfig, split: EmotionSplit, vectors: Vectors
) -> SweepInputs:
    """The task, queries, perplexity texts and vectors of :func:`alpha_sweep_step`."""
    task = EmotionTask.build(target, split)
    n = config.n_sweep_negatives
    queries = {
        e: task.query_ids(target, negatives(split, e, n, "validation")) for e in config.emotions
    }
    ppl_texts = heldout_wikisplit(config.n_ppl_texts) if config.n_ppl_texts else []
    by_method = {"transplanted": vectors.transplanted, "self": vectors.own}
    if "random" in config.sweep_methods:
        by_method["random"] = {
            e: random_like(vectors.transplanted[e], config.seed * 100 + EMOTIONS.index(e))
            for e in config.emotions
        }
    return SweepInputs(task, queries, ppl_texts, by_method)


def _measure(
    target: Any,
    config: AnalysisConfig,
    inputs: SweepInputs,
    point: tuple[str, str, float, str],
    steering: Any,
    base_ppl: list[dict[str, Any]],
) -> dict[str, Any]:
    """One point ``(method, layer set, alpha, emotion)``: Token Acc and perplexity.

    The unsteered perplexity is the same for every emotion: measured once into
    ``base_ppl`` and reused.
    """
    method, set_name, a, e = point
    predicted = inputs.task.predict(
        target, inputs.queries[e], intervention=steering, batch_size=config.batch_size
    )
    row: dict[str, Any] = {"method": method, "layers": set_name, "alpha": a, "emotion": e}
    row.update(score(predicted, e, inputs.task.emotion_ids))
    if inputs.ppl_texts:
        if steering is None and base_ppl:
            p = base_ppl[0]
        else:
            p = perplexity(
                target,
                inputs.ppl_texts,
                intervention=steering,
                batch_size=config.batch_size,
                max_length=config.ppl_max_length,
            )
            if steering is None:
                base_ppl.append(p)
        row.update({"ppl": p["ppl"], "nll_sum": p["nll_sum"], "n_tokens": p["n_tokens"]})
    return row


def _pooled(rows: Sequence[Mapping[str, Any]], with_ppl: bool) -> dict[str, Any]:
    """The mean Token/Logit Acc over emotions, and the perplexity of their pooled NLL."""
    out: dict[str, Any] = {
        "token_acc": sum(r["token_acc"] for r in rows) / len(rows),
        "logit_acc": sum(r["logit_acc"] for r in rows) / len(rows),
        "n": sum(r["n"] for r in rows),
        "ppl": None,
    }
    if with_ppl:
        nll, n_tok = sum(r["nll_sum"] for r in rows), sum(r["n_tokens"] for r in rows)
        out["ppl"] = math.exp(nll / n_tok)
    return out


def _series_rows(
    per_emotion: Sequence[Mapping[str, Any]],
    config: AnalysisConfig,
    layer_sets: Mapping[str, Any],
    with_ppl: bool,
) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """One series per (method, layer set): α = 0 (base) then every α, pooled over emotions.

    Returns:
        The rows of every series and the α picked for each (:func:`pick_alpha`).
    """
    base_row = _pooled([r for r in per_emotion if r["method"] == "base"], with_ppl)
    sweep_rows: list[dict[str, Any]] = []
    picked: dict[str, float | None] = {}
    for method in config.sweep_methods:
        for set_name in layer_sets:
            series = f"{method} · layers {set_name}"
            rows = [{"series": series, "method": method, "layers": set_name, "alpha": 0.0}]
            rows[0].update(base_row)
            for a in config.alphas:
                got = [
                    r
                    for r in per_emotion
                    if r["method"] == method and r["layers"] == set_name and r["alpha"] == a
                ]
                row = {"series": series, "method": method, "layers": set_name, "alpha": a}
                row.update(_pooled(got, with_ppl))
                rows.append(row)
            sweep_rows += rows
            picked[series] = pick_alpha(rows, max_ppl_ratio=config.max_ppl_ratio)
    return sweep_rows, picked


@dataclass(frozen=True)
class SweepResult:
    """The α sweep.

    Attributes:
        rows: one row per series and α (α = 0 first), pooled over emotions.
        per_emotion: one row per (method, layer set, α, emotion), base rows first.
        picked: ``{series: α}`` (:func:`pick_alpha`; None: no α within the perplexity bound).
        ppl_texts: the perplexity texts.
        files: ``alpha_sweep.{png,json}``.
    """

    rows: list[dict[str, Any]]
    per_emotion: list[dict[str, Any]]
    picked: dict[str, float | None]
    ppl_texts: list[str]
    files: list[Path]


def alpha_sweep_step(
    target: Any,
    config: AnalysisConfig,
    split: EmotionSplit,
    vectors: Vectors,
    plan: LayerPlan,
    names: ModelNames,
    out: Path,
    log: Log,
) -> SweepResult:
    """Step 8: Token Acc (validation negatives) and perplexity per method, layer set and α.

    α = 0, the unsteered target, starts every curve.
    """
    inputs = sweep_inputs(target, config, split, vectors)
    base_ppl: list[dict[str, Any]] = []
    log("sweep: base (alpha 0)")
    per_emotion = [
        _measure(target, config, inputs, ("base", "-", 0.0, e), None, base_ppl)
        for e in config.emotions
    ]
    for method in config.sweep_methods:
        for set_name, layers in plan.layer_sets.items():
            for a in config.alphas:
                log(f"sweep: {method}, layers {set_name}, alpha {a:g}")
                for e in config.emotions:
                    steering = make_steering(target, inputs.vectors[method][e], a, layers=layers)
                    point = (method, set_name, a, e)
                    per_emotion.append(_measure(target, config, inputs, point, steering, base_ppl))
    rows, picked = _series_rows(per_emotion, config, plan.layer_sets, bool(inputs.ppl_texts))
    files = plot_alpha_sweep(
        rows,
        out / "alpha_sweep",
        picked=picked,
        effect_label=f"Token Acc (mean of {len(config.emotions)} emotions)",
        title=f"{names.source} → {names.target}: Token Acc and perplexity against α\n"
        f"★ = best Token Acc with perplexity ≤ {config.max_ppl_ratio:g}× base",
    )
    return SweepResult(rows, per_emotion, picked, inputs.ppl_texts, list(files))


# --- the run -------------------------------------------------------------------------------


class _Steps:
    """Seconds and written files per step, and progress messages."""

    def __init__(self, out: Path, verbose: bool) -> None:
        self.out = out
        self.level = logging.INFO if verbose else logging.DEBUG
        self.seconds: dict[str, float] = {}
        self.files: dict[str, list[str]] = {}
        self.started = time.time()

    def log(self, msg: str) -> None:
        logger.log(self.level, msg)

    def start(self) -> None:
        self.started = time.time()

    def wrote(self, step: str, written: Sequence[Path]) -> None:
        self.files[step] = [str(p.relative_to(self.out)) for p in written]

    def done(self, step: str, written: Sequence[Path] = ()) -> None:
        self.seconds[step] = round(time.time() - self.started, 1)
        if written:
            self.wrote(step, written)
        self.log(f"{step}: {self.seconds[step]} s")
        self.started = time.time()


@dataclass(frozen=True)
class AnalysisParts:
    """The results of every step of one run, before they are written."""

    split: EmotionSplit
    plan: LayerPlan
    mapped: MapResult
    sim: LayerSimilarity
    cosines: dict[str, dict[int, float]]
    norms: NormProfiles
    shifts: dict[str, dict[str, Any]]
    negs: Negatives
    pca: BeforeAfterPCA
    states: LabelStates
    separation: dict[str, dict[int, dict[str, float]]]
    tsne_perplexity: float
    sweep: SweepResult


def run_analysis(
    source: Any,
    target: Any,
    config: AnalysisConfig,
    out_dir: str | os.PathLike[str],
    *,
    command: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Analyse an emotion transplant from ``source`` to ``target`` and write figures.

    Runs the steps of this module in order (see the module docstring for every file).
    Nothing is written before the layers, the map (``config.map_path``) and ``out_dir``
    are checked; ``out_dir`` is created once the map is fitted or loaded and checked.

    Args:
        source: the model the vectors come from (TransformerLens bridge).
        target: the model they are transplanted into.
        config: every setting (:class:`AnalysisConfig`, already checked).
        out_dir: output folder (checked with
            :func:`~contrans_tl.pipelines.emotion.check_out_dir` before any work).
        command: the command line, recorded.
        verbose: log progress at INFO (else at DEBUG).

    Returns:
        The dict written to ``analysis.json`` (JSON-ready: layer keys are strings, NaN
        is ``None``).

    Raises:
        TypeError: ``config`` is not an :class:`AnalysisConfig`, or a layer not an integer.
        ValueError: a layer out of range or not mapped, or a map of other models.
        FileNotFoundError: ``config.map_path`` does not exist.
        NotADirectoryError, PermissionError: ``out_dir`` cannot be written.

    Example:
        >>> config = AnalysisConfig(alphas=[0.5, 1, 2],
        ...                         layer_sets={"all": None, "middle": range(6, 12)})
        >>> run_analysis(src, tgt, config, "runs/analysis")
    """
    if not isinstance(config, AnalysisConfig):
        raise TypeError(f"config must be an AnalysisConfig, got {type(config).__name__}")
    t0 = time.time()
    plan = plan_layers(config, target)
    loaded = load_map(config, source, target)  # before any work: a bad map fails here
    out = check_out_dir(out_dir)  # created once the map is checked, before the first file
    steps = _Steps(out, verbose)
    names = ModelNames.of(source, target)
    split = scenario_split(config, seed=config.seed)
    steps.start()
    mapped, plan = map_step(source, target, config, plan, loaded, out, steps.log)
    steps.done("map")
    sim = layer_similarity_step(source, target, config, mapped, out, steps.log)
    if sim.match_files:
        steps.wrote("layer_match", sim.match_files)
    steps.done("layer_similarity", sim.files)
    vectors = refine_vectors_step(source, target, config, split, mapped.rmap, out, steps.log)
    cosines, files = vector_cosines_step(vectors, names, out)
    steps.done("vectors", files)
    norms = norm_profile_step(source, target, config, vectors, names, out)
    steps.done("norm_profile", norms.files)
    negs = negative_scenarios(config, split)
    shifts, files = token_shift_step(
        source, target, config, vectors, mapped.rmap, plan, negs, names, out
    )
    steps.done("token_shifts", files)
    pca, files = pca_step(target, config, split, vectors, plan, negs, names, out)
    steps.done("pca", files)
    states = label_states_step(source, target, config, split)
    separation, sep_files = separation_step(states, config, names, out)
    perp, tsne_files = tsne_step(states, config, mapped.rmap, plan, names, out)
    steps.done("geometry", [*sep_files, *tsne_files])
    sweep = alpha_sweep_step(target, config, split, vectors, plan, names, out, steps.log)
    steps.done("alpha_sweep", sweep.files)
    parts = AnalysisParts(
        split,
        plan,
        mapped,
        sim.sim,
        cosines,
        norms,
        shifts,
        negs,
        pca,
        states,
        separation,
        perp,
        sweep,
    )
    result = assemble_result(source, target, config, parts, steps, t0, command)
    write_summary(result, out)
    steps.log(f"done in {result['seconds']['total']} s -> {out}")
    return result


def _settings(config: AnalysisConfig, parts: AnalysisParts) -> dict[str, Any]:
    """The settings as run: every config field but ``map_path`` (recorded under "map"),
    the layers and t-SNE perplexity as resolved, and the split's sizes."""
    resolved = {
        "layer_sets": {k: ("all" if v is None else v) for k, v in parts.plan.layer_sets.items()},
        "layers_for_lens": parts.plan.lens_layers,
        "pca_layer": parts.plan.pca_layer,
        "pca_emotion": parts.plan.pca_emotion,
        "tsne_perplexity": parts.tsne_perplexity,
    }
    settings = {
        f.name: resolved.get(f.name, getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name != "map_path"
    }
    settings["split_sizes"] = parts.split.sizes()
    return settings


def assemble_result(
    source: Any,
    target: Any,
    config: AnalysisConfig,
    parts: AnalysisParts,
    steps: _Steps,
    t0: float,
    command: str | None,
) -> dict[str, Any]:
    """The dict of ``analysis.json``: settings, every step's numbers, inputs and files."""
    sim = parts.sim
    result: dict[str, Any] = {
        "analysis": "emotion transplant analysis (contrans analyze)",
        "command": command,
        "source": model_provenance(source).to_dict(),
        "target": model_provenance(target).to_dict(),
        "settings": _settings(config, parts),
        "map": parts.mapped.info,
        "layer_similarity": {**sim.to_dict(), "monotone_pairs": _pairs_or_none(sim)},
        "cosine_transplanted_vs_self": parts.cosines,
        "norm_profiles": parts.norms.profiles,
        "token_shifts": parts.shifts,
        "pca": {
            "layer": parts.plan.pca_layer,
            "emotion": parts.plan.pca_emotion,
            "explained_variance_ratio": parts.pca.explained_variance_ratio.tolist(),
        },
        "separation": parts.separation,
        "alpha_sweep": {
            "rows": parts.sweep.rows,
            "per_emotion": parts.sweep.per_emotion,
            "picked": parts.sweep.picked,
        },
        "inputs": {
            "label_texts": parts.states.texts,
            "negative_scenarios": parts.negs.scenarios,
            "sweep_negatives_per_emotion": config.n_sweep_negatives,
            "ppl_texts": parts.sweep.ppl_texts,
            "norm_texts": parts.norms.texts,
        },
        "files": steps.files,
        "seconds": {**steps.seconds, "total": round(time.time() - t0, 1)},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    return _finite(result)


def write_summary(result: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Last step: write ``analysis.json`` (``result``) and ``summary.md`` into ``out``."""
    js = write_json(out / "analysis.json", result)
    md = write_text(out / "summary.md", summary_markdown(result))
    return js, md


def _pairs_or_none(sim: Any) -> list[tuple[int, int]] | None:
    try:
        return list(sim.best_pairs(monotone=True))
    except ValueError:
        return None


def _finite(x: Any) -> Any:
    """NaN and inf as None, int keys as str, tuples as lists (JSON-ready)."""
    if isinstance(x, Mapping):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --- summary.md ----------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


_MATCH_WORDS = {
    "depth": "by relative depth",
    "cka": "by the best monotone CKA matching",
    "r2": "by the best monotone held-out-R² matching (`layer_similarity_r2.png`)",
    "loaded": "as in the loaded map",
}


def _sweep_lines(result: Mapping[str, Any]) -> list[str]:
    st = result["settings"]
    lines = [
        "## Picking α (`alpha_sweep.png`)",
        "",
        f"Token Acc: mean over emotions on {st['n_sweep_negatives']} validation negatives "
        f"each; perplexity on {st['n_ppl_texts']} held-out WikiSplit sentences per emotion "
        f"vector (pooled). ★ = highest Token Acc with perplexity ≤ {st['max_ppl_ratio']:g}× "
        "base.",
        "",
        "| series | " + " | ".join(f"α={a:g}" for a in [0.0, *st["alphas"]]) + " | picked α |",
        "| --- |" + " ---: |" * (len(st["alphas"]) + 2),
    ]
    rows = result["alpha_sweep"]["rows"]
    for series in dict.fromkeys(r["series"] for r in rows):
        cells = []
        for a in [0.0, *st["alphas"]]:
            r = [x for x in rows if x["series"] == series and x["alpha"] == a]
            if r:
                cells.append(f"{_fmt(r[0]['token_acc'], '.2f')} / {_fmt(r[0]['ppl'], '.1f')}")
            else:
                cells.append("-")
        p = result["alpha_sweep"]["picked"].get(series)
        lines.append(f"| {series} | " + " | ".join(cells) + f" | {_fmt(p, 'g')} |")
    return lines + ["", "Cells: Token Acc / perplexity.", ""]


def _layer_lines(result: Mapping[str, Any]) -> list[str]:
    sim = result["layer_similarity"]
    lines = [
        "## Layers (`layer_similarity.png`, `vector_cosines.png`, `norm_profile.png`)",
        "",
        f"Map: pairing {result['map']['pairing']}, method {result['map']['method']}, "
        f"layer pairs {_MATCH_WORDS[result['map'].get('layer_match', 'depth')]}.",
        "",
        "| target layer | source layer (map) | CKA-suggested source | map R² (last token) | "
        "mean cos(transplanted, Self) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    suggested = {int(tl): s for s, tl in (sim.get("monotone_pairs") or [])}
    cos = result["cosine_transplanted_vs_self"]
    for s, tl in result["map"]["layer_pairs"]:
        r2 = result["map"]["metrics"].get(str(tl), {}).get("r2_last")
        vals = [c[str(tl)] for c in cos.values() if c.get(str(tl)) is not None]
        mean_cos = sum(vals) / len(vals) if vals else None
        lines.append(f"| {tl} | {s} | {suggested.get(tl, '-')} | {_fmt(r2)} | {_fmt(mean_cos)} |")
    return lines


def summary_markdown(result: Mapping[str, Any]) -> str:
    """Render :func:`run_analysis`'s result (or ``analysis.json``) as ``summary.md``."""
    src, tgt = result["source"]["model_id"], result["target"]["model_id"]
    st = result["settings"]
    lines = [
        f"# Transplant analysis: {src} → {tgt}",
        "",
        f"Command: `{result.get('command')}`",
        "",
        f"Emotions: {', '.join(st['emotions'])}. Run time {result['seconds']['total']} s "
        f"on {result['machine']['platform']} ({result['machine']['threads']} threads).",
        "",
        *_sweep_lines(result),
        *_layer_lines(result),
    ]
    lines += ["", "## Separation of the six emotions (`separation.png`, `tsne.png`)", ""]
    lines += ["| model | best layer (probe acc) | probe acc | best layer (silhouette) | silh. |"]
    lines += ["| --- | ---: | ---: | ---: | ---: |"]
    for model, by_layer in result["separation"].items():
        bp = max(by_layer, key=lambda k: by_layer[k]["probe_accuracy"])
        bs = max(by_layer, key=lambda k: by_layer[k]["silhouette"])
        lines.append(
            f"| {model} | {bp} | {_fmt(by_layer[bp]['probe_accuracy'])} | {bs} | "
            f"{_fmt(by_layer[bs]['silhouette'])} |"
        )
    lines += ["", "## Token shifts (`token_shifts_L*.md`)", ""]
    for tl, info in result["token_shifts"].items():
        for name, tab in info["tables"].items():
            up = ", ".join(repr(tok) for tok, _ in tab["increased"][:5]) or "-"
            lines.append(f"- L{tl}, {name}: up {up}")
    lines += ["", "## Files", ""]
    for step, names in result["files"].items():
        lines.append(f"- {step}: " + ", ".join(f"`{n}`" for n in names))
    lines.append("")
    return "\n".join(lines)
