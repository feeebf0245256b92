"""Per-offset SVDs of rotary models' QK forms, from the factors (docs/rotary.md).

With rotary embeddings the score of head h from destination i to source j is

    s(i, j) = x~_i A R(i)^T R(j) B^T x~_j = x~_i A M(i - j) B^T x~_j,   M(d) = R(-d) = R(d)^T

with A = [W_Q; b_Q^T], B = [W_K; b_K^T] (the biases are added before the rotation, so they rotate
with the rest) and R(t) the rotation of position t. So each offset d = i - j has its own form
Omega~(d) = A M(d) B^T. Its SVD comes from the thin QRs A = Qa Ra, B = Qb Rb, taken once per head:
Ra M(d) Rb^T = Uc diag(sigma) Vc^T (d_head x d_head), U = Qa Uc, V = Qb Vc. Forms are computed
only for the (head, offset) pairs that occur in firings and cached for the whole run; the
directions a batch's sparse signals use are returned with it to be stored
(singular_vectors.pos_offset).
"""

from __future__ import annotations

import torch

from catalog.methods.shared.svd import augmented_factors, float_lists, sign_fixed, thin_qr
from catalog.models.families.base import Rotary
from catalog.methods.sad.forms import LayerForms


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


class RotaryForms:
    """Every head's factors and the per-offset forms computed so far, for one model and run."""

    def __init__(self, W_Q, b_Q, W_K, b_K, rotary: Rotary, device="cpu", rotary_by_layer=None):
        # The factors and the small SVDs stay on the CPU in float64; what the batches use moves to `device`.
        W_Q, b_Q, W_K, b_K = (t.detach().cpu().double() for t in (W_Q, b_Q, W_K, b_K))
        A, B = augmented_factors(W_Q, b_Q, W_K, b_K)
        self.Qa, self.Ra = thin_qr(A)  # [layer, head, d+1, r], [layer, head, r, r]
        self.Qb, self.Rb = thin_qr(B)
        self.rotary, self.d_head = rotary, W_Q.shape[-1]
        # Gemma-3: local and global layers turn by their own frequencies (None: every layer by `rotary`).
        self.rotary_by_layer = tuple(rotary_by_layer) if rotary_by_layer is not None else None
        self.device = device
        self.basis_q, self.basis_k = self.Qa.float().to(device), self.Qb.float().to(device)
        # (layer, head, offset) -> (sigma [r], core_q [r, r], core_k [r, r]) float32
        self.cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.returned: set[tuple[int, int, int, int]] = set()  # (layer, head, offset, sv) given to the writer

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
        rotary = self.rotary_by_layer[layer] if self.rotary_by_layer else self.rotary
        core = self.Ra[layer, heads] @ rotation(rotary, offsets, self.d_head) @ self.Rb[layer, heads].transpose(-1, -2)
        core_u, sigma, core_vh = torch.linalg.svd(core)
        core_v = core_vh.transpose(-1, -2)
        # The sign convention is on U = Qa Uc; flipping a column of Uc flips that column of U.
        U = self.Qa[layer, heads] @ core_u
        _, core_u, core_v = sign_fixed(U, core_u, core_v)
        for index, (h, d) in enumerate(pairs):
            self.cache[(layer, h, d)] = (sigma[index].float(), core_u[index].float(), core_v[index].float())

    def take_new(self, firing_svs):
        """Rows (form 'augmented', layer, head, pos_offset, sv, sigma, u, v) of singular_vectors for
        the directions the batch's sparse signals use (`firing_svs`, the batch's table) that this run
        has not returned yet; the writer also skips those stored by earlier runs.

        Only the directions some stored signal uses are kept: a rotary model has a form per head
        and offset, and keeping all d_head directions of each would cost gigabytes on larger
        models (a Llama-1B form is 1 MB) for vectors no firing refers to."""
        import numpy as np
        import pyarrow as pa

        if firing_svs is None or firing_svs.num_rows == 0:
            return None
        columns = {c: firing_svs.column(c).to_numpy() for c in ("layer", "head", "dest_pos", "src_pos", "sv")}
        keys = np.unique(np.stack([columns["layer"], columns["head"], columns["dest_pos"] - columns["src_pos"],
                                   columns["sv"]], axis=1).astype(np.int64), axis=0)
        new = [tuple(int(v) for v in key) for key in keys if tuple(int(v) for v in key) not in self.returned]
        if not new:
            return None
        self.returned.update(new)
        layer, head, offset, sv = (torch.tensor([key[i] for key in new]) for i in range(4))
        forms = [self.cache[(key[0], key[1], key[2])] for key in new]
        sigma = torch.stack([form[0][key[3]] for form, key in zip(forms, new)])
        core_u = torch.stack([form[1][:, key[3]] for form, key in zip(forms, new)]).double()  # [n, r]
        core_v = torch.stack([form[2][:, key[3]] for form, key in zip(forms, new)]).double()
        U, V = self._vectors(layer, head, core_u, core_v)
        return pa.table({
            "form": pa.array(["augmented"] * len(new), pa.string()),
            "layer": pa.array(layer.numpy(), pa.int16()), "head": pa.array(head.numpy(), pa.int16()),
            "pos_offset": pa.array(offset.numpy(), pa.int16()), "sv": pa.array(sv.numpy(), pa.int16()),
            "sigma": pa.array(sigma.double().numpy(), pa.float64()), "u": float_lists(U), "v": float_lists(V),
        })

    def _vectors(self, layer, head, core_u, core_v):
        """u = Qa core_u and v = Qb core_v [n, d+1] for n directions, one product per head (gathering
        a (d+1) x r factor per direction would move gigabytes)."""
        U = torch.empty(len(layer), self.Qa.shape[2], dtype=torch.float64)
        V = torch.empty_like(U)
        for l, h in torch.unique(torch.stack([layer, head], dim=1), dim=0).tolist():
            rows = ((layer == l) & (head == h)).nonzero(as_tuple=True)[0]
            U[rows] = core_u[rows] @ self.Qa[l, h].T
            V[rows] = core_v[rows] @ self.Qb[l, h].T
        return U, V
