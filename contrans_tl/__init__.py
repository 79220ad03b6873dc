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

from contrans_tl.activations import ResidReads, read_resid_post
from contrans_tl.concepts import ConceptVector, mean_difference
from contrans_tl.data import emotion_scenarios, wikisplit_sentences
from contrans_tl.maps import LinearMapFitter, ResidualMap, fit_residual_map
from contrans_tl.models import ModelProvenance, load_model, load_tokenizer, model_provenance
from contrans_tl.sites import match_layers_by_depth, resid_post_name
from contrans_tl.steering import Steering, generate, make_steering, steer, steering_hooks

__all__ = [
    "ConceptVector",
    "LinearMapFitter",
    "ModelProvenance",
    "ResidReads",
    "ResidualMap",
    "Steering",
    "emotion_scenarios",
    "fit_residual_map",
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
    "wikisplit_sentences",
]

__version__ = "0.1.0"
