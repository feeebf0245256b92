"""Gemma-2: attention-logit softcapping c tanh(s / c), a sliding window on alternate layers,
RMSNorms (weights used as 1 + weight) before and after both attention and MLP, grouped-query
attention, query_pre_attn_scalar as the score's scale and the embedding scaled by sqrt(d_model).
No QK-norm: the form is the rotary one with the input norm's gain inside (docs/normed.md)."""

from catalog.models.families.normed import NormedAdapter, normed_adapter

NAME = "gemma2"
MODEL_TYPES = ("gemma2",)
DESCRIPTION = "Gemma-2"
METHODS = ("sad",)  # ACC++ does not read it yet: refused before the model loads


def adapter(bridge) -> NormedAdapter:
    return normed_adapter(NAME, bridge, gain_offset=1.0, post_norm=True)
