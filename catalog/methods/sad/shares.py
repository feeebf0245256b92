"""What each kind of component carries of a firing side's sparse signal (table `side_shares`).

The 2024 method's edges are upstream heads only, by design; on a trained model heads can carry a
minority of a side (the MLPs carry the rest), and a reader of the edges should be told. For a
firing with sparse signal K and weighted directions w_k = s_k sqrt(sigma_k) (SPEC.md's u'_k and
v'_k, s_k = sign(x~_i . u_k)), a side's signal projection is

    query side:  P = sum_{k in K} w_k (x~_i . u_k)        key side:  P = sum_{k in K} w_k (v_k . x~_j)

The normalised residual of the token is its residual stream over the norm's scale, and the
residual stream is a sum of components (every family's normalisation is folded into the QK
weights, and writing weights are centred where the norm centres), so P splits exactly into

    head       every upstream head's z W_O
    mlp        every upstream MLP's output
    attn_bias  every upstream attention-output bias b_O
    embed      the embedding (token, and position for learned positions)
    offset     the bias row of Omega~ (the constant 1 appended to x~)

each (component . direction) / scale, the offset without a scale. The parts sum to P to float32
precision (tests hold it); a share is a part over P, so the shares of a side sum to one. A part
can be negative (a kind that writes against the signal), so a share can lie outside [0, 1].
"""

from __future__ import annotations

import torch

from catalog.methods.sad.forms import LayerForms
from catalog.methods.sad.signals import Firings, SparseSignals

KINDS = ("head", "mlp", "attn_bias", "embed", "offset")
# Activations the parts need beside the 2024 method's own (blocks.0.hook_resid_pre is the embedding).
HOOKS = ("hook_resid_pre", "hook_mlp_out")
RESIDUAL_KINDS = KINDS[:-1]  # the kinds that are written into the residual stream


def signal_weights(firings: Firings, signals: SparseSignals, forms: LayerForms) -> torch.Tensor:
    """w_k = s_k sqrt(sigma_k) on the signal's directions and 0 elsewhere, [firing, sv]."""
    in_signal = torch.zeros_like(signals.dest_proj, dtype=torch.bool)
    in_signal.scatter_(1, signals.order, signals.selected())
    sign = torch.sign(signals.dest_proj)
    return torch.where(in_signal, sign * torch.sqrt(forms.sigma[firings.form]), torch.zeros_like(sign))


def side_parts(side: str, firings: Firings, weights: torch.Tensor, forms: LayerForms,
               residual: dict[str, torch.Tensor], scale: torch.Tensor, qk_scale=None) -> torch.Tensor:
    """Each kind's part of one side's signal projection, [firing, len(KINDS)] in KINDS order.

    weights: `signal_weights` of the firings (the same for both sides); residual: for each of RESIDUAL_KINDS, the sum of that kind's upstream outputs [prompt, pos,
    d_model] (the components written before this layer); scale: this layer's ln1.hook_scale
    [prompt, pos]. Vectorised as `LayerForms.projections` is: every token on every head's basis,
    then one small product per firing."""
    basis = forms.basis_q if side == "query" else forms.basis_k   # [head, d_model + 1, r]
    core = forms.core_q if side == "query" else forms.core_k
    if core is not None:                                          # u_k = basis @ core[:, k]
        weights = torch.bmm(core[firings.form], weights.unsqueeze(-1)).squeeze(-1)
    head = forms.head[firings.form]
    token = firings.dest if side == "query" else firings.src
    token_scale = scale[firings.prompt, token]
    # QK-norm (docs/normed.md): the form reads x~ / r, so every part, the appended 1's too, is over r.
    qk = qk_scale[firings.prompt, token, firings.head].float() if qk_scale is not None else 1.0
    token_scale = token_scale * qk
    parts = []
    for kind in RESIDUAL_KINDS:
        on_basis = torch.einsum("bpd,hdr->bphr", residual[kind].float(), basis[:, :-1])
        parts.append((on_basis[firings.prompt, token, head] * weights).sum(-1) / token_scale)
    parts.append((basis[:, -1][head] * weights).sum(-1) / qk)     # the appended 1 of x~
    return torch.stack(parts, dim=1)


def signal_projection(side: str, signals: SparseSignals, weights: torch.Tensor) -> torch.Tensor:
    """P of each firing [firing] from the normalised residual itself (what the parts sum to), given
    the firings' `signal_weights`."""
    proj = signals.dest_proj if side == "query" else signals.src_proj
    return (weights * proj).sum(-1)


def residual_by_kind(cache, n_layers: int, head_outputs: torch.Tensor | None, n_heads: int,
                     b_O: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """For each layer L, the sum of each kind's outputs written before it, [prompt, pos, d_model].

    head_outputs: every head's z W_O [prompt, pos, layer * n_heads, d_model] (layer-major) of the
    layers before the last; the MLP outputs and the embedding (blocks.0.hook_resid_pre) come from
    the cache. Running sums over layers, so each layer costs one addition per kind."""
    embed = cache["blocks.0.hook_resid_pre"].float()
    zero = torch.zeros_like(embed)
    sums = {"head": zero, "mlp": zero, "attn_bias": zero, "embed": embed}
    by_layer = []
    for layer in range(n_layers):
        by_layer.append(dict(sums))
        if layer == n_layers - 1:
            break
        heads = head_outputs[:, :, layer * n_heads:(layer + 1) * n_heads].sum(2)
        sums = {"head": sums["head"] + heads,
                "mlp": sums["mlp"] + cache[f"blocks.{layer}.hook_mlp_out"].float(),
                "attn_bias": sums["attn_bias"] + b_O[layer].float().to(embed.device),
                "embed": embed}
    return by_layer
