"""Firings and their sparse signals (SPEC.md, "Sparse signals of one firing").

Everything here is vectorised over prompts, heads and firings of one layer: a firing is one
row of the tensors below, never a Python loop iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catalog.methods.sad.forms import LayerForms


@dataclass
class Firings:
    """The firings of one layer: (prompt, head, dest i, src j) with pattern(i, j) >= threshold."""

    prompt: torch.Tensor  # [firing] index in the batch
    head: torch.Tensor  # [firing]
    dest: torch.Tensor  # [firing] destination (query) position i
    src: torch.Tensor  # [firing] source (key) position j, 1 <= j <= i
    attn_weight: torch.Tensor  # [firing] hook_pattern(i, j)
    score: torch.Tensor  # [firing] raw score s(i, j) = q_i . k_j
    form: torch.Tensor | None = None  # [firing] index into the layer's LayerForms (set by the caller)

    def __len__(self) -> int:
        return len(self.prompt)


@dataclass
class SparseSignals:
    """Per firing, the 64 contributions and which of them form its sparse signal.

    `order` lists sv indices by descending contribution; the signal is its first n_svs entries
    (rank = position in that order).
    """

    contribution: torch.Tensor  # [firing, sv]  c_k = sigma_k (x~_i . u_k)(v_k . x~_j)
    dest_proj: torch.Tensor  # [firing, sv]  x~_i . u_k
    src_proj: torch.Tensor  # [firing, sv]  v_k . x~_j
    order: torch.Tensor  # [firing, sv]  sv indices, largest contribution first
    n_svs: torch.Tensor  # [firing]

    def selected(self) -> torch.Tensor:
        """[firing, rank] mask: True where order[f, rank] belongs to the signal."""
        ranks = torch.arange(self.order.shape[1], device=self.order.device)
        return ranks.unsqueeze(0) < self.n_svs.unsqueeze(1)


def find_sinks(patterns, end_pos, sink_attention: float, sink_head_share: float, sink_min_heads: int) -> torch.Tensor:
    """[prompt, pos] mask of each prompt's attention sinks (docs/schema.md, "Attention sinks").

    patterns: every layer's hook_pattern [prompt, head, dest, src], in layer order. A source token
    j >= 1 is a sink when at least sink_head_share of all heads (layers x heads), and at least
    sink_min_heads heads, give it at least sink_attention of their attention on average over the
    destinations after it, j < i <= end_pos. The floor keeps a few heads of a small model that
    look at one token (a duplicate-token head, say) from making it a sink.
    Position 0 is not judged (it never fires anyway); a token with no destination after it (the
    end and the padding) is never a sink.
    """
    n_pos = patterns[0].shape[-1]
    device = patterns[0].device
    positions = torch.arange(n_pos, device=device)
    end_pos = end_pos.to(device).view(-1, 1, 1)
    # [prompt, dest, src]: the destinations each source's mean is taken over.
    after = (positions.view(1, -1, 1) > positions.view(1, 1, -1)) & (positions.view(1, -1, 1) <= end_pos)
    n_after = after.sum(dim=1)  # [prompt, src]
    n_heads_giving = torch.zeros(after.shape[0], n_pos, device=device)
    for pattern in patterns:  # one layer at a time keeps memory at one layer's pattern
        received = (pattern.float() * after.unsqueeze(1)).sum(dim=2)  # [prompt, head, src]
        mean = received / n_after.clamp(min=1).unsqueeze(1)
        n_heads_giving += (mean >= sink_attention).sum(dim=1)
    n_heads = sum(pattern.shape[1] for pattern in patterns)
    enough = (n_heads_giving >= sink_head_share * n_heads) & (n_heads_giving >= sink_min_heads)
    return enough & (n_after > 0) & (positions.view(1, -1) >= 1)


def find_firings(pattern, attn_scores, end_pos, attn_threshold: float, score_scale: float,
                 window: int | None = None) -> Firings:
    """Firings of one layer from its hook_pattern / hook_attn_scores [prompt, head, dest, src].

    end_pos [prompt] is the last destination analysed (the prompt's `end` token), which also keeps
    the padding of shorter prompts out. Source 0 (the attention sink, or the BOS) never fires.
    attn_scores: the layer's logits before any softcap (catalog.models.families.base.attention_logits);
    score_scale: attn_scores = s / score_scale (sqrt(d_head); Gemma: sqrt(query_pre_attn_scalar)).
    window: the layer's sliding window; a source with i - j >= window is never a firing (the model
    masks it; stated here too so that no pattern rounding can let one through).
    """
    n_pos = pattern.shape[-1]
    dest = torch.arange(n_pos, device=pattern.device).view(1, 1, n_pos, 1)
    src = torch.arange(n_pos, device=pattern.device).view(1, 1, 1, n_pos)
    score = attn_scores * score_scale
    mask = (
        (pattern >= attn_threshold)
        & (score > 0)
        & (src >= 1)
        & (src <= dest)
        & (dest <= end_pos.to(pattern.device).view(-1, 1, 1, 1))
    )
    if window is not None:
        mask = mask & (dest - src < window)
    prompt, head, i, j = mask.nonzero(as_tuple=True)
    return Firings(prompt, head, i, j, pattern[prompt, head, i, j], score[prompt, head, i, j])


def augment(x: torch.Tensor) -> torch.Tensor:
    """x~ = [x ; 1] along the last axis."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def sparse_signals(firings: Firings, normalized, forms: LayerForms, sv_threshold: float,
                   qk_scales=None) -> SparseSignals:
    """Contributions c_k and the sparse signal of every firing of one layer.

    normalized: ln1.hook_normalized [prompt, pos, d_model]; forms: the layer's QK forms, firings.form
    each firing's (catalog.methods.sad.forms). qk_scales: (r_Q, r_K) [prompt, pos, head], the
    QK-norm divisors of a family with QK-norm (docs/normed.md): the projections are those of
    x~_i / r_Q(i) and x~_j / r_K(j), so the contributions still sum to the score.
    """
    x_tilde = augment(normalized.float())
    dest_proj, src_proj = forms.projections(x_tilde, firings.prompt, firings.dest, firings.src, firings.form)
    if qk_scales is not None:
        r_Q, r_K = qk_scales
        dest_proj = dest_proj / r_Q[firings.prompt, firings.dest, firings.head].float().unsqueeze(1)
        src_proj = src_proj / r_K[firings.prompt, firings.src, firings.head].float().unsqueeze(1)
    contribution = forms.sigma[firings.form] * dest_proj * src_proj
    sorted_c, order = torch.sort(contribution, dim=1, descending=True, stable=True)
    # The shortest prefix whose running sum, over the whole score, exceeds sv_threshold. The
    # score is the sum of the contributions, as in the reference implementation (it equals
    # s(i, j) to float32 precision).
    total = contribution.sum(dim=1, keepdim=True)
    passed = (sorted_c.cumsum(dim=1) / total) > sv_threshold
    first = passed.to(torch.int8).argmax(dim=1)
    # No prefix qualifies only when no contribution is negative: then take every c_k > 0.
    n_svs = torch.where(passed.any(dim=1), first + 1, (contribution > 0).sum(dim=1))
    return SparseSignals(contribution, dest_proj, src_proj, order, n_svs)


def subset(rows, index: torch.Tensor):
    """The Firings or SparseSignals `rows` restricted to the firings at `index` (same fields)."""
    return type(rows)(**{name: None if value is None else value[index] for name, value in vars(rows).items()})
