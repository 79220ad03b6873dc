"""contrans_tl: concept transplantation between language models, on TransformerLens.

Refine a concept vector in a small model's residual stream, map it into a bigger
model's residual stream with per-layer linear maps, and add it there through hooks.

Example:
    >>> import contrans_tl as ct
    >>> src, tgt = ct.load_model("smollm2-135m-instruct"), ct.load_model("gemma-3-270m")
    >>> v = ct.mean_difference(src, positive_prompts, negative_prompts, concept="fear")
    >>> rmap = ct.fit_residual_map(src, tgt, ct.wikisplit_sentences(), pairing="word_ends")
    >>> with ct.steer(tgt, rmap.transplant(v), alpha=0.2):
    ...     print(ct.generate(tgt, ["Scenario: You get a letter.\\nThe emotion is"]))
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from contrans_tl.activations import ResidReads, read_resid_post
    from contrans_tl.concepts import ConceptVector, mean_difference
    from contrans_tl.data import emotion_scenarios, wikisplit_sentences
    from contrans_tl.maps import LinearMapFitter, ResidualMap, fit_residual_map
    from contrans_tl.models import load_model, load_tokenizer
    from contrans_tl.provenance import ModelProvenance, model_provenance
    from contrans_tl.sites import match_layers_by_depth, resid_post_name
    from contrans_tl.state_maps import StateMap, fit_state_map, transplant_states
    from contrans_tl.steering import Steering, generate, make_steering, steer, steering_hooks

# Names are imported on first use (PEP 562), so `import contrans_tl` and the CLI's --help
# do not load torch and TransformerLens.
_LAZY = {
    "ConceptVector": "contrans_tl.concepts",
    "LinearMapFitter": "contrans_tl.maps",
    "ModelProvenance": "contrans_tl.provenance",
    "ResidReads": "contrans_tl.activations",
    "ResidualMap": "contrans_tl.maps",
    "StateMap": "contrans_tl.state_maps",
    "Steering": "contrans_tl.steering",
    "emotion_scenarios": "contrans_tl.data",
    "fit_residual_map": "contrans_tl.maps",
    "fit_state_map": "contrans_tl.state_maps",
    "generate": "contrans_tl.steering",
    "load_model": "contrans_tl.models",
    "load_tokenizer": "contrans_tl.models",
    "make_steering": "contrans_tl.steering",
    "match_layers_by_depth": "contrans_tl.sites",
    "mean_difference": "contrans_tl.concepts",
    "model_provenance": "contrans_tl.provenance",
    "read_resid_post": "contrans_tl.activations",
    "resid_post_name": "contrans_tl.sites",
    "steer": "contrans_tl.steering",
    "steering_hooks": "contrans_tl.steering",
    "transplant_states": "contrans_tl.state_maps",
    "wikisplit_sentences": "contrans_tl.data",
}

__all__ = [
    "ConceptVector",
    "LinearMapFitter",
    "ModelProvenance",
    "ResidReads",
    "ResidualMap",
    "StateMap",
    "Steering",
    "emotion_scenarios",
    "fit_residual_map",
    "fit_state_map",
    "generate",
    "load_model",
    "load_tokenizer",
    "make_steering",
    "match_layers_by_depth",
    "mean_difference",
    "model_provenance",
    "read_resid_post",
    "resid_post_name",
    "steer",
    "steering_hooks",
    "transplant_states",
    "wikisplit_sentences",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'contrans_tl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
