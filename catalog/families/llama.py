"""Llama (2, 3, 3.1, ...): rotary position embedding on every dim of a head (Llama 3.1's
frequency scaling is read from the model's own inv_freq), RMSNorm, no biases, and grouped-query
attention where several query heads share one key head."""

from catalog.families.base import FamilyAdapter, rotary_of, score_scale_of

NAME = "llama"
MODEL_TYPES = ("llama",)
DESCRIPTION = "Llama"


def adapter(bridge) -> FamilyAdapter:
    cfg, hf = bridge.cfg, bridge.original_model
    return FamilyAdapter(
        family=NAME, bridge=bridge, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_key_value_heads or cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
        norm="RMSNorm", parallel_attn_mlp=False, score_scale=score_scale_of(hf, cfg.d_head), rotary=rotary_of(hf),
    )
