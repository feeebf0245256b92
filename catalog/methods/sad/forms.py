"""The QK forms the firings of one layer refer to: one per head, or one per (head, offset).

A firing of head h from destination i to source j is explained by the SVD of a bilinear form.
For learned-position models (GPT-2) that form is the head's Omega~, whatever i and j; for rotary
models it is Omega~(i - j) (docs/rotary.md). `LayerForms` holds the forms a layer's firings
need and the index of each firing's form, so that signals and edges never ask which kind a
model is. Every form's vectors are stored as basis @ core: basis [head, d_model+1, r] (Qa or Qb
of the head's thin QR, or U/V themselves with no core), core [form, r, r] (None: identity, one
form per head). Projecting a token on a form is then one [d_model+1, r] product per head and a
small r x r product per firing, instead of gathering a [d_model+1, r] matrix per firing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerForms:
    head: torch.Tensor                 # [form] the head of each form
    pos_offset: torch.Tensor | None    # [form] dest - src of each form (None: position-free)
    sigma: torch.Tensor                # [form, r] descending
    basis_q: torch.Tensor              # [head, d_model + 1, r] query-side basis
    basis_k: torch.Tensor              # [head, d_model + 1, r] key-side basis
    core_q: torch.Tensor | None = None  # [form, r, r]: U = basis_q[head] @ core_q (None: U = basis_q)
    core_k: torch.Tensor | None = None

    def projections(self, x_tilde: torch.Tensor, prompt, dest, src, form) -> tuple[torch.Tensor, torch.Tensor]:
        """x~_i . u_k and v_k . x~_j [firing, r] of firings (prompt, dest, src) with forms `form`.

        x_tilde: [prompt, pos, d_model + 1]."""
        head = self.head[form]
        on_q = torch.einsum("bpd,hdr->bphr", x_tilde, self.basis_q)  # every token on every head's basis
        on_k = torch.einsum("bpd,hdr->bphr", x_tilde, self.basis_k)
        dest_proj, src_proj = on_q[prompt, dest, head], on_k[prompt, src, head]
        if self.core_q is not None:
            dest_proj = torch.bmm(dest_proj.unsqueeze(1), self.core_q[form]).squeeze(1)
            src_proj = torch.bmm(src_proj.unsqueeze(1), self.core_k[form]).squeeze(1)
        return dest_proj, src_proj

    def directions(self, side: str, form: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
        """The singular vectors u_k (side 'query') or v_k ('key') [firing, rank, d_model + 1] of
        forms `form` [firing] and sv indices `sv` [firing, rank]."""
        basis = self.basis_q if side == "query" else self.basis_k
        core = self.core_q if side == "query" else self.core_k
        head = self.head[form]
        if core is None:
            return basis.transpose(1, 2)[head.unsqueeze(1), sv]
        columns = torch.gather(core[form], 2, sv.unsqueeze(1).expand(-1, core.shape[1], -1))  # [f, r, rank]
        return torch.bmm(basis[head], columns).transpose(1, 2)


def position_free(U: torch.Tensor, V: torch.Tensor, sigma: torch.Tensor) -> LayerForms:
    """One form per head (U, V [head, d_model+1, r], sigma [head, r]): GPT-2's Omega~."""
    return LayerForms(head=torch.arange(U.shape[0], device=U.device), pos_offset=None, sigma=sigma,
                      basis_q=U, basis_k=V)


class HeadForms:
    """QK forms of a learned-position model: one per head, from its stored decomposition
    (catalog.methods.shared.svd.Decomposition); nothing new to store as batches go."""

    def __init__(self, decomposition, device="cpu"):
        self.U, self.V = decomposition.U.to(device), decomposition.V.to(device)
        self.sigma = decomposition.sigma.to(device)

    def layer_forms(self, layer: int, head: torch.Tensor, pos_offset: torch.Tensor) -> tuple[LayerForms, torch.Tensor]:
        return position_free(self.U[layer], self.V[layer], self.sigma[layer]), head

    def take_new(self, firing_svs):
        return None  # every direction was stored with the model
