"""Every residual component's output, from one forward pass (ACCPP.md sections 0 and 2.1).

Component ids follow the reference library: 0..H-1 a head restricted to one source token,
H the MLP, H+1 the attention-output bias b_O, H+2 the embedding (token + position), H+3 the
downstream head's own bias offset. A head slice's output at position t is
A[t, tb] v(tb) W_O, so it is kept as the pattern and v W_O apart and multiplied only where
needed. The "dense" components (every MLP, every b_O, the embedding) are stacked on one axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Activations ACC++ reads, by hook name suffix (TransformerLens names, used verbatim).
HOOKS = (
    "hook_resid_pre",        # only blocks.0 is used: the embedding component
    "ln1.hook_normalized",
    "ln1.hook_scale",
    "attn.hook_pattern",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "hook_mlp_out",
    "ln_final.hook_normalized",
    "ln_final.hook_scale",
)

MLP, ATTN_BIAS, EMBED, OFFSET = "mlp", "attn_bias", "embed", "offset"


def component_kind(comp: int, n_heads: int) -> str:
    """'head' for 0..H-1, then mlp, attn_bias, embed, offset."""
    return "head" if comp < n_heads else (MLP, ATTN_BIAS, EMBED, OFFSET)[comp - n_heads]


@dataclass
class Residual:
    """The components of one batch of prompts; positions are padded to the longest prompt."""

    pattern: torch.Tensor      # [prompt, layer, head, dest, src]  hook_pattern of every layer
    v: torch.Tensor            # [prompt, src, layer, head, d_head]  hook_v of every head
    W_O: torch.Tensor          # [layer, head, d_head, d_model]; a head slice writes A[t, tb] v(tb) W_O
    dense: torch.Tensor        # [prompt, pos, 2 * n_layers + 1, d_model]  mlp_0.., b_O 0.., embedding
    normalized: torch.Tensor   # [prompt, layer, pos, d_model]  ln1.hook_normalized
    scale: torch.Tensor        # [prompt, layer, pos]  ln1.hook_scale
    attn_scores: torch.Tensor  # [prompt, layer, head, dest, src]  hook_attn_scores (scaled)
    final_normalized: torch.Tensor  # [prompt, pos, d_model]
    final_scale: torch.Tensor  # [prompt, pos]

    @property
    def n_layers(self) -> int:
        return self.pattern.shape[1]

    def dense_index(self, kind: str, layer: int) -> int:
        """Position of a dense component on the `dense` axis."""
        if kind == MLP:
            return layer
        if kind == ATTN_BIAS:
            return self.n_layers + layer
        return 2 * self.n_layers  # embedding

    def dense_upto(self, layer: int) -> torch.Tensor:
        """The dense components upstream of `layer`, [prompt, pos, 2*layer + 1, d_model]: the MLPs
        0..layer-1, the b_O of layers 0..layer-1, the embedding."""
        L = self.n_layers
        return self.dense[:, :, list(range(layer)) + list(range(L, L + layer)) + [2 * L]]


def residual_components(cache, W_O: torch.Tensor, b_O: torch.Tensor) -> Residual:
    """Stack the cached activations of one forward pass into a Residual, in float32 whatever the
    model's dtype (as the 2024 method reads them: a bfloat16 model's activations, computed on)."""
    n_layers = W_O.shape[0]
    W_O, b_O = W_O.float(), b_O.float()
    per_layer = lambda name: torch.stack([cache[f"blocks.{l}.{name}"].float() for l in range(n_layers)], dim=1)
    pattern = per_layer("attn.hook_pattern")
    v = per_layer("attn.hook_v").transpose(1, 2)  # [prompt, pos, layer, head, d_head]
    if v.shape[3] != W_O.shape[1]:  # grouped-query attention: each value head serves its group of query heads
        v = v.repeat_interleave(W_O.shape[1] // v.shape[3], dim=3)
    mlp = per_layer("hook_mlp_out").transpose(1, 2)  # [prompt, pos, layer, d_model]
    n_prompts, n_pos = mlp.shape[:2]
    bias = b_O.view(1, 1, n_layers, -1).expand(n_prompts, n_pos, -1, -1)
    embed = cache["blocks.0.hook_resid_pre"].float().unsqueeze(2)
    return Residual(
        pattern=pattern, v=v, W_O=W_O, dense=torch.cat([mlp, bias, embed], dim=2),
        normalized=per_layer("ln1.hook_normalized"), scale=per_layer("ln1.hook_scale")[..., 0],
        attn_scores=per_layer("attn.hook_attn_scores"),
        final_normalized=cache["ln_final.hook_normalized"].float(),
        final_scale=cache["ln_final.hook_scale"][..., 0].float(),
    )
