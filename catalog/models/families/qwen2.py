"""Qwen2 and Qwen2.5: as Llama (rotary on every dim, RMSNorm, grouped-query attention) plus
biases on the query and key projections, often large; the bias-augmented factors carry them
through the rotation (they are added before it)."""

from catalog.models.families.base import FamilyAdapter, ForwardSpec, forward_spec_of, from_bridge, rotary_of

NAME = "qwen2"
MODEL_TYPES = ("qwen2",)
DESCRIPTION = "Qwen2 / Qwen2.5"


def adapter(bridge) -> FamilyAdapter:
    return from_bridge(NAME, bridge, norm="RMSNorm", parallel_attn_mlp=False, rotary=rotary_of(bridge.original_model))


def forward_spec(adapter: FamilyAdapter) -> ForwardSpec:
    """As Llama: RMSNorm, rotary, grouped-query attention, gated silu MLP; the QK(V) biases are in the
    processed weights (added before the rotation)."""
    return forward_spec_of(adapter, act=adapter.bridge.original_model.config.hidden_act, gated_mlp=True)
