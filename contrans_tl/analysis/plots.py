"""Figures of the analyses: each a PNG with the plotted numbers beside it as JSON.

Every function takes numbers that :mod:`contrans_tl.analysis` (or an evaluation) already
computed, draws them with matplotlib's Agg canvas (no display, no global ``pyplot``
state), and writes ``NAME.png`` and ``NAME.json``; each file goes to a temporary file
first and is moved into place, so an interrupted run leaves no half-written figure. The
JSON holds exactly what was drawn (NaN as ``null``), so a figure can be redrawn, or its
numbers quoted, without rerunning the models.

* :func:`plot_layer_similarity`: source x target layer heatmap (CKA or map R²) with the
  suggested monotone matching and the relative-depth matching on top.
* :func:`plot_vector_cosines`: cosine per layer of two vectors (transplanted vs Self).
* :func:`plot_norm_profile`: mean residual norm (or vector norm) per relative depth.
* :func:`plot_before_after_pca`: states before and after steering, with arrows (Fig. 2b).
* :func:`plot_tsne`: 2-D embeddings coloured by label, one panel per model (Figs. 7, 8).
* :func:`plot_separation`: silhouette and probe accuracy per relative depth.
* :func:`plot_alpha_sweep`: effect and perplexity against α on twin axes: the curve a
  user reads to pick α.
* :func:`write_shift_table`: the paper's Table 8 ("(token, count)") as Markdown and JSON.

Example:
    >>> sim = layer_similarity(src, tgt, texts, metric="cka")
    >>> plot_layer_similarity(sim, "out/layer_similarity")   # layer_similarity.png + .json
    >>> up, down = aggregate_shifts(token_shifts(tgt, texts, v, 1.0, layers=[9])[9])
    >>> write_shift_table({"fear, target L9": (up, down)}, "out/shifts")  # shifts.md + .json
"""

import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrans_tl.analysis.diagnostics import LayerSimilarity
from contrans_tl.analysis.geometry import BeforeAfterPCA
from contrans_tl.io import write_atomic, write_json
from contrans_tl.provenance import ModelProvenance
from contrans_tl.sites import match_layers_by_depth

__all__ = [
    "ShiftTable",
    "figure_paths",
    "plot_layer_similarity",
    "plot_vector_cosines",
    "plot_norm_profile",
    "plot_before_after_pca",
    "plot_tsne",
    "plot_separation",
    "plot_alpha_sweep",
    "write_shift_table",
]

ShiftTable = tuple[list[tuple[str, int]], list[tuple[str, int]]]
"""``(increased, decreased)`` as returned by :func:`contrans_tl.analysis.aggregate_shifts`."""

_SUFFIXES = (".png", ".json", ".md")
_DPI = 120


def figure_paths(path: str | os.PathLike[str], ext: str = ".png") -> tuple[Path, Path]:
    """``(NAME<ext>, NAME.json)`` for ``NAME``, ``NAME.png``, ``NAME.md`` or ``NAME.json``.

    Only those suffixes are stripped, so ``"sweep_a0.5"`` stays one name.
    """
    p = Path(path)
    if p.suffix in _SUFFIXES:
        p = p.with_suffix("")
    if not p.name:
        raise ValueError(f"cannot name a figure after {str(path)!r}; give a file name")
    return p.with_name(p.name + ext), p.with_name(p.name + ".json")


def _jsonable(x: Any) -> Any:
    """Numbers, arrays, tensors, tuples and mappings as plain JSON values (NaN/inf: None)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else None
    return x


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
    """A matplotlib Figure on an Agg canvas (no pyplot), with ``ncols`` axes side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _wrap(fig: Any, text: str, fontsize: float = 9) -> str:
    """Wrap a title to the figure's width (about 0.6 em per character)."""
    width_pt = fig.get_figwidth() * 72
    chars = max(20, int(width_pt / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _save(fig: Any, data: Mapping[str, Any], path: str | os.PathLike[str]) -> tuple[Path, Path]:
    png, js = figure_paths(path)
    payload = _jsonable(data)
    write_atomic(png, lambda tmp: fig.savefig(tmp, format="png"))
    write_json(js, payload)
    return png, js


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    write_atomic(path, write)


def _series(values: Mapping[Any, float]) -> tuple[list[int], list[float]]:
    """Layers (ascending) and their values; NaN kept (matplotlib leaves a gap)."""
    layers = sorted(int(k) for k in values)
    by = {int(k): v for k, v in values.items()}
    return layers, [float("nan") if by[k] is None else float(by[k]) for k in layers]


def _depth(layers: Sequence[int], n_layers: int) -> list[float]:
    return [(k + 1) / n_layers for k in layers]


def _n_layers(name: str, layers: Sequence[int], given: Mapping[str, int] | None) -> int:
    if given is not None and name in given:
        n = int(given[name])
        if layers and max(layers) >= n:
            raise ValueError(f"{name!r} has layer {max(layers)} but n_layers[{name!r}] = {n}")
        return n
    return max(layers) + 1


def _check_name_map(values: Mapping[str, Any], what: str) -> None:
    if not values:
        raise ValueError(f"no {what} given; pass {{name: {{layer: value}}}} with at least one")
    empty = [name for name, v in values.items() if not v]
    if empty:
        raise ValueError(f"{what} {empty} have no layers")


def _ticks(ax: Any, axis: str, layers: Sequence[int], max_ticks: int = 20) -> None:
    step = max(1, math.ceil(len(layers) / max_ticks))
    idx = list(range(0, len(layers), step))
    if idx[-1] != len(layers) - 1:
        idx.append(len(layers) - 1)
    labels = [str(layers[i]) for i in idx]
    if axis == "x":
        ax.set_xticks(idx, labels)
    else:
        ax.set_yticks(idx, labels)


def plot_layer_similarity(
    sim: LayerSimilarity,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> tuple[Path, Path]:
    """Heatmap of a source x target layer matrix with two layer matchings on top.

    Rows are source layers (bottom: shallowest), columns target layers. Drawn over the
    heatmap: the monotone matching with the largest total score
    (:meth:`LayerSimilarity.best_pairs`, white line), each target layer's best source
    layer (dots), and the relative-depth matching that
    :func:`contrans_tl.maps.fit_residual_map` uses by default (dashed red; a source layer
    left out of the matrix is placed between its neighbours).

    Args:
        sim: the matrix (:func:`contrans_tl.analysis.layer_similarity`).
        path: ``NAME`` (or ``NAME.png``); writes ``NAME.png`` and ``NAME.json``.
        title: figure title (default: the metric and the two model ids).

    Returns:
        ``(png_path, json_path)``. The JSON is :meth:`LayerSimilarity.to_dict` plus
        ``monotone_pairs``, ``best_pairs`` and ``depth_pairs`` (``[source, target]``
        lists; ``null`` where no matching exists, e.g. an all-NaN column).

    Example:
        >>> plot_layer_similarity(layer_similarity(src, tgt, texts), "out/cka")
    """
    src, tgt = list(sim.source_layers), list(sim.target_layers)
    n_src = sim.source.n_layers if sim.source is not None else src[-1] + 1
    n_tgt = sim.target.n_layers if sim.target is not None else tgt[-1] + 1
    monotone_pairs, best = _best_pairs_or_none(sim, True), _best_pairs_or_none(sim, False)
    depth = [(s, t) for s, t in match_layers_by_depth(n_src, n_tgt) if t in tgt]
    fig, (ax,) = _figure(max(5.0, 0.28 * len(tgt) + 3), max(4.0, 0.22 * len(src) + 2))
    _draw_similarity_heatmap(fig, ax, sim)
    _draw_matchings(ax, src, tgt, monotone_pairs, best, depth)
    _ticks(ax, "x", tgt)
    _ticks(ax, "y", src)
    ax.set_xlabel(f"target layer ({_model_id(sim.target, 'target')})")
    ax.set_ylabel(f"source layer ({_model_id(sim.source, 'source')})")
    ax.legend(loc="upper left", fontsize=7, framealpha=0.6)
    ax.set_title(_wrap(fig, title or _similarity_title(sim)), fontsize=9)
    data = {
        "kind": "layer_similarity",
        **sim.to_dict(),
        "monotone_pairs": monotone_pairs,
        "best_pairs": best,
        "depth_pairs": depth,
        "source_n_layers": n_src,
        "target_n_layers": n_tgt,
    }
    return _save(fig, data, path)


def _best_pairs_or_none(sim: LayerSimilarity, monotone: bool) -> list[tuple[int, int]] | None:
    """:meth:`LayerSimilarity.best_pairs`, or ``None`` where no matching exists."""
    try:
        return sim.best_pairs(monotone=monotone)
    except ValueError:
        return None


def _similarity_title(sim: LayerSimilarity) -> str:
    """The default title of :func:`plot_layer_similarity`: the metric and the two models."""
    metric = "linear CKA" if sim.metric == "cka" else "held-out map R²"
    return f"{metric}: {_model_id(sim.source, 'source')} x {_model_id(sim.target, 'target')}"


def _model_id(provenance: ModelProvenance | None, default: str) -> str:
    """A model's id for a label, or ``default`` when the provenance is not known."""
    return provenance.model_id if provenance is not None else default


def _draw_similarity_heatmap(fig: Any, ax: Any, sim: LayerSimilarity) -> None:
    """The score matrix as an image (NaN left blank) with its colour bar."""
    scores = sim.scores.numpy()
    finite = scores[np.isfinite(scores)]
    im = ax.imshow(
        np.ma.masked_invalid(scores),
        origin="lower",
        aspect="auto",
        cmap="viridis",
        interpolation="nearest",
        vmin=float(finite.min()) if finite.size else None,
        vmax=float(finite.max()) if finite.size else None,
    )
    fig.colorbar(im, ax=ax, label="linear CKA" if sim.metric == "cka" else "held-out R²")


def _draw_matchings(
    ax: Any,
    src: list[int],
    tgt: list[int],
    monotone_pairs: list[tuple[int, int]] | None,
    best: list[tuple[int, int]] | None,
    depth: list[tuple[int, int]],
) -> None:
    """The three layer matchings of :func:`plot_layer_similarity` over its heatmap.

    A source layer's row is interpolated between its neighbours when it was left out of
    the matrix (the relative-depth matching may name it).
    """

    def y_of(s: int) -> float:
        return float(np.interp(s, src, np.arange(len(src))))

    xs = np.arange(len(tgt))
    if monotone_pairs is not None:
        ax.plot(
            xs,
            [y_of(s) for s, _ in monotone_pairs],
            "-",
            color="white",
            lw=2,
            label="best monotone matching",
        )
    if best is not None:
        ax.plot(
            xs,
            [y_of(s) for s, _ in best],
            "o",
            ms=4,
            mfc="none",
            color="white",
            label="best source layer per column",
        )
    ax.plot(
        [tgt.index(t) for _, t in depth],
        [y_of(s) for s, _ in depth],
        "--",
        color="tab:red",
        lw=1.5,
        label="relative depth (fit_residual_map default)",
    )


def plot_vector_cosines(
    cosines_by_name: Mapping[str, Mapping[int, float]],
    path: str | os.PathLike[str],
    *,
    title: str = "cosine per layer: transplanted vs Self",
    ylabel: str = "cosine",
) -> tuple[Path, Path]:
    """One line per name of ``{layer: cosine}``, plus their mean when there are several.

    Args:
        cosines_by_name: e.g. ``{emotion: cosine_per_layer(transplanted, self)}``.
        path: ``NAME``; writes ``NAME.png`` and ``NAME.json``.
        title, ylabel: labels.

    Returns:
        ``(png_path, json_path)``; the JSON has ``cosines`` (``{name: {layer: value}}``)
        and ``mean`` (``{layer: mean over the names that have the layer}``, NaN-free
        values only).

    Raises:
        ValueError: nothing to plot.

    Example:
        >>> plot_vector_cosines({"fear": cosine_per_layer(v_hat, v_self)}, "out/cos")
    """
    _check_name_map(cosines_by_name, "cosine series")
    fig, (ax,) = _figure(6.5, 4.0)
    pooled: dict[int, list[float]] = {}
    for name, values in cosines_by_name.items():
        layers, ys = _series(values)
        ax.plot(layers, ys, "-o", ms=3, lw=1, alpha=0.8, label=name)
        for k, y in zip(layers, ys):
            if math.isfinite(y):
                pooled.setdefault(k, []).append(y)
    mean = {k: float(np.mean(v)) for k, v in sorted(pooled.items())}
    if len(cosines_by_name) > 1 and mean:
        ax.plot(list(mean), list(mean.values()), "-", color="black", lw=2.5, label="mean")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(_wrap(fig, title), fontsize=9)
    ax.legend(fontsize=7, ncols=2)
    return _save(fig, {"kind": "vector_cosines", "cosines": cosines_by_name, "mean": mean}, path)


def plot_norm_profile(
    profiles: Mapping[str, Mapping[int, float]],
    path: str | os.PathLike[str],
    *,
    n_layers: Mapping[str, int] | None = None,
    title: str = "mean norm per layer",
    log_scale: bool = True,
) -> tuple[Path, Path]:
    """Norms per layer of several series on one relative-depth axis.

    Models of different depth line up when the x axis is ``(layer + 1) / n_layers``.
    Typical series: each model's :func:`~contrans_tl.analysis.residual_norm_profile`
    and the norms of the concept vectors (whose ratio is what ``α`` acts against).

    Args:
        profiles: ``{name: {layer: norm}}``.
        path: ``NAME``; writes ``NAME.png`` and ``NAME.json``.
        n_layers: ``{name: layer count}`` for the depth axis; a series without an entry
            uses its largest layer + 1.
        title: figure title.
        log_scale: logarithmic y axis (residual and vector norms differ by orders).

    Returns:
        ``(png_path, json_path)``; the JSON has ``profiles``, ``n_layers`` and, per
        series, the ``relative_depth`` of each layer.

    Raises:
        ValueError: nothing to plot, or a layer beyond a given ``n_layers``.

    Example:
        >>> plot_norm_profile({"gemma": residual_norm_profile(tgt, texts)}, "out/norms")
    """
    _check_name_map(profiles, "profiles")
    fig, (ax,) = _figure(6.5, 4.0)
    counts, depths = {}, {}
    for name, values in profiles.items():
        layers, ys = _series(values)
        n = _n_layers(name, layers, n_layers)
        counts[name], depths[name] = n, dict(zip(layers, _depth(layers, n)))
        ax.plot(_depth(layers, n), ys, "-o", ms=3, lw=1.2, label=name)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("relative depth (layer + 1) / n_layers")
    ax.set_ylabel("mean L2 norm")
    ax.set_title(_wrap(fig, title), fontsize=9)
    ax.legend(fontsize=7)
    data = {
        "kind": "norm_profile",
        "profiles": profiles,
        "n_layers": counts,
        "relative_depth": depths,
    }
    return _save(fig, data, path)


def _colours(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    names = list(dict.fromkeys(labels))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def plot_before_after_pca(
    result: BeforeAfterPCA,
    labels: Sequence[str],
    path: str | os.PathLike[str],
    *,
    reference: Mapping[str, np.ndarray] | None = None,
    title: str = "before → after steering (PCA)",
) -> tuple[Path, Path]:
    """States before (dots) and after (crosses) steering, an arrow per input (Fig. 2b).

    Args:
        result: :func:`contrans_tl.analysis.before_after_pca` of the two state sets.
        labels: one label per input (e.g. the true emotion of each scenario), for colour.
        path: ``NAME``; writes ``NAME.png`` and ``NAME.json``.
        reference: ``{name: [m, 2]}`` extra points in the same frame, drawn as hollow
            triangles (e.g. the unsteered states of the concept's own scenarios,
            ``(X - result.mean) @ result.components.T``).
        title: figure title.

    Returns:
        ``(png_path, json_path)``; the JSON has ``before``, ``after`` (``[n, 2]``),
        ``labels``, ``reference``, ``explained_variance_ratio`` and ``fit_on``.

    Raises:
        TypeError: ``labels`` is one string.
        ValueError: ``labels`` does not have one entry per input.

    Example:
        >>> pa = before_after_pca(before.states[12], after.states[12])
        >>> plot_before_after_pca(pa, true_emotions, "out/pca_fear")
    """
    if isinstance(labels, str):
        raise TypeError("labels must be a list with one label per input, got one str")
    b, a = np.asarray(result.before), np.asarray(result.after)
    if len(labels) != b.shape[0]:
        raise ValueError(f"got {len(labels)} labels for {b.shape[0]} inputs; give one per input")
    labels = [str(x) for x in labels]
    colours = _colours(labels)
    fig, (ax,) = _figure(6.0, 5.0)
    for name, c in colours.items():
        idx = [i for i, x in enumerate(labels) if x == name]
        ax.scatter(b[idx, 0], b[idx, 1], s=18, color=c, label=f"{name} (before)")
        ax.scatter(a[idx, 0], a[idx, 1], s=22, color=c, marker="x")
        ax.quiver(
            b[idx, 0],
            b[idx, 1],
            a[idx, 0] - b[idx, 0],
            a[idx, 1] - b[idx, 1],
            angles="xy",
            scale_units="xy",
            scale=1,
            color=c,
            alpha=0.5,
            width=0.003,
        )
    refs = {}
    for name, xy in (reference or {}).items():
        arr = np.asarray(xy, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"reference {name!r} must be [m, 2] coordinates, got {arr.shape}")
        refs[str(name)] = arr
        c = colours.get(str(name), "black")
        ax.scatter(arr[:, 0], arr[:, 1], s=30, marker="^", facecolors="none", edgecolors=c)
        ax.scatter([], [], marker="^", facecolors="none", edgecolors=c, label=f"{name} (reference)")
    evr = np.asarray(result.explained_variance_ratio)
    ax.set_xlabel(f"PC1 ({100 * evr[0]:.0f}% of variance, fitted on {result.fit_on})")
    ax.set_ylabel(f"PC2 ({100 * evr[1]:.0f}%)")
    ax.set_title(_wrap(fig, title + "  [• before, × after]"), fontsize=9)
    ax.legend(fontsize=7)
    data = {
        "kind": "before_after_pca",
        "before": b,
        "after": a,
        "labels": labels,
        "reference": refs,
        "explained_variance_ratio": evr,
        "fit_on": result.fit_on,
    }
    return _save(fig, data, path)


def plot_tsne(
    coords: np.ndarray | Mapping[str, np.ndarray],
    labels: Sequence[str] | Mapping[str, Sequence[str]],
    path: str | os.PathLike[str],
    *,
    title: str = "t-SNE of last-token states",
) -> tuple[Path, Path]:
    """2-D points coloured by label; one panel per model when given a mapping.

    Args:
        coords: ``[n, 2]`` (:func:`contrans_tl.analysis.tsne_2d`), or ``{panel: [n, 2]}``
            for several panels side by side (e.g. source and target model).
        labels: one label per point; with several panels, the same list for all or
            ``{panel: labels}``.
        path: ``NAME``; writes ``NAME.png`` and ``NAME.json``.
        title: figure title.

    Returns:
        ``(png_path, json_path)``; the JSON has ``panels``:
        ``{panel: {"coords": [[x, y], ...], "labels": [...]}}`` (panel ``""`` for a
        single array).

    Raises:
        TypeError: labels is one string.
        ValueError: no panels, coordinates not ``[n, 2]``, or a label count that differs
            from the point count.

    Example:
        >>> plot_tsne({"smollm2": tsne_2d(xs), "gemma": tsne_2d(ys)}, emotions, "out/tsne")
    """
    panels = dict(coords) if isinstance(coords, Mapping) else {"": coords}
    if not panels:
        raise ValueError("no coordinates given")
    if isinstance(labels, str):
        raise TypeError("labels must be a list with one label per point, got one str")
    out: dict[str, dict[str, Any]] = {}
    for name, xy in panels.items():
        arr = np.asarray(xy, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"coordinates of panel {name!r} must be [n, 2], got {arr.shape}")
        lab = labels[name] if isinstance(labels, Mapping) else labels
        if len(lab) != arr.shape[0]:
            raise ValueError(
                f"panel {name!r} has {arr.shape[0]} points but {len(lab)} labels; give one each"
            )
        out[name] = {"coords": arr, "labels": [str(x) for x in lab]}
    colours = _colours([x for p in out.values() for x in p["labels"]])
    fig, axes = _figure(4.6 * len(out), 4.4, ncols=len(out))
    for ax, (name, p) in zip(axes, out.items()):
        for label, c in colours.items():
            idx = [i for i, x in enumerate(p["labels"]) if x == label]
            if idx:
                ax.scatter(p["coords"][idx, 0], p["coords"][idx, 1], s=14, color=c, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(_wrap(fig, title, 10), fontsize=10)
    return _save(fig, {"kind": "tsne", "panels": out}, path)


def plot_separation(
    scores_by_layer_by_model: Mapping[str, Mapping[int, Mapping[str, float]]],
    path: str | os.PathLike[str],
    *,
    n_layers: Mapping[str, int] | None = None,
    title: str = "how well the labels separate, per layer",
) -> tuple[Path, Path]:
    """Silhouette (left) and linear-probe accuracy (right) per relative depth, per model.

    Args:
        scores_by_layer_by_model: ``{model: separation_by_layer(...)}``, i.e.
            ``{model: {layer: {"silhouette", "probe_accuracy", "chance"}}}``.
        path: ``NAME``; writes ``NAME.png`` and ``NAME.json``.
        n_layers: ``{model: layer count}`` for the depth axis (default: largest layer + 1).
        title: figure title.

    Returns:
        ``(png_path, json_path)``; the JSON has ``scores`` as given, ``n_layers`` and
        ``relative_depth``.

    Raises:
        ValueError: nothing to plot, or a score dict without ``silhouette`` and
            ``probe_accuracy``.

    Example:
        >>> plot_separation({"gemma": separation_by_layer(tgt, texts_by_emotion)}, "out/sep")
    """
    _check_name_map(scores_by_layer_by_model, "models")
    fig, (ax_s, ax_p) = _figure(10.0, 4.0, ncols=2)
    counts, depths = {}, {}
    for i, (name, by_layer) in enumerate(scores_by_layer_by_model.items()):
        layers = sorted(int(k) for k in by_layer)
        rows = {int(k): v for k, v in by_layer.items()}
        for k in layers:
            missing = {"silhouette", "probe_accuracy"} - set(rows[k])
            if missing:
                raise ValueError(
                    f"scores of {name!r} layer {k} lack {sorted(missing)}; expected the dicts "
                    "of separation_scores()"
                )
        n = _n_layers(name, layers, n_layers)
        x = _depth(layers, n)
        counts[name], depths[name] = n, dict(zip(layers, x))
        colour = f"C{i}"
        ax_s.plot(x, [rows[k]["silhouette"] for k in layers], "-o", ms=3, color=colour, label=name)
        ax_p.plot(
            x, [rows[k]["probe_accuracy"] for k in layers], "-o", ms=3, color=colour, label=name
        )
        if "chance" in rows[layers[0]]:
            ax_p.axhline(rows[layers[0]]["chance"], color=colour, ls=":", lw=1)
    ax_s.set_ylabel("silhouette")
    ax_p.set_ylabel("probe accuracy (dotted: chance)")
    for ax in (ax_s, ax_p):
        ax.set_xlabel("relative depth (layer + 1) / n_layers")
        ax.legend(fontsize=7)
    fig.suptitle(_wrap(fig, title, 10), fontsize=10)
    data = {
        "kind": "separation",
        "scores": scores_by_layer_by_model,
        "n_layers": counts,
        "relative_depth": depths,
    }
    return _save(fig, data, path)


def plot_alpha_sweep(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    effect: str = "token_acc",
    fluency: str = "ppl",
    series_key: str = "series",
    picked: Mapping[str, float | None] | None = None,
    effect_label: str = "emotion Token Acc",
    fluency_label: str = "perplexity (held-out WikiSplit)",
    effect_range: tuple[float, float] | None = (0.0, 1.0),
    title: str = "strength sweep: effect and fluency against α",
) -> tuple[Path, Path]:
    """Effect (solid, left axis) and perplexity (dashed, right axis) against α.

    Read it to pick α: the effect rises with α until the model stops being fluent, which
    the perplexity curve shows. One colour per series (e.g. ``"transplanted · all"``);
    a star marks a series' picked α when ``picked`` is given. α = 0 rows (the unsteered
    model) start each curve. The α axis is logarithmic when the positive α span a
    factor of 8 or more (symmetric-log when α = 0 is among them).

    Args:
        rows: dicts with ``"alpha"``, the ``effect`` key, optionally the ``fluency`` key
            (``None``/absent: not measured) and ``series_key`` (absent: one series ``""``).
        path: ``NAME``; writes ``NAME.png`` and ``NAME.json``.
        effect: key of the effect measure in ``rows``.
        fluency: key of the fluency measure (lower is better).
        series_key: key that names the series of a row.
        picked: ``{series: α}`` to mark (``None`` values are skipped).
        effect_label, fluency_label, title: labels.
        effect_range: fixed limits of the effect axis (an accuracy: ``(0, 1)``);
            ``None``: fit to the data. The perplexity axis is logarithmic when the
            values span a factor of 3 or more.

    Returns:
        ``(png_path, json_path)``; the JSON has ``rows`` (as given), ``effect``,
        ``fluency``, ``series_key`` and ``picked``.

    Raises:
        ValueError: no rows, or a row without ``"alpha"`` or the ``effect`` key.

    Example:
        >>> rows = [{"series": "transplanted", "alpha": a, "token_acc": acc[a], "ppl": ppl[a]}
        ...         for a in (0, 0.5, 1, 2)]
        >>> plot_alpha_sweep(rows, "out/alpha_sweep", picked={"transplanted": 1.0})
    """
    series = _sweep_series(rows, effect, series_key)
    fig, (ax,) = _figure(7.5, 5.0)
    ax2 = ax.twinx() if any(r.get(fluency) is not None for r in rows) else None
    for i, (name, rs) in enumerate(series.items()):
        _draw_sweep_series(ax, ax2, name, rs, f"C{i}", effect, fluency, picked)
    _sweep_axes(ax, ax2, rows, fluency, effect_label, fluency_label, effect_range)
    ncols = min(3, len(series))
    fig.legend(loc="outside lower center", ncols=ncols, fontsize=7)
    ax.set_title(
        _wrap(fig, title + ("\n★: picked α" if picked and "★" not in title else "")), fontsize=9
    )
    data = {
        "kind": "alpha_sweep",
        "effect": effect,
        "fluency": fluency,
        "series_key": series_key,
        "picked": dict(picked) if picked else None,
        "rows": [dict(r) for r in rows],
    }
    return _save(fig, data, path)


def _sweep_series(
    rows: Sequence[Mapping[str, Any]], effect: str, series_key: str
) -> dict[str, list[Mapping[str, Any]]]:
    """Check the rows of :func:`plot_alpha_sweep` and group them by series, in order.

    Raises:
        ValueError: no rows, or a row without ``"alpha"`` or the ``effect`` key.
    """
    if not rows:
        raise ValueError("no rows to plot; give dicts with 'alpha' and the effect key")
    for i, r in enumerate(rows):
        missing = [k for k in ("alpha", effect) if k not in r]
        if missing:
            raise ValueError(f"row {i} lacks {missing}; its keys are {sorted(r)}")
    series: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        series.setdefault(str(r.get(series_key, "")), []).append(r)
    return series


def _draw_sweep_series(
    ax: Any,
    ax2: Any,
    name: str,
    rows: list[Mapping[str, Any]],
    colour: str,
    effect: str,
    fluency: str,
    picked: Mapping[str, float | None] | None,
) -> None:
    """One series of :func:`plot_alpha_sweep`: effect (solid), fluency (dashed), ★ picked."""
    rs = sorted(rows, key=lambda r: float(r["alpha"]))
    xs = [float(r["alpha"]) for r in rs]
    ys = [float("nan") if r[effect] is None else float(r[effect]) for r in rs]
    ax.plot(xs, ys, "-o", ms=4, color=colour, label=name or effect)
    if ax2 is not None:
        fl = [(float(r["alpha"]), float(r[fluency])) for r in rs if r.get(fluency) is not None]
        if fl:
            ax2.plot([a for a, _ in fl], [f for _, f in fl], "--s", ms=3, color=colour)
    if picked and picked.get(name) is not None:
        a = float(picked[name])  # type: ignore[arg-type]
        hit = [y for x, y in zip(xs, ys) if x == a]
        if hit:
            ax.plot([a], [hit[0]], "*", ms=14, color=colour, mec="black")


def _sweep_axes(
    ax: Any,
    ax2: Any,
    rows: Sequence[Mapping[str, Any]],
    fluency: str,
    effect_label: str,
    fluency_label: str,
    effect_range: tuple[float, float] | None,
) -> None:
    """Scales, limits and labels of the two axes of :func:`plot_alpha_sweep`."""
    positive = sorted({float(r["alpha"]) for r in rows if float(r["alpha"]) > 0})
    if positive and positive[-1] / positive[0] >= 8:
        if any(float(r["alpha"]) <= 0 for r in rows):
            ax.set_xscale("symlog", linthresh=positive[0])
        else:
            ax.set_xscale("log")
    ax.set_xlabel("α")
    ax.set_ylabel(f"{effect_label} (solid)")
    if effect_range is not None:
        lo, hi = effect_range
        pad = 0.03 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
    if ax2 is not None:
        ax2.set_ylabel(f"{fluency_label} (dashed)")
        fvals = [float(r[fluency]) for r in rows if r.get(fluency) is not None]
        if min(fvals) > 0 and max(fvals) / min(fvals) >= 3:
            ax2.set_yscale("log")


def _cell(item: tuple[str, int] | None) -> str:
    if item is None:
        return ""
    token, count = item
    return f"({json.dumps(token, ensure_ascii=False)}, {count})".replace("|", "\\|")


def write_shift_table(
    agg: ShiftTable | Mapping[str, ShiftTable],
    path: str | os.PathLike[str],
    *,
    title: str = "Tokens whose logit-lens probability rose and fell most",
    note: str | None = None,
) -> tuple[Path, Path]:
    """Write token-shift counts in the paper's Table 8 format as Markdown and JSON.

    Each table has two columns, "increased" and "decreased", of ``(token, count)``:
    the number of inputs that have the token among their top-``k`` risers (fallers),
    as :func:`contrans_tl.analysis.aggregate_shifts` returns them. Tokens are written
    as JSON strings, so a leading space (``" happy"``) or a newline stays visible.

    Args:
        agg: one ``(increased, decreased)`` pair, or ``{table name: (increased,
            decreased)}`` for several tables in one file.
        path: ``NAME``; writes ``NAME.md`` and ``NAME.json``.
        title: heading of the Markdown file.
        note: a paragraph under the heading (e.g. how the shifts were measured).

    Returns:
        ``(md_path, json_path)``; the JSON is ``{"kind": "token_shifts", "title", "note",
        "tables": {name: {"increased": [[token, count], ...], "decreased": [...]}}}``.

    Raises:
        ValueError: no tables.

    Example:
        >>> up, down = aggregate_shifts(shifts[12], top=10)
        >>> write_shift_table({"fear (target L12)": (up, down)}, "out/shifts_L12")
    """
    tables: dict[str, ShiftTable] = dict(agg) if isinstance(agg, Mapping) else {"": agg}
    if not tables:
        raise ValueError("no tables given")
    md, js = figure_paths(path, ".md")
    lines = [f"# {title}", ""]
    if note:
        lines += [note, ""]
    for name, (up, down) in tables.items():
        if name:
            lines += [f"## {name}", ""]
        lines += [
            "| # | increased (token, count) | decreased (token, count) |",
            "| ---: | --- | --- |",
        ]
        for i in range(max(len(up), len(down))):
            u = up[i] if i < len(up) else None
            d = down[i] if i < len(down) else None
            lines.append(f"| {i + 1} | {_cell(u)} | {_cell(d)} |")
        if not up and not down:
            lines.append("| - | (no token moved) | |")
        lines.append("")
    data = {
        "kind": "token_shifts",
        "title": title,
        "note": note,
        "tables": {
            name: {"increased": [list(x) for x in up], "decreased": [list(x) for x in down]}
            for name, (up, down) in tables.items()
        },
    }
    _write_text(md, "\n".join(lines))
    write_json(js, _jsonable(data))
    return md, js
