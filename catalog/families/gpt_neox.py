"""GPT-NeoX and Pythia: rotary position embedding on the first rotary_pct of each head's dims
(Pythia: a quarter), QK biases, LayerNorm, and (with use_parallel_residual) attention and MLP
reading the same residual stream. The QK form depends on the offset between destination and
source (docs/rotary.md)."""

from catalog.families.base import FamilyAdapter, rotary_of, score_scale_of

NAME = "gpt_neox"
MODEL_TYPES = ("gpt_neox",)
DESCRIPTION = "GPT-NeoX / Pythia"


def adapter(bridge) -> FamilyAdapter:
    cfg, hf = bridge.cfg, bridge.original_model
    return FamilyAdapter(
        family=NAME, bridge=bridge, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
        d_model=cfg.d_model, d_head=cfg.d_head, norm="LayerNorm",
        parallel_attn_mlp=bool(getattr(hf.config, "use_parallel_residual", True)),
        score_scale=score_scale_of(hf, cfg.d_head), rotary=rotary_of(hf),
    )
