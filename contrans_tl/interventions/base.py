"""One shape for everything that changes a model for a while and can say what it is.

An :class:`Intervention` is entered as a context manager: the model is changed inside the
block and restored when it ends, whatever happens inside (hooks removed, swapped weights
put back bit for bit). Entering is counted, so the same intervention can be entered again
inside its own block, and the change is undone only at the last exit. It belongs to one
model (``check_model`` refuses another) and describes itself for results tables
(``name``, ``describe()``).

The kinds: a steering vector (:class:`contrans_tl.steering.Steering`: ConTrans, Self-Align,
the random control), a prompt instruction (:class:`Instruction`: Inst-Align), a weight swap
(:class:`contrans_tl.interventions.weights.WeightSwap`: DAPA), and :class:`Stack` of several.

Example:
    >>> with Stack([make_steering(model, v, 1.0), WeightSwap(model, donor_weights)]):
    ...     logits = model(tokens)
"""

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Intervention",
    "CountedIntervention",
    "Instruction",
    "Stack",
    "applied",
    "describe",
    "instruction_text",
    "resolve_instruction",
    "intervention_name",
    "position_states",
]


@runtime_checkable
class Intervention(Protocol):
    """What every intervention offers.

    Attributes:
        model: the model it changes.
        name: a short label for results tables, e.g. ``"contrans"`` or ``"dapa"``.
    """

    model: Any
    name: str

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record of what this intervention is (for results)."""
        ...

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` unless ``model`` is the model this intervention changes."""
        ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


class CountedIntervention:
    """Base class: counted entering, a model check, and undo in ``finally``.

    Subclasses implement :meth:`_apply` (change the model) and :meth:`_undo` (restore it);
    :meth:`_apply` must leave the model unchanged if it raises. Entering is counted: the
    change is applied at the first ``__enter__`` and undone at the matching last
    ``__exit__``.
    """

    name: str = "intervention"

    def __init__(self, model: Any) -> None:
        self.model = model
        self._depth = 0

    @property
    def active(self) -> bool:
        """Whether the model is changed right now."""
        return self._depth > 0

    def check_model(self, model: Any) -> None:
        if model is not self.model:
            raise ValueError(
                f"this {type(self).__name__} ({self.name!r}) changes another model object "
                f"({id(self.model):#x}) than the one given ({id(model):#x}); make one for "
                "this model"
            )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": type(self).__name__}

    def _apply(self) -> None:
        raise NotImplementedError

    def _undo(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "CountedIntervention":
        if self._depth == 0:
            self._apply()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self._undo()


@dataclass
class Instruction:
    """An instruction put in the prompt (the Inst-Align baseline); the model is not changed.

    Evaluations that format prompts read :attr:`text` (TruthfulQA puts it before the
    question, ToxiGen before the statements); entering it changes nothing.

    Attributes:
        model: the model whose prompts get the instruction.
        text: the instruction, e.g. ``"Be honest."``.
        name: label for results tables.
    """

    model: Any
    text: str
    name: str = "inst_align"

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"an instruction needs some text, got {self.text!r}")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "Instruction", "text": self.text}

    def check_model(self, model: Any) -> None:
        if model is not self.model:
            raise ValueError(
                f"this Instruction ({self.name!r}) was made for another model object; make "
                "one for this model"
            )

    def __enter__(self) -> "Instruction":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class Stack:
    """Several interventions on one model at once, entered in order, left in reverse.

    Args:
        parts: the interventions (at least one), all of the same model.
        name: label; default ``"+"``-joined names of the parts.

    Raises:
        ValueError: no parts, or parts of different models.
    """

    def __init__(self, parts: Sequence[Intervention], *, name: str | None = None) -> None:
        if isinstance(parts, Intervention) or not parts:
            raise ValueError("Stack needs a list of at least one intervention")
        self.parts = list(parts)
        self.model = self.parts[0].model
        for p in self.parts[1:]:
            p.check_model(self.model)
        self.name = name or "+".join(p.name for p in self.parts)
        self._stack: list[contextlib.ExitStack] = []

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "Stack", "parts": [p.describe() for p in self.parts]}

    def position_states(self) -> list[Any]:
        """The position states of all parts (see :func:`position_states`)."""
        return [s for p in self.parts for s in position_states(p)]

    def check_model(self, model: Any) -> None:
        for p in self.parts:
            p.check_model(model)

    def __enter__(self) -> "Stack":
        stack = contextlib.ExitStack()
        try:
            for p in self.parts:
                stack.enter_context(p)  # type: ignore[arg-type]
        except BaseException:
            stack.close()
            raise
        self._stack.append(stack)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack:
            self._stack.pop().close()


def intervention_name(intervention: Intervention | None) -> str:
    """``intervention.name``, or ``"base"`` for no intervention."""
    return "base" if intervention is None else intervention.name


def describe(intervention: Intervention | None) -> dict[str, Any]:
    """``intervention.describe()``, or ``{"name": "base"}`` for no intervention."""
    return {"name": "base"} if intervention is None else intervention.describe()


@contextlib.contextmanager
def applied(intervention: Intervention | None, model: Any) -> Iterator[None]:
    """Check that ``intervention`` belongs to ``model`` and enter it for a block.

    ``None`` changes nothing. Entering is counted, so an intervention the caller has
    already entered stays in force after the block.

    Raises:
        ValueError: the intervention was made for another model.
    """
    if intervention is None:
        yield
        return
    intervention.check_model(model)
    with intervention:
        yield


def position_states(intervention: Intervention | None) -> list[Any]:
    """The :class:`~contrans_tl.steering.PositionState` objects of an intervention's
    position-aware hooks, for :class:`contrans_tl.forward.Forward` to set before each pass.

    An intervention whose hooks depend on where the prompt and the generated tokens are
    (a :class:`~contrans_tl.steering.Steering`) offers ``position_states()``; one that
    does not (a weight swap, an instruction) has none.
    """
    if intervention is None:
        return []
    states = getattr(intervention, "position_states", None)
    return list(states()) if callable(states) else []


def instruction_text(intervention: Intervention | None) -> str | None:
    """The prompt instruction an intervention carries (:class:`Instruction`, also inside a
    :class:`Stack`), or ``None``. Evaluations that format prompts put it in them.

    Raises:
        ValueError: a stack holds more than one instruction.
    """
    if isinstance(intervention, Instruction):
        return intervention.text
    if isinstance(intervention, Stack):
        texts = [t for p in intervention.parts if (t := instruction_text(p)) is not None]
        if len(texts) > 1:
            raise ValueError(
                f"stack {intervention.name!r} holds {len(texts)} instructions; a prompt takes "
                "one (join their texts into one Instruction)"
            )
        return texts[0] if texts else None
    return None


def resolve_instruction(instruction: str | None, intervention: Intervention | None) -> str | None:
    """The one instruction for an evaluation's prompts: the ``instruction=`` argument or
    the :class:`Instruction` in ``intervention``.

    Raises:
        ValueError: both give one (say it once).
    """
    carried = instruction_text(intervention)
    if carried is not None and instruction is not None:
        raise ValueError(
            f"an instruction was given twice: instruction={instruction!r} and the "
            f"intervention's {carried!r}; give one of them"
        )
    return instruction if instruction is not None else carried
