"""Interventions: anything that changes a model for a while and can say what it is.

Every evaluation takes one (or none) and compares them on the same items, so one table
can hold ConTrans, DAPA and RE-Control on one model and one metric.

* :class:`~contrans_tl.interventions.base.Intervention`: the protocol (``name``,
  ``describe()``, ``check_model``, context manager with counted entering).
* :class:`contrans_tl.steering.Steering`: residual-stream additions (ConTrans, Self-Align,
  the random control).
* :class:`~contrans_tl.interventions.base.Instruction`: an instruction in the prompt
  (Inst-Align).
* :class:`~contrans_tl.interventions.weights.WeightSwap`: some parameters replaced
  (DAPA), restored bit for bit.
* :class:`~contrans_tl.interventions.base.Stack`: several at once.
"""

from contrans_tl.interventions.base import (
    CountedIntervention,
    Instruction,
    Intervention,
    Stack,
    applied,
    describe,
    intervention_name,
)
from contrans_tl.interventions.weights import WeightSwap, donor_weights, parameter_table

__all__ = [
    "CountedIntervention",
    "Instruction",
    "Intervention",
    "Stack",
    "WeightSwap",
    "applied",
    "describe",
    "donor_weights",
    "intervention_name",
    "parameter_table",
]
