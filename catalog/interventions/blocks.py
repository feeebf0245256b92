"""The parts of a transformer block the intervention forward pass computes, for every family.

`ModelWeights` holds a model's processed weights (TransformerLens compatibility mode: the
LayerNorm / RMSNorm weights folded into the matrices that read the residual stream, writing
weights centred on LayerNorm models, value biases folded into b_O) and what its family does
differently (`catalog.models.families.base.ForwardSpec`):

- the norm: LNPre `(x - mean) / sqrt(var + eps)` (GPT-2, GPT-NeoX) or RMSPre `x / sqrt(mean(x^2) + eps)`
  (Llama, Qwen2; no centring);
- positions: learned `W_pos` added to the embedding (GPT-2) or a rotation of each query and key
  by its position (rotate-half pairs on the first `rotary_dim` dims of a head, as Hugging Face
  computes the angles: float32 `pos * inv_freq`);
- grouped-query attention: `n_kv_heads` key/value heads, query head h reading key head
  `h // (n_heads / n_kv_heads)`;
- the MLP: `act(x W_in + b_in) W_out + b_out`, or gated `(act(x W_gate) * (x W_in)) W_out`;
- parallel attention and MLP (GPT-NeoX): the MLP reads the residual before the layer's attention.

Every function works on flat rows [row, ...]; matrix products with fewer than 16 rows are padded
(see `linear`), so a row's numbers do not depend on what shares its pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MIN_ROWS = 16


@dataclass
class ModelWeights:
    """The processed weights of a model and how its blocks compute."""

    W_E: torch.Tensor  # [d_vocab, d_model]
    W_pos: torch.Tensor | None  # [n_ctx, d_model]; None with rotary positions
    W_Q: torch.Tensor  # [layer, head, d_model, d_head]
    b_Q: torch.Tensor  # [layer, head, d_head]
    W_K: torch.Tensor  # per query head (key heads repeated over their group)
    b_K: torch.Tensor
    W_O: torch.Tensor  # [layer, head, d_head, d_model]
    b_O: torch.Tensor  # [layer, d_model] (value biases folded in)
    W_qkv: torch.Tensor  # [layer, d_model, (head + 2 kv_head) * d_head]: q | k | v, head-major within each
    b_qkv: torch.Tensor  # [layer, (head + 2 kv_head) * d_head]
    W_O_flat: torch.Tensor  # [layer, head * d_head, d_model]
    W_in: torch.Tensor  # [layer, d_model, d_mlp], gated: [layer, d_model, 2 d_mlp] (gate | in)
    b_in: torch.Tensor
    W_out: torch.Tensor  # [layer, d_mlp, d_model]
    b_out: torch.Tensor
    W_U_T: torch.Tensor  # [d_vocab, d_model] (unembedding, transposed for F.linear)
    b_U: torch.Tensor  # [d_vocab]
    eps: float
    norm: str = "LN"  # 'LN' | 'RMS'
    act: str = "gelu_new"
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    n_kv_heads: int | None = None  # None: one key head per query head
    score_scale: float | None = None  # None: sqrt(d_head)
    inv_freq: torch.Tensor | None = None  # [rotary_dim / 2] float32; None: learned positions
    rotary_gain: float = 1.0  # the embedding's attention scaling, on every rotated dim

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[3]

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def group(self) -> int:
        """Query heads per key head (1 without grouped-query attention)."""
        return self.n_heads // self.kv_heads

    @property
    def centred(self) -> bool:
        """LayerNorm models read centred residuals (their writing weights are centred at load):
        an intervention's signal is centred too. RMSNorm models are not (ACCPP.md section 5)."""
        return self.norm == "LN"

    @classmethod
    def from_bridge(cls, bridge, spec=None) -> "ModelWeights":
        """From a TransformerBridge in compatibility mode; spec (a ForwardSpec) says how its blocks
        compute, by default GPT-2's (checked against the bridge's config)."""
        cfg = bridge.cfg
        if spec is None:
            if getattr(cfg, "act_fn", "gelu_new") != "gelu_new" or getattr(cfg, "positional_embedding_type",
                                                                            "standard") != "standard":
                raise ValueError("without a ForwardSpec, interventions read GPT-2 (gelu_new MLPs, learned positions)")
            from catalog.models.families.base import ForwardSpec

            spec = ForwardSpec(norm="LN", act="gelu_new", gated_mlp=False, parallel_attn_mlp=False, rotary=None,
                               n_kv_heads=cfg.n_heads, score_scale=math.sqrt(cfg.d_head),
                               eps=float(getattr(cfg, "eps", 1e-5)))
        from catalog.models.families.base import parameter_or_none

        def get(name, like=None):
            value = parameter_or_none(bridge, name)
            if value is None:  # a bias-free projection: zeros of the bias' shape
                return torch.zeros(like, device=bridge.W_E.device)
            return value.detach().float().contiguous()

        W_Q, W_K, W_V, W_O = get("W_Q"), get("W_K"), get("W_V"), get("W_O")
        n_layers, n_heads, d_model, d_head = W_Q.shape
        n_kv = W_K.shape[1]
        b_Q, b_K, b_V = get("b_Q", W_Q.shape[:2] + (d_head,)), get("b_K", W_K.shape[:2] + (d_head,)), \
            get("b_V", W_V.shape[:2] + (d_head,))

        def flat(W):  # [layer, head, d_model, d_head] -> [layer, d_model, head * d_head]
            return W.permute(0, 2, 1, 3).reshape(n_layers, d_model, W.shape[1] * d_head)

        W_in = get("W_in")
        d_mlp = W_in.shape[2]
        b_in = get("b_in", (n_layers, d_mlp))
        if spec.gated_mlp:  # one matmul for both: gate | in
            W_in = torch.cat([get("W_gate"), W_in], dim=2).contiguous()
            b_in = torch.cat([torch.zeros(n_layers, d_mlp, device=b_in.device), b_in], dim=1).contiguous()
        group = torch.arange(n_heads, device=W_K.device) // (n_heads // n_kv)
        rotary = spec.rotary
        return cls(
            W_E=get("W_E"), W_pos=get("W_pos") if rotary is None else None, W_Q=W_Q, b_Q=b_Q,
            W_K=W_K[:, group].contiguous(), b_K=b_K[:, group].contiguous(), W_O=W_O,
            b_O=get("b_O", (n_layers, d_model)),
            W_qkv=torch.cat([flat(W_Q), flat(W_K), flat(W_V)], dim=2).contiguous(),
            b_qkv=torch.cat([b_Q.flatten(1), b_K.flatten(1), b_V.flatten(1)], dim=1).contiguous(),
            W_O_flat=W_O.reshape(n_layers, n_heads * d_head, d_model).contiguous(),
            W_in=W_in, b_in=b_in, W_out=get("W_out"), b_out=get("b_out", (n_layers, d_model)),
            W_U_T=get("W_U").T.contiguous(), b_U=get("b_U", (bridge.W_U.shape[1],)), eps=spec.eps,
            norm=spec.norm, act=spec.act, gated_mlp=spec.gated_mlp, parallel_attn_mlp=spec.parallel_attn_mlp,
            n_kv_heads=n_kv, score_scale=spec.score_scale,
            inv_freq=None if rotary is None else torch.tensor(rotary.inv_freq, dtype=torch.float32,
                                                              device=W_Q.device),
            rotary_gain=1.0 if rotary is None else math.sqrt(rotary.magnitude),
        )

    @classmethod
    def from_model(cls, lm) -> "ModelWeights":
        """From a catalog LoadedModel, its family's ForwardSpec read from the family module."""
        from catalog.models.families import forward_spec

        return cls.from_bridge(lm.bridge, forward_spec(lm.adapter))


def normalize(w: ModelWeights, x: torch.Tensor) -> torch.Tensor:
    """ln.hook_normalized: LNPre (one fused kernel) or RMSPre."""
    if w.norm == "RMS":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + w.eps)
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=w.eps)


def ln_scale(w: ModelWeights, x: torch.Tensor) -> torch.Tensor:
    """ln.hook_scale of each row [..., 1]: sqrt(var + eps) (LN) or sqrt(mean(x^2) + eps) (RMS)."""
    if w.norm != "RMS":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + w.eps).sqrt()


def activation(w: ModelWeights, x: torch.Tensor) -> torch.Tensor:
    if w.act in ("gelu_new", "gelu_pytorch_tanh"):  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), fused
        return torch.nn.functional.gelu(x, approximate="tanh")
    if w.act == "gelu":
        return torch.nn.functional.gelu(x)
    if w.act == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"no activation {w.act!r}")


def linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ W + b for flat rows [row, d_in]. Fewer than 16 rows are padded with zeros: CPU BLAS
    takes other code paths for a few rows, whose rounding differs, and a token's result must not
    depend on how many tokens share its matmul (a zero signal must change nothing, bit for bit)."""
    n = x.shape[0]
    if n < _MIN_ROWS:
        x = torch.cat([x, x.new_zeros(_MIN_ROWS - n, x.shape[1])])
    return torch.addmm(b, x, W)[:n]


def mlp(w: ModelWeights, layer: int, resid: torch.Tensor) -> torch.Tensor:
    """hook_mlp_out for flat tokens [token, d_model] of the residual the MLP reads."""
    pre = linear(normalize(w, resid), w.W_in[layer], w.b_in[layer])
    if w.gated_mlp:
        gate, up = pre.chunk(2, dim=-1)
        hidden = activation(w, gate) * up
    else:
        hidden = activation(w, pre)
    return linear(hidden, w.W_out[layer], w.b_out[layer])


def qkv(w: ModelWeights, layer: int, x: torch.Tensor, pos: torch.Tensor):
    """Queries [token, head, d_head] and keys, values [token, head, d_head] (key heads repeated over
    their group) of normalised inputs x [token, d_model] at positions pos [token], rotated."""
    H, KV, dh = w.n_heads, w.kv_heads, w.d_head
    out = linear(x, w.W_qkv[layer], w.b_qkv[layer])
    q = out[:, : H * dh].view(-1, H, dh)
    k = out[:, H * dh: (H + KV) * dh].view(-1, KV, dh)
    v = out[:, (H + KV) * dh:].view(-1, KV, dh)
    q, k = rotate(w, q, pos), rotate(w, k, pos)
    if KV != H:
        k, v = k.repeat_interleave(w.group, dim=1), v.repeat_interleave(w.group, dim=1)
    return q, k, v


def rotate(w: ModelWeights, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [token, head, d_head] turned by its token's position [token] (rotary models; else x):
    dims p and p + r/2 (p < r/2) by the angle pos * inv_freq[p], dims r.. left alone."""
    if w.inv_freq is None:
        return x
    half = w.inv_freq.shape[0]
    angle = pos.to(torch.float32).unsqueeze(1) * w.inv_freq.unsqueeze(0)  # [token, r/2]
    cos = (angle.cos() * w.rotary_gain).unsqueeze(1)
    sin = (angle.sin() * w.rotary_gain).unsqueeze(1)
    x1, x2 = x[..., :half], x[..., half: 2 * half]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:]], dim=-1)


def attend(w: ModelWeights, q, keys, values, query_pos) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of padded queries against full key/value matrices.

    q [row, win, head, d_head], keys/values [row, pos, head, d_head], query_pos [row, win]:
    returns pattern [row, head, win, pos] and z [row, win, head, d_head].
    """
    n_win = q.shape[1]
    if n_win < _MIN_ROWS:  # the same rounding for any window (see linear)
        q = torch.cat([q, q.new_zeros(q.shape[0], _MIN_ROWS - n_win, *q.shape[2:])], dim=1)
        query_pos = torch.cat([query_pos, query_pos.new_zeros(query_pos.shape[0], _MIN_ROWS - n_win)], dim=1)
    scores = torch.einsum("rwhe,rkhe->rhwk", q, keys) / (w.score_scale or math.sqrt(w.d_head))
    key_pos = torch.arange(keys.shape[1], device=keys.device)
    future = key_pos.view(1, 1, 1, -1) > query_pos.view(query_pos.shape[0], 1, -1, 1)
    pattern = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return pattern[:, :, :n_win], torch.einsum("rhwk,rkhe->rwhe", pattern, values)[:, :n_win]


def embed(w: ModelWeights, tokens: torch.Tensor) -> torch.Tensor:
    """blocks.0.hook_resid_pre [prompt, pos, d_model]: token embedding (+ learned positions)."""
    resid = w.W_E[tokens]
    return resid if w.W_pos is None else resid + w.W_pos[: tokens.shape[1]]


def unembed(w: ModelWeights, resid_final: torch.Tensor) -> torch.Tensor:
    """Logits [row, d_vocab] of final residuals [row, d_model] (ln_final, then W_U, b_U)."""
    x = normalize(w, resid_final)
    n = x.shape[0]
    if n < _MIN_ROWS:
        x = torch.cat([x, x.new_zeros(_MIN_ROWS - n, x.shape[1])])
    return torch.nn.functional.linear(x, w.W_U_T, w.b_U)[:n]
