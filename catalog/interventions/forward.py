"""The forward pass written over flat token rows, and its incremental form for interventions.

`clean_forward` runs a batch of prompts once and keeps every activation an intervention reads
(the "clean cache"). `propagate` then runs many perturbed copies of those prompts at once, each
copy ("row") starting where its perturbation enters the model: at layer a, before the attention
stage (residual `resid_pre[a]`, or a query/key patch of one head there) or before the MLP stage
(`resid_mid[a]`), and computing only the positions that can change, its *window* t..end (causal
attention: nothing before the perturbed token t moves). Keys and values of positions before t are
the clean cache's. Rows are independent: a row's perturbation enters only its own tensors.

Both passes compute every layer the same way (`catalog.interventions.blocks`: the family's norm
without affine part, the fused QKV projection on flat tokens [token, d_model] with the rotation
of rotary models, attention per row against that row's full key/value matrices with key heads
repeated over their query group, the family's MLP on flat tokens, in sequence or in parallel
with the attention). That is HookedTransformer's model, with torch's fused kernels (equal to its
written-out formulas up to float rounding; checked against the bridge's hooks and the Hugging
Face model's logits in tests/test_interventions.py and tests/test_interventions_families.py).
Both passes use the same operations, so an unchanged row reproduces the clean pass exactly.

Shapes are named as TransformerLens names them: [layer, prompt, pos, d_model], [.., head, d_head].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from catalog.interventions.blocks import (  # noqa: F401  (ModelWeights, unembed: this module's API too)
    ModelWeights, attend, embed, linear, ln_scale, mlp, normalize, qkv, unembed,
)


@dataclass
class CleanPass:
    """Activations of one forward pass over a batch of prompts, [layer, prompt, pos, ...]."""

    tokens: torch.Tensor  # [prompt, pos] (right-padded)
    end_pos: torch.Tensor  # [prompt]
    resid_pre: torch.Tensor  # [layer + 1, prompt, pos, d_model]; the last is the final residual
    resid_mid: torch.Tensor  # [layer, prompt, pos, d_model]
    normalized: torch.Tensor  # [layer, prompt, pos, d_model]  ln1.hook_normalized
    scale: torch.Tensor  # [layer, prompt, pos]  ln1.hook_scale
    q: torch.Tensor  # [layer, prompt, pos, head, d_head], rotated on rotary models
    k: torch.Tensor  # per query head (key heads repeated over their group), rotated
    v: torch.Tensor
    z: torch.Tensor
    pattern: torch.Tensor  # [layer, prompt, head, dest, src]
    attn_out: torch.Tensor  # [layer, prompt, pos, d_model]  hook_attn_out
    mlp_out: torch.Tensor  # [layer, prompt, pos, d_model]  hook_mlp_out
    logits_end: torch.Tensor  # [prompt, d_vocab] at end_pos


def clean_forward(w: ModelWeights, tokens: torch.Tensor, end_pos: torch.Tensor) -> CleanPass:
    """The forward pass of a [prompt, pos] token batch, keeping what interventions read.

    With parallel attention and MLP, resid_mid is resid_pre + attn_out (what a changed head output
    adds to) and the MLP reads resid_pre."""
    n_prompts, n_pos = tokens.shape
    H, dh = w.n_heads, w.d_head
    resid = embed(w, tokens).reshape(n_prompts * n_pos, -1)
    query_pos = torch.arange(n_pos, device=tokens.device).expand(n_prompts, n_pos)
    flat_pos = query_pos.reshape(-1)
    keep = {name: [] for name in ("resid_pre", "resid_mid", "normalized", "scale", "q", "k", "v", "z", "pattern",
                                  "attn_out", "mlp_out")}
    for layer in range(w.n_layers):
        keep["resid_pre"].append(resid)
        x, scale = normalize(w, resid), ln_scale(w, resid)
        q, k, v = (t.view(n_prompts, n_pos, H, dh) for t in qkv(w, layer, x, flat_pos))
        pattern, z = attend(w, q, k, v, query_pos)
        attn_out = linear(z.reshape(n_prompts * n_pos, H * dh), w.W_O_flat[layer], w.b_O[layer])
        resid_mid = resid + attn_out
        mlp_out = mlp(w, layer, resid if w.parallel_attn_mlp else resid_mid)
        resid = resid_mid + mlp_out
        for name, value in (("resid_mid", resid_mid), ("normalized", x), ("scale", scale[:, 0]), ("q", q), ("k", k),
                            ("v", v), ("z", z), ("pattern", pattern), ("attn_out", attn_out),
                            ("mlp_out", mlp_out)):
            keep[name].append(value)
    keep["resid_pre"].append(resid)
    shaped = {}
    for name, values in keep.items():
        stacked = torch.stack(values)
        if name not in ("q", "k", "v", "z", "pattern"):
            stacked = stacked.view(len(values), n_prompts, n_pos, *stacked.shape[2:])
        shaped[name] = stacked
    final = shaped["resid_pre"][-1][torch.arange(n_prompts, device=tokens.device), end_pos]
    logits_end = unembed(w, final)
    return CleanPass(tokens=tokens, end_pos=end_pos, logits_end=logits_end, **shaped)


# How a row's change enters the model (ACCPP.md section 5):
LOCAL_QUERY = 0  # head `head` of `layer`: its query at t recomputed from the patched input x'
LOCAL_KEY = 1  # the same for its key at t
GLOBAL_MID = 2  # delta added to hook_attn_out of `layer` at t (resid_mid: before that layer's MLP)
GLOBAL_PRE = 3  # delta added to the residual entering `layer` at t (hook_mlp_out of layer-1, resid_pre[0])
CONTROL = 4  # nothing: the clean end token recomputed from `layer` (the batch's un-intervened prompts)

# Stages of a layer, in order; a token starts at one of them (key = layer * 3 + stage).
_ATTN, _HEAD, _MLP = 0, 1, 2


class TensorColumns:
    """A dataclass whose fields are equally long tensors (one entry per row): len() and take()."""

    def __len__(self) -> int:
        return len(getattr(self, next(iter(self.__dataclass_fields__))))

    def take(self, index):
        """The rows at index (a tensor of indices or a mask), as the same class."""
        return type(self)(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})


@dataclass
class Rows(TensorColumns):
    """Copies of clean prompts, each with one change (all [row] unless noted)."""

    prompt: torch.Tensor  # index into the CleanPass batch
    kind: torch.Tensor  # LOCAL_QUERY | LOCAL_KEY | GLOBAL_MID | GLOBAL_PRE | CONTROL
    layer: torch.Tensor
    pos: torch.Tensor  # t, the changed token; the row computes positions t..end (its window)
    head: torch.Tensor  # the patched head (local)
    vector: torch.Tensor  # [row, d_model] local: the patched input x' at t; global: the delta added at t
    watch_layer: torch.Tensor  # report the attention of (watch_layer, watch_head) at (dest, src); -1: none
    watch_head: torch.Tensor
    watch_dest: torch.Tensor
    watch_src: torch.Tensor

    @staticmethod
    def cat(parts: list["Rows"]) -> "Rows":
        return Rows(**{name: torch.cat([getattr(p, name) for p in parts]) for name in Rows.__dataclass_fields__})


def propagate(w: ModelWeights, clean: CleanPass, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every row from its change to the logits at its prompt's end token.

    Returns (watched attention [row], NaN where watch_layer is -1; logits [row, d_vocab] at end).

    A row computes only what its change can reach: positions t..end (causal attention), from the
    layer and stage where the change enters. Everything else is the clean cache: the residual
    each token starts from, and the keys and values of positions before t. A local change at layer
    l moves only head h of that layer: its attention is recomputed from the clean q, k, v with the
    one patched query or key, and the head's change of output, (z' - z) W_O[h], is added to the
    clean resid_mid (a local query patch at i moves no other token at layer l). At the last layer
    only the end token (and a watched destination) needs its attention output and MLP.

    Grouped-query attention: a local key patch changes the key head that head h reads, so every
    query head of its group sees it (as the reference library patches hook_k). Parallel attention
    and MLP: a change of a layer's attention output reaches the next layer only (the MLP read the
    residual before it), so it enters there; a token whose attention was recomputed gets its MLP
    from the residual before the attention, one that started after the attention the clean MLP.
    """
    if w.parallel_attn_mlp:
        mid = rows.kind == GLOBAL_MID
        rows = replace(rows, kind=torch.where(mid, GLOBAL_PRE, rows.kind), layer=rows.layer + mid.long())
    L, H, dh = w.n_layers, w.n_heads, w.d_head
    n_rows, device = len(rows), rows.kind.device  # the model's device: index tensors are made there too
    kind, layer, t = rows.kind, rows.layer, rows.pos
    # The window: positions t..end, except that a key patched at position 0 cannot move position 0
    # itself (its attention row has that one key, weight 1 whatever the key): there it is 1..end.
    start = t + ((kind == LOCAL_KEY) & (t == 0) & (rows.watch_dest >= 1)).long()
    end = clean.end_pos[rows.prompt]
    width = end - start + 1
    # Tokens: (row, pos) for every position of every row's window, with the key where it starts.
    tok_row = torch.repeat_interleave(torch.arange(n_rows, device=device), width)
    first = torch.zeros(n_rows, dtype=torch.long, device=device)
    first[1:] = width.cumsum(0)[:-1]
    tok_slot = torch.arange(len(tok_row), device=device) - first[tok_row]
    tok_pos = start[tok_row] + tok_slot
    at_t = tok_slot == 0
    tk = kind[tok_row]
    tl = layer[tok_row]
    start_layer = torch.where((tk == GLOBAL_MID) & ~at_t, tl + 1, tl)
    start_layer = torch.where((tk == LOCAL_QUERY) & ~at_t, tl + 1, start_layer)
    stage = torch.full_like(tok_row, _ATTN)
    stage = torch.where((tk == GLOBAL_MID) & at_t, _MLP, stage)
    stage = torch.where((tk == LOCAL_KEY) | ((tk == LOCAL_QUERY) & at_t), _HEAD, stage)
    tok_key = start_layer * 3 + stage
    # A row's first full attention stage; rows and tokens sorted so that what is active is a prefix.
    row_key = torch.where((kind == GLOBAL_PRE) | (kind == CONTROL), layer, layer + 1) * 3
    row_order = torch.argsort(row_key, stable=True)
    row_rank = torch.empty_like(row_order)
    row_rank[row_order] = torch.arange(n_rows, device=device)
    tok_order = torch.argsort(tok_key, stable=True)
    tok_row, tok_slot, tok_pos, tok_key = row_rank[tok_row[tok_order]], tok_slot[tok_order], tok_pos[tok_order], \
        tok_key[tok_order]
    start_layer, stage, at_t = start_layer[tok_order], stage[tok_order], at_t[tok_order]
    prompt, kind, layer, t, start, end = (x[row_order] for x in (rows.prompt, kind, layer, t, start, end))
    head, vector, row_key = rows.head[row_order], rows.vector[row_order], row_key[row_order]
    watch_layer, watch_head, watch_dest, watch_src = (x[row_order] for x in (
        rows.watch_layer, rows.watch_head, rows.watch_dest, rows.watch_src))
    tok_prompt = prompt[tok_row]
    # Every token's starting residual, from the clean cache (layer L: the final residual).
    pre = clean.resid_pre[start_layer, tok_prompt, tok_pos]
    mid = clean.resid_mid[start_layer.clamp(max=L - 1), tok_prompt, tok_pos]
    resid = torch.where((stage == _ATTN).unsqueeze(1), pre, mid)
    is_global = (kind[tok_row] == GLOBAL_MID) | (kind[tok_row] == GLOBAL_PRE)
    changed = torch.nonzero(is_global & at_t).flatten()
    resid[changed] += vector[tok_row[changed]]
    end_tok = torch.empty(n_rows, dtype=torch.long, device=device)
    is_end = tok_pos == end[tok_row]
    end_tok[tok_row[is_end]] = torch.nonzero(is_end).flatten()
    watched = torch.full((n_rows,), float("nan"), device=device)
    max_width = int(width.max())
    for ell in range(L):
        last = ell == L - 1
        n_tok = int((tok_key <= ell * 3 + _ATTN).sum())
        n_attn = n_tok  # tokens [:n_attn] go through this layer's attention
        if n_tok:
            n_act = int((row_key <= ell * 3).sum())
            if w.parallel_attn_mlp:
                before_attn = resid[:n_tok].clone()
            q, k, v = qkv(w, ell, normalize(w, resid[:n_tok]), tok_pos[:n_tok])
            keys = clean.k[ell][prompt[:n_act]]  # [row, pos, head, d_head]; the window's are replaced
            values = clean.v[ell][prompt[:n_act]]
            keys[tok_row[:n_tok], tok_pos[:n_tok]] = k
            values[tok_row[:n_tok], tok_pos[:n_tok]] = v
            if last:  # only the end token (and a watched destination) need their output
                wanted = is_end[:n_tok] | ((watch_layer[tok_row[:n_tok]] == ell)
                                           & (tok_pos[:n_tok] == watch_dest[tok_row[:n_tok]]))
                sel = torch.nonzero(wanted).flatten()
                slot = (~is_end[sel]).long()  # end token: slot 0, watched destination: slot 1
                n_slots = 2
            else:
                sel, slot, n_slots = torch.arange(n_tok, device=device), tok_slot[:n_tok], max_width
            q_pad = torch.zeros(n_act, n_slots, H, dh, device=device)
            q_pad[tok_row[sel], slot] = q[sel]
            query_pos = torch.zeros(n_act, n_slots, dtype=torch.long, device=device)
            query_pos[tok_row[sel], slot] = tok_pos[sel]
            pattern, z = attend(w, q_pad, keys, values, query_pos)
            seen = torch.nonzero((watch_layer[tok_row[sel]] == ell) & (tok_pos[sel] == watch_dest[tok_row[sel]]))
            r, sl = tok_row[sel[seen.flatten()]], slot[seen.flatten()]
            watched[r] = pattern[r, watch_head[r], sl, watch_src[r]]
            resid[sel] += linear(z[tok_row[sel], slot].reshape(len(sel), H * dh), w.W_O_flat[ell], w.b_O[ell])
        local = torch.nonzero(((kind == LOCAL_QUERY) | (kind == LOCAL_KEY)) & (layer == ell)).flatten()
        if len(local):
            _head_stage(w, clean, ell, local, resid, tok_key == ell * 3 + _HEAD, tok_row, tok_slot, tok_pos,
                        prompt, kind, t, start, head, vector, max_width,
                        (watch_layer, watch_head, watch_dest, watch_src),
                        watched)
        n_tok = int((tok_key <= ell * 3 + _MLP).sum())
        if n_tok and not w.parallel_attn_mlp:
            sel = torch.nonzero(is_end[:n_tok]).flatten() if last else slice(0, n_tok)
            resid[sel] += mlp(w, ell, resid[sel])
        elif n_tok:
            sel = torch.nonzero(is_end[:n_tok]).flatten() if last else torch.arange(n_tok, device=device)
            fresh = sel[sel < n_attn]
            later = sel[sel >= n_attn]  # started at this layer's head stage: the MLP read the clean residual
            resid[later] += clean.mlp_out[ell][tok_prompt[later], tok_pos[later]]
            if len(fresh):
                resid[fresh] += mlp(w, ell, before_attn[fresh])
    logits = unembed(w, resid[end_tok])
    return watched[row_rank], logits[row_rank]


def _head_stage(w, clean, ell, local, resid, starts_here, tok_row, tok_slot, tok_pos, prompt, kind, t, start, head,
                vector, max_width, watch, watched) -> None:
    """Local rows of layer ell: head h's attention with the patched query, or the heads of h's
    key group with the patched key; the tokens that start here get resid_mid + sum (z' - z) W_O."""
    G, dh, device = w.group, w.d_head, local.device
    p, h = prompt[local], head[local]
    n = torch.arange(len(local), device=device)
    heads = (h // G * G).unsqueeze(1) + torch.arange(G, device=device)  # [row, G]: h's key group
    own = h % G  # h's place in it
    q_new, k_new, _ = qkv(w, ell, vector[local], t[local])  # rotated at t; keys already per query head
    is_key = kind[local] == LOCAL_KEY
    keys = clean.k[ell][p.unsqueeze(1), :, heads].transpose(1, 2).clone()  # [row, pos, G, d_head]
    values = clean.v[ell][p.unsqueeze(1), :, heads].transpose(1, 2)
    kr = torch.nonzero(is_key).flatten()
    keys[kr, t[local[kr]]] = k_new[kr.unsqueeze(1), heads[kr]]
    # Queries of the tokens that start here, by slot; a query patch replaces head h's at t.
    toks = torch.nonzero(starts_here).flatten()
    rank = torch.empty(len(prompt), dtype=torch.long, device=device)
    rank[local] = n
    r = rank[tok_row[toks]]
    q_pad = torch.zeros(len(local), max_width, G, dh, device=device)
    q_pad[r, tok_slot[toks]] = clean.q[ell][p[r].unsqueeze(1), tok_pos[toks].unsqueeze(1), heads[r]]
    qr = torch.nonzero(~is_key).flatten()
    q_pad[qr, 0, own[qr]] = q_new[qr, h[qr]]
    query_pos = start[local].view(-1, 1) + torch.arange(max_width, device=device).view(1, -1)
    pattern, z = attend(w, q_pad, keys, values, query_pos)
    watch_layer, watch_head, watch_dest, watch_src = watch
    rows_here = local[(watch_layer[local] == ell)]
    if len(rows_here):
        rr = rank[rows_here]
        watched[rows_here] = pattern[rr, own[rr], watch_dest[rows_here] - start[rows_here], watch_src[rows_here]]
    dz = z[r, tok_slot[toks]] - clean.z[ell][p[r].unsqueeze(1), tok_pos[toks].unsqueeze(1), heads[r]]  # [tok, G, dh]
    if G > 1:  # a query patch moves head h only: the group's other heads are clean (no rounding moves them)
        dz = dz * ((torch.arange(G, device=device) == own[r].unsqueeze(1)) | is_key[r].unsqueeze(1)).unsqueeze(2)
    flat_dz, flat_head = dz.reshape(-1, dh), heads[r].reshape(-1)
    out = torch.zeros(len(flat_dz), w.W_O.shape[-1], device=device)
    for one in torch.unique(flat_head).tolist():  # at most n_heads small matmuls
        m = torch.nonzero(flat_head == one).flatten()
        out[m] = flat_dz[m] @ w.W_O[ell, one]
    resid[toks] = clean.resid_mid[ell][p[r], tok_pos[toks]] + out.view(len(toks), G, -1).sum(1)
