"""What a model family tells the method: the adapter interface and the parts families share.

The method modules (decompose, rotary, signals, edges, batch) read a model only through a
FamilyAdapter: each head's query and key factors with their biases (key heads expanded to the
query heads that share them), how positions enter the QK form (learned: not at all; rotary: a
rotation between the factors), the scale between the score and `hook_attn_scores`, the hooks
the method caches, and the upstream components (every head of an earlier layer, as z W_O).
A family module states only what differs; the weights themselves come from TransformerLens's
bridge in compatibility mode, which has already folded the normalisation into W_Q and W_K.
"""

from __future__ import annotations

from dataclasses import dataclass

# Activations the 2024 method reads (SPEC.md, "Model and activations"), for every family: the
# normalised residual each head reads, its scale, the scores and pattern, and every head's z.
HOOK_SUFFIXES = (
    "ln1.hook_normalized",
    "ln1.hook_scale",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
)


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding as the model applies it (the rotate-half convention of GPT-NeoX,
    Llama and Qwen2): dims p and p + rotary_dim/2 of a head turn together by angle pos * inv_freq[p];
    dims from rotary_dim on are left alone; `magnitude` multiplies every rotated q.k term (the
    square of the embedding's attention scaling, 1 for the default rotation)."""

    inv_freq: tuple[float, ...]   # [rotary_dim / 2], as the model computes them (float32)
    base: float | None = None     # the config's theta (inv_freq[p] = base ** (-2p / rotary_dim) by default)
    magnitude: float = 1.0
    # Rope variants that switch frequencies with the sequence length (transformers' 'dynamic' and
    # 'longrope') keep the ones read here up to this many positions; None: at every length.
    fixed_up_to: int | None = None
    rope_type: str = "default"

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)


@dataclass
class FamilyAdapter:
    """One model family's answers to the method's questions, for one loaded model."""

    family: str                 # 'gpt2' | 'gpt_neox' | 'llama' | 'qwen2'
    bridge: object              # the TransformerBridge, in compatibility mode
    n_layers: int
    n_heads: int
    n_kv_heads: int             # < n_heads: grouped-query attention
    d_model: int
    d_head: int
    norm: str                   # 'LayerNorm' | 'RMSNorm'
    parallel_attn_mlp: bool     # attention and MLP read the same residual stream
    score_scale: float          # hook_attn_scores = score / score_scale
    rotary: Rotary | None       # None: learned positions, one position-free QK form per head
    hooks: tuple[str, ...] = HOOK_SUFFIXES

    @property
    def pos_encoding(self) -> str:
        return "rotary" if self.rotary is not None else "learned"

    def qk_factors(self):
        """W_Q, b_Q, W_K, b_K per query head: [layer, head, d_model, d_head] and [layer, head, d_head].

        A model without QK biases gets zeros; the key factors of grouped-query attention are
        repeated for every query head of their group (head h reads key head h // (n_heads / n_kv_heads))."""
        import torch

        b = self.bridge
        W_Q, W_K = b.W_Q.detach(), b.W_K.detach()
        b_Q, b_K = _bias(b, "b_Q", W_Q), _bias(b, "b_K", W_K)
        if self.n_kv_heads != self.n_heads:
            group = torch.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)
            W_K, b_K = W_K[:, group], b_K[:, group]
        return W_Q, b_Q, W_K, b_K

    def W_O(self):
        """[layer, head, d_head, d_model]: head (l', h') writes z W_O into the residual stream."""
        return self.bridge.W_O.detach()

    def upstream_heads(self, layer: int) -> int:
        """How many heads are upstream of `layer` (layer-major): every head of an earlier layer.
        With parallel attention and MLP (GPT-NeoX) the attention of a layer reads the residual
        before that layer's own MLP, so the upstream heads are still exactly those of earlier layers."""
        return layer * self.n_heads

    def record(self) -> dict:
        """The model_families row (without model_id)."""
        return {"family": self.family, "pos_encoding": self.pos_encoding,
                "rotary_dim": self.rotary.rotary_dim if self.rotary else None,
                "rotary_base": self.rotary.base if self.rotary else None, "n_kv_heads": self.n_kv_heads,
                "norm": self.norm, "parallel_attn_mlp": self.parallel_attn_mlp, "score_scale": self.score_scale}


def from_bridge(family: str, bridge, norm: str, parallel_attn_mlp: bool, rotary: Rotary | None) -> FamilyAdapter:
    """The adapter of a loaded bridge: sizes from its config, the score scale from its attention modules."""
    cfg = bridge.cfg
    return FamilyAdapter(
        family=family, bridge=bridge, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads, d_model=cfg.d_model,
        d_head=cfg.d_head, norm=norm, parallel_attn_mlp=parallel_attn_mlp,
        score_scale=score_scale_of(bridge.original_model, cfg.d_head), rotary=rotary,
    )


def parameter_or_none(bridge, name: str):
    """A stacked parameter of the bridge (b_Q, b_O, ...), or None where the model has none."""
    try:
        value = getattr(bridge, name)
    except Exception:  # the bridge raises for bias-free projections rather than returning None
        return None
    return None if value is None else value.detach()


def _bias(bridge, name: str, weight):
    """The stacked QK bias [layer, head, d_head], zeros where the projection has none."""
    import torch

    bias = parameter_or_none(bridge, name)
    if bias is None:
        return torch.zeros(weight.shape[:2] + weight.shape[3:], dtype=weight.dtype, device=weight.device)
    return bias


def rotary_of(hf_model) -> Rotary:
    """The rotation of a Hugging Face model, from its rotary embedding module's own frequencies
    (so every rope variant that only changes inv_freq, e.g. Llama 3's, is read right).

    Variants whose frequencies change with the sequence length recompute them in the forward pass
    of a long sequence; the module's `original_inv_freq` are those of sequences up to
    `fixed_up_to` positions, which is what is read (a longer prompt is refused: `token_limit`)."""
    for _, module in hf_model.named_modules():
        inv_freq = getattr(module, "original_inv_freq", None)
        inv_freq = inv_freq if inv_freq is not None else getattr(module, "inv_freq", None)
        if inv_freq is not None:
            scaling = float(getattr(module, "attention_scaling", 1.0) or 1.0)
            config = hf_model.config
            parameters = getattr(config, "rope_parameters", None) or {}
            theta = parameters.get("rope_theta") or getattr(config, "rope_theta", None) or getattr(
                config, "rotary_emb_base", None)
            rope_type = str(getattr(module, "rope_type", None) or parameters.get("rope_type") or "default")
            fixed_up_to = None
            if rope_type in ("dynamic", "longrope"):
                fixed_up_to = int(parameters.get("original_max_position_embeddings")
                                  or getattr(module, "original_max_seq_len", None) or config.max_position_embeddings)
            return Rotary(inv_freq=tuple(float(f) for f in inv_freq.double().cpu()),
                          base=float(theta) if theta else None, magnitude=scaling**2,
                          fixed_up_to=fixed_up_to, rope_type=rope_type)
    raise ValueError("no rotary embedding module (with inv_freq) in this model")


def token_limit(n_ctx: int, rotary: Rotary | None) -> tuple[int, str]:
    """The most tokens a prompt may have for this model, and what sets that limit (for the error)."""
    if rotary is not None and rotary.fixed_up_to is not None and rotary.fixed_up_to < n_ctx:
        return rotary.fixed_up_to, (f"up to which this model's rotary frequencies (rope_type '{rotary.rope_type}') "
                                    "stay fixed; the catalog does not read the ones of longer sequences yet")
    return n_ctx, "the model takes"


def score_scale_of(hf_model, d_head: int) -> float:
    """1 / the attention modules' `scaling` (softmax(q.k * scaling)), else sqrt(d_head)."""
    for _, module in hf_model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, float) and scaling > 0:
            return 1.0 / scaling
    return float(d_head) ** 0.5


# -- What the method asks of every family beyond its QK factors (defaults: the pre-norm families
# above, whose normalisation is folded into W_Q and W_K; catalog.models.families.normed overrides
# them for QK-norm, post-norm, softcapped and sliding-window families, docs/normed.md). Added as
# functions of the adapter so that the families above need nothing new.

def residual_in(adapter, cache, layer: int):
    """(x, scale): the normalised residual head inputs read [prompt, pos, d_model] and the norm's
    per-token scale [prompt, pos] (x = residual / scale)."""
    read = getattr(adapter, "read_residual", None)
    if read is not None:
        return read(cache, layer)
    return cache[f"blocks.{layer}.ln1.hook_normalized"], cache[f"blocks.{layer}.ln1.hook_scale"][..., 0]


def qk_scales(adapter, cache, layer: int):
    """(r_Q, r_K) [prompt, pos, head] (per query head): each token's QK-norm divisor, or None for a
    family without QK-norm."""
    read = getattr(adapter, "read_qk_scales", None)
    return read(cache, layer) if read is not None else None


def head_z(adapter, cache, layer: int):
    """What multiplies W_O to give a head's write into the residual stream [prompt, pos, head, d_head]:
    hook_z, divided by the post-attention norm's per-token scale where the family has one."""
    read = getattr(adapter, "read_head_z", None)
    return read(cache, layer) if read is not None else cache[f"blocks.{layer}.attn.hook_z"]


def attention_logits(adapter, cache, layer: int):
    """[prompt, head, dest, src]: the model's attention logits before any softcap (= score / score_scale)."""
    read = getattr(adapter, "read_attention_logits", None)
    return read(cache, layer) if read is not None else cache[f"blocks.{layer}.attn.hook_attn_scores"]


def layer_window(adapter, layer: int) -> int | None:
    """The layer's sliding window (a source j is seen from i only when i - j < window), or None."""
    windows = getattr(adapter, "windows", None)
    return windows[layer] if windows else None


def layer_rotary(adapter, layer: int) -> Rotary | None:
    """The rotation of `layer` (Gemma-3: its own base per layer type), else the model's one."""
    rotaries = getattr(adapter, "rotaries", None)
    return rotaries[layer] if rotaries else adapter.rotary


def methods_read(family) -> tuple[str, ...] | None:
    """The methods a family module reads (its METHODS), or None: every method."""
    return getattr(family, "METHODS", None)


# -- what an incremental forward pass of the family needs (catalog.interventions.forward) -----------

ACTIVATIONS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "silu")


@dataclass(frozen=True)
class ForwardSpec:
    """How a family's block computes, beyond the processed weights (LayerNorm / RMSNorm weights
    already folded into the matrices that read the residual stream). Interventions replay the
    model with these; a family module without `forward_spec` cannot be intervened on."""

    norm: str                   # 'LN': centre and scale (LNPre) | 'RMS': scale only (RMSPre)
    act: str                    # one of ACTIVATIONS
    gated_mlp: bool             # act(x W_gate) * (x W_in), then W_out (Llama, Qwen2)
    parallel_attn_mlp: bool     # the MLP reads the residual before the layer's attention (GPT-NeoX)
    rotary: Rotary | None       # None: learned positions added to the embedding (W_pos)
    n_kv_heads: int             # key/value heads; query head h reads key head h // (n_heads / n_kv_heads)
    score_scale: float          # softmax(q.k / score_scale)
    eps: float                  # of every norm of the model


def forward_spec_of(adapter: FamilyAdapter, act: str, gated_mlp: bool) -> ForwardSpec:
    """The ForwardSpec of a loaded model: what the adapter already says, plus the MLP's kind."""
    if act not in ACTIVATIONS:
        from catalog.errors import CatalogError

        raise CatalogError(f"interventions do not compute the activation '{act}' of this {adapter.family} "
                           f"model (they compute {', '.join(ACTIVATIONS)})")
    norm = "RMS" if adapter.norm == "RMSNorm" else "LN"
    return ForwardSpec(norm=norm, act=act, gated_mlp=gated_mlp, parallel_attn_mlp=adapter.parallel_attn_mlp,
                       rotary=adapter.rotary, n_kv_heads=adapter.n_kv_heads, score_scale=adapter.score_scale,
                       eps=float(getattr(adapter.bridge.cfg, "eps", 1e-5)))
