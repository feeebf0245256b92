"""Per-head weights of ACC++ (ACCPP.md section 1), computed once per model.

Omega = W_Q W_K^T (no bias augmentation) has rank d_head, so its SVD comes from the factors
(thin QR of each, then the SVD of the small core), batched over every head in float64, as in
catalog.methods.shared.svd. The biases enter as additive d_model vectors, the "AH offset":
c_d = b_Q W_Q^+ and c_s = b_K W_K^+, so that q_t = (x_t + c_d) W_Q and k_t = (x_t + c_s) W_K.
No sign convention is needed: every ACC++ quantity uses u_k and v_k in pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from catalog.methods.shared.svd import thin_qr


@dataclass
class AccppWeights:
    U: torch.Tensor  # [layer, head, d_model, sv] query-side singular vectors u_k
    S: torch.Tensor  # [layer, head, sv] singular values, descending
    V: torch.Tensor  # [layer, head, d_model, sv] key-side singular vectors v_k
    c_d: torch.Tensor  # [layer, head, d_model] query bias offset b_Q W_Q^+
    c_s: torch.Tensor  # [layer, head, d_model] key bias offset b_K W_K^+
    _through: dict = field(default_factory=dict, repr=False)  # (layer, head) -> W_O U, W_O V

    def through_output(self, W_O: torch.Tensor, layer: int, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W_O[l', h'] U[layer, h] and W_O[l', h'] V[layer, h] for every upstream head l' < layer:
        [heads, layer * H, d_head, d_head] each. A head slice projects on u_k as v (W_O u_k), and
        d_head is far smaller than d_model; cached, since the weights never change within a run."""
        for head in heads.tolist():
            if (layer, head) not in self._through:
                upstream = W_O[:layer].flatten(0, 1)  # [layer * H, d_head, d_model]
                self._through[(layer, head)] = (upstream @ self.U[layer, head], upstream @ self.V[layer, head])
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


def accpp_weights(W_Q, b_Q, W_K, b_K) -> AccppWeights:
    """The SVD of every head's Omega and its bias offsets, stored as float32."""
    U, S, V = plain_svd(W_Q, W_K)
    c_d, c_s = bias_offset(W_Q, b_Q), bias_offset(W_K, b_K)
    return AccppWeights(U=U.float(), S=S.float(), V=V.float(), c_d=c_d.float(), c_s=c_s.float())
