"""lm-evaluation-harness backend: any lm-eval task on a TransformerLens model under any
contrans_tl intervention (a transplanted vector, a DAPA module swap, a RE-Control
controller, or a stack of them).

Importing this module registers the model ``"contrans"`` with lm-eval's registry
(``lm_eval.api.registry.register_model``). lm-eval 0.4.13 has no plugin entry points
(its registry takes lazy ``module:object`` placeholders, but nothing scans installed
packages), so its own ``lm-eval`` command cannot find the backend; ``contrans-lm-eval``
is that command with the backend registered and this package's offline task configs on
the include path (:data:`TASKS_DIR`):

.. code-block:: bash

    contrans-lm-eval run --model contrans \\
        --model_args model=gemma-3-270m,vector=vectors/honesty_gemma,alpha=2 \\
        --tasks contrans_truthfulqa_mc1 --limit 100

From Python::

    import lm_eval
    from contrans_tl.lm_eval_backend import ContransLM, task_manager

    lm = ContransLM(model=target, intervention=make_steering(target, v, 2.0))
    out = lm_eval.simple_evaluate(model=lm, tasks=["contrans_truthfulqa_mc1"],
                                  task_manager=task_manager())

Scoring is contrans_tl's own (:func:`contrans_tl.evals.truthfulqa.score_continuations`):
requests that share a context run it once and score their continuations behind its KV
cache, so the backend's MC1 on ``contrans_truthfulqa_mc1`` is contrans_tl's TruthfulQA
MC1 (``evaluate_mc(..., chat=False)``). Generation is greedy
(:func:`contrans_tl.steering.generate`); sampling is refused rather than ignored.
"""

import inspect
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

__all__ = ["TASKS_DIR", "ContransLM", "build_intervention", "main", "task_manager"]

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
"""lm-eval task configs that read ``../shared/data`` (``--include_path`` for lm-eval)."""

_TRUE = ("1", "true", "yes")


def task_manager() -> Any:
    """An lm-eval ``TaskManager`` that knows lm-eval's tasks and ours (:data:`TASKS_DIR`).

    Example:
        >>> "contrans_truthfulqa_mc1" in task_manager().all_tasks
        True
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def _number(value: Any, name: str, kind: type = float) -> Any:
    """``value`` (a CLI string or a number) as ``kind``, or a ValueError naming ``name``."""
    try:
        out = kind(value)
    except (TypeError, ValueError):
        what = "an int" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if kind is float and not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _load_vector(model: Any, vector: Any) -> Any:
    from contrans_tl.concepts import ConceptVector

    if isinstance(vector, ConceptVector):
        return vector
    path = str(vector)
    if path.endswith(".gguf"):
        return ConceptVector.from_gguf(path, model)
    return ConceptVector.load(path.removesuffix(".safetensors").removesuffix(".json"))


def build_intervention(
    model: Any,
    *,
    vector: Any = None,
    alpha: Any = 1.0,
    layers: Any = None,
    positions: str = "all",
    scale: str = "raw",
    donor: Any = None,
    modules: Any = None,
    value: Any = None,
    n_steps: Any = 10,
    step_size: Any = 0.5,
    intervention: Any = None,
) -> Any:
    """The intervention the backend's arguments ask for (``None``: the model as it is).

    Several are stacked in the order module swap, vector, controller, then
    ``intervention`` (each inside the previous).

    Args:
        model: the model they are for.
        vector: a :class:`~contrans_tl.concepts.ConceptVector`, a saved one (``NAME``) or
            a llama.cpp control vector (``FILE.gguf``), added ``alpha`` times at
            ``layers`` (a list or a spec like ``"4-10"``; default: all the vector has),
            ``positions`` and ``scale`` (see :func:`~contrans_tl.steering.make_steering`).
        donor, modules: a DAPA swap: the donor model (a loaded model, or a name for
            :func:`~contrans_tl.models.load_model`) and its modules as a list or a
            ``"+"``-joined string of ``kind@layer`` (``"gate@3+up@4"``), or
            ``"heuristic"`` for :func:`~contrans_tl.dapa.heuristic_modules`.
        value, n_steps, step_size: RE-Control: a saved value function (``NAME``) and its
            gradient steps per token and step size (:class:`~contrans_tl.recontrol.ValueControl`).
        intervention: any other :class:`~contrans_tl.interventions.Intervention` (Python).

    Raises:
        ValueError: a setting that cannot be used, naming it; ``donor`` without
            ``modules`` or the reverse.

    Example:
        >>> build_intervention(target, vector="happiness.gguf", alpha="2").describe()["name"]
    """
    from contrans_tl.interventions import Stack

    parts: list[Any] = []
    if (donor is None) != (modules is None):
        raise ValueError("a module swap needs both donor= and modules= (e.g. modules=gate@3+up@4)")
    if donor is not None:
        from contrans_tl.dapa import ModuleTransplant, heuristic_modules

        if isinstance(donor, str):
            from contrans_tl.models import load_model

            donor = load_model(donor)
        if modules == "heuristic":
            mods = heuristic_modules(int(model.cfg.n_layers))
        else:
            mods = modules.split("+") if isinstance(modules, str) else list(modules)
        parts.append(ModuleTransplant(model, donor, mods))
    if vector is not None:
        from contrans_tl.sites import parse_layers
        from contrans_tl.steering import make_steering

        v = _load_vector(model, vector)
        wanted = parse_layers(layers, int(model.cfg.n_layers)) if layers is not None else None
        parts.append(
            make_steering(
                model,
                v,
                _number(alpha, "alpha"),
                layers=wanted,
                positions=positions,  # type: ignore[arg-type]
                scale=scale,  # type: ignore[arg-type]
            )
        )
    if value is not None:
        from contrans_tl.recontrol import ValueControl, load_value_function

        net, meta = load_value_function(str(value), model)
        parts.append(
            ValueControl(
                model,
                net,
                n_steps=_number(n_steps, "n_steps", int),
                step_size=_number(step_size, "step_size"),
                hook=meta["hook"],
                metadata={"value": str(value)},
            )
        )
    if intervention is not None:
        parts.append(intervention)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else Stack(parts)


@register_model("contrans")
class ContransLM(TemplateLM):
    """lm-eval's ``LM`` for a TransformerLens model under a contrans_tl intervention.

    Args:
        model: a loaded TransformerLens model, or what
            :func:`~contrans_tl.models.load_model` takes (zoo name, hub id, folder, ``.gguf``).
        batch_size: continuations per forward pass (lm-eval's ``auto`` means 16).
        max_gen_toks: default cap on generated tokens (a task's ``max_gen_toks`` wins).
        device, dtype: for a model loaded here.
        **intervention: the arguments of :func:`build_intervention` (``vector``,
            ``alpha``, ``layers``, ``positions``, ``scale``, ``donor``, ``modules``,
            ``value``, ``n_steps``, ``step_size``, ``intervention``).

    Raises:
        ValueError: an unknown argument (naming the valid ones) or a bad setting.

    Example:
        >>> lm = ContransLM(model="gemma-3-270m", vector="vectors/honesty_gemma", alpha="2")
        >>> lm.loglikelihood(requests)            # what lm_eval.simple_evaluate calls
    """

    #: what :func:`build_intervention` takes, besides the model
    _INTERVENTION_ARGS = tuple(inspect.signature(build_intervention).parameters)[1:]

    def __init__(
        self,
        model: Any = "gemma-3-270m",
        *,
        batch_size: Any = 16,
        max_gen_toks: Any = 256,
        device: str = "cpu",
        dtype: str = "float32",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - set(self._INTERVENTION_ARGS) - {"max_batch_size"})
        if unknown:
            raise ValueError(
                f"unknown argument(s) {unknown} for the contrans backend; valid: model, "
                f"batch_size, max_gen_toks, device, dtype, {', '.join(self._INTERVENTION_ARGS)}"
            )
        kwargs.pop("max_batch_size", None)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.max_gen_toks = _number(max_gen_toks, "max_gen_toks", int)
        if isinstance(model, str):
            import torch

            from contrans_tl.models import load_model

            if dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
            model = load_model(model, device=device, dtype=getattr(torch, dtype))
        self.model = model
        self.tokenizer = model.tokenizer
        self.intervention = build_intervention(model, **kwargs)

    # --- tokens ---------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "contrans").replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """contrans_tl's encoding (:func:`~contrans_tl.evals.truthfulqa.encode_prompt`:
        BOS where the tokenizer adds one by default); ``add_special_tokens=False``: none."""
        from contrans_tl.evals.truthfulqa import encode_prompt

        if add_special_tokens is False:
            return [int(i) for i in self.tokenizer(string, add_special_tokens=False)["input_ids"]]
        return encode_prompt(self.tokenizer, string)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )

    # --- scoring --------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: Sequence[tuple[Any, list[int], list[int]]], **_: Any
    ) -> list[tuple[float, bool]]:
        """Per request ``(ll, is_greedy)``; requests of one context share its forward pass."""
        from contrans_tl.evals.truthfulqa import score_continuations

        groups: dict[tuple[int, ...], list[int]] = {}
        for n, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {n} has an empty continuation; nothing to score")
            groups.setdefault(tuple(ctx), []).append(n)
        keys = list(groups)
        items = [(list(k), [requests[n][2] for n in groups[k]]) for k in keys]
        got = score_continuations(
            self.model, items, intervention=self.intervention, batch_size=self.batch_size
        )
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for k, row in zip(keys, got):
            for n, scored in zip(groups[k], row):
                out[n] = scored
                self.cache_hook.add_partial("loglikelihood", requests[n][0], scored)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of whole texts, in windows of the model's context."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        n_ctx = int(self.model.cfg.n_ctx)
        windows: list[tuple[Any, list[int], list[int]]] = []
        owner: list[int] = []
        for n, req in enumerate(requests):
            (text,) = req.args
            ids = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(ids, self.prefix_token_id, n_ctx, context_len=1),
            ):
                windows.append(((None, text), list(ctx), list(cont)))
                owner.append(n)
        scored = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, scored):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first ``until`` string (sampling is refused)."""
        from contrans_tl.steering import generate

        out: list[str] = [""] * len(requests)
        by_kwargs: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for n, req in enumerate(requests):
            context, gen = req.args
            gen = dict(gen or {})
            if gen.pop("do_sample", False) or float(gen.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError(
                    "the contrans backend generates greedily; give do_sample=False and "
                    "temperature=0 (--gen_kwargs do_sample=False,temperature=0)"
                )
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(gen.pop("max_gen_toks", self.max_gen_toks))
            by_kwargs.setdefault((tuple(until), budget), []).append(n)
        for (until, budget), members in by_kwargs.items():
            texts = generate(
                self.model,
                [requests[n].args[0] for n in members],
                max_new_tokens=budget,
                intervention=self.intervention,
                batch_size=self.batch_size,
            )
            for n, text in zip(members, texts):
                assert isinstance(text, str)
                for stop in until:
                    if stop:
                        text = text.split(stop, 1)[0]
                out[n] = text
                self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out


def main(argv: Sequence[str] | None = None) -> None:
    """``contrans-lm-eval``: lm-eval's command line with the ``contrans`` model registered
    and :data:`TASKS_DIR` added to ``--include_path``. Without ``--device``, ``run`` uses
    ``cpu`` where torch sees no CUDA device (lm-eval's own default is ``cuda:0``).

    Example:
        >>> main(["run", "--model", "contrans", "--model_args", "model=gemma-3-270m",
        ...       "--tasks", "contrans_truthfulqa_mc1", "--limit", "20"])
    """
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "run" and "--device" not in args:
        import torch

        if not torch.cuda.is_available():  # lm-eval's own default is cuda:0
            args += ["--device", "cpu"]
    if args and args[0] in ("run", "ls", "validate"):
        if "--include_path" in args:
            i = args.index("--include_path") + 1
            if i < len(args):
                args[i] = f"{args[i]}:{TASKS_DIR}"
        else:
            args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["contrans-lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
