"""Gemma-3 (text): as Gemma-2 without the softcap, plus QK-norm per head (an RMSNorm over each
head's query and key, gain 1 + weight), and local (sliding-window) and global layers with their
own rotary bases (docs/normed.md). Read: model_type 'gemma3_text' (Gemma3ForCausalLM); the
multimodal 'gemma3' checkpoints are not."""

from catalog.models.families.normed import NormedAdapter, normed_adapter, rotaries_by_layer_type

NAME = "gemma3"
MODEL_TYPES = ("gemma3_text",)
DESCRIPTION = "Gemma-3 (text)"
METHODS = ("sad",)


def adapter(bridge) -> NormedAdapter:
    return normed_adapter(NAME, bridge, gain_offset=1.0, qk_norm="head", post_norm=True,
                          rotaries=rotaries_by_layer_type(bridge.original_model))
