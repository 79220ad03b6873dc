"""Run the emotion transplant experiment end to end and write results.json / results.md.

A thin layer over :mod:`contrans_tl.pipelines.emotion`, where the experiment lives: its
settings are the fields of :class:`~contrans_tl.pipelines.emotion.EmotionConfig` and its
steps are :func:`~contrans_tl.pipelines.emotion.run_emotion`. This module keeps the
keyword-argument entry points (:func:`run_emotion_experiment`, :func:`check_emotion_args`)
and the helpers other modules import from here (:func:`check_out_dir`,
:func:`check_minimums`, :func:`random_like`, :func:`write_markdown`).

Example:
    >>> run_emotion_experiment(source, target, "runs/emotion", alphas=[0.5, 1, 2])
"""

import os
from pathlib import Path
from typing import Any

from contrans_tl.pipelines.emotion import (
    EmotionConfig,
    check_minimums,
    check_out_dir,
    random_like,
    run_emotion,
    write_markdown,
)

__all__ = [
    "check_emotion_args",
    "check_minimums",
    "check_out_dir",
    "run_emotion_experiment",
    "random_like",
    "write_markdown",
]


def check_emotion_args(
    *, out_dir: str | os.PathLike[str] | None = None, **settings: Any
) -> list[float]:
    """Check the settings of :func:`run_emotion_experiment` that do not need the models.

    Builds an :class:`~contrans_tl.pipelines.emotion.EmotionConfig` from ``settings``
    (which validates them, the scenario split included) and checks ``out_dir``. Layers are
    checked as indices only (their range needs the target: the run checks it first thing).

    Args:
        out_dir: the output folder, checked with :func:`check_out_dir` (``None``: not
            checked).
        **settings: fields of :class:`~contrans_tl.pipelines.emotion.EmotionConfig`.

    Returns:
        The strengths the experiment runs, sorted and without duplicates.

    Raises:
        TypeError: a setting that is not a field of the config.
        ValueError: a setting out of range, naming it and what would be valid.
        NotADirectoryError, PermissionError: ``out_dir`` cannot be written.
    """
    config = EmotionConfig(**settings)
    if out_dir is not None:
        check_out_dir(out_dir)
    return list(config.alphas)


def run_emotion_experiment(
    source: Any,
    target: Any,
    out_dir: str | Path,
    *,
    config: EmotionConfig | None = None,
    command: str | None = None,
    cache: Any = None,
    **settings: Any,
) -> dict[str, Any]:
    """Refine, reformulate and transplant emotion vectors; score them on the target.

    Args:
        source: the model the vectors come from (weak, aligned).
        target: the model they are added to.
        out_dir: where results.json and results.md go (checked first with
            :func:`check_out_dir`; created when they are written).
        config: the settings; or give them as keywords instead.
        command: the command line, recorded in the results.
        cache: the result cache (see :func:`~contrans_tl.pipelines.emotion.run_emotion`;
            ``False`` turns it off).
        **settings: fields of :class:`~contrans_tl.pipelines.emotion.EmotionConfig`
            (``alphas``, ``layers``, ``pairings``, ``map_method``, ``n_map_texts``,
            ``n_refine``, ``n_fewshot``, ``n_negatives``, ``n_validation_negatives``,
            ``batch_size``, ``seed``, ``include_self``, ``include_random``).

    Returns:
        The dict written to ``results.json``.

    Raises:
        TypeError: both ``config`` and keyword settings, or an unknown setting.
        ValueError: a setting out of range or a layer the target does not have; raised
            before any work.
        NotADirectoryError, PermissionError: ``out_dir`` cannot be written.
    """
    if config is not None and settings:
        raise TypeError(
            f"give either config or keyword settings, not both (got config and {sorted(settings)})"
        )
    if config is None:
        config = EmotionConfig(**settings)
    return run_emotion(source, target, config, out_dir, command=command, cache=cache)
