"""An edge's weight split by the features of an attention-output SAE (docs/features.md).

A `head` edge of the 2024 method from upstream head (l', h') at token t, through the ranks k of
its edge_svs, has weight (docs/schema.md, `edge_svs`)

    sum_k w_k . o~(t) / scale_t,   w_k = s_k sqrt(sigma_k) d_k,   o~ = [z_{h'}(t) W_O^{h'} ; 1]

with d_k the direction u_k (query side) or v_k (key side). The SAE of layer l' writes the
layer's whole z at t as  z = sum_f a_f W_dec[f] + b_dec + e  (e: the reconstruction error);
head h' owns the slice h' of each row, so

    z_{h'} = sum_f a_f W_dec[f, h'] + b_dec[h'] + e[h'],

and the term of rank k splits exactly into a part per active feature f
(a_f W_dec[f, h'] W_O^{h'} . w_k[:d_model] / scale_t), the decoder bias's, the error's, and
the appended constant's (w_k[d_model] / scale_t; 0 without append_constant). Computed in
float64 from the float32 activations, so the parts of an edge add up to its weight to float64
precision of the recomputed activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catalog.features.sae import AttentionSae

_CHUNK = 512  # edges per einsum (bounds the gathered W_O slices: chunk x d_head x d_model float64)


@dataclass
class EdgeParts:
    feature: torch.Tensor       # [edge, A] active feature index, -1 past the edge's active features
    activation: torch.Tensor    # [edge, A] its activation a_f at the edge's token
    feature_part: torch.Tensor  # [edge, A, R] its part of the edge's term at each rank
    bias_part: torch.Tensor     # [edge, R] the decoder bias's
    error_part: torch.Tensor    # [edge, R] the reconstruction error's
    constant_part: torch.Tensor  # [edge, R] the appended constant's


def split_edges(sae: AttentionSae, z: torch.Tensor, up_head: torch.Tensor, W_O: torch.Tensor,
                directions: torch.Tensor, scale: torch.Tensor, append_constant: bool) -> EdgeParts:
    """Parts of E edges from one upstream layer.

    z [E, n_heads * d_head]: the layer's hook_z at each edge's token; up_head [E]; W_O
    [n_heads, d_head, d_model] of that layer; directions [E, R, d_model + 1]: s_k sqrt(sigma_k)
    d_k of each rank (zero past the edge's ranks); scale [E]: the downstream ln1 scale at the token.
    """
    n_heads, d_head, d_model = W_O.shape
    z = z.float()
    acts = sae.encode(z)  # the SAE's own arithmetic decides which features are active
    n_active = int((acts > 0).sum(dim=1).max()) if len(z) else 0
    top = torch.topk(acts, k=max(n_active, 0), dim=1)
    feature = torch.where(top.values > 0, top.indices, torch.full_like(top.indices, -1))
    activation = top.values.double()
    W_dec, b_dec = sae.W_dec.double(), sae.b_dec.double()
    z64 = z.double()
    error = z64 - (acts.double() @ W_dec + b_dec)
    columns = up_head.unsqueeze(1) * d_head + torch.arange(d_head, device=z.device)  # [E, d_head]
    weighted = directions.double() / scale.double().view(-1, 1, 1)
    parts = {"feature_part": [], "bias_part": [], "error_part": []}
    for chunk in torch.arange(len(z), device=z.device).split(_CHUNK):
        # Each rank's direction read back through the upstream head: [e, d_head, R].
        through = torch.einsum("ehd,erd->ehr", W_O[up_head[chunk]].double(), weighted[chunk, :, :d_model])
        rows = W_dec[feature[chunk].clamp_min(0).unsqueeze(-1), columns[chunk].unsqueeze(1)]  # [e, A, d_head]
        rows = rows * (activation[chunk] * (feature[chunk] >= 0)).unsqueeze(-1)
        parts["feature_part"].append(torch.einsum("eah,ehr->ear", rows, through))
        parts["bias_part"].append(torch.einsum("eh,ehr->er", b_dec[columns[chunk]], through))
        parts["error_part"].append(torch.einsum("eh,ehr->er", torch.gather(error[chunk], 1, columns[chunk]), through))
    R = directions.shape[1]
    joined = {name: torch.cat(found) if found else torch.zeros((0, n_active, R) if name == "feature_part" else (0, R),
                                                               dtype=torch.float64, device=z.device)
              for name, found in parts.items()}
    constant = weighted[:, :, d_model] if append_constant else torch.zeros_like(weighted[:, :, d_model])
    return EdgeParts(feature=feature, activation=activation, constant_part=constant, **joined)
