"""OLMo-2: no norm before attention or MLP (they read the residual stream itself), RMSNorms after
both, and QK-norm over the whole query (key) projection: one divisor per token shared by all its
heads, one gain per dim (docs/normed.md)."""

from catalog.models.families.normed import NormedAdapter, normed_adapter

NAME = "olmo2"
MODEL_TYPES = ("olmo2",)
DESCRIPTION = "OLMo-2"
METHODS = ("sad",)


def adapter(bridge) -> NormedAdapter:
    return normed_adapter(NAME, bridge, pre_norm=False, qk_norm="projection", post_norm=True)
