"""The analysis of one emotion transplant, end to end: numbers, figures and a summary.

:func:`run_analysis` takes a source and a target model and writes into ``out_dir``:

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
tables are ``NAME.md`` + ``NAME.json``. Every size is a parameter; the defaults finish in
roughly 15-25 minutes on a 2-core CPU for SmolLM2-135M-Instruct → Gemma-3-270m.

Example:
    >>> src, tgt = load_model("smollm2-135m-instruct"), load_model("gemma-3-270m")
    >>> res = run_analysis(src, tgt, "runs/analysis", emotions=["happiness", "fear"])
    >>> res["alpha_sweep"]["picked"]
"""

import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from contrans_tl.activations import read_resid_post
from contrans_tl.analysis.diagnostics import (
    cosine_per_layer,
    layer_pairs_from_similarity,
    layer_similarity,
    residual_norm_profile,
)
from contrans_tl.analysis.geometry import before_after_pca, separation_scores, tsne_2d
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
from contrans_tl.data import EMOTIONS, emotion_scenarios, wikisplit_sentences
from contrans_tl.evals.emotion import (
    REFINE_TEMPLATE,
    EmotionSplit,
    EmotionTask,
    negatives,
    refinement_prompts,
    score,
    split_scenarios,
)
from contrans_tl.evals.emotion_run import check_minimums, check_out_dir, random_like
from contrans_tl.evals.perplexity import heldout_wikisplit, perplexity
from contrans_tl.io import write_json
from contrans_tl.maps import PAIRINGS, MapMethod, Pairing, ResidualMap, fit_residual_map
from contrans_tl.models import model_provenance
from contrans_tl.sites import check_layers
from contrans_tl.steering import make_steering

__all__ = [
    "DEFAULT_ALPHAS",
    "SWEEP_METHODS",
    "check_analysis_args",
    "default_lens_layers",
    "similarity_layers",
    "pick_alpha",
    "run_analysis",
]

DEFAULT_ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)
SWEEP_METHODS = ("transplanted", "self", "random")
_MAP_METHODS = ("svd", "ridge")


def _log(msg: str) -> None:
    print(f"[analyze {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check_analysis_args(
    *,
    emotions: Sequence[str] = EMOTIONS,
    n_map_texts: int = 500,
    map_pairing: str = "auto",
    map_method: str = "svd",
    layer_match: str = "depth",
    n_similarity_texts: int = 100,
    similarity_max_gb: float = 1.0,
    n_refine: int = 50,
    n_fewshot: int = 3,
    n_per_emotion: int = 20,
    n_sweep_negatives: int = 10,
    n_ppl_texts: int = 16,
    n_norm_texts: int = 100,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    alpha: float = 1.0,
    sweep_methods: Sequence[str] = ("transplanted", "self"),
    pca_emotion: str | None = None,
    top_k: int = 10,
    top_tokens: int = 15,
    tsne_perplexity: float | None = None,
    max_ppl_ratio: float = 1.5,
    batch_size: int = 16,
) -> EmotionSplit:
    """Check the settings of :func:`run_analysis` that do not need the models.

    Called by :func:`run_analysis` and, before any model is loaded, by the
    ``contrans analyze`` command. Also cuts the scenario split, which must leave enough
    scenarios for every part.

    Returns:
        The :class:`~contrans_tl.evals.emotion.EmotionSplit` the analysis will use
        (seed 0 here; :func:`run_analysis` cuts its own with its seed).

    Raises:
        ValueError: a setting out of range, naming it and what would be valid.
    """
    if isinstance(emotions, str):
        raise ValueError(f"emotions must be a list of emotion names, got the string {emotions!r}")
    bad = [e for e in emotions if e not in EMOTIONS]
    if bad or not emotions:
        raise ValueError(f"emotions must be a non-empty subset of {list(EMOTIONS)}, got {bad}")
    if len(set(emotions)) != len(emotions):
        raise ValueError(f"emotions must be distinct, got {list(emotions)}")
    if pca_emotion is not None and pca_emotion not in emotions:
        raise ValueError(f"pca_emotion {pca_emotion!r} must be one of emotions {list(emotions)}")
    if map_pairing not in PAIRINGS:
        raise ValueError(f"map_pairing must be one of {PAIRINGS}, got {map_pairing!r}")
    if map_method not in _MAP_METHODS:
        raise ValueError(f"map_method must be one of {_MAP_METHODS}, got {map_method!r}")
    if layer_match not in LAYER_MATCHES:
        raise ValueError(f"layer_match must be one of {LAYER_MATCHES}, got {layer_match!r}")
    minimum = {
        "n_map_texts": (n_map_texts, 10),
        "n_similarity_texts": (n_similarity_texts, 2),
        "n_refine": (n_refine, 1),
        "n_fewshot": (n_fewshot, 1),
        "n_per_emotion": (n_per_emotion, 3),
        "n_sweep_negatives": (n_sweep_negatives, 1),
        "n_ppl_texts": (n_ppl_texts, 0),
        "n_norm_texts": (n_norm_texts, 1),
        "top_k": (top_k, 1),
        "top_tokens": (top_tokens, 1),
        "batch_size": (batch_size, 1),
    }
    check_minimums(minimum)
    if not similarity_max_gb > 0:
        raise ValueError(f"similarity_max_gb must be > 0, got {similarity_max_gb}")
    if isinstance(alphas, (int, float)):
        raise ValueError(f"alphas must be a list of strengths, got the number {alphas!r}")
    alphas = list(alphas)
    if not alphas:
        raise ValueError("alphas is empty; give strengths > 0, e.g. 0.25,0.5,1,2 (0 is base)")
    wrong = [a for a in alphas if not (math.isfinite(a) and a > 0)]
    if wrong:
        raise ValueError(
            f"every alpha in alphas must be a finite number > 0 (alpha 0 is always run as "
            f"the unsteered base), got {wrong}; e.g. 0.25,0.5,1,2"
        )
    if not (math.isfinite(alpha) and alpha != 0):
        raise ValueError(f"alpha (for token shifts and PCA) must be finite and non-zero: {alpha}")
    if isinstance(sweep_methods, str):
        raise ValueError(f"sweep_methods must be a list, got the string {sweep_methods!r}")
    bad = [m for m in sweep_methods if m not in SWEEP_METHODS]
    if bad or not sweep_methods:
        raise ValueError(
            f"sweep_methods must be a non-empty subset of {list(SWEEP_METHODS)}, got "
            f"{list(sweep_methods)}"
        )
    if tsne_perplexity is not None and not tsne_perplexity > 0:
        raise ValueError(f"tsne_perplexity must be > 0 or None, got {tsne_perplexity}")
    n_points = n_per_emotion * len(EMOTIONS)
    if tsne_perplexity is not None and tsne_perplexity >= n_points:
        raise ValueError(
            f"tsne_perplexity {tsne_perplexity} must be below the number of points "
            f"(n_per_emotion x 6 = {n_points})"
        )
    if not max_ppl_ratio >= 1:
        raise ValueError(f"max_ppl_ratio must be >= 1, got {max_ppl_ratio}")
    return _split(n_fewshot, n_refine, n_sweep_negatives, n_per_emotion, seed=0)


def _split(
    n_fewshot: int, n_refine: int, n_sweep_negatives: int, n_per_emotion: int, *, seed: int
) -> EmotionSplit:
    """The scenario split, with enough validation scenarios for the sweep's negatives."""
    n_validation = max(20, math.ceil(n_sweep_negatives / (len(EMOTIONS) - 1)))
    split = split_scenarios(
        emotion_scenarios(),
        n_fewshot=n_fewshot,
        n_refine=n_refine,
        n_validation=n_validation,
        seed=seed,
    )
    have = min(len(v) for v in split.evaluation.values())
    if n_per_emotion > have:
        raise ValueError(
            f"n_per_emotion={n_per_emotion} but with n_fewshot={n_fewshot}, n_refine="
            f"{n_refine} and {n_validation} validation scenarios the smallest emotion keeps "
            f"{have} evaluation scenarios; lower n_per_emotion or n_refine"
        )
    return split


LayerMatch = Literal["depth", "cka", "r2"]
LAYER_MATCHES = ("depth", "cka", "r2")


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
    highest ``effect``; ties go to the smaller α.

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
    base_f = base[0].get(fluency) if base else None
    ok = []
    for r in rows:
        if float(r["alpha"]) <= 0 or r.get(effect) is None:
            continue
        f = r.get(fluency)
        if base_f is not None and f is not None and not f <= max_ppl_ratio * base_f:
            continue
        ok.append(r)
    if not ok:
        return None
    best = max(ok, key=lambda r: (float(r[effect]), -float(r["alpha"])))
    return float(best["alpha"])


def _name(model: Any) -> str:
    return str(model_provenance(model).model_id)


def run_analysis(
    source: Any,
    target: Any,
    out_dir: str | os.PathLike[str],
    *,
    emotions: Sequence[str] = EMOTIONS,
    map_path: str | os.PathLike[str] | None = None,
    n_map_texts: int = 500,
    map_pairing: Pairing = "auto",
    map_method: MapMethod = "svd",
    layer_match: LayerMatch = "depth",
    n_similarity_texts: int = 100,
    similarity_max_gb: float = 1.0,
    n_refine: int = 50,
    n_fewshot: int = 3,
    n_per_emotion: int = 20,
    n_sweep_negatives: int = 10,
    n_ppl_texts: int = 16,
    n_norm_texts: int = 100,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    alpha: float = 1.0,
    layer_sets: Mapping[str, Sequence[int] | None] | None = None,
    layers_for_lens: Sequence[int] | None = None,
    pca_layer: int | None = None,
    pca_emotion: str | None = None,
    sweep_methods: Sequence[str] = ("transplanted", "self"),
    top_k: int = 10,
    top_tokens: int = 15,
    tsne_perplexity: float | None = None,
    max_ppl_ratio: float = 1.5,
    ppl_max_length: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    command: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Analyse an emotion transplant from ``source`` to ``target`` and write figures.

    Steps (each figure is ``NAME.png`` + ``NAME.json`` in ``out_dir``, see the module
    docstring): fit the residual map (or load ``map_path``); CKA layer-similarity matrix;
    source vectors, their transplants and the target's own (Self) vectors per emotion
    (mean difference on the paper's refinement prompts); cosine per layer transplanted
    vs Self; residual-norm profiles; token-shift tables (logit lens, direct view) at
    ``layers_for_lens``; PCA before/after at ``pca_layer``; t-SNE of the six emotions in
    both models; separation per layer in both models; and the α sweep: Token Acc on the
    validation negatives of each emotion and perplexity on held-out WikiSplit, per
    method, per layer set and per α (α = 0, the unsteered target, starts every curve).

    Args:
        source: the model the vectors come from (TransformerLens bridge).
        target: the model they are transplanted into.
        out_dir: output folder (checked first with
            :func:`~contrans_tl.evals.emotion_run.check_out_dir`; created once the map is
            fitted or loaded and checked, so a run refused on its settings leaves nothing).
        emotions: emotions whose vectors are analysed (the t-SNE and separation always
            use all six as labels).
        map_path: a saved :class:`~contrans_tl.maps.ResidualMap` to use instead of
            fitting one (it must belong to these two models).
        n_map_texts: WikiSplit sentences for fitting the map (10% held out for R²).
        map_pairing: map pairing (``"auto"``: every token for one tokenizer, word ends
            across tokenizers); the CKA pairs states the same way.
        map_method: ``"svd"`` (paper) or ``"ridge"``.
        layer_match: which source layer each target layer's map reads from:
            ``"depth"`` (the paper: same relative depth), or the best monotone matching
            (:func:`~contrans_tl.analysis.layer_pairs_from_similarity`) of a similarity
            matrix computed first on the similarity texts, ``"cka"`` (linear CKA) or
            ``"r2"`` (held-out map R²). With thinned similarity layers
            (``similarity_max_gb``) only the matrix's target layers get a map, and the
            default lens and PCA layers move to the nearest mapped ones. Not with
            ``map_path`` (a loaded map keeps its pairs).
        n_similarity_texts: WikiSplit sentences for the CKA matrix.
        similarity_max_gb: memory for the CKA moments; layers are thinned to fit
            (:func:`similarity_layers`).
        n_refine: refinement scenarios per emotion (and as many negatives).
        n_fewshot: solved examples per emotion in the Token Acc prompt.
        n_per_emotion: scenarios per emotion for t-SNE and separation, and negative
            scenarios per emotion for the token shifts and the PCA.
        n_sweep_negatives: validation negatives per emotion for Token Acc in the sweep.
        n_ppl_texts: held-out WikiSplit sentences for perplexity, per emotion vector
            (0: no perplexity).
        n_norm_texts: held-out WikiSplit sentences for the norm profiles.
        alphas: strengths of the sweep (> 0).
        alpha: strength for the token shifts and the PCA.
        layer_sets: ``{name: target layers}`` steered in the sweep (``None``: every layer
            the vector has); default ``{"all": None}``.
        layers_for_lens: target layers of the token-shift tables (default: a middle and
            a late layer, :func:`default_lens_layers`); each must be mapped.
        pca_layer: target layer of the PCA and t-SNE (default: the last lens layer).
        pca_emotion: whose vector the PCA adds (default: the first of ``emotions``).
        sweep_methods: any of ``"transplanted"``, ``"self"``, ``"random"`` (a random
            direction with the transplanted vector's norm per layer).
        top_k: tokens per text counted in the shift tables (the paper's top-k).
        top_tokens: rows per shift table.
        tsne_perplexity: t-SNE perplexity (default ``min(30, points / 4)``).
        max_ppl_ratio: perplexity allowed over base when picking α (:func:`pick_alpha`).
        ppl_max_length: tokens per perplexity text.
        batch_size: texts per forward pass.
        seed: seeds the split, the map's held-out texts, random directions and t-SNE.
        command: the command line, recorded.
        verbose: print progress.

    Returns:
        The dict written to ``analysis.json`` (JSON-ready: layer keys are strings, NaN
        is ``None``).

    Raises:
        ValueError: a setting out of range (see :func:`check_analysis_args`), a layer out
            of range or not mapped, or a map of other models.
        FileNotFoundError: ``map_path`` does not exist.
        NotADirectoryError, PermissionError: ``out_dir`` cannot be written.

    Example:
        >>> run_analysis(src, tgt, "runs/analysis", alphas=[0.5, 1, 2],
        ...              layer_sets={"all": None, "middle": range(6, 12)})
    """
    log = _log if verbose else (lambda msg: None)
    t0 = time.time()
    check_analysis_args(
        emotions=emotions,
        n_map_texts=n_map_texts,
        map_pairing=map_pairing,
        map_method=map_method,
        layer_match=layer_match,
        n_similarity_texts=n_similarity_texts,
        similarity_max_gb=similarity_max_gb,
        n_refine=n_refine,
        n_fewshot=n_fewshot,
        n_per_emotion=n_per_emotion,
        n_sweep_negatives=n_sweep_negatives,
        n_ppl_texts=n_ppl_texts,
        n_norm_texts=n_norm_texts,
        alphas=alphas,
        alpha=alpha,
        sweep_methods=sweep_methods,
        pca_emotion=pca_emotion,
        top_k=top_k,
        top_tokens=top_tokens,
        tsne_perplexity=tsne_perplexity,
        max_ppl_ratio=max_ppl_ratio,
        batch_size=batch_size,
    )
    if ppl_max_length < 2:
        raise ValueError(f"ppl_max_length must be >= 2, got {ppl_max_length}")
    emotions = list(emotions)
    alphas = sorted({float(a) for a in alphas})
    pca_emotion = pca_emotion or emotions[0]
    n_src, n_tgt = int(source.cfg.n_layers), int(target.cfg.n_layers)
    src_name, tgt_name = _name(source), _name(target)
    if src_name == tgt_name:
        src_name, tgt_name = f"source {src_name}", f"target {tgt_name}"
    lens_layers = check_layers(
        target, default_lens_layers(n_tgt) if layers_for_lens is None else layers_for_lens
    )
    pca_layer_given = pca_layer
    pca_layer = lens_layers[-1] if pca_layer is None else check_layers(target, [pca_layer])[0]
    sets: dict[str, list[int] | None] = {}
    for set_name, layers in ({"all": None} if layer_sets is None else layer_sets).items():
        sets[str(set_name)] = None if layers is None else check_layers(target, list(layers))
    if not sets:
        raise ValueError("layer_sets is empty; give at least one, e.g. {'all': None}")
    if map_path is not None and layer_match != "depth":
        raise ValueError(
            f"layer_match={layer_match!r} chooses the layer pairs of a map to fit, but "
            "map_path loads a map with its own pairs; drop one of them"
        )
    loaded_map = None
    if map_path is not None:  # before any work: a missing or broken map fails here
        loaded_map = ResidualMap.load(map_path)
        loaded_map.check_models(source, target)
    out = check_out_dir(out_dir)  # created once the map is checked, before the first file
    art = out / "artifacts"
    seconds: dict[str, float] = {}
    files: dict[str, list[str]] = {}

    def done(step: str, t: float, written: Sequence[Path] = ()) -> None:
        seconds[step] = round(time.time() - t, 1)
        if written:
            files[step] = [str(p.relative_to(out)) for p in written]
        log(f"{step}: {seconds[step]} s")

    split = _split(n_fewshot, n_refine, n_sweep_negatives, n_per_emotion, seed=seed)

    # 1. The map (paper Eq. 2), its layer pairs by relative depth or by similarity
    t = time.time()
    s_layers, t_layers = similarity_layers(
        n_src, n_tgt, int(source.cfg.d_model), int(target.cfg.d_model), similarity_max_gb
    )

    def similarity(metric: str, pairing: str) -> Any:
        return layer_similarity(
            source,
            target,
            wikisplit_sentences(n_similarity_texts),
            pairing=pairing,  # type: ignore[arg-type]
            metric=metric,  # type: ignore[arg-type]
            source_layers=s_layers,
            target_layers=t_layers,
            batch_size=batch_size,
            seed=seed,
        )

    match_sim = None
    if loaded_map is not None:
        rmap = loaded_map
        map_info: dict[str, Any] = {"loaded_from": str(map_path), "layer_match": "loaded"}
    else:
        pairs = None
        if layer_match != "depth":
            log(
                f"{layer_match} on {n_similarity_texts} texts, "
                f"{len(s_layers)} x {len(t_layers)} layers, to choose the map's layer pairs"
            )
            match_sim = similarity(layer_match, map_pairing)
            pairs = layer_pairs_from_similarity(match_sim, source=source, target=target)
        log(f"fitting the residual map on {n_map_texts} WikiSplit sentences")
        rmap = fit_residual_map(
            source,
            target,
            wikisplit_sentences(n_map_texts),
            layer_pairs=pairs,
            pairing=map_pairing,
            method=map_method,
            seed=seed,
            batch_size=batch_size,
        )
        map_info = {"fitted_on_texts": n_map_texts, "layer_match": layer_match}
    mapped = [tl for _, tl in rmap.layer_pairs]
    if layers_for_lens is None and layer_match != "depth":
        # the defaults may fall between the thinned similarity's target layers
        lens_layers = sorted({min(mapped, key=lambda m: (abs(m - k), m)) for k in lens_layers})
        if pca_layer_given is None:
            pca_layer = lens_layers[-1]
    for what, layers in [("layers_for_lens", lens_layers), ("pca_layer", [pca_layer])] + [
        (f"layer set {k!r}", v) for k, v in sets.items() if v is not None
    ]:
        missing = [k for k in layers if k not in mapped]
        if missing:
            raise ValueError(
                f"{what} has target layers {missing} that the map does not reach; mapped "
                f"target layers: {mapped}"
            )
    out.mkdir(parents=True, exist_ok=True)
    if map_path is None:
        rmap.save(art / "residual_map")
    map_info.update(
        {
            "pairing": rmap.pairing,
            "method": rmap.method,
            "layer_pairs": rmap.layer_pairs,
            "info": rmap.info,
            "metrics": {str(k): v for k, v in rmap.metrics.items()},
        }
    )
    done("map", t)

    # 2. Layer similarity (CKA; the matching's own matrix when it was CKA)
    t = time.time()
    if match_sim is not None and layer_match == "cka":
        sim = match_sim
    else:
        log(f"CKA on {n_similarity_texts} texts, {len(s_layers)} x {len(t_layers)} layers")
        sim = similarity("cka", rmap.pairing)
    if match_sim is not None and layer_match == "r2":
        match_sim.save(art / "layer_similarity_r2")
        files["layer_match"] = [
            str(p.relative_to(out))
            for p in plot_layer_similarity(match_sim, out / "layer_similarity_r2")
        ]
    sim.save(art / "layer_similarity")
    written = plot_layer_similarity(sim, out / "layer_similarity")
    done("layer_similarity", t, written)

    # 3. Vectors (Eq. 1) and their transplants (Eq. 2)
    t = time.time()
    log(f"refining vectors for {emotions} in both models")
    prompts = {e: refinement_prompts(split, e) for e in emotions}
    src_vecs = {
        e: mean_difference(source, *prompts[e], concept=e, batch_size=batch_size) for e in emotions
    }
    tr_vecs = {e: rmap.transplant(src_vecs[e]) for e in emotions}
    self_vecs = {
        e: mean_difference(target, *prompts[e], concept=e, batch_size=batch_size) for e in emotions
    }
    for e in emotions:
        src_vecs[e].save(art / "vectors" / f"source_{e}")
        tr_vecs[e].save(art / "vectors" / f"transplanted_{e}")
        self_vecs[e].save(art / "vectors" / f"self_{e}")
    cosines = {e: cosine_per_layer(tr_vecs[e], self_vecs[e]) for e in emotions}
    written = plot_vector_cosines(
        cosines,
        out / "vector_cosines",
        title=f"cosine per target layer: transplanted ({src_name} → {tgt_name}) vs Self",
    )
    done("vectors", t, written)

    # 4. Norm profiles
    t = time.time()
    norm_texts = heldout_wikisplit(n_norm_texts)
    resid_src = residual_norm_profile(source, norm_texts, batch_size=batch_size)
    resid_tgt = residual_norm_profile(target, norm_texts, batch_size=batch_size)

    def mean_norms(vecs: Mapping[str, ConceptVector]) -> dict[int, float]:
        per = [v.norms() for v in vecs.values()]
        return {k: sum(p[k] for p in per) / len(per) for k in per[0]}

    profiles = {
        f"{src_name}: residual": resid_src,
        f"{tgt_name}: residual": resid_tgt,
        f"{src_name}: source vector (mean)": mean_norms(src_vecs),
        f"{tgt_name}: transplanted vector (mean)": mean_norms(tr_vecs),
        f"{tgt_name}: Self vector (mean)": mean_norms(self_vecs),
    }
    counts = {k: (n_src if k.startswith(f"{src_name}:") else n_tgt) for k in profiles}
    written = plot_norm_profile(
        profiles,
        out / "norm_profile",
        n_layers=counts,
        title="mean residual norm (last token, held-out WikiSplit) and concept-vector norms",
    )
    done("norm_profile", t, written)

    # 5. Token shifts (Table 8), direct logit-lens view
    t = time.time()
    owner = {s: e for e in EMOTIONS for s in split.evaluation[e]}
    neg = {e: negatives(split, e, n_per_emotion, "evaluation") for e in emotions}
    neg_texts = {e: [REFINE_TEMPLATE.format(scenario=s) for s in neg[e]] for e in emotions}
    shift_files: list[Path] = []
    shift_tables: dict[str, dict[str, Any]] = {}
    for tl in lens_layers:
        sl = rmap.source_layer(tl)
        tables = {}
        for e in emotions:
            tr = token_shifts(
                target, neg_texts[e], tr_vecs[e], alpha, layers=[tl], k=top_k, mode="direct"
            )[tl]
            sr = token_shifts(
                source, neg_texts[e], src_vecs[e], alpha, layers=[sl], k=top_k, mode="direct"
            )[sl]
            tables[f"{e}: transplanted, {tgt_name} L{tl}"] = aggregate_shifts(tr, top=top_tokens)
            tables[f"{e}: source vector, {src_name} L{sl}"] = aggregate_shifts(sr, top=top_tokens)
        note = (
            f"Logit lens, direct view: each of {n_per_emotion} negative scenarios per emotion "
            f"(prompt: the refinement template) is read at the last token after block L; "
            f"α·v (α = {alpha:g}) is added to that state and the change of every token's "
            f"probability is ranked. Count: in how many inputs the token is among the top "
            f"{top_k} risers (fallers). Target layer {tl} is mapped from source layer {sl}."
        )
        md, js = write_shift_table(
            tables,
            out / f"token_shifts_L{tl}",
            title=f"Token shifts at target layer {tl} / source layer {sl}",
            note=note,
        )
        shift_files += [md, js]
        shift_tables[str(tl)] = {
            "source_layer": sl,
            "tables": {k: {"increased": u, "decreased": d} for k, (u, d) in tables.items()},
        }
    done("token_shifts", t, shift_files)

    # 6. PCA before/after (Fig. 2b)
    t = time.time()
    pca_texts = neg_texts[pca_emotion]
    pca_labels = [owner[s] for s in neg[pca_emotion]]
    before = read_resid_post(target, pca_texts, [pca_layer], batch_size=batch_size)
    with make_steering(target, tr_vecs[pca_emotion], alpha):
        after = read_resid_post(target, pca_texts, [pca_layer], batch_size=batch_size)
    pca = before_after_pca(before.states[pca_layer], after.states[pca_layer], fit_on="before")
    own = [REFINE_TEMPLATE.format(scenario=s) for s in split.evaluation[pca_emotion]]
    own_states = read_resid_post(
        target, own[:n_per_emotion], [pca_layer], batch_size=batch_size
    ).states[pca_layer]
    own_xy = (own_states.double().numpy() - pca.mean) @ pca.components.T
    written = plot_before_after_pca(
        pca,
        pca_labels,
        out / "pca_before_after",
        reference={pca_emotion: own_xy},
        title=f"{tgt_name} L{pca_layer}: negatives of {pca_emotion!r} (colour: their own "
        f"emotion) before → after adding {alpha:g}·v̂({pca_emotion}) at every layer; "
        f"triangles: {pca_emotion!r} scenarios, unsteered",
    )
    done("pca", t, written)

    # 7. t-SNE and separation, both models, the six emotions
    t = time.time()
    label_scen = {e: split.evaluation[e][:n_per_emotion] for e in EMOTIONS}
    label_texts = {e: [REFINE_TEMPLATE.format(scenario=s) for s in label_scen[e]] for e in EMOTIONS}
    all_texts = [x for e in EMOTIONS for x in label_texts[e]]
    labels = [e for e in EMOTIONS for _ in label_texts[e]]
    reads = {
        "source": read_resid_post(source, all_texts, None, batch_size=batch_size),
        "target": read_resid_post(target, all_texts, None, batch_size=batch_size),
    }

    def by_label(states: torch.Tensor) -> dict[str, torch.Tensor]:
        idx = {e: [i for i, x in enumerate(labels) if x == e] for e in EMOTIONS}
        return {e: states[idx[e]] for e in EMOTIONS}

    separation = {
        src_name: {
            k: separation_scores(by_label(reads["source"].states[k]), seed=seed)
            for k in range(n_src)
        },
        tgt_name: {
            k: separation_scores(by_label(reads["target"].states[k]), seed=seed)
            for k in range(n_tgt)
        },
    }
    written_sep = plot_separation(
        separation,
        out / "separation",
        n_layers={src_name: n_src, tgt_name: n_tgt},
        title="separation of the six emotions (last token of the refinement prompt)",
    )
    perp = tsne_perplexity or min(30.0, len(all_texts) / 4)
    src_pca_layer = rmap.source_layer(pca_layer)
    coords = {
        f"{src_name} L{src_pca_layer}": tsne_2d(
            reads["source"].states[src_pca_layer], seed=seed, perplexity=perp, pca_dims=50
        ),
        f"{tgt_name} L{pca_layer}": tsne_2d(
            reads["target"].states[pca_layer], seed=seed, perplexity=perp, pca_dims=50
        ),
    }
    written_tsne = plot_tsne(
        coords, labels, out / "tsne", title=f"t-SNE of the six emotions (perplexity {perp:g})"
    )
    done("geometry", t, [*written_sep, *written_tsne])

    # 8. α sweep: Token Acc and perplexity
    t = time.time()
    task = EmotionTask.build(target, split)
    queries = {
        e: task.query_ids(target, negatives(split, e, n_sweep_negatives, "validation"))
        for e in emotions
    }
    ppl_texts = heldout_wikisplit(n_ppl_texts) if n_ppl_texts else []
    vectors: dict[str, dict[str, ConceptVector]] = {"transplanted": tr_vecs, "self": self_vecs}
    if "random" in sweep_methods:
        vectors["random"] = {
            e: random_like(tr_vecs[e], seed * 100 + EMOTIONS.index(e)) for e in emotions
        }
    per_emotion: list[dict[str, Any]] = []

    def measure(method: str, set_name: str, a: float, e: str, steering: Any) -> dict[str, Any]:
        s = score(
            task.predict(target, queries[e], steering=steering, batch_size=batch_size),
            e,
            task.emotion_ids,
        )
        row: dict[str, Any] = {"method": method, "layers": set_name, "alpha": a, "emotion": e}
        row.update(s)
        if ppl_texts:
            if steering is None and base_ppl:  # unsteered: the same for every emotion
                p = base_ppl[0]
            else:
                p = perplexity(
                    target,
                    ppl_texts,
                    steering=steering,
                    batch_size=batch_size,
                    max_length=ppl_max_length,
                )
                if steering is None:
                    base_ppl.append(p)
            row.update({"ppl": p["ppl"], "nll_sum": p["nll_sum"], "n_tokens": p["n_tokens"]})
        return row

    base_ppl: list[dict[str, Any]] = []

    log("sweep: base (alpha 0)")
    base_rows = [measure("base", "-", 0.0, e, None) for e in emotions]
    per_emotion += base_rows
    for method in sweep_methods:
        for set_name, layers in sets.items():
            for a in alphas:
                log(f"sweep: {method}, layers {set_name}, alpha {a:g}")
                for e in emotions:
                    steering = make_steering(target, vectors[method][e], a, layers=layers)
                    per_emotion.append(measure(method, set_name, a, e, steering))

    def pooled(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out_row: dict[str, Any] = {
            "token_acc": sum(r["token_acc"] for r in rows) / len(rows),
            "logit_acc": sum(r["logit_acc"] for r in rows) / len(rows),
            "n": sum(r["n"] for r in rows),
            "ppl": None,
        }
        if ppl_texts:
            nll, n_tok = sum(r["nll_sum"] for r in rows), sum(r["n_tokens"] for r in rows)
            out_row["ppl"] = math.exp(nll / n_tok)
        return out_row

    sweep_rows: list[dict[str, Any]] = []
    picked: dict[str, float | None] = {}
    base_row = pooled(base_rows)
    for method in sweep_methods:
        for set_name in sets:
            series = f"{method} · layers {set_name}"
            rows = [{"series": series, "method": method, "layers": set_name, "alpha": 0.0}]
            rows[0].update(base_row)
            for a in alphas:
                got = [
                    r
                    for r in per_emotion
                    if r["method"] == method and r["layers"] == set_name and r["alpha"] == a
                ]
                row = {"series": series, "method": method, "layers": set_name, "alpha": a}
                row.update(pooled(got))
                rows.append(row)
            sweep_rows += rows
            picked[series] = pick_alpha(rows, max_ppl_ratio=max_ppl_ratio)
    written = plot_alpha_sweep(
        sweep_rows,
        out / "alpha_sweep",
        picked=picked,
        effect_label=f"Token Acc (mean of {len(emotions)} emotions)",
        title=f"{src_name} → {tgt_name}: Token Acc and perplexity against α\n"
        f"★ = best Token Acc with perplexity ≤ {max_ppl_ratio:g}× base",
    )
    done("alpha_sweep", t, written)

    result: dict[str, Any] = {
        "analysis": "emotion transplant analysis (contrans analyze)",
        "command": command,
        "source": model_provenance(source).to_dict(),
        "target": model_provenance(target).to_dict(),
        "settings": {
            "emotions": emotions,
            "n_map_texts": n_map_texts,
            "map_pairing": map_pairing,
            "map_method": map_method,
            "layer_match": layer_match,
            "n_similarity_texts": n_similarity_texts,
            "similarity_max_gb": similarity_max_gb,
            "n_refine": n_refine,
            "n_fewshot": n_fewshot,
            "n_per_emotion": n_per_emotion,
            "n_sweep_negatives": n_sweep_negatives,
            "n_ppl_texts": n_ppl_texts,
            "n_norm_texts": n_norm_texts,
            "alphas": alphas,
            "alpha": alpha,
            "layer_sets": {k: ("all" if v is None else v) for k, v in sets.items()},
            "layers_for_lens": lens_layers,
            "pca_layer": pca_layer,
            "pca_emotion": pca_emotion,
            "sweep_methods": list(sweep_methods),
            "top_k": top_k,
            "top_tokens": top_tokens,
            "tsne_perplexity": perp,
            "max_ppl_ratio": max_ppl_ratio,
            "ppl_max_length": ppl_max_length,
            "batch_size": batch_size,
            "seed": seed,
            "split_sizes": split.sizes(),
        },
        "map": map_info,
        "layer_similarity": {**sim.to_dict(), "monotone_pairs": _pairs_or_none(sim)},
        "cosine_transplanted_vs_self": cosines,
        "norm_profiles": profiles,
        "token_shifts": shift_tables,
        "pca": {
            "layer": pca_layer,
            "emotion": pca_emotion,
            "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
        },
        "separation": separation,
        "alpha_sweep": {"rows": sweep_rows, "per_emotion": per_emotion, "picked": picked},
        "inputs": {
            "label_texts": label_texts,
            "negative_scenarios": neg,
            "sweep_negatives_per_emotion": n_sweep_negatives,
            "ppl_texts": ppl_texts,
            "norm_texts": norm_texts,
        },
        "files": files,
        "seconds": {**seconds, "total": round(time.time() - t0, 1)},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    result = _finite(result)
    write_json(out / "analysis.json", result)
    (out / "summary.md").write_text(summary_markdown(result), encoding="utf-8")
    log(f"done in {result['seconds']['total']} s -> {out}")
    return result


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
    lines += ["", "Cells: Token Acc / perplexity.", ""]
    sim = result["layer_similarity"]
    lines += [
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
