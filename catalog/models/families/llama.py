"""Llama (2, 3, 3.1, ...): rotary position embedding on every dim of a head (Llama 3.1's
frequency scaling is read from the model's own inv_freq), RMSNorm, no biases, and grouped-query
attention where several query heads share one key head."""

from catalog.models.families.base import FamilyAdapter, from_bridge, rotary_of

NAME = "llama"
MODEL_TYPES = ("llama",)
DESCRIPTION = "Llama"


def adapter(bridge) -> FamilyAdapter:
    return from_bridge(NAME, bridge, norm="RMSNorm", parallel_attn_mlp=False, rotary=rotary_of(bridge.original_model))
