"""Training an attention-output SAE on a layer's hook_z, and its figures.

TopK (the default; Gao et al. 2024): the `k` largest pre-activations are kept, ReLU'd, the
loss is the squared reconstruction error alone. JumpReLU (Rajamanoharan et al. 2024): a
pre-activation is kept where it exceeds a learned per-feature threshold; the loss adds
`l0_coefficient` times the number of active features, whose gradient to the thresholds comes
from a straight-through estimator with a rectangle kernel of width `bandwidth`.

Activations are scaled by one number so that their mean squared norm is d_in while training
(the coefficients then mean the same on every model), and the scale is folded back into the
weights before saving, so the SAE reads the model's raw hook_z. Decoder rows are kept at unit
norm while training (after folding, every row's norm is that scale). Adam, minibatches drawn with a
seeded generator: the same corpus and settings give the same SAE on the same device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catalog.features.sae import AttentionSae

_JUMP_INIT_THRESHOLD = 0.1


@dataclass(frozen=True)
class SaeTraining:
    architecture: str = "topk"
    expansion: int = 8          # d_sae = expansion * d_in
    k: int = 16                 # topk: active features per token
    l0_coefficient: float = 1.0  # jumprelu: weight of the L0 term
    bandwidth: float = 0.05     # jumprelu: straight-through kernel width
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0


class _Step(torch.autograd.Function):
    """H(pre - threshold); the threshold's gradient through a rectangle kernel, none to pre."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype)
        return None, (-grad * near / ctx.bandwidth).sum(dim=0), None


class _JumpRelu(torch.autograd.Function):
    """pre * H(pre - threshold); the threshold's gradient through the same kernel."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype)
        return (grad * (pre > threshold).to(pre.dtype), (-grad * near * threshold / ctx.bandwidth).sum(dim=0),
                None)


def train_sae(activations: torch.Tensor, layer: int, model_name: str, settings: SaeTraining,
              say=None) -> AttentionSae:
    """An SAE trained on activations [n_tokens, d_in] (a layer's flattened hook_z)."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    device = activations.device
    x_all = activations.float()
    scale = (x_all.pow(2).sum(dim=1).mean() / x_all.shape[1]).sqrt().clamp_min(1e-12)
    x_all = x_all / scale
    n, d_in = x_all.shape
    d_sae = settings.expansion * d_in
    W_dec = torch.randn(d_sae, d_in, generator=generator).to(device)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    params = {"W_dec": W_dec, "W_enc": W_dec.T.clone(), "b_enc": torch.zeros(d_sae, device=device),
              "b_dec": x_all.mean(dim=0).clone()}
    jump = settings.architecture == "jumprelu"
    if jump:
        params["threshold"] = torch.full((d_sae,), _JUMP_INIT_THRESHOLD, device=device)
    for tensor in params.values():
        tensor.requires_grad_(True)
    optimizer = torch.optim.Adam(params.values(), lr=settings.lr)
    k = min(settings.k, d_sae)
    with torch.enable_grad():
        for step in range(settings.steps):
            rows = torch.randint(0, n, (min(settings.batch_size, n),), generator=generator).to(device)
            x = x_all[rows]
            pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
            if jump:
                acts = _JumpRelu.apply(torch.relu(pre), params["threshold"], settings.bandwidth)
                l0 = _Step.apply(pre, params["threshold"], settings.bandwidth).sum(dim=1).mean()
            else:
                top = torch.topk(pre, k=k, dim=-1)
                acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
                l0 = None
            error = (acts @ params["W_dec"] + params["b_dec"] - x).pow(2).sum(dim=1).mean()
            loss = error + (settings.l0_coefficient * l0 if jump else 0.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-12)
                if jump:
                    params["threshold"].clamp_(min=1e-4)
            if say is not None and (step + 1) % max(1, settings.steps // 20) == 0:
                say(f"step {step + 1} of {settings.steps}: squared error {float(error):.4g}")
    with torch.no_grad():  # fold the scale back: the SAE reads raw hook_z
        return AttentionSae(
            settings.architecture, W_enc=(params["W_enc"] / scale).detach(), W_dec=(params["W_dec"] * scale).detach(),
            b_enc=params["b_enc"].detach(), b_dec=(params["b_dec"] * scale).detach(), layer=layer,
            model_name=model_name, k=k if not jump else None,
            threshold=params["threshold"].detach().clone() if jump else None,
        )


def reconstruction_figures(sae: AttentionSae, activations: torch.Tensor) -> dict:
    """Fraction of variance explained and L0 (mean active features per token) on activations."""
    x = activations.float()
    acts = sae.encode(x)
    residual = (x - sae.decode(acts)).pow(2).sum()
    variance = (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-30)
    return {"fraction_variance_explained": float(1 - residual / variance),
            "l0": float((acts > 0).sum(dim=1).float().mean()), "n_tokens": int(x.shape[0])}
