"""Upstream contributions and traced edges (SPEC.md, "Upstream contributions (edges)").

For a firing of head (l, h) with sparse signal K, each k in K gets the weighted directions
u'_k = s_k sqrt(sigma_k) u_k and v'_k = s_k sqrt(sigma_k) v_k with s_k = sign(x~_i . u_k). The
term of upstream head (l', h') through direction k is

    key side:   (v'_k . o~_{l'h'}(j)) / scale_j        query side:   (o~_{l'h'}(i) . u'_k) / scale_i

with o~ = [z W_O ; 1] (the appended 1 is optional: `append_constant`). The edge weight is the
sum over k in K; an upstream head is an edge when it is among the heads that carry
edge_threshold of the side's total.

Vectorised over the firings of one layer and all its upstream heads: firings are grouped by
signal size into a few buckets so that the per-direction terms are one batched matmul per
bucket (padding every firing to the largest signal would cost up to 64x the work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catalog.methods.sad.forms import LayerForms
from catalog.methods.sad.signals import Firings, SparseSignals

SIDES = ("query", "key")
_BUCKET_EDGES = (1, 2, 4, 8, 16, 32, 64)  # signal sizes (a, b] share one padded matmul
_CHUNK_ELEMENTS = 2**25  # bound on the gathered upstream outputs per matmul (128 MB of float32)


@dataclass
class SideEdges:
    """One side's result for the firings of one layer."""

    terms: torch.Tensor  # [firing, upstream head, rank] per-direction terms (0 beyond n_svs)
    weight: torch.Tensor  # [firing, upstream head] edge weight of every upstream head
    is_edge: torch.Tensor  # [firing, upstream head] selected by the edge threshold


def upstream_outputs(z_by_layer: list[torch.Tensor], W_O: torch.Tensor) -> torch.Tensor:
    """o_{l'h'}(t) = z W_O for every head: [prompt, pos, layer * n_heads (layer-major), d_model]."""
    z = torch.stack(z_by_layer, dim=2)  # [prompt, pos, layer, head, d_head]
    o = torch.einsum("bplhe,lhed->bplhd", z, W_O[: z.shape[2]])
    return o.flatten(2, 3)


def select_edges(weight: torch.Tensor, edge_threshold: float) -> torch.Tensor:
    """Mask of the upstream heads that carry edge_threshold of each row's total.

    Sort descending, find the first position where the running sum exceeds edge_threshold times
    the sum of all weights, keep every head whose weight is >= the weight at that position.
    """
    ordered, _ = torch.sort(weight, dim=1, descending=True)
    passed = ordered.cumsum(dim=1) > edge_threshold * weight.sum(dim=1, keepdim=True)
    first = passed.to(torch.int8).argmax(dim=1, keepdim=True)
    cutoff = torch.gather(ordered, 1, first)
    return (weight >= cutoff) & passed.any(dim=1, keepdim=True)


def trace_side(
    side: str,
    firings: Firings,
    signals: SparseSignals,
    forms: LayerForms,
    outputs: torch.Tensor,
    scale: torch.Tensor,
    append_constant: bool,
    edge_threshold: float,
    qk_scale: torch.Tensor | None = None,
) -> SideEdges:
    """Edges of one side for the firings of one layer.

    forms: this layer's QK forms (firings.form indexes them); outputs: upstream_outputs
    restricted to the layers above this one [prompt, pos, n_up, d_model]; scale: this layer's
    ln1.hook_scale [prompt, pos]; qk_scale: the side's QK-norm divisor [prompt, pos, head] (r_Q on
    the query side, r_K on the key side) where the family has QK-norm: the token's vector the form
    reads is its residual over scale * qk_scale, so both divide every term (docs/normed.md).
    """
    n_firings, n_up, d_model = len(firings), outputs.shape[2], outputs.shape[3]
    max_svs = int(signals.n_svs.max()) if n_firings else 0
    terms = torch.zeros(n_firings, n_up, max_svs, device=outputs.device)
    token = firings.dest if side == "query" else firings.src
    divisor = scale[firings.prompt, token]  # [firing]: what every term of the firing's side is divided by
    if qk_scale is not None:
        divisor = divisor * qk_scale[firings.prompt, token, firings.head].to(divisor.dtype)
    for low, high in zip(_BUCKET_EDGES, _BUCKET_EDGES[1:] + (None,)):
        in_bucket = (signals.n_svs >= low) & ((signals.n_svs < high) if high else True)
        index = in_bucket.nonzero(as_tuple=True)[0]
        if len(index) == 0:
            continue
        width = int(signals.n_svs[index].max())
        chunk = max(1, _CHUNK_ELEMENTS // (n_up * d_model))
        for part in index.split(chunk):
            terms[part, :, :width] = _terms(part, width, side, firings, signals, forms, outputs, divisor[part],
                                            token, append_constant)
    weight = terms.sum(dim=2)
    return SideEdges(terms=terms, weight=weight, is_edge=select_edges(weight, edge_threshold))


def _terms(part, width, side, firings, signals, forms, outputs, divisor, token, append_constant):
    """Per-direction terms [firing, upstream head, rank] for some firings, padded to `width` ranks."""
    form = firings.form[part]
    sv = signals.order[part, :width]  # [f, rank]
    in_signal = torch.arange(width, device=sv.device).unsqueeze(0) < signals.n_svs[part].unsqueeze(1)
    sign = torch.sign(torch.gather(signals.dest_proj[part], 1, sv))
    magnitude = torch.sqrt(forms.sigma[form.unsqueeze(1), sv])
    directions = forms.directions(side, form, sv)  # [f, rank, d_model+1]
    directions = directions * (sign * magnitude * in_signal).unsqueeze(-1)
    upstream = outputs[firings.prompt[part], token[part]]  # [f, n_up, d_model]
    terms = torch.bmm(upstream, directions[..., :-1].transpose(1, 2))  # [f, n_up, rank]
    if append_constant:
        terms = terms + directions[..., -1].unsqueeze(1)
    return terms / divisor.view(-1, 1, 1)
