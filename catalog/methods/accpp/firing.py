"""Decomposing firings into residual components (ACCPP.md section 2), batched over firings.

An atom is (upstream layer, component id, singular index k, token tb); its breakdown row
X[atom, j'] is its contribution to the score of every key column j' of the firing's row i.
The atoms are laid out as the reference library flattens them, [layer, H + 4, r, pos], so an
atom's flat index decodes to its key by arithmetic.

Two facts make this fast. The score rows have structure: on the query side X = a_atom *
bcoef[j', k] (the key side is held whole), on the key side a head slice's row is the head's
attention column A[j', tb] scaled. And the trapezoid integral of the ranking is linear in
the atoms: IG_atom = X[atom] . g with g = sum_m w_m p_j(a_m) (e_j - p(a_m)), one T-vector per
firing. So no breakdown tensor is ever built: the ranking is one product per atom, and only
the atoms the greedy actually zeroes (the top of the ranking) get their rows.

Rotary models (ACCPP.md section 6, docs/accpp.md): a component at position t is read into the
head's query or key space, rotated by R_t there (catalog.methods.accpp.rotation) and taken to
singular coordinates by W_Q^+ U (W_K^+ V). On the query side every component sits at i, so one
rotation per firing; on the key side a head slice is rotated at each key column it is written
to, and its IG needs only the attention-weighted sums of cos_j' and sin_j' over the columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from catalog.methods.accpp.components import Residual
from catalog.methods.accpp.rotation import Rotation
from catalog.methods.accpp.weights import AccppWeights

SIDES = ("query", "key")
MAX_ATOMS = 1000  # the reference's MAX_ITER: a side that needs more atoms keeps no edge
# Atoms ranked per greedy pass: most firings stop within 32 (on attn-real IOI prompts the median
# is 5-6, the 90th percentile 14-26), the rest are ranked again, deeper, up to the cap.
PASSES = (32, 128, MAX_ATOMS + 1)
CHUNK_ELEMENTS = 2**24  # bound on a chunk's atom tensor (firings x atoms)


def threshold_at(threshold, dest: torch.Tensor) -> torch.Tensor:
    """A run's firing threshold at each destination: 'dynamic' (below) or one number."""
    if threshold == "dynamic":
        return dynamic_threshold(dest)
    return torch.full(dest.shape, float(threshold), dtype=torch.float64, device=dest.device)


def dynamic_threshold(dest: torch.Tensor, scale: float = 2.5) -> torch.Tensor:
    """The default firing and greedy threshold min(1, 2.5 / (i + 1))."""
    return torch.clamp(scale / (dest.double() + 1), max=1.0)


@dataclass
class Firings:
    """Firings of one layer: (prompt in the batch, head, dest i, src j), with pattern and threshold."""

    prompt: torch.Tensor
    head: torch.Tensor
    dest: torch.Tensor
    src: torch.Tensor
    attn: torch.Tensor       # hook_pattern[i, j]
    threshold: torch.Tensor  # the attention the greedy must get below

    def __len__(self) -> int:
        return len(self.prompt)

    def take(self, index) -> "Firings":
        return Firings(*(t[index] for t in (self.prompt, self.head, self.dest, self.src, self.attn, self.threshold)))


@dataclass
class Selection:
    """One side's greedy result for a set of firings: the zeroed atoms and how each firing ended."""

    firing: torch.Tensor     # [atom] index of the firing
    rank: torch.Tensor       # [atom] 0-based selection order within the firing's side
    up_layer: torch.Tensor   # [atom] upstream layer (reference layout: 0 for embedding and offset)
    comp: torch.Tensor       # [atom] component id (0..H-1 head, H mlp, H+1 b_O, H+2 embedding, H+3 offset)
    sv: torch.Tensor         # [atom] singular index k of the downstream head
    token: torch.Tensor      # [atom] head slice: its source token tb; other components: i (query) or j (key)
    drop: torch.Tensor       # [atom] attention drop caused by zeroing it (float64)
    n_atoms: torch.Tensor    # [firing] atoms zeroed
    attn_after: torch.Tensor  # [firing] attention left
    capped: torch.Tensor     # [firing] MAX_ATOMS reached: the atoms are not edges


def trapezoid_weights(steps: int, dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """alphas 0, 1/steps, ..., 1 and their trapezoid weights."""
    alphas = torch.linspace(0, 1, steps + 1, dtype=dtype, device=device)
    weights = torch.full((steps + 1,), 1.0 / steps, dtype=dtype, device=device)
    weights[0] = weights[-1] = 0.5 / steps
    return alphas, weights


def _masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)


def ig_vector(row: torch.Tensor, src: torch.Tensor, valid: torch.Tensor, steps: int) -> torch.Tensor:
    """g [firing, pos] with IG_atom = X[atom] . g (ACCPP.md 2.3, trapezoid along alpha * row)."""
    alphas, weights = trapezoid_weights(steps, device=row.device)
    p = _masked_softmax(alphas.view(-1, 1, 1) * row.unsqueeze(0), valid.unsqueeze(0))  # [step, firing, pos]
    p_j = p.gather(2, src.view(1, -1, 1).expand(len(alphas), -1, 1))  # [step, firing, 1]
    onehot = torch.nn.functional.one_hot(src, row.shape[-1]).to(row.dtype)
    return torch.einsum("m,mfo,mfp->fp", weights, p_j, onehot.unsqueeze(0) - p)


class LayerDecomposer:
    """Decomposes the firings of one downstream layer; projections shared by its firings are made once.

    Only the heads that have firings are projected (every firing of a layer reads the same
    upstream outputs, projected on its own head's singular vectors).
    """

    def __init__(self, layer: int, firings: "Firings", residual: Residual, weights: AccppWeights):
        self.layer = layer
        self.n_heads = weights.U.shape[1]
        self.rank = weights.U.shape[-1]
        self.device = device = residual.pattern.device  # everything below lives there, as the activations
        self.heads = torch.unique(firings.head)
        self.local = torch.full((self.n_heads,), -1, dtype=torch.long, device=device)
        self.local[self.heads] = torch.arange(len(self.heads), device=device)
        U, V = weights.U[layer, self.heads], weights.V[layer, self.heads]  # [h, d_model, r]
        self.S = weights.S[layer, self.heads] / math.sqrt(self.rank)  # [h, r], score scale folded in
        x = residual.normalized[:, layer]
        self.scale = residual.scale[:, layer]  # [prompt, pos]
        n_pos = x.shape[1]
        self.rot = None if weights.rotary is None else Rotation(weights.rotary, self.rank, n_pos, device)
        if self.rot is None:
            self.xu = torch.einsum("bpd,hdk->bphk", x, U)
            self.xv = torch.einsum("bpd,hdk->bphk", x, V)
            self.cu = torch.einsum("hd,hdk->hk", weights.c_d[layer, self.heads], U)
            self.cv = torch.einsum("hd,hdk->hk", weights.c_s[layer, self.heads], V)
        else:
            # Rotary: everything at position t is read into the head's query (key) space, rotated
            # by R_t there, and taken to singular coordinates by back_q (back_k). The offsets
            # (b_Q, b_K in that space) rotate too, so they depend on the position: [h, pos, r].
            self.Rq, self.Rk = weights.read_q[layer, self.heads], weights.read_k[layer, self.heads]
            self.Bq, self.Bk = weights.back_q[layer, self.heads], weights.back_k[layer, self.heads]
            cos, sin = self.rot.cos, self.rot.sin  # [pos, r]
            turn = lambda y, c, s: self.rot.rotate(y, c, s)  # noqa: E731
            xq = turn(torch.einsum("bpd,hde->bphe", x, self.Rq), cos[None, :, None], sin[None, :, None])
            xk = turn(torch.einsum("bpd,hde->bphe", x, self.Rk), cos[None, :, None], sin[None, :, None])
            self.xu = torch.einsum("bphe,hek->bphk", xq, self.Bq)
            self.xv = torch.einsum("bphe,hek->bphk", xk, self.Bk)
            off_q = turn(weights.offset_q[layer, self.heads].unsqueeze(1), cos[None], sin[None])  # [h, pos, r]
            off_k = turn(weights.offset_k[layer, self.heads].unsqueeze(1), cos[None], sin[None])
            self.cu = torch.einsum("hpe,hek->hpk", off_q, self.Bq)
            self.cv = torch.einsum("hpe,hek->hpk", off_k, self.Bk)
        # Head slices projected on u_k / v_k, only for the (prompt, head) pairs that have firings:
        # (v W_O) . u_k as [pair, upstream head, k, tb], a firing's slab one contiguous block.
        pair_keys = torch.unique(firings.prompt * self.n_heads + firings.head)
        self.pair = torch.full((residual.v.shape[0], self.n_heads), -1, dtype=torch.long, device=device)
        self.pair.view(-1)[pair_keys] = torch.arange(len(pair_keys), device=device)
        pair_prompt, pair_head = pair_keys // self.n_heads, self.local[pair_keys % self.n_heads]
        v = residual.v[pair_prompt, :, :layer].flatten(2, 3)  # [pair, tb, layer*head, d_head]
        WU, WV = weights.through_output(residual.W_O, layer, self.heads)  # [h, layer*head, d_head, r]
        if self.rot is None:
            self.Pu_heads = torch.einsum("qpne,qnek->qnkp", v, WU[pair_head]).contiguous()
            self.Pv_heads = torch.einsum("qpne,qnek->qnkp", v, WV[pair_head]).contiguous()
        else:
            # Rotary: (v W_O) read into the query / key space, [pair, upstream head, tb, r]; the
            # rotation is the position the slice is written at, known per firing (i, or each j').
            self.Pq_heads = torch.einsum("qpne,qnek->qnpk", v, WU[pair_head]).contiguous()
            self.Pk_heads = torch.einsum("qpne,qnek->qnpk", v, WV[pair_head]).contiguous()
        self.U, self.V = U, V
        dense = residual.dense_upto(layer)
        self.dense = dense / self.scale[:, :, None, None]  # LN scale of this layer at the component's token
        if self.rot is not None:
            # The dense components at every position, read and rotated there: [prompt, pos, h, 2L + 1, r].
            cos, sin = self.rot.cos[None, :, None, None], self.rot.sin[None, :, None, None]
            self.dense_q = self.rot.rotate(torch.einsum("bpcd,hde->bphce", self.dense, self.Rq), cos, sin)
            self.dense_k = self.rot.rotate(torch.einsum("bpcd,hde->bphce", self.dense, self.Rk), cos, sin)
        self.A = residual.pattern[:, :layer].flatten(1, 2)  # [prompt, layer*head, dest, src]

    def layout(self) -> tuple[int, int, int, int]:
        return self.layer, self.n_heads + 4, self.rank, self.A.shape[-1]

    def decompose(self, firings: Firings, steps: int) -> dict[str, Selection]:
        """Both sides' selections for `firings` (all of this layer), chunked to bound memory."""
        atoms_per_firing = math.prod(self.layout())
        chunk = max(1, CHUNK_ELEMENTS // atoms_per_firing)
        # Chunks of similar destinations: a chunk's head slices only span its tokens 0..max(i).
        by_dest = torch.argsort(firings.dest, stable=True)
        parts = {side: [] for side in SIDES}
        zeros = lambda dtype: torch.zeros(len(firings), dtype=dtype, device=self.device)  # noqa: E731
        per_firing = {side: {"n_atoms": zeros(torch.long), "attn_after": zeros(torch.float64),
                             "capped": zeros(torch.bool)} for side in SIDES}
        for start in range(0, len(firings), chunk):
            index = by_dest[start:start + chunk]
            for side, selection in self._chunk(firings.take(index), steps).items():
                selection.firing = index[selection.firing]  # back to the input order
                for name, values in per_firing[side].items():
                    values[index] = getattr(selection, name)
                parts[side].append(selection)
        return {side: _concat(parts[side], **per_firing[side]) for side in SIDES}

    def _chunk(self, f: Firings, steps: int) -> dict[str, Selection]:
        atoms = self.atoms(f, steps)
        return {side: greedy(candidates, rows_of, atoms, f, self.layout())
                for side, (candidates, rows_of) in atoms.sides.items()}

    def atoms(self, f: Firings, steps: int) -> "FiringAtoms":
        """The firings' atoms: candidates by float32 IG, and their breakdown rows.

        Head slices (the bulk: layer * H * r * pos atoms) and the other components (2 * layer + 2
        per sv) are ranked apart, each with one fused product, and merged: no tensor in the
        padded [layer, H + 4, r, pos] layout is ever built."""
        n_layer, n_comp, r, n_pos = self.layout()
        H, L = self.n_heads, self.layer
        b, h, i, j = f.prompt, self.local[f.head], f.dest, f.src
        q = self.pair[b, f.head]  # the firing's (prompt, head) pair
        S = self.S[h]  # [F, r]
        rot = self.rot
        cu_i = self.cu[h] if rot is None else self.cu[h, i]  # [F, r] the query offset at i
        cv_at = self.cv[h].unsqueeze(1) if rot is None else self.cv[h]  # [F, 1 or pos, r] the key offset
        acoef = S * (self.xu[b, i, h] + cu_i)  # [F, r]
        bcoef = self.xv[b, :, h] + cv_at  # [F, pos, r]
        valid = torch.arange(n_pos, device=self.device).unsqueeze(0) <= i.unsqueeze(1)
        row = torch.einsum("fk,fpk->fp", acoef.double(), bcoef.double())
        g = ig_vector(row, j, valid, steps)  # [F, pos]
        g32 = g.float()
        scale_i = self.scale[b, i].unsqueeze(1)  # [F, 1]
        T = int(i.max()) + 1  # head slices read tokens 0..i only

        # Query side: X[atom, j'] = value[atom] * bcoef[j', k], so IG = value * (bcoef[:, k] . g).
        G = torch.einsum("fpk,fp->fk", bcoef.double(), g).float()
        A_i = self.A[b, :, i, :T]  # [F, layer*head, tb]
        # One copy of the firings' slabs, then products in place: this is the bulk of the memory traffic.
        if rot is None:
            query_heads = self.Pu_heads[..., :T].index_select(0, q).mul_(A_i.unsqueeze(2))
            dense_u = _per_head(self.dense[b, i], self.U, h)  # [F, 2L + 1, r]: components at i, on u_k
        else:  # the slices written at i, rotated by R_i, then to singular coordinates
            Pq = self.Pq_heads[:, :, :T].index_select(0, q)  # [F, layer*head, tb, r]
            Pq = rot.rotate(Pq, rot.cos[i][:, None, None], rot.sin[i][:, None, None])
            query_heads = torch.einsum("fnte,fek->fnkt", Pq, self.Bq[h]).mul_(A_i.unsqueeze(2))
            dense_u = torch.bmm(self.dense_q[b, i, h], self.Bq[h])
        query_heads.mul_((S * G / scale_i)[:, None, :, None])
        query_comps = torch.cat([dense_u, cu_i.unsqueeze(1)], dim=1) * (S * G).unsqueeze(1)

        def query_value(fs, up, comp, k, tb):
            """value[atom] of the atoms (flat keys decoded, [F', K] each) of the firings fs."""
            bs, hs = b[fs], h[fs]
            n = (up * H + comp).clamp(max=L * H - 1)
            if rot is None:
                P, cu_k = self.Pu_heads[q[fs], n, k, tb], self.cu[hs, k]
            else:
                vec = rot.rotate(self.Pq_heads[q[fs], n, tb], rot.cos[i[fs]], rot.sin[i[fs]])  # [F', K, r]
                P, cu_k = (vec * self.Bq.transpose(-1, -2)[hs, k]).sum(-1), self.cu[hs, i[fs], k]
            head = S[fs, k] * self.A[bs, n, i[fs], tb] * P / self.scale[bs, i[fs]]
            other = S[fs, k] * torch.where(comp == H + 3, cu_k, dense_u[fs, _dense_index(comp, up, H, L), k])
            return torch.where(comp < H, head, torch.where(_exists(comp, up, tb, i[fs], H), other, 0.0))

        def query_rows(sel, idx):
            fs = sel.unsqueeze(1).expand_as(idx)
            up, comp, k, tb = _decode(idx, n_comp, r, n_pos)
            return (query_value(fs, up, comp, k, tb).unsqueeze(-1) * bcoef[fs, :, k]).double()

        # Key side: IG = acoef[k] * sum_j' (v_k . y(j')) g[j'].
        if rot is None:
            # [F, layer*head, tb]
            Ag = torch.einsum("fntp,ft->fnp", self.A[b, :, :T, :T], g32[:, :T] / self.scale[b, :T])
            key_heads = self.Pv_heads[..., :T].index_select(0, q).mul_(Ag.unsqueeze(2))
            dense_g = _per_head(_weighted_by_prompt(self.dense[:, :T], b, g32[:, :T]), self.V, h)  # [F, 2L + 1, r]
            offset_g = self.cv[h] * g32.sum(1, keepdim=True)
        else:
            # A slice (tb) at key column j' turns by R_j': sum_j' w[j'] rot_j'(p) = p * sum_j' w cos_j'
            # + half_turn(p) * sum_j' w sin_j', with w[j'] = A[j', tb] g[j'] / scale[j'].
            w = self.A[b, :, :T, :T] * (g32[:, :T] / self.scale[b, :T])[:, None, :, None]  # [F, n, j', tb]
            Pk = self.Pk_heads[:, :, :T].index_select(0, q)  # [F, layer*head, tb, r]
            turned = (Pk * torch.einsum("fntp,te->fnpe", w, rot.cos[:T])
                      + rot.half_turn(Pk) * torch.einsum("fntp,te->fnpe", w, rot.sin[:T]))
            key_heads = torch.einsum("fnpe,fek->fnkp", turned, self.Bk[h])
            dense_g = torch.bmm(torch.einsum("fpce,fp->fce", self.dense_k[b, :T, h], g32[:, :T]), self.Bk[h])
            offset_g = torch.einsum("fpk,fp->fk", self.cv[h], g32)
        key_heads.mul_(acoef[:, None, :, None])
        key_comps = torch.cat([dense_g, offset_g.unsqueeze(1)], dim=1) * acoef.unsqueeze(1)

        def key_rows(sel, idx):
            up, comp, k, tb = _decode(idx, n_comp, r, n_pos)
            fs = sel.unsqueeze(1).expand_as(idx)
            bs, hs = b[fs], h[fs]
            coef = acoef[fs, k]  # [F', K]
            n = (up * H + comp).clamp(max=L * H - 1)
            if rot is None:
                head_rows = ((coef * self.Pv_heads[q[fs], n, k, tb]).unsqueeze(-1) * self.A[bs, n, :, tb]
                             / self.scale[bs])
                offset_rows = (coef * self.cv[hs, k]).unsqueeze(-1).expand(-1, -1, n_pos)
            else:  # the slice's projection at every key column j', rotated by R_j': [F', K, pos]
                vec, back = self.Pk_heads[q[fs], n, tb], self.Bk.transpose(-1, -2)[hs, k]  # [F', K, r] each
                P = (vec * back) @ rot.cos.T + (rot.half_turn(vec) * back) @ rot.sin.T
                head_rows = coef.unsqueeze(-1) * P * self.A[bs, n, :, tb] / self.scale[bs]
                offset_rows = coef.unsqueeze(-1) * self.cv.transpose(1, 2)[hs, k]
            rows = torch.where((comp < H).unsqueeze(-1), head_rows, offset_rows)
            exists = _exists(comp, up, tb, j[fs], H)
            rows = torch.where(((comp >= H) & ~exists).unsqueeze(-1), torch.zeros_like(rows), rows)
            # MLP, b_O and embedding rows, (y(j') / scale) . v_k at every key column, for those atoms only.
            m = torch.nonzero((comp >= H) & (comp < H + 3) & exists, as_tuple=True)
            if len(m[0]):
                if rot is None:
                    y = self.dense[bs[m], :, _dense_index(comp[m], up[m], H, L)]  # [M, pos, d_model]
                    rows[m] = coef[m].unsqueeze(-1) * torch.einsum("mpd,md->mp", y, self.V[hs[m], :, k[m]])
                else:
                    y = self.dense_k[bs[m], :, hs[m], _dense_index(comp[m], up[m], H, L)]  # [M, pos, r] rotated
                    rows[m] = coef[m].unsqueeze(-1) * torch.einsum("mpe,me->mp", y, self.Bk[hs[m], :, k[m]])
            return rows.double()

        def candidates_of(heads_ig, comps_ig, slot):
            comp_keys = _component_keys(L, H, r, n_pos, self.device)  # [2L + 2, r] flat keys at token 0

            def candidates(sel, K):
                """Flat atom keys [F', K] of each firing's largest float32 IG, heads and components merged."""
                top_heads = torch.topk(heads_ig[sel].flatten(1), min(K, heads_ig[0].numel()), dim=1)
                top_comps = torch.topk(comps_ig[sel].flatten(1), min(K, comps_ig[0].numel()), dim=1)
                flat = top_heads.indices  # over [layer * H, r, T]
                n, k, tb = flat // (r * T), (flat // T) % r, flat % T
                head_keys = (((n // H) * n_comp + n % H) * r + k) * n_pos + tb
                comp_keys_sel = comp_keys.flatten()[top_comps.indices] + slot[sel].unsqueeze(1)
                values = torch.cat([top_heads.values, top_comps.values], dim=1)
                keys = torch.cat([head_keys, comp_keys_sel], dim=1)
                best = torch.topk(values, min(K, values.shape[1]), dim=1).indices
                return keys.gather(1, best)

            return candidates

        return FiringAtoms(row, valid, g, n_layer * n_comp * r * n_pos, {
            "query": (candidates_of(query_heads, query_comps, i), query_rows),
            "key": (candidates_of(key_heads, key_comps, j), key_rows),
        })


def _per_head(x: torch.Tensor, W: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """x[f] @ W[head[f]] for x [F, c, d], W [h, d, r]: one matmul per head (no [F, d, r] gather)."""
    out = x.new_empty(x.shape[0], x.shape[1], W.shape[-1])
    for hh in torch.unique(head).tolist():
        rows = torch.nonzero(head == hh).flatten()
        out[rows] = x[rows] @ W[hh]
    return out


def _weighted_by_prompt(dense: torch.Tensor, prompt: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_p weights[f, p] dense[prompt[f], p] for dense [prompt, pos, c, d]: [F, c, d], one matmul
    per prompt (no [F, pos, c, d] gather)."""
    flat = dense.flatten(2)  # [prompt, pos, c * d]
    out = flat.new_empty(len(prompt), flat.shape[-1])
    for bb in torch.unique(prompt).tolist():
        rows = torch.nonzero(prompt == bb).flatten()
        out[rows] = weights[rows] @ flat[bb]
    return out.view(len(prompt), dense.shape[2], dense.shape[3])


def _decode(idx: torch.Tensor, n_comp: int, r: int, n_pos: int):
    """(upstream layer, component, sv, token) of flat atom keys in the [layer, H + 4, r, pos] layout."""
    return idx // (n_comp * r * n_pos), (idx // (r * n_pos)) % n_comp, (idx // n_pos) % r, idx % n_pos


def _dense_index(comp, up, H: int, L: int):
    """Position on the dense axis (mlp 0.., b_O 0.., embedding) of a non-head component."""
    return torch.where(comp == H, up, torch.where(comp == H + 1, L + up, 2 * L)).clamp(0, 2 * L)


def _exists(comp, up, tb, slot, H: int):
    """A non-head component exists at its slot token only, the embedding and offset at layer 0 only."""
    return (tb == slot) & ((comp < H + 2) | (up == 0))


def _component_keys(L: int, H: int, r: int, n_pos: int, device=None) -> torch.Tensor:
    """Flat keys (at token 0) of the non-head components in the order of the *_comps tensors:
    mlp 0..L-1, b_O 0..L-1, embedding, offset; [2L + 2, r]."""
    n_comp = H + 4
    layer = torch.tensor(list(range(L)) * 2 + [0, 0], device=device)
    comp = torch.tensor([H] * L + [H + 1] * L + [H + 2, H + 3], device=device)
    k = torch.arange(r, device=device)
    return ((layer.unsqueeze(1) * n_comp + comp.unsqueeze(1)) * r + k) * n_pos


@dataclass
class FiringAtoms:
    """What the greedy needs of a chunk of firings.

    sides[side] = (candidates, rows_of): candidates(firings, K) gives the flat keys [F', K] of
    the K atoms of largest float32 IG of the firings (indices [F'] into the chunk);
    rows_of(firings, keys) gives their breakdown rows X [F', K, pos] (float64). The exact IG of
    an atom is X . g.
    """

    row: torch.Tensor    # [F, pos] the score row i (float64), = the sum of every atom's row
    valid: torch.Tensor  # [F, pos] key columns j' <= i
    g: torch.Tensor      # [F, pos] the IG vector (float64)
    n_atoms: int         # atoms in the layout (some slots hold no component)
    sides: dict          # side -> (candidates(firings, K) -> flat keys [F', K], rows_of)


def _ranked(candidates_of, rows_of, atoms: FiringAtoms, pending: torch.Tensor, K: int):
    """The top K atoms of each pending firing in exact IG order, and their rows.

    Candidates come from the float32 IG with a margin (2K + 16), so that its rounding cannot
    push an atom of the exact top K out; they are then ordered by X . g in float64 (stable, as
    the reference's float64 ranking), which decides near-ties exactly as far as float64 can.
    """
    candidates = candidates_of(pending, min(atoms.n_atoms, 2 * K + 16))
    X = rows_of(pending, candidates)  # [F', K', pos]
    exact = torch.einsum("fkp,fp->fk", X, atoms.g[pending])
    order = torch.sort(exact, dim=1, descending=True, stable=True).indices[:, :K]
    return candidates.gather(1, order), X.gather(1, order.unsqueeze(-1).expand(-1, -1, X.shape[-1]))


def greedy(candidates_of, rows_of, atoms: FiringAtoms, f: Firings, layout) -> Selection:
    """Zero atoms in descending IG order until p_j falls below the threshold (ACCPP.md 2.4).

    The attention after each step comes from the running score row row - cumsum(X) of the top
    atoms, for every firing at once; firings that need more atoms than a pass ranked go on to the
    next, deeper pass (PASSES), up to MAX_ATOMS + 1.
    """
    F, N = len(f), atoms.n_atoms
    row, valid = atoms.row, atoms.valid
    device = row.device
    n_atoms = torch.zeros(F, dtype=torch.long, device=device)
    attn_after = f.attn.double().clone()
    capped = torch.zeros(F, dtype=torch.bool, device=device)
    parts = []  # (firing, rank, atom, drop) of the firings finished in each pass
    pending = torch.arange(F, device=device)
    for K in sorted({min(K, N) for K in PASSES}):
        if len(pending) == 0:
            break
        top, X = _ranked(candidates_of, rows_of, atoms, pending, K)  # [F', K], [F', K, pos]
        running = row[pending].unsqueeze(1) - X.cumsum(dim=1)
        p = _masked_softmax(running, valid[pending].unsqueeze(1))
        a = p.gather(2, f.src[pending].view(-1, 1, 1).expand(-1, K, 1)).squeeze(2)  # [F', K]
        a_all = torch.cat([f.attn[pending].double().unsqueeze(1), a], dim=1)
        below = a < f.threshold[pending].unsqueeze(1)
        found = below.any(dim=1)
        stop = below.to(torch.int8).argmax(dim=1) + 1  # atoms zeroed
        done = found | (K == N) | (K > MAX_ATOMS)
        m = torch.where(found, stop, torch.full_like(stop, K))  # atoms zeroed (all K when never below)
        finished = pending[done]
        n_atoms[finished] = m[done]
        attn_after[finished] = a_all[done].gather(1, m[done].unsqueeze(1)).squeeze(1)
        capped[finished] = m[done] >= MAX_ATOMS
        local, rank = torch.nonzero(done.unsqueeze(1) & (torch.arange(K, device=device).unsqueeze(0) < m.unsqueeze(1)),
                                    as_tuple=True)
        drop = a_all[:, :-1] - a_all[:, 1:]
        parts.append((pending[local], rank, top[local, rank], drop[local, rank]))
        pending = pending[~done]
    return _selection(parts, layout, n_atoms, attn_after, capped)


def _selection(parts: list, layout, n_atoms, attn_after, capped) -> Selection:
    _, n_comp, r, n_pos = layout
    firing, rank, idx, drop = (torch.cat([p[c] for p in parts]) if parts
                               else torch.zeros(0, dtype=torch.long, device=n_atoms.device) for c in range(4))
    order = torch.argsort(firing * (MAX_ATOMS + 2) + rank)  # by firing, then selection order
    firing, rank, idx, drop = firing[order], rank[order], idx[order], drop[order].double()
    return Selection(
        firing=firing, rank=rank, up_layer=idx // (n_comp * r * n_pos), comp=(idx // (r * n_pos)) % n_comp,
        sv=(idx // n_pos) % r, token=idx % n_pos, drop=drop, n_atoms=n_atoms, attn_after=attn_after, capped=capped,
    )


def _concat(parts: list[Selection], **per_firing) -> Selection:
    """One selection from the chunks' atoms, with the per-firing results given."""
    atom_fields = [name for name in Selection.__dataclass_fields__ if name not in per_firing]
    return Selection(**{name: torch.cat([getattr(p, name) for p in parts]) for name in atom_fields}, **per_firing)
