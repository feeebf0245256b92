"""GPT-NeoX and Pythia: rotary position embedding on the first rotary_pct of each head's dims
(Pythia: a quarter), QK biases, LayerNorm, and (with use_parallel_residual) attention and MLP
reading the same residual stream. The QK form depends on the offset between destination and
source (docs/rotary.md)."""

from catalog.models.families.base import FamilyAdapter, ForwardSpec, forward_spec_of, from_bridge, rotary_of

NAME = "gpt_neox"
MODEL_TYPES = ("gpt_neox",)
DESCRIPTION = "GPT-NeoX / Pythia"


def adapter(bridge) -> FamilyAdapter:
    hf = bridge.original_model
    return from_bridge(NAME, bridge, norm="LayerNorm",
                       parallel_attn_mlp=bool(getattr(hf.config, "use_parallel_residual", True)), rotary=rotary_of(hf))


def forward_spec(adapter: FamilyAdapter) -> ForwardSpec:
    """LayerNorm, rotary on rotary_pct of each head, parallel attention and MLP (use_parallel_residual),
    one MLP with the config's hidden_act (Pythia: exact GELU)."""
    return forward_spec_of(adapter, act=adapter.bridge.original_model.config.hidden_act, gated_mlp=False)
