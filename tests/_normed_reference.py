"""Gemma-2, Gemma-3, Qwen3 and OLMo-2 attention written out from the raw checkpoint files (numpy,
float64), independently of catalog/ and of TransformerLens: the QK form of every (layer, head,
offset) and, for one prompt, what the 2024 method must find (docs/normed.md).

Only the residual stream before each layer comes from the Hugging Face model itself
(output_hidden_states); everything the method computes from it (norms, QK-norm divisors, the
rotation, the softcap, the window, the pattern, every head's write after the post-norm) is
recomputed here from config.json and model.safetensors."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
from _per_firing import ATTN, select_edges, _signal


def dense_svd(matrix):
    """numpy.linalg.svd's (U, S, Vt) of a float64 matrix, through torch on one thread: a small SVD on
    several BLAS threads of a busy 2-core machine spins up to 50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        U, S, Vt = torch.linalg.svd(torch.from_numpy(matrix))
    finally:
        torch.set_num_threads(threads)
    return U.numpy(), S.numpy(), Vt.numpy()


class RawModel:
    def __init__(self, checkpoint):
        from safetensors.numpy import load_file

        self.config = config = json.loads((checkpoint / "config.json").read_text())
        self.w = {k.removeprefix("model."): v.astype(np.float64) for k, v in load_file(
            str(checkpoint / "model.safetensors")).items()}
        self.type = config["model_type"]
        self.gemma = self.type.startswith("gemma")
        self.n_layers, self.n_heads = config["num_hidden_layers"], config["num_attention_heads"]
        self.n_kv = config["num_key_value_heads"]
        self.d_model = config["hidden_size"]
        self.d_head = config.get("head_dim") or self.d_model // self.n_heads
        self.eps = config["rms_norm_eps"]
        self.scale = config.get("query_pre_attn_scalar", self.d_head) ** 0.5   # score / logit
        self.softcap = config.get("attn_logit_softcapping")
        kinds = config.get("layer_types") or ["full_attention"] * self.n_layers
        self.window = [config["sliding_window"] if k == "sliding_attention" else None for k in kinds]
        rope = config.get("rope_parameters") or {}
        self.theta = [(rope[k] if k in rope else rope).get("rope_theta", config.get("rope_theta")) for k in kinds]

    # -- weights -----------------------------------------------------------------------------------
    def gain(self, name):
        return self.w[name] + (1.0 if self.gemma else 0.0)

    def _side(self, layer, head, which):
        """[diag(g_in) W^T ; 0] diag(g_norm) of one query head ('q') or its key head ('k'): (d+1) x d_head."""
        p = f"layers.{layer}.self_attn."
        heads = self.n_heads if which == "q" else self.n_kv
        h = head if which == "q" else head // (self.n_heads // self.n_kv)
        W = self.w[p + f"{which}_proj.weight"].T                            # [d_model, heads * d_head]
        if self.type != "olmo2":
            W = W * self.gain(f"layers.{layer}.input_layernorm.weight")[:, None]
        if p + f"{which}_norm.weight" in self.w:
            g = self.gain(p + f"{which}_norm.weight")
            W = W * (np.tile(g, heads) if g.size == self.d_head else g)
        W = W[:, h * self.d_head:(h + 1) * self.d_head]
        return np.vstack([W, np.zeros((1, self.d_head))])

    @lru_cache(maxsize=None)
    def rotation(self, layer, offset):
        d = self.d_head
        freq = (1.0 / self.theta[layer] ** (np.arange(0, d, 2) / d)).astype(np.float32).astype(np.float64)
        M, half = np.eye(d), d // 2
        for p in range(half):
            c, s = np.cos(offset * freq[p]), np.sin(offset * freq[p])
            M[p, p] = M[p + half, p + half] = c
            M[p, p + half], M[p + half, p] = s, -s
        return M

    @lru_cache(maxsize=None)
    def omega(self, layer, head, offset):
        return self._side(layer, head, "q") @ self.rotation(layer, offset) @ self._side(layer, head, "k").T

    @lru_cache(maxsize=None)
    def svd(self, layer, head, offset):
        return dense_svd(self.omega(layer, head, offset))

    # -- one prompt ----------------------------------------------------------------------------------
    def _rms(self, x):
        return np.sqrt((x**2).mean(-1) + self.eps)

    def activations(self, hf_model, token_ids):
        """Per layer: x (residual / its ln1 scale), scale, r_Q, r_K [pos, head], the pre-cap score
        [head, i, j], the pattern, and what every head writes into the residual [pos, head, d_model]."""
        import torch

        with torch.no_grad():
            hidden = hf_model(torch.tensor([token_ids]), output_hidden_states=True).hidden_states
        n, L = len(token_ids), []
        for layer in range(self.n_layers):
            resid = hidden[layer][0].double().numpy()
            p = f"layers.{layer}.self_attn."
            if self.type == "olmo2":
                scale, x = np.ones(n), resid
                read = resid
            else:
                scale = self._rms(resid)
                x = resid / scale[:, None]
                read = x * self.gain(f"layers.{layer}.input_layernorm.weight")
            q = read @ self.w[p + "q_proj.weight"].T
            k = read @ self.w[p + "k_proj.weight"].T
            v = (read @ self.w[p + "v_proj.weight"].T).reshape(n, self.n_kv, self.d_head)
            r_Q, r_K = np.ones((n, self.n_heads)), np.ones((n, self.n_heads))
            group = np.arange(self.n_heads) // (self.n_heads // self.n_kv)
            if p + "q_norm.weight" in self.w:
                if self.w[p + "q_norm.weight"].size == self.d_head:   # per head
                    r_Q = self._rms(q.reshape(n, self.n_heads, self.d_head))
                    r_K = self._rms(k.reshape(n, self.n_kv, self.d_head))[:, group]
                else:                                                  # whole projection
                    r_Q = np.repeat(self._rms(q)[:, None], self.n_heads, 1)
                    r_K = np.repeat(self._rms(k)[:, None], self.n_heads, 1)
            xt = np.hstack([x, np.ones((n, 1))])
            score = np.zeros((self.n_heads, n, n))
            for h in range(self.n_heads):
                for i in range(n):
                    for j in range(i + 1):
                        score[h, i, j] = (xt[i] / r_Q[i, h]) @ self.omega(layer, h, i - j) @ (xt[j] / r_K[j, h])
            logit = score / self.scale
            if self.softcap:
                logit = self.softcap * np.tanh(logit / self.softcap)
            i, j = np.indices((n, n))
            allowed = (j <= i) & ((i - j < self.window[layer]) if self.window[layer] else True)
            logit = np.where(allowed, logit, -np.inf)
            pattern = np.exp(logit - logit.max(-1, keepdims=True))
            pattern /= pattern.sum(-1, keepdims=True)
            z = np.einsum("hij,jhd->ihd", pattern, v[:, group])
            W_O = self.w[p + "o_proj.weight"].T.reshape(self.n_heads, self.d_head, self.d_model)
            writes = np.einsum("ihd,hdm->ihm", z, W_O)
            if self.type != "qwen3":  # Qwen3's post_attention_layernorm is the norm before its MLP
                r_post = self._rms(writes.sum(1))
                writes = writes * self.gain(f"layers.{layer}.post_attention_layernorm.weight") / r_post[:, None, None]
            L.append(dict(x=x, scale=scale, r_Q=r_Q, r_K=r_K, score=score, pattern=pattern, writes=writes,
                          allowed=allowed, resid=resid))
        return L


def per_firing(raw: RawModel, acts, end_pos: int) -> dict:
    """_per_firing.per_firing's answer, for these families: the form's vectors read x~ / r, every
    upstream term is divided by the token's ln1 scale and its QK-norm divisor (docs/normed.md),
    and the score is the one before the softcap. Also each side's signal projection and the part
    every upstream head carries of it ('projection', 'head_part')."""
    result = {}
    for layer, a in enumerate(acts):
        xt = np.hstack([a["x"], np.ones((len(a["x"]), 1))])
        for head in range(raw.n_heads):
            for i in range(end_pos + 1):
                for j in range(1, i + 1):
                    if a["pattern"][head, i, j] < ATTN or a["score"][head, i, j] <= 0:
                        continue
                    U, S, Vt = raw.svd(layer, head, i - j)
                    U, S, V = U[:, :raw.d_head], S[:raw.d_head], Vt[:raw.d_head].T
                    xi, xj = xt[i] / a["r_Q"][i, head], xt[j] / a["r_K"][j, head]
                    c = [S[k] * (xi @ U[:, k]) * (V[:, k] @ xj) for k in range(len(S))]
                    svs = _signal(c)
                    w = {k: np.sign(xi @ U[:, k]) * np.sqrt(S[k]) for k in svs}
                    edges, projection, head_part = {}, {}, {}
                    for side, t, r in (("query", i, a["r_Q"]), ("key", j, a["r_K"])):
                        direction = {k: (U[:, k] if side == "query" else V[:, k]) for k in svs}
                        token = xi if side == "query" else xj
                        projection[side] = sum(w[k] * (token @ direction[k]) for k in svs)
                        divisor = a["scale"][t] * r[t, head]
                        weights, terms = {}, {}
                        for up_layer in range(layer):
                            for up_head in range(raw.n_heads):
                                o = np.append(acts[up_layer]["writes"][t, up_head], 1.0)
                                terms[up_layer, up_head] = {k: w[k] * (o @ direction[k]) / divisor for k in svs}
                                weights[up_layer, up_head] = sum(terms[up_layer, up_head].values())
                        head_part[side] = sum(w[k] * (acts[up]["writes"][t, h] @ direction[k][:-1]) / divisor
                                              for up in range(layer) for h in range(raw.n_heads) for k in svs)
                        edges[side] = {u: (weights[u], terms[u]) for u in select_edges(weights)} if layer else {}
                    result[layer, head, i, j] = {"score": a["score"][head, i, j], "c": c, "svs": svs, "edges": edges,
                                                 "projection": projection, "head_part": head_part}
    return result
