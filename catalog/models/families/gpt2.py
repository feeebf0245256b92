"""GPT-2, every size (small, medium, large, xl): learned absolute positions added to the residual
stream, LayerNorm, QK biases, one key head per query head. The QK form of a head does not
depend on positions: one bias-augmented SVD per head (SPEC.md)."""

from catalog.errors import CatalogError
from catalog.models.families.base import FamilyAdapter, ForwardSpec, forward_spec_of, from_bridge

NAME = "gpt2"
MODEL_TYPES = ("gpt2",)
DESCRIPTION = "GPT-2 (every size)"


def check_config(config: dict, display: str) -> None:
    """The variant check of `adapter`, from config.json before the weights are loaded."""
    if config.get("scale_attn_by_inverse_layer_idx", False) or not config.get("scale_attn_weights", True):
        raise CatalogError(f"{display} is a GPT-2 variant that scales attention scores per layer (or not at all); "
                           "the catalog reads GPT-2 models whose scores are divided by sqrt(d_head)")


def adapter(bridge) -> FamilyAdapter:
    config = bridge.original_model.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(config, "scale_attn_weights", True):
        # Every catalog score is hook_attn_scores times one scale per model.
        raise CatalogError("this GPT-2 variant scales attention scores per layer (or not at all); "
                           "the catalog reads GPT-2 models whose scores are divided by sqrt(d_head)")
    return from_bridge(NAME, bridge, norm="LayerNorm", parallel_attn_mlp=False, rotary=None)


def forward_spec(adapter: FamilyAdapter) -> ForwardSpec:
    """LayerNorm, learned positions, one MLP with GPT-2's tanh GELU (its config's activation_function)."""
    act = getattr(adapter.bridge.original_model.config, "activation_function", "gelu_new")
    return forward_spec_of(adapter, act=act, gated_mlp=False)
