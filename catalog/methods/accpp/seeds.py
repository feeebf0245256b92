"""Seeding a prompt's circuit at the model's output (ACCPP.md section 3).

The final residual at the output position e, divided by ln_final's scale there, is a sum of
components r_c (heads split by source token, every MLP, every b_O, the embedding; no offset)
whose sum is ln_final.hook_normalized[e]. A seed is a component that explains the output:

* linear: contrib_c = r_c . (W_U[:, answer] - W_U[:, wrong]); keep every component at or
  above a cutoff (the first sorted value whose running sum exceeds the total, at most half
  the total). Seed weights are logits.
* probe (the library's trace_from_probe): contrib_c = r_c . d for a linear probe's direction d
  at the output position, with r_c the raw (not ln_final-scaled) output of the components of
  layers 0..L, whose sum is blocks.L.hook_resid_post[e]; the same cutoff rule. Seed weights are
  probe units (the direction's dot product with the residual).
* prob: integrated gradients of J = sum_t q*_t log softmax(z)_t along z(a) = b_U + a z_clean,
  then greedily the components of largest attribution until their removal drops J by tau of
  the completeness C = J(z_clean + b_U) - J(b_U). Seed weights are nats.

Scores r_c . w for one vector w per prompt come from the pattern and v W_O without building
r_c; only a prob seed actually removed needs its r_c @ W_U.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catalog.methods.accpp.components import Residual
from catalog.methods.accpp.firing import trapezoid_weights


@dataclass
class PromptSeeds:
    """Seeds of one prompt: components as (layer, comp id, token) in the reference layout."""

    layer: list[int]
    comp: list[int]
    token: list[int]
    weight: list[float]
    total: float       # linear: sum of all contributions; prob: completeness C
    objective: str


def component_scores(res: Residual, prompt: int, end: int, vector: torch.Tensor) -> torch.Tensor:
    """r_c . vector for every component of one prompt, as [layer, H + 3, pos] (zero where absent)."""
    L, H, n_pos = res.pattern.shape[1], res.pattern.shape[2], res.pattern.shape[-1]
    scale = res.final_scale[prompt, end].double()
    scores = torch.zeros(L, H + 3, n_pos, dtype=torch.float64, device=res.pattern.device)
    out_dot = res.W_O.double() @ vector  # [layer, head, d_head]: W_O . vector, then v . that
    vo_dot = torch.einsum("plhe,lhe->lhp", res.v[prompt].double(), out_dot)  # [layer, head, tb]
    scores[:, :H] = res.pattern[prompt, :, :, end, :].double() * vo_dot / scale
    dense = res.dense[prompt, end].double() @ vector / scale  # mlp 0.., b_O 0.., embedding
    scores[:, H, end], scores[:, H + 1, end], scores[0, H + 2, end] = dense[:L], dense[L:2 * L], dense[2 * L]
    scores[:, :, end + 1:] = 0.0  # padding after the output position
    return scores


def component_output(res: Residual, prompt: int, end: int, layer: int, comp: int, token: int) -> torch.Tensor:
    """r_c itself (a d_model vector) for one component."""
    H = res.pattern.shape[2]
    scale = res.final_scale[prompt, end].double()
    if comp < H:
        vo = res.v[prompt, token, layer, comp].double() @ res.W_O[layer, comp].double()
        return res.pattern[prompt, layer, comp, end, token].double() * vo / scale
    index = res.dense_index(("mlp", "attn_bias", "embed")[comp - H], layer)
    return res.dense[prompt, end, index].double() / scale


def _nonzero_components(scores: torch.Tensor):
    """(flat indices, values) of the components that exist (a zero score is an absent slot)."""
    flat = scores.flatten()
    index = torch.nonzero(flat != 0).flatten()
    return index, flat[index]


def _decode(index: torch.Tensor, shape) -> tuple[list[int], list[int], list[int]]:
    _, n_comp, n_pos = shape
    return (index // (n_comp * n_pos)).tolist(), ((index // n_pos) % n_comp).tolist(), (index % n_pos).tolist()


def linear_seeds(res: Residual, prompt: int, end: int, direction: torch.Tensor, objective: str) -> PromptSeeds:
    """Seeds along a logit direction (get_upstream_contributors_seed with frac 1.0)."""
    return _linear_rule(component_scores(res, prompt, end, direction.double()), objective)


def probe_seeds(res: Residual, prompt: int, end: int, direction: torch.Tensor, layer: int,
                objective: str) -> PromptSeeds:
    """Seeds along a probe direction in the residual stream after `layer` (blocks.L.hook_resid_post)."""
    scores = component_scores(res, prompt, end, direction.double()) * res.final_scale[prompt, end].double()
    scores[layer + 1:] = 0.0  # later layers' heads, MLPs and b_O (the embedding sits at layer 0)
    return _linear_rule(scores, objective)


def _linear_rule(scores: torch.Tensor, objective: str) -> PromptSeeds:
    """Keep every component at or above the cutoff (the first sorted value whose running sum
    exceeds the total, at most half the total), heaviest first."""
    index, contrib = _nonzero_components(scores)
    total = float(contrib.sum())
    if total <= 0:
        return PromptSeeds([], [], [], [], total, objective)
    ordered = torch.sort(contrib, descending=True).values
    exceeds = torch.nonzero(ordered.cumsum(0) > total).flatten()
    # No running sum exceeds the total only when no contribution is negative; the reference
    # library stops with an error there, the catalog keeps the half-total rule alone.
    cutoff = min(float(ordered[exceeds[0]]), total / 2) if len(exceeds) else total / 2
    keep = contrib >= cutoff
    chosen, weights = index[keep], contrib[keep]
    order = torch.argsort(weights, descending=True, stable=True)
    layer, comp, token = _decode(chosen[order], scores.shape)
    return PromptSeeds(layer, comp, token, weights[order].tolist(), total, objective)


def prob_seeds(res: Residual, prompt: int, end: int, W_U: torch.Tensor, b_U: torch.Tensor,
               targets: list[int], tau: float, steps: int, objective: str) -> PromptSeeds:
    """Seeds of the probability objective on a token support (q* uniform over `targets`)."""
    W_U, b_U = W_U.double(), b_U.double()
    q = torch.full((len(targets),), 1.0 / len(targets), dtype=torch.float64, device=W_U.device)
    z_clean = res.final_normalized[prompt, end].double() @ W_U

    def J(z):
        return float((q * torch.log_softmax(z, dim=-1)[targets]).sum())

    J_clean = J(z_clean + b_U)
    completeness = J_clean - J(b_U)
    if completeness <= 0:
        return PromptSeeds([], [], [], [], completeness, objective)
    alphas, weights = trapezoid_weights(steps, device=W_U.device)
    mean_probs = sum(w * torch.softmax(b_U + a * z_clean, dim=-1) for a, w in zip(alphas, weights))
    vector = W_U[:, targets] @ q - W_U @ mean_probs
    scores = component_scores(res, prompt, end, vector)
    index, attribution = _nonzero_components(scores)
    order = torch.argsort(attribution, descending=True, stable=True)
    z_run = z_clean.clone()
    chosen = []
    for n in order.tolist():
        if attribution[n] <= 0:
            break
        chosen.append(n)
        layer, comp, token = _decode(index[n:n + 1], scores.shape)
        z_run -= component_output(res, prompt, end, layer[0], comp[0], token[0]) @ W_U
        if J_clean - J(z_run + b_U) >= tau * completeness:
            break
    picked = index[chosen] if chosen else index[:0]
    layer, comp, token = _decode(picked, scores.shape)
    return PromptSeeds(layer, comp, token, attribution[chosen].tolist() if chosen else [], completeness, objective)
