"""The rotary rotation as ACC++ applies it (ACCPP.md section 6), per position.

A query or key of a rotary model is rotated by the rotation of its own position before the dot
product: q_i . k_j = rot_i(q) . rot_j(k). ACC++ keeps the position-free SVD of W_Q W_K^T and
inserts these rotations between a component's read into the query (key) space and the singular
coordinates, so a component at position t is rotated by R_t: the destination's at i on the query
side, each key column's own j' on the key side.

rot_t(x) = x * cos_t + rotate_half(x) * sin_t (the rotate-half pairs p, p + rotary_dim / 2 of
GPT-NeoX, Llama and Qwen2), with cos_t = 1 and sin_t = 0 on the dims a partial rotary (Pythia)
leaves alone, and the embedding's attention scaling on the rotated dims (1 for the default rope).
"""

from __future__ import annotations

import torch

from catalog.models.families.base import Rotary


class Rotation:
    """cos and sin tables [pos, d_head] of one model's rotation, for positions 0..n_pos-1."""

    def __init__(self, rotary: Rotary, d_head: int, n_pos: int, device=None):
        half = len(rotary.inv_freq)
        self.half = half
        angle = torch.arange(n_pos, dtype=torch.float64).unsqueeze(1) * torch.tensor(rotary.inv_freq,
                                                                                       dtype=torch.float64)
        scaling = rotary.magnitude ** 0.5  # magnitude multiplies q.k: each side carries its square root
        cos = torch.ones(n_pos, d_head, dtype=torch.float64)
        sin = torch.zeros(n_pos, d_head, dtype=torch.float64)
        cos[:, :2 * half] = torch.cat([torch.cos(angle), torch.cos(angle)], dim=1) * scaling
        sin[:, :2 * half] = torch.cat([torch.sin(angle), torch.sin(angle)], dim=1) * scaling
        self.cos, self.sin = cos.float().to(device), sin.float().to(device)

    def half_turn(self, x: torch.Tensor) -> torch.Tensor:
        """rotate_half on the last axis: (-x2, x1) on the rotated dims, 0 on the others."""
        h = self.half
        out = torch.zeros_like(x)
        out[..., :h] = -x[..., h:2 * h]
        out[..., h:2 * h] = x[..., :h]
        return out

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x rotated by the rotation whose tables (broadcast to x, d_head last) are cos, sin."""
        return x * cos + self.half_turn(x) * sin
