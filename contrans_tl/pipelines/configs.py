"""The settings of every pipeline and CLI command, as frozen, validated dataclasses.

Each config checks everything that can be checked without a model when it is made, and
names the setting and what would be valid when it refuses one. Each field's
``metadata["help"]`` says what it is; the ``contrans`` command builds its options from
these fields (:mod:`contrans_tl.cli_options`), so each setting is declared once.

This module imports neither torch nor TransformerLens (checks that need them import
them when they run), so ``contrans ... --help`` answers at once.

* :class:`EmotionConfig`: the emotion transplant experiment (``contrans emotion``).
* :class:`AnalysisConfig`: the analysis of one emotion transplant (``contrans analyze``).
* :class:`DapaConfig`: DAPA against ConTrans on an aligned model and its harmful fine-tune
  (``experiments/run_dapa.py``).
* :class:`RefineConfig`, :class:`MapConfig`, :class:`TransplantConfig`,
  :class:`SteerConfig`, :class:`GenerateConfig`, :class:`EvaluateConfig`: the method's
  own steps (``contrans refine``, ``fit-map``, ``transplant``, ``generate``,
  ``evaluate``).
"""

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from contrans_tl.data import EMOTIONS, emotion_scenarios, wikisplit_sentences

if TYPE_CHECKING:
    from contrans_tl.evals.emotion import EmotionSplit

__all__ = [
    "DEFAULT_ALPHAS",
    "LAYER_MATCHES",
    "MAP_METHODS",
    "MAP_TEXT_KINDS",
    "STATE_MAP_FAMILIES",
    "EMOTION_MAP_METHODS",
    "N_VALIDATION",
    "PAIRINGS",
    "SWEEP_METHODS",
    "AnalysisConfig",
    "DapaConfig",
    "DAPA_STEPS",
    "MODULE_KINDS",
    "EmotionConfig",
    "LayerMatch",
    "LayerSets",
    "EVAL_TASKS",
    "READ_POSITIONS",
    "STEER_POSITIONS",
    "STEER_SCALES",
    "EvaluateConfig",
    "GenerateConfig",
    "MapConfig",
    "ReControlConfig",
    "ReControlRefusalConfig",
    "RefineConfig",
    "SteerConfig",
    "TransplantConfig",
    "check_minimums",
    "check_out_dir",
    "scenario_split",
]

PAIRINGS = ("auto", "last", "all", "word_ends")
"""How a map pairs source and target states (:data:`contrans_tl.maps.Pairing`)."""
N_VALIDATION = 20
"""Validation scenarios per emotion (the negatives that pick α)."""
DEFAULT_ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)
"""The strengths of the α sweep by default (α = 0, the unsteered base, is always run)."""
SWEEP_METHODS = ("transplanted", "self", "random")
"""The vectors the sweep can steer with."""
MAP_METHODS = ("svd", "ridge", "procrustes", "whitened_procrustes", "reduced_rank")
MAP_METHOD_HELP = (
    "map fit: svd (the paper), ridge, procrustes, whitened_procrustes, reduced_rank "
    "(contrans_tl.maps)"
)
#: Map families that are not one matrix (:data:`contrans_tl.state_maps.FAMILIES`).
STATE_MAP_FAMILIES = ("mlp", "anchor")
#: What the emotion experiment's ``map_method`` takes: every linear method and family.
EMOTION_MAP_METHODS = (
    "svd",
    "ridge",
    "procrustes",
    "whitened_procrustes",
    "reduced_rank",
    *STATE_MAP_FAMILIES,
)
#: The map methods that need no rank (what the experiments other than the emotion one take).
FULL_RANK_MAP_METHODS = ("svd", "ridge", "procrustes", "whitened_procrustes")
#: Steering scales (:data:`contrans_tl.steering.Scale`).
STEER_SCALES = ("raw", "relative")
#: Kinds of map-fitting text (:data:`contrans_tl.map_texts.MAP_TEXTS`).
MAP_TEXT_KINDS = ("wikisplit", "prompts", "mixed")
"""How the residual map is solved."""
LayerMatch = Literal["depth", "cka", "r2"]
LAYER_MATCHES = ("depth", "cka", "r2")
"""How the map's layer pairs are chosen."""

LayerSets = Mapping[str, Sequence[int] | None] | Sequence[tuple[str, Sequence[int] | None]] | None
"""``{name: target layers, or None for every layer}``, or the same as ``(name, layers)`` pairs."""


def check_out_dir(out_dir: str | os.PathLike[str], *, name: str = "out_dir") -> Path:
    """Check that ``out_dir`` can be the output folder of a run, without creating it.

    Fine: an existing writable folder (empty or not: files of the same names in it are
    replaced), or a path that does not exist yet whose nearest existing ancestor is a
    writable folder. Nothing is created here; a run creates the folder when it writes.

    Args:
        out_dir: the output folder.
        name: what to call it in messages (``"--out"`` for the command line).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path` (``~`` expanded).

    Raises:
        ValueError: ``out_dir`` is empty.
        NotADirectoryError: ``out_dir`` is an existing file, or lies under one.
        PermissionError: the folder, or the nearest existing ancestor it would be created
            in, is not writable.
    """
    if not str(os.fspath(out_dir)).strip():
        raise ValueError(f"{name} is empty; give the folder to write the results into")
    path = Path(out_dir).expanduser()
    probe = path
    while True:
        try:
            exists = probe.exists() or probe.is_symlink()
        except OSError as e:
            raise PermissionError(f"{name} {str(out_dir)!r}: cannot look at {probe}: {e}") from None
        if exists or probe == probe.parent:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "is an existing file" if probe == path else f"is under {probe}, which is a file"
        raise NotADirectoryError(
            f"{name} {str(out_dir)!r} {where}, not a folder; give a folder (existing, or new "
            "under an existing folder)"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is a folder" if probe == path else f"would be created in {probe}, a folder"
        raise PermissionError(
            f"{name} {str(out_dir)!r} {where} that this user cannot write to; give a "
            "writable folder"
        )
    return path


def check_minimums(minimum: Mapping[str, tuple[object, int]]) -> None:
    """Check counts: ``{name: (value, lowest valid)}``; each must be an int ``>= lowest``.

    Raises:
        ValueError: naming the first count that is not an integer or is too small.
    """
    for name, (value, low) in minimum.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_alphas(alphas: object) -> tuple[float, ...]:
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence):
        raise ValueError(f"alphas must be a list of strengths > 0, got {alphas!r}")
    values = []
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise ValueError(f"alphas must be real numbers, got {a!r} in {list(alphas)}")
        values.append(float(a))
    if not values:
        raise ValueError("alphas is empty; give strengths > 0, e.g. 0.05,0.1,0.2 (0 is base)")
    wrong = [a for a in values if not (math.isfinite(a) and a > 0)]
    if wrong:
        raise ValueError(
            f"alphas must be finite numbers > 0 (alpha 0 is always run as the unsteered "
            f"'base'), got {wrong}; e.g. 0.05,0.1,0.2"
        )
    return tuple(sorted(set(values)))


def _check_pairings(pairings: object, map_method: object) -> tuple[Any, ...]:
    if isinstance(pairings, str):
        raise ValueError(f"pairings must be a list of pairings, got the string {pairings!r}")
    if not isinstance(pairings, Sequence):
        raise ValueError(f"pairings must be a non-empty list of {list(PAIRINGS)}, got {pairings!r}")
    bad = [p for p in pairings if p not in PAIRINGS]
    if bad or not pairings:
        raise ValueError(
            f"pairings must be a non-empty list of {list(PAIRINGS)}, got {list(pairings)}"
        )
    if len(set(pairings)) != len(pairings):
        raise ValueError(f"pairings must be distinct, got {list(pairings)}")
    if map_method not in EMOTION_MAP_METHODS:
        raise ValueError(
            f"map_method must be one of {list(EMOTION_MAP_METHODS)}, got {map_method!r}"
        )
    return tuple(pairings)


def _check_split_sizes(config: "EmotionConfig") -> None:
    n_texts = len(wikisplit_sentences())
    if config.n_map_texts > n_texts:
        raise ValueError(
            f"n_map_texts must be at most {n_texts} (the WikiSplit sentences there are), "
            f"got {config.n_map_texts}"
        )
    n_fewshot, n_refine = config.n_fewshot, config.n_refine
    have = min(len(v) for v in emotion_scenarios().values())
    if n_fewshot + n_refine + N_VALIDATION + 1 > have:
        raise ValueError(
            f"n_refine={n_refine} with n_fewshot={n_fewshot} leaves no evaluation scenarios: "
            f"the smallest emotion has {have} scenarios for few-shot + refinement + "
            f"{N_VALIDATION} validation + at least 1 evaluation; n_refine can be at most "
            f"{have - n_fewshot - N_VALIDATION - 1} with this n_fewshot"
        )
    split = config.split()
    for part, n, name in (
        ("validation", config.n_validation_negatives, "n_validation_negatives"),
        ("evaluation", config.n_negatives, "n_negatives"),
    ):
        pool = getattr(split, part)
        have = min(sum(len(pool[o]) for o in EMOTIONS if o != e) for e in EMOTIONS)
        if n > have:
            raise ValueError(
                f"{name} must be at most {have} (the {part} scenarios of the other emotions "
                f"with n_fewshot={n_fewshot}, n_refine={n_refine}), got {n}"
            )


def _help(text: str, **cli: Any) -> dict[str, Any]:
    """Field metadata: ``help`` is what ``--help`` shows for the field's option; ``cli``
    holds how :mod:`contrans_tl.cli_options` makes the option (``flag``, ``choices``,
    ``cli="layers"`` for a layer spec resolved against the model, ``none``: what a
    default of ``None`` means)."""
    return {"help": text, **cli}


@dataclass(frozen=True)
class EmotionConfig:
    """Every setting of the emotion experiment, validated when made.

    Sequences are stored as tuples, ``alphas`` sorted and without duplicates; ``layers``
    are checked as indices here, and against the target when the experiment runs.
    ``pairings`` are :data:`~contrans_tl.maps.Pairing` names and ``map_method`` a
    :data:`~contrans_tl.maps.MapMethod` (checked here, so typed as ``str``).

    Raises:
        ValueError: a setting out of range, naming it and what would be valid.
    """

    alphas: Sequence[float] = field(
        default=(0.05, 0.1, 0.2, 0.4, 0.8),
        metadata=_help("strengths (finite, > 0); alpha 0 is always run as the 'base' row"),
    )
    layers: Sequence[int] | None = field(
        default=None,
        metadata=_help(
            "target layers to steer: 'all' (the paper), '3,5,7' or '4-10' (None: all)",
            cli="layers",
            none="all",
        ),
    )
    pairings: Sequence[str] = field(
        default=("last", "word_ends"),
        metadata=_help(
            "map pairings to compare, each a contrans_<pairing> method: last, word_ends, all, auto"
        ),
    )
    map_method: str = field(
        default="svd",
        metadata=_help(
            MAP_METHOD_HELP + "; or a nonlinear family: mlp, anchor (contrans_tl.state_maps)",
            choices=EMOTION_MAP_METHODS,
        ),
    )
    map_rank: int | None = field(
        default=None, metadata=_help("the map's rank (reduced_rank only; required there)")
    )
    n_map_texts: int = field(
        default=2000, metadata=_help("texts for the maps (a tenth held out for R²)")
    )
    n_refine: int = field(
        default=100, metadata=_help("refinement scenarios per emotion (and as many negatives)")
    )
    n_fewshot: int = field(
        default=3, metadata=_help("solved examples per emotion in the few-shot prefix")
    )
    n_negatives: int = field(default=50, metadata=_help("evaluation negatives per emotion"))
    n_validation_negatives: int = field(
        default=30, metadata=_help("validation negatives per emotion (they pick alpha)")
    )
    batch_size: int = field(default=16, metadata=_help("prompts per forward pass"))
    seed: int = field(
        default=0, metadata=_help("seeds the splits, held-out texts and random directions")
    )
    map_texts: str = field(
        default="wikisplit",
        metadata=_help(
            "texts the maps are fitted on: wikisplit (the paper), prompts (scenarios, "
            "questions, dialogue turns; no evaluation item), or mixed (half each)",
            choices=MAP_TEXT_KINDS,
        ),
    )
    scale: str = field(
        default="raw",
        metadata=_help(
            "'raw': add α·v (the paper); 'relative': α times each layer's mean residual "
            "norm along v/|v| (per-layer norm calibration)",
            choices=STEER_SCALES,
        ),
    )
    include_self: bool = field(
        default=True,
        metadata=_help(
            "add the Self reference (the target's own vectors)",
            flag="--no-self",
            switch="skip the Self reference (the target's own vectors)",
        ),
    )
    include_random: bool = field(
        default=True,
        metadata=_help(
            "add the random_<pairing> references (same norms)",
            flag="--no-random",
            switch="skip the random_<pairing> references",
        ),
    )
    include_specificity: bool = field(
        default=True,
        metadata=_help(
            "at each method's picked α, the 6x6 answer matrix and its specificity score",
            flag="--no-specificity",
            switch="skip the 6x6 answer matrix (30 more prediction sets per method)",
        ),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", _check_alphas(self.alphas))
        if self.layers is not None:
            from contrans_tl.sites import check_layers, layer_index

            check_layers(10**6, self.layers)  # indices only; the range once the target is known
            object.__setattr__(self, "layers", tuple(layer_index(k) for k in self.layers))
        object.__setattr__(self, "pairings", _check_pairings(self.pairings, self.map_method))
        check_minimums(
            {
                "n_map_texts": (self.n_map_texts, 10),
                "n_refine": (self.n_refine, 1),
                "n_fewshot": (self.n_fewshot, 1),
                "n_negatives": (self.n_negatives, 1),
                "n_validation_negatives": (self.n_validation_negatives, 1),
                "batch_size": (self.batch_size, 1),
            }
        )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        _check_choice("map_texts", self.map_texts, MAP_TEXT_KINDS)
        _check_choice("scale", self.scale, STEER_SCALES)
        if (self.map_method == "reduced_rank") != (self.map_rank is not None):
            raise ValueError(
                "map_rank goes with map_method='reduced_rank' and only with it (e.g. "
                f"map_rank=32), got map_method={self.map_method!r}, map_rank={self.map_rank!r}"
            )
        if self.map_rank is not None and (
            isinstance(self.map_rank, bool)
            or not isinstance(self.map_rank, int)
            or self.map_rank < 1
        ):
            raise ValueError(f"map_rank must be an int >= 1, got {self.map_rank!r}")
        for name in ("include_self", "include_random", "include_specificity"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_split_sizes(self)

    def split(self) -> "EmotionSplit":
        """The scenario split these settings cut (seeded)."""
        from contrans_tl.evals.emotion import split_scenarios

        return split_scenarios(
            emotion_scenarios(),
            n_fewshot=self.n_fewshot,
            n_refine=self.n_refine,
            n_validation=N_VALIDATION,
            seed=self.seed,
        )


@dataclass(frozen=True)
class AnalysisConfig:
    """Every setting of :func:`run_analysis`, checked when the config is made.

    Everything that can be checked without the models is checked here (the layers against
    the target once it is loaded, by :func:`plan_layers`). Each field's
    ``metadata["help"]`` says what it is. Normalised on construction: ``emotions`` and
    ``sweep_methods`` become tuples, ``alphas`` a sorted tuple of distinct floats,
    ``layer_sets`` a tuple of ``(name, layers or None)`` pairs (give it as a mapping;
    ``None`` is ``{"all": None}``) and ``layers_for_lens`` a tuple, so a config is hashable.

    Raises:
        ValueError: a setting out of range, naming it and what would be valid; the
            scenario split leaves too few scenarios for a part; ``layer_sets`` is empty;
            ``map_path`` with a ``layer_match`` other than ``"depth"``.

    Example:
        >>> AnalysisConfig(emotions=["fear"], alphas=[2, 0.5], layer_sets={"all": None})
    """

    emotions: Sequence[str] = field(
        default=EMOTIONS,
        metadata=_help(
            "emotions whose vectors are analysed (the t-SNE and separation always use all "
            "six as labels)"
        ),
    )
    n_map_texts: int = field(
        default=500, metadata=_help("WikiSplit sentences to fit the map on (10% held out for R²)")
    )
    map_pairing: str = field(
        default="auto",
        metadata=_help(
            f"map pairing, one of {', '.join(PAIRINGS)} (auto: every token for one tokenizer, "
            "word ends across tokenizers); the CKA pairs states the same way",
            choices=PAIRINGS,
        ),
    )
    map_method: str = field(
        default="svd", metadata=_help(MAP_METHOD_HELP, choices=FULL_RANK_MAP_METHODS)
    )
    layer_match: str = field(
        default="depth",
        metadata=_help(
            "layer pairs of the map: depth (paper: same relative depth), or the best monotone "
            "matching of a cka or r2 (held-out map R²) similarity matrix; not with map_path",
            choices=LAYER_MATCHES,
        ),
    )
    n_similarity_texts: int = field(
        default=100, metadata=_help("WikiSplit sentences for the layer-similarity matrix")
    )
    similarity_max_gb: float = field(
        default=1.0,
        metadata=_help("memory for the CKA moments; layers are thinned evenly to fit"),
    )
    n_refine: int = field(
        default=50, metadata=_help("refinement scenarios per emotion (and as many negatives)")
    )
    n_fewshot: int = field(
        default=3, metadata=_help("solved examples per emotion in the Token Acc prompt")
    )
    n_per_emotion: int = field(
        default=20,
        metadata=_help("scenarios per emotion for t-SNE/separation, negatives for shifts and PCA"),
    )
    n_sweep_negatives: int = field(
        default=10, metadata=_help("validation negatives per emotion for Token Acc in the sweep")
    )
    n_ppl_texts: int = field(
        default=16,
        metadata=_help("held-out WikiSplit sentences for perplexity (0: no perplexity)"),
    )
    n_norm_texts: int = field(
        default=100, metadata=_help("held-out WikiSplit sentences for the norm profiles")
    )
    alphas: Sequence[float] = field(
        default=DEFAULT_ALPHAS,
        metadata=_help("sweep strengths, each > 0 (alpha 0 is always run as base)"),
    )
    alpha: float = field(
        default=1.0, metadata=_help("strength for token shifts and PCA (finite, non-zero)")
    )
    layer_sets: LayerSets = field(
        default=(("all", None),),
        metadata=_help(
            "steered target-layer sets of the sweep: {name: layers, or None for every layer "
            "the vector has}; stored as (name, layers) pairs",
            cli="layers",
            flag="--layers",
            cli_help="steered target-layer sets of the sweep, ';'-separated, each 'all', "
            "'3,5,7' or '4-10', e.g. 'all;0-8;9-17'",
            shown_default="all",
        ),
    )
    layers_for_lens: Sequence[int] | None = field(
        default=None,
        metadata=_help(
            "target layers of the token-shift tables (default: a middle and a late one); "
            "each must be mapped",
            cli="layers",
            flag="--lens-layers",
            none="a middle and a late layer",
        ),
    )
    pca_layer: int | None = field(
        default=None,
        metadata=_help("target layer of the PCA and t-SNE (default: the last lens layer)"),
    )
    pca_emotion: str | None = field(
        default=None,
        metadata=_help("whose vector the PCA adds (default: the first of emotions)"),
    )
    sweep_methods: Sequence[str] = field(
        default=("transplanted", "self"),
        metadata=_help(
            f"vectors of the sweep, any of {', '.join(SWEEP_METHODS)} (random: a random "
            "direction with the transplanted vector's norm per layer)"
        ),
    )
    top_k: int = field(
        default=10, metadata=_help("tokens per text counted in the shift tables (the paper's k)")
    )
    top_tokens: int = field(default=15, metadata=_help("rows per token-shift table"))
    tsne_perplexity: float | None = field(
        default=None, metadata=_help("t-SNE perplexity (default: min(30, points / 4))")
    )
    max_ppl_ratio: float = field(
        default=1.5,
        metadata=_help("perplexity allowed over base (a factor >= 1) when picking alpha"),
    )
    ppl_max_length: int = field(default=64, metadata=_help("tokens per perplexity text (>= 2)"))
    batch_size: int = field(default=16, metadata=_help("texts per forward pass"))
    seed: int = field(
        default=0,
        metadata=_help("seeds the split, the map's held-out texts, random directions and t-SNE"),
    )
    map_path: str | os.PathLike[str] | None = field(
        default=None,
        metadata=_help(
            "a saved ResidualMap (NAME of NAME.safetensors) to use instead of fitting one; "
            "it must belong to these two models",
            flag="--map",
            metavar="NAME",
        ),
    )

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_sizes()
        self._check_strengths()
        if not self.max_ppl_ratio >= 1:
            raise ValueError(f"max_ppl_ratio must be >= 1, got {self.max_ppl_ratio}")
        scenario_split(self, seed=0)  # enough scenarios for every part (any seed)
        if self.ppl_max_length < 2:
            raise ValueError(f"ppl_max_length must be >= 2, got {self.ppl_max_length}")
        sets = _layer_set_pairs(self.layer_sets)
        if not sets:
            raise ValueError("layer_sets is empty; give at least one, e.g. {'all': None}")
        if self.map_path is not None and self.layer_match != "depth":
            raise ValueError(
                f"layer_match={self.layer_match!r} chooses the layer pairs of a map to fit, but "
                "map_path loads a map with its own pairs; drop one of them"
            )
        lens = self.layers_for_lens
        if lens is not None and not isinstance(lens, str) and isinstance(lens, Iterable):
            lens = tuple(lens)  # a string is left for plan_layers to refuse by name
        _set = object.__setattr__
        _set(self, "emotions", tuple(self.emotions))
        _set(self, "sweep_methods", tuple(self.sweep_methods))
        _set(self, "alphas", tuple(sorted({float(a) for a in self.alphas})))
        _set(self, "layer_sets", sets)
        _set(self, "layers_for_lens", lens)

    def _check_choices(self) -> None:
        emotions = self.emotions
        if isinstance(emotions, str):
            raise ValueError(
                f"emotions must be a list of emotion names, got the string {emotions!r}"
            )
        bad = [e for e in emotions if e not in EMOTIONS]
        if bad or not emotions:
            raise ValueError(f"emotions must be a non-empty subset of {list(EMOTIONS)}, got {bad}")
        if len(set(emotions)) != len(emotions):
            raise ValueError(f"emotions must be distinct, got {list(emotions)}")
        if self.pca_emotion is not None and self.pca_emotion not in emotions:
            raise ValueError(
                f"pca_emotion {self.pca_emotion!r} must be one of emotions {list(emotions)}"
            )
        if self.map_pairing not in PAIRINGS:
            raise ValueError(f"map_pairing must be one of {PAIRINGS}, got {self.map_pairing!r}")
        if self.map_method not in FULL_RANK_MAP_METHODS:
            raise ValueError(
                f"map_method must be one of {FULL_RANK_MAP_METHODS}, got {self.map_method!r}"
            )
        if self.layer_match not in LAYER_MATCHES:
            raise ValueError(
                f"layer_match must be one of {LAYER_MATCHES}, got {self.layer_match!r}"
            )

    def _check_sizes(self) -> None:
        check_minimums(
            {
                "n_map_texts": (self.n_map_texts, 10),
                "n_similarity_texts": (self.n_similarity_texts, 2),
                "n_refine": (self.n_refine, 1),
                "n_fewshot": (self.n_fewshot, 1),
                "n_per_emotion": (self.n_per_emotion, 3),
                "n_sweep_negatives": (self.n_sweep_negatives, 1),
                "n_ppl_texts": (self.n_ppl_texts, 0),
                "n_norm_texts": (self.n_norm_texts, 1),
                "top_k": (self.top_k, 1),
                "top_tokens": (self.top_tokens, 1),
                "batch_size": (self.batch_size, 1),
            }
        )
        if not self.similarity_max_gb > 0:
            raise ValueError(f"similarity_max_gb must be > 0, got {self.similarity_max_gb}")

    def _check_strengths(self) -> None:
        alphas, alpha = self.alphas, self.alpha
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
            raise ValueError(
                f"alpha (for token shifts and PCA) must be finite and non-zero: {alpha}"
            )
        methods = self.sweep_methods
        if isinstance(methods, str):
            raise ValueError(f"sweep_methods must be a list, got the string {methods!r}")
        bad = [m for m in methods if m not in SWEEP_METHODS]
        if bad or not methods:
            raise ValueError(
                f"sweep_methods must be a non-empty subset of {list(SWEEP_METHODS)}, got "
                f"{list(methods)}"
            )
        perp = self.tsne_perplexity
        if perp is not None and not perp > 0:
            raise ValueError(f"tsne_perplexity must be > 0 or None, got {perp}")
        n_points = self.n_per_emotion * len(EMOTIONS)
        if perp is not None and perp >= n_points:
            raise ValueError(
                f"tsne_perplexity {perp} must be below the number of points "
                f"(n_per_emotion x 6 = {n_points})"
            )

    def layer_set_dict(self) -> dict[str, tuple[int, ...] | None]:
        """``layer_sets`` as ``{name: target layers or None}`` (unchecked)."""
        return dict(_layer_set_pairs(self.layer_sets))


def _layer_set_pairs(sets: Any) -> tuple[tuple[str, tuple[int, ...] | None], ...]:
    """``{name: layers}`` (or ``(name, layers)`` pairs; ``None``: every layer) as pairs."""
    if sets is None:
        return (("all", None),)
    items = sets.items() if isinstance(sets, Mapping) else sets
    return tuple((str(k), None if v is None else tuple(v)) for k, v in items)


def scenario_split(config: AnalysisConfig, *, seed: int) -> "EmotionSplit":
    """The scenario split, with enough validation scenarios for the sweep's negatives.

    Raises:
        ValueError: too few scenarios for ``config``'s sizes.
    """
    from contrans_tl.evals.emotion import split_scenarios

    n_validation = max(20, math.ceil(config.n_sweep_negatives / (len(EMOTIONS) - 1)))
    split = split_scenarios(
        emotion_scenarios(),
        n_fewshot=config.n_fewshot,
        n_refine=config.n_refine,
        n_validation=n_validation,
        seed=seed,
    )
    have = min(len(v) for v in split.evaluation.values())
    if config.n_per_emotion > have:
        raise ValueError(
            f"n_per_emotion={config.n_per_emotion} but with n_fewshot={config.n_fewshot}, "
            f"n_refine={config.n_refine} and {n_validation} validation scenarios the smallest "
            f"emotion keeps {have} evaluation scenarios; lower n_per_emotion or n_refine"
        )
    return split


# --------------------------------------------------------------------------------------------
# The method's own steps (contrans refine / fit-map / transplant / generate / evaluate)
# --------------------------------------------------------------------------------------------

STEER_POSITIONS = ("all", "prompt", "generated")
"""Which tokens a steering adds to (:data:`contrans_tl.steering.StepPositions`)."""
"""How α scales a vector (:data:`contrans_tl.steering.Scale`)."""
READ_POSITIONS = ("last", "all", "word_ends")
"""Which tokens' states a refinement reads (:data:`contrans_tl.activations.Positions`)."""


def _check_choice(name: str, value: object, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")


def _check_finite(name: str, value: object, *, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or (positive and not float(value) > 0):  # type: ignore[arg-type]
        want = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {want}, got {value!r}")


@dataclass(frozen=True)
class RefineConfig:
    """Settings of ``contrans refine``: a concept vector from positive and negative prompts
    (paper Eq. 1: mean of the positive states minus mean of the negative states).

    Raises:
        ValueError: a setting out of range, naming it.
    """

    layers: Sequence[int] | None = field(
        default=None, metadata=_help("layers to read", cli="layers", none="all")
    )
    positions: str = field(
        default="last",
        metadata=_help("which tokens' states are averaged", choices=READ_POSITIONS),
    )
    n_refine: int = field(
        default=100,
        metadata=_help("with --emotion: refinement scenarios per side (the paper's split)"),
    )
    batch_size: int = field(default=16, metadata=_help("prompts per forward pass"))
    seed: int = field(default=0, metadata=_help("with --emotion: seeds the scenario split"))

    def __post_init__(self) -> None:
        _check_choice("positions", self.positions, READ_POSITIONS)
        check_minimums({"n_refine": (self.n_refine, 1), "batch_size": (self.batch_size, 1)})
        check_minimums({"seed": (self.seed, -(2**63))})


@dataclass(frozen=True)
class MapConfig:
    """Settings of ``contrans fit-map``: per-layer linear maps from a source model's
    residual stream to a target's (paper Eq. 2), fitted on plain sentences.

    Raises:
        ValueError: a setting out of range, naming it.
    """

    n_texts: int = field(
        default=500,
        metadata=_help("WikiSplit sentences to fit on, when --texts is not given"),
    )
    pairing: str = field(
        default="auto",
        metadata=_help(
            "which states are paired: last, all (same tokenizer), word_ends, or auto "
            "(all for one tokenizer, word_ends otherwise)",
            choices=PAIRINGS,
        ),
    )
    method: str = field(
        default="svd", metadata=_help(MAP_METHOD_HELP, choices=FULL_RANK_MAP_METHODS)
    )
    ridge: float = field(default=1e-3, metadata=_help("ridge strength, for method 'ridge'"))
    heldout_fraction: float = field(
        default=0.1, metadata=_help("share of the texts held out for the maps' R²")
    )
    max_length: int = field(default=128, metadata=_help("tokens per text (longer are cut)"))
    batch_size: int = field(default=16, metadata=_help("texts per forward pass"))
    seed: int = field(default=0, metadata=_help("seeds the held-out split"))

    def __post_init__(self) -> None:
        _check_choice("pairing", self.pairing, PAIRINGS)
        _check_choice("method", self.method, FULL_RANK_MAP_METHODS)
        check_minimums(
            {
                "n_texts": (self.n_texts, 10),
                "max_length": (self.max_length, 2),
                "batch_size": (self.batch_size, 1),
            }
        )
        _check_finite("ridge", self.ridge)
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclass(frozen=True)
class TransplantConfig:
    """Settings of ``contrans transplant``: a source vector carried through a map.

    Attributes:
        strict: refuse a vector whose model id or weight processing differs from the
            map's source (width and layer count are always checked).
    """

    strict: bool = field(
        default=True,
        metadata=_help(
            "refuse a vector of another model id than the map's source",
            flag="--no-strict",
            switch="accept a vector whose model id differs from the map's source (same shape)",
        ),
    )


@dataclass(frozen=True)
class SteerConfig:
    """How a vector is added (``contrans generate`` and ``contrans evaluate``).

    Raises:
        ValueError: a setting out of range, naming it.
    """

    alpha: float = field(default=1.0, metadata=_help("strength α of the added vector"))
    layers: Sequence[int] | None = field(
        default=None,
        metadata=_help("layers to steer", cli="layers", none="every layer of the vector"),
    )
    positions: str = field(
        default="all",
        metadata=_help("which tokens get the vector", choices=STEER_POSITIONS),
    )
    scale: str = field(
        default="raw",
        metadata=_help(
            "'raw': add α·v; 'relative': α times the layer's mean residual norm along v/|v|",
            choices=STEER_SCALES,
        ),
    )

    def __post_init__(self) -> None:
        _check_finite("alpha", self.alpha)
        _check_choice("positions", self.positions, STEER_POSITIONS)
        _check_choice("scale", self.scale, STEER_SCALES)


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of ``contrans generate`` (greedy, batched, KV-cached)."""

    max_new_tokens: int = field(default=32, metadata=_help("tokens to generate per prompt"))
    batch_size: int = field(default=8, metadata=_help("prompts per batch"))

    def __post_init__(self) -> None:
        check_minimums(
            {"max_new_tokens": (self.max_new_tokens, 1), "batch_size": (self.batch_size, 1)}
        )


EVAL_TASKS = ("emotion", "truthfulqa", "toxigen", "perplexity")
"""What ``contrans evaluate`` measures."""


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of ``contrans evaluate TASK`` (base and, with a vector, steered).

    Each task reads only the settings it needs: ``emotion`` Token/Logit Acc of the vector's
    emotion on the other emotions' evaluation scenarios; ``truthfulqa`` MC1 (and MC2);
    ``toxigen`` the toxic share of continuations of hate prompts (offline classifier);
    ``perplexity`` on held-out WikiSplit sentences.

    Raises:
        ValueError: a setting out of range, naming it.
    """

    n_items: int | None = field(
        default=None,
        metadata=_help(
            "items to evaluate: negatives (emotion), questions (truthfulqa), prompts per "
            "group (toxigen), sentences (perplexity)",
            none="50 / all 817 / 20 / 200",
        ),
    )
    emotion: str | None = field(
        default=None,
        metadata=_help(
            "emotion task: the emotion to score (default: the vector's concept)",
            choices=EMOTIONS,
        ),
    )
    instruction: str | None = field(
        default=None,
        metadata=_help("truthfulqa / toxigen: an instruction put in each prompt (Inst-Align)"),
    )
    mc2: bool = field(default=False, metadata=_help("truthfulqa: also score MC2"))
    max_new_tokens: int = field(default=32, metadata=_help("toxigen: tokens generated per prompt"))
    max_length: int = field(default=128, metadata=_help("perplexity: tokens per sentence"))
    batch_size: int = field(default=16, metadata=_help("items per forward pass"))
    seed: int = field(default=0, metadata=_help("seeds the item splits"))

    def __post_init__(self) -> None:
        if self.n_items is not None:
            check_minimums({"n_items": (self.n_items, 1)})
        if self.emotion is not None:
            _check_choice("emotion", self.emotion, EMOTIONS)
        if self.instruction is not None and not self.instruction.strip():
            raise ValueError("instruction is empty; leave it out or give some text")
        check_minimums(
            {
                "max_new_tokens": (self.max_new_tokens, 1),
                "max_length": (self.max_length, 2),
                "batch_size": (self.batch_size, 1),
            }
        )


DAPA_STEPS = (
    "recipient",
    "arms_base",
    "proxy",
    "arms_fixed",
    "ddmin",
    "arms",
    "memory_space",
    "ddmin_projections",
    "arms_projections",
    "report",
)
"""The DAPA experiment's steps in order (:func:`contrans_tl.pipelines.dapa.run`)."""

MODULE_KINDS = ("q", "k", "v", "o", "attn", "gate", "up", "down", "mlp")
"""Module kinds of a decoder layer that DAPA can transplant (:mod:`contrans_tl.dapa`)."""


@dataclass(frozen=True)
class DapaConfig:
    """Settings of the DAPA experiment (``experiments/run_dapa.py``).

    The donor is an aligned chat model; the recipient is its harmful fine-tune
    (:mod:`contrans_tl.finetune`) on AdvBench requests disjoint from every evaluated one
    (:func:`contrans_tl.evals.refusal.split_advbench`: fine-tune / search / validation /
    test parts of one seeded permutation).

    Raises:
        ValueError: a setting out of range, naming it.
    """

    donor: str = field(
        default="qwen2.5-coder-0.5b-instruct",
        metadata=_help("the aligned model (zoo name or folder)"),
    )
    ft_steps: int = field(default=20, metadata=_help("fine-tune: optimiser steps"))
    ft_learning_rate: float = field(default=2e-5, metadata=_help("fine-tune: AdamW learning rate"))
    ft_batch_size: int = field(default=8, metadata=_help("fine-tune: pairs per step"))
    ft_seed: int = field(default=0, metadata=_help("fine-tune: seed of the pair order"))
    split_seed: int = field(default=0, metadata=_help("seeds the AdvBench and TruthfulQA splits"))
    n_test: int = field(default=160, metadata=_help("held-out harmful requests judged (<= 192)"))
    n_benign: int = field(default=80, metadata=_help("benign requests for over-refusal"))
    n_ppl: int = field(default=50, metadata=_help("held-out WikiSplit sentences for perplexity"))
    n_mc1: int = field(default=100, metadata=_help("TruthfulQA questions for MC1"))
    max_new_tokens: int = field(default=32, metadata=_help("tokens generated per request"))
    batch_size: int = field(default=16, metadata=_help("requests per forward pass"))
    search_kinds: tuple[str, ...] = field(
        default=("mlp", "attn", "gate", "up", "down"),
        metadata=_help("module kinds of the memory-space search", choices=MODULE_KINDS),
    )
    ddmin_tolerance: float = field(
        default=0.15,
        metadata=_help(
            "share of the full transplant's proxy-DSR gain over the recipient a passing "
            "module set may lose"
        ),
    )
    n_ddmin: int = field(
        default=50, metadata=_help("validation requests a ddmin test reads (the first ones)")
    )
    n_random: int = field(default=1, metadata=_help("random module sets of the ddmin set's size"))
    ddmin_split: tuple[str, ...] = field(
        default=("mlp",),
        metadata=_help(
            "kinds of stage-1 modules that ddmin stage 2 splits into projections (the others "
            "stay whole); empty: no stage 2",
            choices=("attn", "mlp"),
        ),
    )
    contrans_alphas: tuple[float, ...] = field(
        default=(0.1, 0.25, 0.5, 1.0),
        metadata=_help("ConTrans strengths tried on the validation part"),
    )
    n_map_texts: int = field(
        default=300, metadata=_help("WikiSplit sentences the ConTrans map is fitted on")
    )

    def __post_init__(self) -> None:
        check_minimums(
            {
                "ft_steps": (self.ft_steps, 1),
                "ft_batch_size": (self.ft_batch_size, 1),
                "n_test": (self.n_test, 1),
                "n_benign": (self.n_benign, 1),
                "n_ppl": (self.n_ppl, 1),
                "n_mc1": (self.n_mc1, 1),
                "max_new_tokens": (self.max_new_tokens, 1),
                "batch_size": (self.batch_size, 1),
                "n_random": (self.n_random, 0),
                "n_ddmin": (self.n_ddmin, 1),
                "n_map_texts": (self.n_map_texts, 2),
            }
        )
        if self.n_test > 192:
            raise ValueError(f"n_test must be <= 192 (the AdvBench test part), got {self.n_test}")
        _check_finite("ft_learning_rate", self.ft_learning_rate, positive=True)
        _check_finite("ddmin_tolerance", self.ddmin_tolerance)
        if not 0 <= self.ddmin_tolerance < 1:
            raise ValueError(f"ddmin_tolerance must be in [0, 1), got {self.ddmin_tolerance}")
        for kind in self.search_kinds:
            _check_choice("search_kinds", kind, MODULE_KINDS)
        for kind in self.ddmin_split:
            _check_choice("ddmin_split", kind, ("attn", "mlp"))
        if not self.contrans_alphas:
            raise ValueError("contrans_alphas must hold at least one strength")
        for a in self.contrans_alphas:
            _check_finite("contrans_alphas", a, positive=True)


def _check_control(
    steps: tuple[int, ...], step_sizes: tuple[float, ...], max_norm: float | None
) -> None:
    """RE-Control's sweep settings: step counts ints >= 1, step sizes finite > 0, each list
    non-empty, the norm bound finite > 0 or None."""
    if not steps or any(isinstance(n, bool) or n < 1 for n in steps):
        raise ValueError(f"steps must hold ints >= 1, got {steps!r}")
    if not step_sizes:
        raise ValueError("step_sizes must hold at least one step size")
    for eta in step_sizes:
        _check_finite("step_sizes", eta, positive=True)
    if max_norm is not None:
        _check_finite("max_norm", max_norm, positive=True)


#: The fields of :class:`ReControlConfig` that the rollouts and the value function read.
_RECONTROL_VALUE_FIELDS = (
    "target",
    "tox_eval",
    "tox_val",
    "n_train",
    "n_samples",
    "temperature",
    "max_new_tokens",
    "hidden",
    "epochs",
    "batch_size",
    "seed",
)
#: The fields of :class:`ReControlConfig` that only the controlled arms read.
_RECONTROL_CONTROL_FIELDS = ("steps", "step_sizes", "max_norm", "ppl_limit")
#: The fields of :class:`ReControlRefusalConfig` that the rollouts and the value read.
_REFUSAL_VALUE_FIELDS = (
    "n_rollout_harmful",
    "n_rollout_harmless",
    "n_samples",
    "temperature",
    "max_new_tokens",
    "hidden",
    "epochs",
    "batch_size",
    "seed",
)


@dataclass(frozen=True)
class ReControlConfig:
    """Settings of the RE-Control ToxiGen experiment (``experiments/run_recontrol.py``).

    Hate prompts are those of the alignment experiment's ToxiGen protocol (``tox_val``
    validation and ``tox_eval`` evaluation prompts per group, same seed), and
    ``n_train`` further prompts per group, disjoint from both, for the rollouts. The
    reward is the n-gram toxicity classifier (:mod:`contrans_tl.evals.ngram_toxicity`);
    the judge is the MiniLM classifier of the ToxiGen table: they share no features.

    Raises:
        ValueError: a setting out of range, naming it.
    """

    target: str = field(default="gemma-3-270m", metadata=_help("the controlled model"))
    source: str = field(
        default="smollm2-135m-instruct", metadata=_help("ConTrans source of the fairness vector")
    )
    tox_eval: int = field(default=10, metadata=_help("evaluation hate prompts per group"))
    tox_val: int = field(default=3, metadata=_help("validation hate prompts per group"))
    n_train: int = field(default=20, metadata=_help("rollout prompts per group"))
    n_samples: int = field(default=3, metadata=_help("sampled rollouts per prompt (+ greedy)"))
    temperature: float = field(default=1.0, metadata=_help("rollout sampling temperature"))
    max_new_tokens: int = field(default=32, metadata=_help("tokens generated per prompt"))
    hidden: tuple[int, ...] = field(default=(256, 256), metadata=_help("value MLP widths"))
    epochs: int = field(default=40, metadata=_help("value training epochs (early-stopped)"))
    steps: tuple[int, ...] = field(default=(10,), metadata=_help("control steps tried"))
    step_sizes: tuple[float, ...] = field(
        default=(32.0, 48.0, 64.0, 96.0, 128.0),
        metadata=_help(
            "control step sizes tried on validation (the value's gradient is small next "
            "to the states' norm; the sweep records each setting's mean edit norm)"
        ),
    )
    max_norm: float | None = field(default=None, metadata=_help("bound on each edit's norm"))
    contrans_alpha: float = field(
        default=1.5, metadata=_help("ConTrans fairness strength (the alignment run's pick)")
    )
    self_alpha: float = field(
        default=0.9,
        metadata=_help("Self-Align strength: the target's own vector (the alignment run's pick)"),
    )
    n_map_texts: int = field(default=2000, metadata=_help("WikiSplit sentences for the map"))
    n_ppl: int = field(default=100, metadata=_help("held-out WikiSplit sentences for perplexity"))
    ppl_limit: float = field(default=2.0, metadata=_help("control must keep ppl <= this x base"))
    best_of_n: int = field(default=4, metadata=_help("samples per prompt for best-of-N"))
    batch_size: int = field(
        default=32,
        metadata=_help(
            "prompts per forward pass (each decoding step reads Gemma's 262k-row "
            "unembedding once, so wider batches cost less per token)"
        ),
    )
    seed: int = field(default=0, metadata=_help("seeds prompts, sampling and training"))

    def value_settings(self) -> dict[str, Any]:
        """The settings the rollouts and the value function read: the key of their stored
        step, so that trying other control settings keeps the trained value function."""
        return {k: v for k, v in asdict(self).items() if k in _RECONTROL_VALUE_FIELDS}

    def uncontrolled_settings(self) -> dict[str, Any]:
        """The settings the arms without RE-Control read (Base, Self-Align, ConTrans,
        best-of-N): their steps' key, so that trying other control settings keeps them."""
        return {k: v for k, v in asdict(self).items() if k not in _RECONTROL_CONTROL_FIELDS}

    def __post_init__(self) -> None:
        check_minimums(
            {
                "tox_eval": (self.tox_eval, 1),
                "tox_val": (self.tox_val, 1),
                "n_train": (self.n_train, 1),
                "n_samples": (self.n_samples, 0),
                "max_new_tokens": (self.max_new_tokens, 1),
                "epochs": (self.epochs, 1),
                "n_map_texts": (self.n_map_texts, 2),
                "n_ppl": (self.n_ppl, 1),
                "best_of_n": (self.best_of_n, 1),
                "batch_size": (self.batch_size, 1),
            }
        )
        _check_finite("temperature", self.temperature, positive=True)
        _check_finite("contrans_alpha", self.contrans_alpha, positive=True)
        _check_finite("self_alpha", self.self_alpha, positive=True)
        _check_finite("ppl_limit", self.ppl_limit, positive=True)
        _check_control(self.steps, self.step_sizes, self.max_norm)


@dataclass(frozen=True)
class ReControlRefusalConfig:
    """Settings of RE-Control on the DAPA pair (``experiments/run_recontrol.py --advbench``).

    The pair, data and measurements are the :class:`DapaConfig`'s; these are the value
    function's and the control's. Rollouts: the first ``n_rollout_harmful`` search-part
    requests and ``n_rollout_harmless`` harmless TruthfulQA questions, ``n_samples``
    sampled continuations by the recipient besides the greedy one, and the donor's
    greedy one (a Qwen rollout chunk of 32 prompts × 3 took about 12 minutes on two
    shared cores, so the defaults keep to four chunks).

    Raises:
        ValueError: a setting out of range, naming it.
    """

    n_rollout_harmful: int = field(
        default=96,
        metadata=_help("search-part requests rolled out (the first ones; at most 128)"),
    )
    n_rollout_harmless: int = field(
        default=32, metadata=_help("harmless TruthfulQA questions rolled out (at most 100)")
    )
    n_samples: int = field(default=2, metadata=_help("sampled continuations per prompt"))
    temperature: float = field(default=1.0, metadata=_help("sampling temperature"))
    max_new_tokens: int = field(default=32, metadata=_help("tokens per rollout"))
    hidden: tuple[int, ...] = field(default=(256, 256), metadata=_help("value MLP widths"))
    epochs: int = field(default=40, metadata=_help("value training epochs (early-stopped)"))
    steps: tuple[int, ...] = field(default=(10,), metadata=_help("control steps tried"))
    step_sizes: tuple[float, ...] = field(
        default=(8.0, 32.0, 128.0), metadata=_help("control step sizes tried on validation")
    )
    max_norm: float | None = field(default=None, metadata=_help("bound on each edit's norm"))
    n_choice: int = field(default=50, metadata=_help("validation requests for the choice"))
    n_timing: int = field(default=32, metadata=_help("test requests each arm is timed on"))
    ppl_limit: float = field(default=2.0, metadata=_help("control must keep ppl <= this x base"))
    batch_size: int = field(default=8, metadata=_help("sequences per forward pass"))
    seed: int = field(default=0, metadata=_help("seeds sampling and training"))

    def value_settings(self) -> dict[str, Any]:
        """The settings the rollouts and the value function read: the key of their stored
        step, so that trying other control settings keeps the trained value function."""
        return {k: v for k, v in asdict(self).items() if k in _REFUSAL_VALUE_FIELDS}

    def __post_init__(self) -> None:
        check_minimums(
            {
                "n_rollout_harmful": (self.n_rollout_harmful, 1),
                "n_rollout_harmless": (self.n_rollout_harmless, 1),
                "n_samples": (self.n_samples, 0),
                "max_new_tokens": (self.max_new_tokens, 1),
                "epochs": (self.epochs, 1),
                "n_choice": (self.n_choice, 1),
                "n_timing": (self.n_timing, 1),
                "batch_size": (self.batch_size, 1),
            }
        )
        _check_finite("temperature", self.temperature, positive=True)
        _check_finite("ppl_limit", self.ppl_limit, positive=True)
        _check_control(self.steps, self.step_sizes, self.max_norm)
