"""Edge signals and interventions (ACCPP.md section 5), batched over edges.

An edge says: the upstream component's output, through some singular directions of the
downstream head (l, h), moves the firing (i, j). Its *signal* is that output projected on those
directions, at the token the component writes to (t = i on the query side, t = j on the key
side):

    sig = P y(t),   P = B (B^T B)^-1 B^T   (B: the edge's directions, one column each)
    sig -= mean(sig)                       (LayerNorm centres; the model is LNPre)

For ACC++ the columns of B are orthonormal (u_k or v_k of the plain Omega), so P = B B^T as in
the reference library. For the 2024 method they are the d_model-part of the bias-augmented
directions, which are not orthonormal; P is still the orthogonal projector on their span (see
docs/interventions.md for why).

* local:  x' = ln1.hook_normalized[l](t) + sign * sig / ln1.hook_scale[l](t), and only head h's
          query (query side) or key (key side) at t is recomputed from x'.
* global: sign * sig is added to the component's own output at t (hook_attn_out of its layer for
          a head or the attention bias, hook_mlp_out for an MLP, hook_resid_pre of layer 0 for
          the embedding), so that everything downstream sees it. Offsets cannot be global.

sign = -1 ablates (removes the signal), +1 boosts (adds it once more). Every edge runs in its own
copy of its prompt (`forward.propagate`), so edges never see each other's changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catalog.interventions.forward import (
    CONTROL, GLOBAL_MID, GLOBAL_PRE, LOCAL_KEY, LOCAL_QUERY, CleanPass, ModelWeights, Rows, TensorColumns, propagate,
)

UP_KINDS = ("head", "mlp", "attn_bias", "embed", "offset")
HEAD, MLP, ATTN_BIAS, EMBED, OFFSET = range(len(UP_KINDS))
MODES = ("local", "global")


@dataclass
class Directions:
    """The singular directions edges name, in the residual stream: [layer, head, d_model, sv].

    ACC++: u_k and v_k of the plain Omega = W_Q W_K^T, with the AH offsets c_d, c_s
    ([layer, head, d_model]). The 2024 method: the first d_model entries of the bias-augmented
    u_k and v_k (the last entry belongs to the constant 1, which no component writes); no offsets.
    """

    U: torch.Tensor
    V: torch.Tensor
    c_d: torch.Tensor | None = None
    c_s: torch.Tensor | None = None
    # The 2024 method on rotary models has one form per head and offset dest - src (docs/rotary.md):
    # then U, V are [form, d_model, sv] and form_index [layer, head, offset] names each one (-1: none).
    form_index: torch.Tensor | None = None


@dataclass
class EdgeBatch(TensorColumns):
    """Edges to intervene on, as index tensors (all [edge] unless noted).

    `prompt` indexes the CleanPass batch; `up_src` is the token an ACC++ head slice reads (-1: the
    whole head, the 2024 method); `svs` [edge, k] the edge's singular directions (-1: padding).
    """

    prompt: torch.Tensor
    layer: torch.Tensor
    head: torch.Tensor
    dest: torch.Tensor
    src: torch.Tensor
    query_side: torch.Tensor  # bool: the query (d) side, else the key (s) side
    up_kind: torch.Tensor  # index into UP_KINDS
    up_layer: torch.Tensor  # -1 where not applicable
    up_head: torch.Tensor
    up_src: torch.Tensor
    svs: torch.Tensor

    @property
    def pos(self) -> torch.Tensor:
        """The token the upstream component writes to: dest on the query side, src on the key side."""
        return torch.where(self.query_side, self.dest, self.src)

    def basis(self, directions: Directions) -> torch.Tensor:
        """[edge, d_model, k]: the edge's directions as columns, zero columns for padding."""
        if directions.form_index is None:
            U, V = directions.U[self.layer, self.head], directions.V[self.layer, self.head]
        else:  # the form of the firing's offset
            offset, known = self.dest - self.src, directions.form_index.shape[2]
            form = directions.form_index[self.layer, self.head, offset.clamp(max=known - 1)]
            form = torch.where(offset < known, form, -1)
            if bool((form < 0).any()):
                raise ValueError("an edge names a (head, offset) form that the directions do not hold")
            U, V = directions.U[form], directions.V[form]
        vectors = torch.where(self.query_side.view(-1, 1, 1), U, V)  # [edge, d_model, sv]
        picked = torch.gather(vectors, 2, self.svs.clamp(min=0).unsqueeze(1).expand(-1, vectors.shape[1], -1))
        return picked * (self.svs >= 0).unsqueeze(1)

    def offset(self, directions: Directions) -> torch.Tensor:
        """[edge, d_model]: the downstream head's AH offset (c_d query side, c_s key side) for offset
        edges, zero for the others."""
        out = torch.zeros(len(self), directions.U.shape[-2], device=directions.U.device)
        e = torch.nonzero(self.up_kind == OFFSET).flatten()
        if len(e):
            if directions.c_d is None:
                raise ValueError("offset edges need the AH offsets c_d, c_s (ACC++ directions)")
            l, h = self.layer[e], self.head[e]
            out[e] = torch.where(self.query_side[e].unsqueeze(1), directions.c_d[l, h], directions.c_s[l, h])
        return out


def upstream_output(w: ModelWeights, clean: CleanPass, edges: EdgeBatch, directions: Directions) -> torch.Tensor:
    """y: what each edge's upstream component writes at its token, [edge, d_model] (ACCPP.md 5)."""
    p, t, kind = edges.prompt, edges.pos, edges.up_kind
    y = torch.zeros(len(edges), w.W_O.shape[-1], device=w.W_O.device)
    is_head = kind == HEAD
    for layer in torch.unique(edges.up_layer[is_head]).tolist():  # one matmul per upstream layer
        e = torch.nonzero(is_head & (edges.up_layer == layer)).flatten()
        h, tb = edges.up_head[e], edges.up_src[e]
        z = clean.z[layer][p[e], t[e], h]  # the whole head: z W_O (2024 method)
        sliced = tb >= 0  # ACC++ head slice: A[t, tb] v(tb) W_O
        if bool(sliced.any()):
            s = torch.nonzero(sliced).flatten()
            attn = clean.pattern[layer][p[e[s]], h[s], t[e[s]], tb[s]]
            z[s] = attn.unsqueeze(1) * clean.v[layer][p[e[s]], tb[s], h[s]]
        y[e] = torch.bmm(z.unsqueeze(1), w.W_O[layer][h]).squeeze(1)
    mlp = torch.nonzero(kind == MLP).flatten()
    y[mlp] = clean.mlp_out[edges.up_layer[mlp], p[mlp], t[mlp]]
    bias = torch.nonzero(kind == ATTN_BIAS).flatten()
    y[bias] = w.b_O[edges.up_layer[bias]]
    embed = torch.nonzero(kind == EMBED).flatten()
    y[embed] = clean.resid_pre[0][p[embed], t[embed]]
    off = torch.nonzero(kind == OFFSET).flatten()
    y[off] = edges.offset(directions)[off]
    return y


def project(y: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of y [edge, d] on the span of basis' columns [edge, d, k] (zero columns
    are padding): B (B^T B)^+ B^T y, which is B B^T y for orthonormal columns."""
    gram = (basis.transpose(1, 2) @ basis).double()
    coef = torch.linalg.pinv(gram, hermitian=True) @ (basis.transpose(1, 2) @ y.unsqueeze(2)).double()
    return (basis @ coef.float()).squeeze(2)


@dataclass
class Signals:
    delta: torch.Tensor  # [edge, d_model] the signed change at the edge's token (local: of x, global: of the output)
    norm: torch.Tensor  # [edge] |sig| (local: divided by the ln1 scale)
    norm_ratio: torch.Tensor  # [edge] |after| / |before| of the patched tensor at the token
    cos_sim: torch.Tensor  # [edge] cosine of after and before


def edge_signals(w: ModelWeights, clean: CleanPass, edges: EdgeBatch, directions: Directions, mode: str,
                 boost: bool, center: bool | None = None) -> Signals:
    """The signal of every edge, signed for ablate / boost, and how much it changes the patched tensor.

    center: subtract the signal's mean; by default on LayerNorm models (whose residuals are
    centred), not on RMSNorm models (ACCPP.md section 5)."""
    if center is None:
        center = w.centred
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    sig = project(upstream_output(w, clean, edges, directions), edges.basis(directions))
    if center:
        sig = sig - sig.mean(dim=1, keepdim=True)
    p, t = edges.prompt, edges.pos
    if mode == "local":
        sig = sig / clean.scale[edges.layer, p, t].unsqueeze(1)
        before = clean.normalized[edges.layer, p, t]
    else:
        if bool((edges.up_kind == OFFSET).any()):
            raise ValueError("an AH offset has no output of its own: it cannot be intervened on globally")
        before = hooked_output(clean, edges)
    delta = sig if boost else -sig
    after = before + delta
    return Signals(delta=delta, norm=sig.norm(dim=1), norm_ratio=after.norm(dim=1) / before.norm(dim=1),
                   cos_sim=torch.nn.functional.cosine_similarity(after, before, dim=1))


def hooked_output(clean: CleanPass, edges: EdgeBatch) -> torch.Tensor:
    """The clean tensor a global intervention adds to, at the edge's token: hook_attn_out (head,
    attn bias), hook_mlp_out (MLP) or blocks.0.hook_resid_pre (embedding)."""
    p, t, kind, layer = edges.prompt, edges.pos, edges.up_kind, edges.up_layer.clamp(min=0)
    out = clean.attn_out[layer, p, t]
    out = torch.where((kind == MLP).unsqueeze(1), clean.mlp_out[layer, p, t], out)
    return torch.where((kind == EMBED).unsqueeze(1), clean.resid_pre[0][p, t], out)


def intervention_rows(clean: CleanPass, edges: EdgeBatch, signals: Signals, mode: str) -> Rows:
    """One propagate() row per edge: where its change enters the model."""
    watch = dict(watch_layer=edges.layer, watch_head=edges.head, watch_dest=edges.dest, watch_src=edges.src)
    if mode == "local":
        x = clean.normalized[edges.layer, edges.prompt, edges.pos]
        return Rows(prompt=edges.prompt, kind=torch.where(edges.query_side, LOCAL_QUERY, LOCAL_KEY),
                    layer=edges.layer, pos=edges.pos, head=edges.head, vector=x + signals.delta, **watch)
    kind = edges.up_kind
    # head / attn bias: hook_attn_out of its layer (before that layer's MLP); MLP: hook_mlp_out, i.e.
    # the residual entering the next layer; embedding: the residual entering layer 0.
    mid = (kind == HEAD) | (kind == ATTN_BIAS)
    layer = torch.where(mid, edges.up_layer, torch.where(kind == MLP, edges.up_layer + 1, 0))
    return Rows(prompt=edges.prompt, kind=torch.where(mid, GLOBAL_MID, GLOBAL_PRE), layer=layer, pos=edges.pos,
                head=torch.zeros_like(edges.head), vector=signals.delta, **watch)


def control_rows(clean: CleanPass, prompts: torch.Tensor, start_layer: int) -> Rows:
    """Un-intervened copies of prompts, their end token recomputed from start_layer: the batch's
    other prompts, whose logits must not move."""
    n, d_model, device = len(prompts), clean.resid_pre.shape[-1], prompts.device
    zeros = torch.zeros(n, dtype=torch.long, device=device)
    return Rows(prompt=prompts, kind=zeros + CONTROL, layer=zeros + start_layer, pos=clean.end_pos[prompts],
                head=zeros, vector=torch.zeros(n, d_model, device=device), watch_layer=zeros - 1, watch_head=zeros,
                watch_dest=zeros, watch_src=zeros)


@dataclass
class Results:
    """What an intervention changed, per edge (numpy-ready tensors, all [edge])."""

    pos: torch.Tensor
    signal_norm: torch.Tensor
    norm_ratio: torch.Tensor
    cos_sim: torch.Tensor
    attn_before: torch.Tensor
    attn_after: torch.Tensor
    logit_diff_before: torch.Tensor  # NaN where the prompt has no answer / wrong token
    logit_diff_after: torch.Tensor
    kl_div: torch.Tensor  # KL(clean || intervened) of the next-token distribution at the end token, nats
    other_logit_change: torch.Tensor  # largest |logit change| of the batch's un-intervened prompts


def intervene(w: ModelWeights, clean: CleanPass, edges: EdgeBatch, directions: Directions, mode: str = "local",
              boost: bool = False, answer: torch.Tensor | None = None, wrong: torch.Tensor | None = None,
              max_rows: int = 256) -> Results:
    """Intervene on every edge (each in its own copy of its prompt) and measure the effects.

    answer, wrong: token ids per prompt of the clean batch (-1: unknown) for the logit difference.
    Edges go through the model max_rows at a time (ordered by where they enter it), each pass
    with one un-intervened copy of every prompt of the clean batch: the "other prompts" whose
    logits must not change.
    """
    n, n_prompts, device = len(edges), clean.tokens.shape[0], clean.tokens.device
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    out = {name: torch.empty(n, device=device) for name in ("signal_norm", "norm_ratio", "cos_sim", "attn_after",
                                                            "diff_after", "kl", "other")}
    answer = torch.full((n_prompts,), -1, device=device) if answer is None else torch.as_tensor(answer, device=device)
    wrong = torch.full((n_prompts,), -1, device=device) if wrong is None else torch.as_tensor(wrong, device=device)
    known = (answer >= 0) & (wrong >= 0)
    ans, wr = answer.clamp(min=0), wrong.clamp(min=0)
    # KL(clean || q) = sum_v p log p - p . z_q + logsumexp(z_q) (sum_v p = 1), in float64: the terms
    # cancel to small numbers, and float32 would round them below 0.
    clean_p = clean.logits_end.double().softmax(dim=-1)
    neg_entropy = (clean_p * clean.logits_end.double().log_softmax(dim=-1)).sum(dim=-1)
    all_prompts = torch.arange(n_prompts, device=device)
    enters = edges.layer if mode == "local" else edges.up_layer
    for part in torch.argsort(enters, stable=True).split(max_rows):
        chunk = edges.take(part)
        signals = edge_signals(w, clean, chunk, directions, mode, boost)
        rows = intervention_rows(clean, chunk, signals, mode)
        controls = control_rows(clean, all_prompts, int(rows.layer.min()))
        watched, logits = propagate(w, clean, Rows.cat([rows, controls]))
        edge_logits, control_logits = logits[: len(part)], logits[len(part):]
        p = chunk.prompt
        z = edge_logits.double()
        for name, value in (
            ("signal_norm", signals.norm), ("norm_ratio", signals.norm_ratio), ("cos_sim", signals.cos_sim),
            ("attn_after", watched[: len(part)]),
            ("diff_after", edge_logits.gather(1, ans[p].view(-1, 1)).squeeze(1)
             - edge_logits.gather(1, wr[p].view(-1, 1)).squeeze(1)),
            ("kl", (neg_entropy[p] - (z @ clean_p.T).gather(1, p.view(-1, 1)).squeeze(1)
                    + torch.logsumexp(z, dim=-1)).float()),  # p . z for every clean prompt: one matmul
            ("other", (control_logits - clean.logits_end).abs().max().expand(len(part))),
        ):
            out[name][part] = value
    p = edges.prompt
    diff_before = clean.logits_end[p, ans[p]] - clean.logits_end[p, wr[p]]
    nan = torch.tensor(float("nan"), device=device)
    return Results(
        pos=edges.pos, signal_norm=out["signal_norm"], norm_ratio=out["norm_ratio"], cos_sim=out["cos_sim"],
        attn_before=clean.pattern[edges.layer, p, edges.head, edges.dest, edges.src], attn_after=out["attn_after"],
        logit_diff_before=torch.where(known[p], diff_before, nan),
        logit_diff_after=torch.where(known[p], out["diff_after"], nan), kl_div=out["kl"],
        other_logit_change=out["other"],
    )
