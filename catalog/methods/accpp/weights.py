"""Per-head weights of ACC++ (ACCPP.md section 1), computed once per model.

Omega = W_Q W_K^T (no bias augmentation) has rank d_head, so its SVD comes from the factors
(thin QR of each, then the SVD of the small core), batched over every head in float64, as in
catalog.methods.shared.svd. The biases enter as additive d_model vectors, the "AH offset":
c_d = b_Q W_Q^+ and c_s = b_K W_K^+, so that q_t = (x_t + c_d) W_Q and k_t = (x_t + c_s) W_K.
No sign convention is needed: every ACC++ quantity uses u_k and v_k in pairs.

Rotary models (ACCPP.md section 6) keep the same position-free SVD, but a component y at
position t is projected through the rotated query or key space: on the query side
rot_t(y W_Q) (W_Q^+ U), on the key side rot_t(y W_K) (W_K^+ V). Without the rotation these are
y U and y V exactly (U and V lie in the column spaces of W_Q and W_K), so the decomposition
reads every family the same way: `read_q` / `read_k` take y into a head's r-dimensional space
(U and V themselves for learned positions, W_Q and W_K for rotary ones), the rotation acts
there, and `back_q` / `back_k` (W_Q^+ U and W_K^+ V, None without a rotation) give the
singular coordinates. The offsets rotate with the queries and keys: c_d W_Q = b_Q.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from catalog.methods.shared.svd import thin_qr
from catalog.models.families.base import Rotary


@dataclass
class AccppWeights:
    U: torch.Tensor  # [layer, head, d_model, sv] query-side singular vectors u_k
    S: torch.Tensor  # [layer, head, sv] singular values, descending
    V: torch.Tensor  # [layer, head, d_model, sv] key-side singular vectors v_k
    c_d: torch.Tensor  # [layer, head, d_model] query bias offset b_Q W_Q^+
    c_s: torch.Tensor  # [layer, head, d_model] key bias offset b_K W_K^+
    rotary: Rotary | None = None
    read_q: torch.Tensor | None = None  # [layer, head, d_model, r]: U, or W_Q for a rotary model
    read_k: torch.Tensor | None = None  # [layer, head, d_model, r]: V, or W_K
    back_q: torch.Tensor | None = None  # [layer, head, r, r]: W_Q^+ U (rotary models only)
    back_k: torch.Tensor | None = None  # [layer, head, r, r]: W_K^+ V
    offset_q: torch.Tensor | None = None  # [layer, head, r]: c_d read into that space (c_d U, or b_Q)
    offset_k: torch.Tensor | None = None  # [layer, head, r]: c_s V, or b_K
    _through: dict = field(default_factory=dict, repr=False)  # (layer, head) -> W_O U, W_O V

    def through_output(self, W_O: torch.Tensor, layer: int, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W_O[l', h'] read_q[layer, h] and W_O[l', h'] read_k[layer, h] (read_q = U, read_k = V
        without a rotation) for every upstream head l' < layer: [heads, layer * H, d_head, d_head]
        each. A head slice projects on u_k as v (W_O u_k), and d_head is far smaller than d_model;
        cached, since the weights never change within a run."""
        for head in heads.tolist():
            if (layer, head) not in self._through:
                upstream = W_O[:layer].flatten(0, 1)  # [layer * H, d_head, d_model]
                self._through[(layer, head)] = (upstream @ self.read_q[layer, head],
                                                upstream @ self.read_k[layer, head])
        pairs = [self._through[(layer, head)] for head in heads.tolist()]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def plain_svd(W_Q: torch.Tensor, W_K: torch.Tensor):
    """U, S, V of W_Q W_K^T for every head ([layer, head, d_model, d_head] factors), float64."""
    Qa, Ra = thin_qr(W_Q.double())
    Qb, Rb = thin_qr(W_K.double())
    core_U, S, core_Vh = torch.linalg.svd(Ra @ Rb.transpose(-1, -2))
    return Qa @ core_U, S, Qb @ core_Vh.transpose(-1, -2)


def bias_offset(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """b W^+ for full-column-rank W [.., d_model, d_head]: W^+ = (W^T W)^-1 W^T (float64)."""
    W = W.double()
    coef = torch.linalg.solve(W.transpose(-1, -2) @ W, b.double().unsqueeze(-1))  # (W^T W)^-1 b
    return (W @ coef).squeeze(-1)


def pinv_times(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """W^+ X for full-column-rank W [.., d_model, r] and X [.., d_model, k]: (W^T W)^-1 W^T X (float64)."""
    W = W.double()
    return torch.linalg.solve(W.transpose(-1, -2) @ W, W.transpose(-1, -2) @ X.double())


def accpp_weights(W_Q, b_Q, W_K, b_K, rotary: Rotary | None = None) -> AccppWeights:
    """The SVD of every head's Omega and its bias offsets, stored as float32; with a rotary
    model's rotation, also the maps through its rotated query and key spaces."""
    U, S, V = plain_svd(W_Q, W_K)
    c_d, c_s = bias_offset(W_Q, b_Q), bias_offset(W_K, b_K)
    weights = AccppWeights(U=U.float(), S=S.float(), V=V.float(), c_d=c_d.float(), c_s=c_s.float(), rotary=rotary)
    if rotary is None:
        weights.read_q, weights.read_k = weights.U, weights.V
        weights.offset_q = torch.einsum("lhd,lhdk->lhk", weights.c_d, weights.U)
        weights.offset_k = torch.einsum("lhd,lhdk->lhk", weights.c_s, weights.V)
    else:
        weights.read_q, weights.read_k = W_Q.float(), W_K.float()
        weights.back_q, weights.back_k = pinv_times(W_Q, U).float(), pinv_times(W_K, V).float()
        weights.offset_q, weights.offset_k = b_Q.float(), b_K.float()
    return weights
