"""Per-head SVD of the bias-augmented QK form Omega~ (SPEC.md, "Per-head decomposition").

Omega~ = A B^T with A = [W_Q; b_Q^T] and B = [W_K; b_K^T], both (d_model+1) x d_head, so its
SVD comes from the factors: A = Qa Ra, B = Qb Rb (thin QR), then the SVD of the small core
Ra Rb^T = Uc diag(sigma) Vc^T gives U = Qa Uc and V = Qb Vc. This is exact (no truncation)
and runs batched over every head at once, in float64, stored as float32.

Sign convention (singular vectors are defined up to (u, v) -> (-u, -v)): the entry of largest
magnitude of each u_k is positive. Every quantity the catalog derives from the pair is either
invariant to the sign (contributions c_k, edge weights) or follows this convention (the stored
projections x~ . u_k and v_k . x~).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Decomposition:
    sigma: torch.Tensor  # [layer, head, sv], descending along sv
    U: torch.Tensor  # [layer, head, d_model + 1, sv]  query (destination) space
    V: torch.Tensor  # [layer, head, d_model + 1, sv]  key (source) space

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n_layers, n_heads, d_aug, rank = self.U.shape
        return n_layers, n_heads, d_aug, rank


def augmented_factors(W_Q, b_Q, W_K, b_K) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [W_Q; b_Q^T], B = [W_K; b_K^T]: [layer, head, d_model + 1, d_head] each."""
    A = torch.cat([W_Q, b_Q.unsqueeze(-2)], dim=-2)
    B = torch.cat([W_K, b_K.unsqueeze(-2)], dim=-2)
    return A, B


def omega(W_Q, b_Q, W_K, b_K) -> torch.Tensor:
    """The dense Omega~ = A B^T, [layer, head, d_model + 1, d_model + 1] (for checks, not for work)."""
    A, B = augmented_factors(W_Q, b_Q, W_K, b_K)
    return A @ B.transpose(-1, -2)


def thin_qr(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W = Q R for tall float64 factors [.., n, r], through the Cholesky factor of W^T W.

    Several times faster than Householder QR on batches of small factors (the r x r Gram
    matrices are all the work), and exact to ~1e-13 in float64 for full-rank attention factors.
    """
    R = torch.linalg.cholesky(W.transpose(-1, -2) @ W).transpose(-1, -2)  # upper: W^T W = R^T R
    return torch.linalg.solve_triangular(R, W, upper=True, left=False), R


def decompose(W_Q, b_Q, W_K, b_K) -> Decomposition:
    """SVD of every head's Omega~ from its factors, batched over [layer, head]."""
    A, B = augmented_factors(W_Q.double(), b_Q.double(), W_K.double(), b_K.double())
    Qa, Ra = thin_qr(A)  # [.., d+1, r], [.., r, r]
    Qb, Rb = thin_qr(B)
    core_U, sigma, core_Vh = torch.linalg.svd(Ra @ Rb.transpose(-1, -2))
    U, V = sign_fixed(Qa @ core_U, Qb @ core_Vh.transpose(-1, -2))
    return Decomposition(sigma=sigma.float(), U=U.float(), V=V.float())


def sign_fixed(U: torch.Tensor, *others: torch.Tensor):
    """The sign convention: flip each column k of U, and of every matrix in `others` with it, so
    that the largest-magnitude entry of each u_k is positive ([..., d, r] matrices)."""
    pivot = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(U, -2, pivot))
    sign[sign == 0] = 1.0
    return (U * sign, *(M * sign for M in others))


def float_lists(rows: torch.Tensor):
    """A [n, d] tensor as an Arrow list<float32> column of n vectors (singular_vectors.u / v)."""
    import pyarrow as pa

    flat = rows.float().contiguous().cpu().numpy().reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), rows.shape[-1]).cast(pa.list_(pa.float32()))


def to_arrow(decomposition: Decomposition, form: str = "augmented"):
    """Rows (form, layer, head, sv, sigma, u, v) for the singular_vectors table, u and v as float lists.

    form: 'augmented' (this module's Omega~) or 'plain' (ACC++'s W_Q W_K^T, same layout)."""
    import pyarrow as pa

    n_layers, n_heads, d_aug, rank = decomposition.shape
    layer, head, sv = np.meshgrid(np.arange(n_layers), np.arange(n_heads), np.arange(rank), indexing="ij")

    vectors = lambda M: float_lists(M.transpose(-1, -2).reshape(-1, d_aug))  # rows in [layer, head, sv] order
    return pa.table({
        "form": pa.array([form] * layer.size, pa.string()),
        "layer": pa.array(layer.ravel(), pa.int16()),
        "head": pa.array(head.ravel(), pa.int16()),
        "sv": pa.array(sv.ravel(), pa.int16()),
        "sigma": pa.array(decomposition.sigma.double().cpu().numpy().ravel(), pa.float64()),
        "u": vectors(decomposition.U),
        "v": vectors(decomposition.V),
    })


def from_arrow(table, n_layers: int, n_heads: int) -> Decomposition:
    """Rebuild a Decomposition from singular_vectors rows (any order)."""
    import pyarrow.compute as pc

    order = pc.sort_indices(table, [("layer", "ascending"), ("head", "ascending"), ("sv", "ascending")])
    table = table.take(order)
    rank = len(table) // (n_layers * n_heads)

    def matrix(column: str) -> torch.Tensor:
        values = table.column(column).combine_chunks()
        flat = values.flatten().to_numpy(zero_copy_only=False)
        d_aug = len(flat) // len(table)
        stacked = torch.from_numpy(flat.reshape(n_layers, n_heads, rank, d_aug).copy())
        return stacked.transpose(-1, -2).contiguous()

    sigma = torch.from_numpy(table.column("sigma").to_numpy().reshape(n_layers, n_heads, rank).copy()).float()
    return Decomposition(sigma=sigma, U=matrix("u"), V=matrix("v"))
