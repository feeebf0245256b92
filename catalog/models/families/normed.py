"""What Gemma-2, Gemma-3, Qwen3 and OLMo-2 share: norms the bridge does not fold, read from the
raw Hugging Face weights (docs/normed.md).

- QK-norm (Gemma-3, Qwen3: per head; OLMo-2: over the whole projection, all heads of a token at
  once) divides a token's query (key) by its own RMS r_Q(i) (r_K(j)) and multiplies by a fixed gain
  g_Q (g_K). The gains go inside the form, the per-token divisors outside it:

      score(i, j) = x~_i A M(i - j) B^T x~_j / (r_Q(i) r_K(j)),
      A = [diag(g_in) W_Q ; b_Q^T] diag(g_Q),   B = [diag(g_in) W_K ; b_K^T] diag(g_K)

  with g_in the gain of the norm before attention (ln1; Gemma's norms multiply by 1 + weight) and
  x the residual over ln1's scale (OLMo-2 has no norm before attention: x is the residual itself).
- Post-norms (Gemma-2, Gemma-3, OLMo-2) normalise the attention output before it is added: head h
  writes (z_h W_O_h) diag(g_post) / r_post(t), so W_O carries g_post and z is divided by r_post.
- Gemma-2's attention softcap c tanh(s / c) acts after the score: the score decomposed is the one
  before it (from the rotated q and k); the pattern, and so the firings, are the model's own.
- Sliding windows (Gemma-2, Gemma-3: alternate layers): a source i - j >= window is masked.
"""

from __future__ import annotations

from dataclasses import dataclass

from catalog.models.families.base import HOOK_SUFFIXES, FamilyAdapter, Rotary, rotary_of, score_scale_of

QK_NORM_HOOKS = ("attn.q_norm.hook_scale", "attn.k_norm.hook_scale")


@dataclass
class NormedAdapter(FamilyAdapter):
    """A FamilyAdapter whose QK factors and output weights come from the raw Hugging Face modules."""

    gain_offset: float = 0.0                # Gemma's RMSNorm multiplies by (1 + weight)
    pre_norm: bool = True                   # False: attention reads the raw residual (OLMo-2)
    qk_norm: str | None = None              # 'head' | 'projection' | None
    post_norm: bool = False                 # attention output normalised before it is added
    softcap: float | None = None            # attention-logit softcap c (Gemma-2)
    windows: tuple[int | None, ...] = ()    # per layer: sliding window, or None (global)
    rotaries: tuple[Rotary, ...] = ()       # per layer: its rotation

    def _layers(self):
        return self.bridge.original_model.model.layers

    def _gain(self, norm):
        return norm.weight.detach().cpu().double() + self.gain_offset  # weights are combined on the CPU

    def qk_factors(self):
        """W_Q, b_Q, W_K, b_K per query head with every gain inside (module docstring), float32."""
        import torch

        n, n_kv, d_head = self.n_heads, self.n_kv_heads, self.d_head
        W_Q, b_Q, W_K, b_K = [], [], [], []
        for layer in self._layers():
            attn = layer.self_attn
            g_in = self._gain(layer.input_layernorm) if self.pre_norm else torch.ones(self.d_model, dtype=torch.float64)
            for proj, norm, heads, Ws, bs in ((attn.q_proj, attn.q_norm if self.qk_norm else None, n, W_Q, b_Q),
                                              (attn.k_proj, attn.k_norm if self.qk_norm else None, n_kv, W_K, b_K)):
                W = proj.weight.detach().cpu().double().T * g_in.unsqueeze(1)     # [d_model, heads * d_head]
                b = (proj.bias.detach().cpu().double() if proj.bias is not None
                     else torch.zeros(W.shape[1], dtype=W.dtype))
                if norm is not None:
                    g = self._gain(norm)
                    g = g.repeat(heads) if g.numel() == d_head else g       # per head: one gain for every head
                    W, b = W * g, b * g
                Ws.append(W.view(self.d_model, heads, d_head).transpose(0, 1))
                bs.append(b.view(heads, d_head))
        W_Q, b_Q, W_K, b_K = (torch.stack(t).float() for t in (W_Q, b_Q, W_K, b_K))
        if n_kv != n:
            group = torch.arange(n) // (n // n_kv)
            W_K, b_K = W_K[:, group], b_K[:, group]
        device = self.bridge.W_Q.device
        return tuple(t.to(device) for t in (W_Q, b_Q, W_K, b_K))

    def W_O(self):
        """[layer, head, d_head, d_model]: o_proj per head, times the post-attention norm's gain."""
        W_O = self.bridge.W_O.detach()
        if not self.post_norm:
            return W_O
        import torch

        gains = torch.stack([self._gain(layer.post_attention_layernorm) for layer in self._layers()])
        return (W_O.double() * gains[:, None, None, :].to(W_O.device)).to(W_O.dtype)

    # -- the activations (catalog.models.families.base: residual_in, qk_scales, head_z, attention_logits)

    def read_residual(self, cache, layer: int):
        if self.pre_norm:
            return cache[f"blocks.{layer}.ln1.hook_normalized"], cache[f"blocks.{layer}.ln1.hook_scale"][..., 0]
        resid = cache[f"blocks.{layer}.hook_resid_pre"]
        return resid, resid.new_ones(resid.shape[:-1])

    def read_qk_scales(self, cache, layer: int):
        if not self.qk_norm:
            return None
        import torch

        scales = []
        for name, heads in (("q_norm", self.n_heads), ("k_norm", self.n_kv_heads)):
            r = cache[f"blocks.{layer}.attn.{name}.hook_scale"][..., 0]
            if self.qk_norm == "head":          # [prompt, head, pos] -> [prompt, pos, head]
                r = r.transpose(1, 2)
            else:                               # one divisor per token, shared by its heads
                r = r.unsqueeze(-1).expand(*r.shape, heads)
            if heads != self.n_heads:
                r = r[..., torch.arange(self.n_heads, device=r.device) // (self.n_heads // heads)]
            scales.append(r)
        return tuple(scales)

    def read_head_z(self, cache, layer: int):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        if not self.post_norm:
            return z
        return z / cache[f"blocks.{layer}.ln1_post.hook_scale"].unsqueeze(-1)  # [prompt, pos, 1, 1]

    def read_attention_logits(self, cache, layer: int):
        if self.softcap is None:
            return cache[f"blocks.{layer}.attn.hook_attn_scores"]
        import torch

        # The hook holds the capped logits; the score decomposed is the one before the cap.
        q, k = cache[f"blocks.{layer}.attn.hook_rot_q"], cache[f"blocks.{layer}.attn.hook_rot_k"]
        k = k[:, :, torch.arange(self.n_heads, device=k.device) // (self.n_heads // self.n_kv_heads)]
        return torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) / self.score_scale


def normed_adapter(family: str, bridge, *, gain_offset: float = 0.0, pre_norm: bool = True,
                   qk_norm: str | None = None, post_norm: bool = False, rotaries=None) -> NormedAdapter:
    """The adapter of a loaded bridge of one of these families, its settings from the HF config."""
    hf = bridge.original_model
    config = hf.config
    cfg = bridge.cfg
    n_layers = cfg.n_layers
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers
    window = getattr(config, "sliding_window", None)
    windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    rotaries = tuple(rotaries) if rotaries is not None else (rotary_of(hf),) * n_layers
    softcap = getattr(config, "attn_logit_softcapping", None)
    hooks = HOOK_SUFFIXES + ("hook_resid_pre",) + (QK_NORM_HOOKS if qk_norm else ()) \
        + (("ln1_post.hook_scale",) if post_norm else ()) + (("attn.hook_rot_q", "attn.hook_rot_k") if softcap else ())
    if not pre_norm:
        hooks = tuple(h for h in hooks if not h.startswith("ln1."))
    return NormedAdapter(
        family=family, bridge=bridge, n_layers=n_layers, n_heads=cfg.n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or cfg.n_heads, d_model=cfg.d_model,
        d_head=cfg.d_head, norm="RMSNorm", parallel_attn_mlp=False,
        score_scale=score_scale_of(hf, cfg.d_head), hooks=hooks,
        # model_families records the rotation of the global layers (the first one's)
        rotary=rotaries[layer_types.index("full_attention")] if "full_attention" in layer_types else rotaries[0],
        gain_offset=gain_offset, pre_norm=pre_norm, qk_norm=qk_norm, post_norm=post_norm,
        softcap=float(softcap) if softcap else None, windows=windows if any(windows) else (), rotaries=rotaries,
    )


def rotaries_by_layer_type(hf) -> tuple[Rotary, ...]:
    """Gemma-3's rotations: one per layer type (local layers' base and global layers' base), read
    from the rotary module's own `{layer_type}_original_inv_freq`, in layer order."""
    from catalog.errors import CatalogError

    config = hf.config
    kinds = getattr(config, "layer_types", None) or ()
    module = next((m for _, m in hf.named_modules() if any(hasattr(m, f"{t}_inv_freq") for t in kinds)), None)
    if module is None:  # transformers 4.x keeps two rotary modules and no layer types
        raise CatalogError("reading Gemma-3 needs the rotary module of transformers 5 (one frequency set "
                           "per layer type); upgrade transformers")
    parameters = getattr(config, "rope_parameters", None) or {}
    by_type = {}
    for kind in set(config.layer_types):
        inv_freq = getattr(module, f"{kind}_original_inv_freq", None)
        inv_freq = inv_freq if inv_freq is not None else getattr(module, f"{kind}_inv_freq")
        rope = parameters.get(kind, {}) if isinstance(parameters.get(kind), dict) else {}
        rope_type = str(rope.get("rope_type", "default"))
        if rope_type not in ("default", "linear"):
            raise CatalogError(f"this Gemma-3 model's {kind} layers use rope_type '{rope_type}'; the catalog "
                               "reads Gemma-3 models with the default or linear rotation")
        scaling = getattr(module, f"{kind}_attention_scaling", None) or 1.0
        by_type[kind] = Rotary(inv_freq=tuple(float(f) for f in inv_freq.double().cpu()),
                               base=float(rope["rope_theta"]) if rope.get("rope_theta") else None,
                               magnitude=float(scaling) ** 2, rope_type=rope_type)
    return tuple(by_type[kind] for kind in config.layer_types)
