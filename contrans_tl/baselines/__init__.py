"""Baselines of the ConTrans paper that need code of their own (proxy-tuning first).

Example:
    >>> from contrans_tl.baselines import proxy_generate
    >>> proxy_generate(strong, weak_aligned, weak_base, ["Hello"], max_new_tokens=10)
"""

from contrans_tl.baselines.proxy_tuning import (
    check_same_vocabulary,
    proxy_generate,
    proxy_logits,
    proxy_sequence_logprob,
    proxy_sequence_logprobs,
)

__all__ = [
    "check_same_vocabulary",
    "proxy_generate",
    "proxy_logits",
    "proxy_sequence_logprob",
    "proxy_sequence_logprobs",
]
