"""Query and key transcoders of one head (after Wynroe & Sharkey 2024), and a firing's score split
into feature pairs (docs/features.md, "QK transcoders").

A head's query transcoder reads the normalized residual stream at the destination (the
`ln1.hook_normalized` the head's W_Q reads, LayerNorm folded) and writes its query through
sparse features: `q^ = a(x) D + c_q`, `a = TopK(x W_enc + b_enc)`; the key transcoder the same
at the source, `k^ = b(x) E + c_k`. A firing's raw score `q_i . k_j` then splits exactly into

    sum_{i,j} a_i b_j <D_i, E_j>          feature pairs (query feature i, key feature j)
    + sum_i a_i <D_i, c_k> + sum_j b_j <c_q, E_j> + <c_q, c_k>     pairs with a decoder bias
    + (q . k - q^ . k^)                     the reconstruction error.

Trained here on the squared error of q and k (not on the attention pattern, as the paper's are);
the pattern's KL divergence is reported as a figure. Learned-position models only: on a rotary
model q and k rotate with the position, which these transcoders do not model.

On disk: a directory with `cfg.json` (`kind` "qk_transcoder", `layer`, `head`, `d_model`,
`d_head`, `d_sae`, `k`, `model_name`, figures) and `qk_weights.safetensors` (`q_W_enc`, `q_b_enc`,
`q_W_dec`, `q_b_dec`, and `k_...` likewise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from catalog.errors import CatalogError

CFG_FILE, WEIGHTS_FILE = "cfg.json", "qk_weights.safetensors"
_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass
class Transcoder:
    W_enc: torch.Tensor  # [d_model, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_head]
    b_dec: torch.Tensor  # [d_head]
    k: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_enc + self.b_enc
        top = torch.topk(pre, k=self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec


@dataclass
class QkTranscoders:
    layer: int
    head: int
    query: Transcoder
    key: Transcoder
    model_name: str = ""
    figures: dict = field(default_factory=dict)

    def config(self) -> dict:
        return {"kind": "qk_transcoder", "layer": self.layer, "head": self.head, "d_model": self.query.W_enc.shape[0],
                "d_head": self.query.W_dec.shape[1], "d_sae": self.query.W_enc.shape[1], "k": self.query.k,
                "hook_name": f"blocks.{self.layer}.ln1.hook_normalized", "model_name": self.model_name,
                "catalog_figures": self.figures}


def save_qk(qk: QkTranscoders, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{side[0]}_{name}": getattr(getattr(qk, side), name).detach().float().cpu().contiguous()
               for side in ("query", "key") for name in _NAMES}
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / CFG_FILE).write_text(json.dumps(qk.config(), indent=2) + "\n")
    return out_dir


def load_qk(qk_dir: str | Path, d_model: int | None = None, d_head: int | None = None) -> QkTranscoders:
    from safetensors.torch import load_file

    qk_dir, where = Path(qk_dir), f"--qk {qk_dir}"
    if not (qk_dir / CFG_FILE).is_file() or not (qk_dir / WEIGHTS_FILE).is_file():
        raise CatalogError(f"{where} is not a QK transcoder directory ({CFG_FILE} and {WEIGHTS_FILE}; "
                           "train-qk writes one per head)")
    try:
        cfg = json.loads((qk_dir / CFG_FILE).read_text())
        weights = load_file(str(qk_dir / WEIGHTS_FILE))
        sides = {side: Transcoder(*(weights[f"{side[0]}_{name}"].float() for name in _NAMES), k=int(cfg["k"]))
                 for side in ("query", "key")}
        layer, head = int(cfg["layer"]), int(cfg["head"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CatalogError(f"{where} cannot be read ({type(err).__name__}: {err})") from None
    if cfg.get("kind") != "qk_transcoder":
        raise CatalogError(f"{where}: cfg.json's kind is not 'qk_transcoder'")
    shape = tuple(sides["query"].W_dec.shape[1:]) + tuple(sides["query"].W_enc.shape[:1])
    if d_model is not None and shape != (d_head, d_model):
        raise CatalogError(f"{where}: made for d_model {shape[1]}, d_head {shape[0]}; the catalog's model has "
                           f"{d_model}, {d_head}")
    return QkTranscoders(layer, head, sides["query"], sides["key"], str(cfg.get("model_name") or ""),
                         cfg.get("catalog_figures") or {})


def train_transcoder(x: torch.Tensor, target: torch.Tensor, d_sae: int, k: int, steps: int, batch_size: int,
                     lr: float, seed: int) -> Transcoder:
    """A TopK transcoder from x [n, d_model] to target [n, d_head], trained on the squared error."""
    generator = torch.Generator().manual_seed(seed)
    n, d_model = x.shape
    W_dec = torch.randn(d_sae, target.shape[1], generator=generator).to(x.device)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * target.norm(dim=1).mean() / k ** 0.5
    params = {"W_enc": (torch.randn(d_model, d_sae, generator=generator) / d_model ** 0.5).to(x.device),
              "b_enc": torch.zeros(d_sae, device=x.device), "W_dec": W_dec, "b_dec": target.mean(dim=0).clone()}
    for tensor in params.values():
        tensor.requires_grad_(True)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    k = min(k, d_sae)
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(0, n, (min(batch_size, n),), generator=generator).to(x.device)
            pre = x[rows] @ params["W_enc"] + params["b_enc"]
            top = torch.topk(pre, k=k, dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
            loss = (acts @ params["W_dec"] + params["b_dec"] - target[rows]).pow(2).sum(dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return Transcoder(*(params[name].detach() for name in _NAMES), k=k)


@dataclass
class FiringPairs:
    query_feature: torch.Tensor  # [firing, P] -1: the query transcoder's bias
    key_feature: torch.Tensor    # [firing, P] -1: the key transcoder's bias
    query_activation: torch.Tensor  # [firing, P] NaN for a bias
    key_activation: torch.Tensor
    weight: torch.Tensor         # [firing, P] the pair's part of the score (float64)
    error: torch.Tensor          # [firing] q . k - q^ . k^
    # With the head's singular directions: each side's active rows (times activation) in the
    # coordinates of the directions, [firing, k + 1, K], so that a pair (i, j) = P index
    # i * (k + 1) + j has part sigma_s alpha[i, s] beta[j, s] through direction s.
    alpha: torch.Tensor | None = None
    beta: torch.Tensor | None = None


def direction_maps(U: torch.Tensor, sigma: torch.Tensor, V: torch.Tensor, W_Q: torch.Tensor,
                   W_K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps from query space and key space (d_head) to the coordinates of the head's singular
    directions, [d_head, K] each (float64).

    The form W_Q W_K^T = U S V^T (W_Q, W_K as the form has them: [D, d_head], bias-augmented for
    the 2024 method) gives W_Q = U S^1/2 M and W_K = V S^1/2 N with M N^T = I, so a query q = x W_Q
    has x . u_s = (q M^-1 S^-1/2)_s, a key likewise with N, and q . k = sum_s sigma_s (x . u_s)(v_s . x').
    U, V: [K, D] (rows u_s, v_s), sigma [K]."""
    U, V, sigma = U.double(), V.double(), sigma.double()
    root = sigma.clamp_min(1e-30).sqrt()
    M = (U @ W_Q.double()) / root.unsqueeze(1)
    N = (V @ W_K.double()) / root.unsqueeze(1)
    return torch.linalg.inv(M) / root.unsqueeze(0), torch.linalg.inv(N) / root.unsqueeze(0)


def split_scores(qk: QkTranscoders, x_dest: torch.Tensor, x_src: torch.Tensor, q: torch.Tensor,
                 k: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor] | None = None) -> FiringPairs:
    """Every pair of active features (and biases) of F firings, from the normalized residual at
    their destination and source and the head's true q, k there: the pairs and the error add up to
    q . k (float64)."""
    a, b = qk.query.encode(x_dest.float()).double(), qk.key.encode(x_src.float()).double()
    D, c_q = qk.query.W_dec.double(), qk.query.b_dec.double()
    E, c_k = qk.key.W_dec.double(), qk.key.b_dec.double()
    top_a, top_b = torch.topk(a, qk.query.k, dim=1), torch.topk(b, qk.key.k, dim=1)
    # Active features plus a bias slot (-1, activation 1) on each side: [F, k + 1].
    ones = torch.ones(len(a), 1, dtype=torch.float64, device=a.device)
    a_val, b_val = torch.cat([top_a.values, ones], 1), torch.cat([top_b.values, ones], 1)
    minus = torch.full((len(a), 1), -1, dtype=torch.long, device=a.device)
    a_idx, b_idx = torch.cat([top_a.indices, minus], 1), torch.cat([top_b.indices, minus], 1)
    a_idx = torch.where(a_val > 0, a_idx, torch.full_like(a_idx, -2))  # -2: inactive (a TopK value <= 0)
    b_idx = torch.where(b_val > 0, b_idx, torch.full_like(b_idx, -2))
    D_rows = torch.where((a_idx >= 0).unsqueeze(-1), D[a_idx.clamp_min(0)], c_q.expand(*a_idx.shape, -1))
    E_rows = torch.where((b_idx >= 0).unsqueeze(-1), E[b_idx.clamp_min(0)], c_k.expand(*b_idx.shape, -1))
    D_rows = D_rows * (a_val * (a_idx > -2)).unsqueeze(-1)  # each row times its activation (0 if inactive)
    E_rows = E_rows * (b_val * (b_idx > -2)).unsqueeze(-1)
    weight = torch.einsum("fid,fjd->fij", D_rows, E_rows)
    alpha, beta = (D_rows @ maps[0], E_rows @ maps[1]) if maps is not None else (None, None)
    q_hat, k_hat = a @ D + c_q, b @ E + c_k
    error = (q.double() * k.double()).sum(1) - (q_hat * k_hat).sum(1)
    n_a, n_b = a_idx.shape[1], b_idx.shape[1]
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=a.device)
    return FiringPairs(
        query_feature=a_idx.unsqueeze(2).expand(-1, n_a, n_b).flatten(1),
        key_feature=b_idx.unsqueeze(1).expand(-1, n_a, n_b).flatten(1),
        query_activation=torch.where(a_idx >= 0, a_val, nan).unsqueeze(2).expand(-1, n_a, n_b).flatten(1),
        key_activation=torch.where(b_idx >= 0, b_val, nan).unsqueeze(1).expand(-1, n_a, n_b).flatten(1),
        weight=weight.flatten(1), error=error, alpha=alpha, beta=beta)
