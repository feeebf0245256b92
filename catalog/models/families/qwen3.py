"""Qwen3 (dense): as Qwen2 without the QK biases, plus QK-norm per head (an RMSNorm over each
head's query and key, before the rotation); grouped-query attention (docs/normed.md)."""

from catalog.models.families.normed import NormedAdapter, normed_adapter

NAME = "qwen3"
MODEL_TYPES = ("qwen3",)
DESCRIPTION = "Qwen3"
METHODS = ("sad",)


def adapter(bridge) -> NormedAdapter:
    return normed_adapter(NAME, bridge, qk_norm="head")
