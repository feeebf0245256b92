"""Llama (2, 3, 3.1, ...): rotary position embedding on every dim of a head (Llama 3.1's
frequency scaling is read from the model's own inv_freq), RMSNorm, no biases, and grouped-query
attention where several query heads share one key head."""

from catalog.models.families.base import FamilyAdapter, ForwardSpec, forward_spec_of, from_bridge, rotary_of

NAME = "llama"
MODEL_TYPES = ("llama",)
DESCRIPTION = "Llama"


def adapter(bridge) -> FamilyAdapter:
    return from_bridge(NAME, bridge, norm="RMSNorm", parallel_attn_mlp=False, rotary=rotary_of(bridge.original_model))


def forward_spec(adapter: FamilyAdapter) -> ForwardSpec:
    """RMSNorm (no centring), rotary on every dim, grouped-query attention, gated MLP
    silu(x W_gate) * (x W_in)."""
    return forward_spec_of(adapter, act=adapter.bridge.original_model.config.hidden_act, gated_mlp=True)
