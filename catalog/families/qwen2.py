"""Qwen2 and Qwen2.5: as Llama (rotary on every dim, RMSNorm, grouped-query attention) plus
biases on the query and key projections, often large; the bias-augmented factors carry them
through the rotation (they are added before it)."""

from catalog.families.base import FamilyAdapter, rotary_of, score_scale_of

NAME = "qwen2"
MODEL_TYPES = ("qwen2",)
DESCRIPTION = "Qwen2 / Qwen2.5"


def adapter(bridge) -> FamilyAdapter:
    cfg, hf = bridge.cfg, bridge.original_model
    return FamilyAdapter(
        family=NAME, bridge=bridge, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_key_value_heads or cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
        norm="RMSNorm", parallel_attn_mlp=False, score_scale=score_scale_of(hf, cfg.d_head), rotary=rotary_of(hf),
    )
