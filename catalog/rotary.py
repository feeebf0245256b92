"""Per-offset SVDs of rotary models' QK forms, from the factors (docs/rotary.md).

With rotary embeddings the score of head h from destination i to source j is

    s(i, j) = x~_i A R(i)^T R(j) B^T x~_j = x~_i A M(i - j) B^T x~_j,   M(d) = R(-d) = R(d)^T

with A = [W_Q; b_Q^T], B = [W_K; b_K^T] (the biases are added before the rotation, so they rotate
with the rest) and R(t) the rotation of position t. So each offset d = i - j has its own form
Omega~(d) = A M(d) B^T. Its SVD comes from the thin QRs A = Qa Ra, B = Qb Rb, taken once per head:
Ra M(d) Rb^T = Uc diag(sigma) Vc^T (d_head x d_head), U = Qa Uc, V = Qb Vc. Forms are computed
only for the (head, offset) pairs that occur in firings, cached for the whole run, and the ones
first needed by a batch are returned with it to be stored (singular_vectors.pos_offset).
"""

from __future__ import annotations

import torch

from catalog.decompose import augmented_factors, thin_qr
from catalog.families.base import Rotary
from catalog.forms import LayerForms


def rotation(rotary: Rotary, offsets: torch.Tensor, d_head: int) -> torch.Tensor:
    """M(d) [offset, d_head, d_head] (float64) such that q_i . k_j (both rotated) = q^T M(i - j) k.

    Dims p and p + h (h = rotary_dim / 2) turn by angle t * inv_freq[p]; M(d) turns them by -d."""
    half = len(rotary.inv_freq)
    angle = offsets.double().unsqueeze(1) * torch.tensor(rotary.inv_freq, dtype=torch.float64)  # [offset, half]
    cos, sin = torch.cos(angle), torch.sin(angle)
    M = torch.eye(d_head, dtype=torch.float64).repeat(len(offsets), 1, 1)
    p = torch.arange(half)
    M[:, p, p], M[:, p + half, p + half] = cos, cos
    M[:, p, p + half], M[:, p + half, p] = sin, -sin
    M[:, : 2 * half, : 2 * half] *= rotary.magnitude
    return M


def sign_fixed(U: torch.Tensor, *others: torch.Tensor):
    """Flip (u_k, v_k) so that the largest-magnitude entry of each u_k is positive (as decompose.py)."""
    pivot = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(U, -2, pivot))
    sign[sign == 0] = 1.0
    return (U * sign, *(M * sign for M in others))


class RotaryForms:
    """Every head's factors and the per-offset forms computed so far, for one model and run."""

    def __init__(self, W_Q, b_Q, W_K, b_K, rotary: Rotary, device="cpu"):
        # The factors and the small SVDs stay on the CPU in float64; what the batches use moves to `device`.
        W_Q, b_Q, W_K, b_K = (t.detach().cpu().double() for t in (W_Q, b_Q, W_K, b_K))
        A, B = augmented_factors(W_Q, b_Q, W_K, b_K)
        self.Qa, self.Ra = thin_qr(A)  # [layer, head, d+1, r], [layer, head, r, r]
        self.Qb, self.Rb = thin_qr(B)
        self.rotary, self.d_head = rotary, W_Q.shape[-1]
        self.device = device
        self.basis_q, self.basis_k = self.Qa.float().to(device), self.Qb.float().to(device)
        # (layer, head, offset) -> (sigma [r], core_q [r, r], core_k [r, r]) float32
        self.cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.new: list[tuple[int, int, int]] = []  # computed since the last take_new()

    def layer_forms(self, layer: int, head: torch.Tensor, pos_offset: torch.Tensor) -> tuple[LayerForms, torch.Tensor]:
        """The forms of firings (head, pos_offset) of `layer`, and each firing's form index."""
        n_heads = self.Qa.shape[1]
        pairs, form = torch.unique(pos_offset.long() * n_heads + head.long(), return_inverse=True)
        pairs = pairs.cpu()
        form_head, form_offset = pairs % n_heads, pairs // n_heads
        missing = [(int(h), int(d)) for h, d in zip(form_head, form_offset) if (layer, int(h), int(d)) not in self.cache]
        if missing:
            self._compute(layer, missing)
        parts = [self.cache[(layer, int(h), int(d))] for h, d in zip(form_head, form_offset)]
        empty = torch.zeros(0, self.d_head, self.d_head)
        stacked = lambda i, none: (torch.stack([p[i] for p in parts]) if parts else none).to(self.device)
        forms = LayerForms(
            head=form_head.to(self.device), pos_offset=form_offset.to(self.device),
            sigma=stacked(0, torch.zeros(0, self.d_head)), basis_q=self.basis_q[layer], basis_k=self.basis_k[layer],
            core_q=stacked(1, empty), core_k=stacked(2, empty),
        )
        return forms, form

    def _compute(self, layer: int, pairs: list[tuple[int, int]]) -> None:
        heads = torch.tensor([h for h, _ in pairs])
        offsets = torch.tensor([d for _, d in pairs])
        core = self.Ra[layer, heads] @ rotation(self.rotary, offsets, self.d_head) @ self.Rb[layer, heads].transpose(-1, -2)
        core_u, sigma, core_vh = torch.linalg.svd(core)
        core_v = core_vh.transpose(-1, -2)
        # The sign convention is on U = Qa Uc; flipping a column of Uc flips that column of U.
        U = self.Qa[layer, heads] @ core_u
        _, core_u, core_v = sign_fixed(U, core_u, core_v)
        for index, (h, d) in enumerate(pairs):
            self.cache[(layer, h, d)] = (sigma[index].float(), core_u[index].float(), core_v[index].float())
            self.new.append((layer, h, d))

    def take_new(self):
        """Rows (form 'augmented', layer, head, pos_offset, sv, sigma, u, v) of the forms computed
        since the last call, for singular_vectors; the writer skips any already stored."""
        import pyarrow as pa

        new, self.new = self.new, []
        r = self.d_head
        if not new:
            return None
        layer = torch.tensor([key[0] for key in new])
        head = torch.tensor([key[1] for key in new])
        sigma = torch.stack([self.cache[key][0] for key in new])  # [form, r]
        U = self.Qa[layer, head] @ torch.stack([self.cache[key][1] for key in new]).double()  # [form, d+1, r]
        V = self.Qb[layer, head] @ torch.stack([self.cache[key][2] for key in new]).double()
        d_aug = U.shape[1]

        def vectors(M):
            flat = M.transpose(1, 2).float().contiguous().numpy().reshape(-1)  # [form, sv, d+1]
            return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), d_aug).cast(pa.list_(pa.float32()))

        repeat = lambda values: pa.array([v for v in values for _ in range(r)], pa.int16())
        return pa.table({
            "form": pa.array(["augmented"] * (len(new) * r), pa.string()),
            "layer": repeat([k[0] for k in new]), "head": repeat([k[1] for k in new]),
            "pos_offset": repeat([k[2] for k in new]),
            "sv": pa.array([s for _ in new for s in range(r)], pa.int16()),
            "sigma": pa.array(sigma.double().numpy().reshape(-1), pa.float64()),
            "u": vectors(U), "v": vectors(V),
        })
