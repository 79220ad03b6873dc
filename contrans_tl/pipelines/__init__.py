"""Pipelines: one frozen, validated config dataclass each, run as named steps.

* :mod:`contrans_tl.pipelines.cache`: the result cache of pipeline steps, keyed by their
  inputs (model hashes, texts, settings, code version).
* :mod:`contrans_tl.pipelines.emotion`: the emotion transplant experiment (paper §4.1;
  ``contrans emotion``).
* :mod:`contrans_tl.pipelines.analysis`: the analysis of one emotion transplant
  (:class:`~contrans_tl.pipelines.analysis.AnalysisConfig`,
  :func:`~contrans_tl.pipelines.analysis.run_analysis`; ``contrans analyze``).

This package imports none of them: import the module of the pipeline you run.
"""
