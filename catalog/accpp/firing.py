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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from catalog.accpp.components import Residual
from catalog.accpp.weights import AccppWeights

SIDES = ("query", "key")
MAX_ATOMS = 1000  # the reference's MAX_ITER: a side that needs more atoms keeps no edge
FIRST_TOP = 64  # atoms ranked before the first greedy try (most firings need far fewer)
CHUNK_ELEMENTS = 2**24  # bound on a chunk's atom tensor (firings x atoms)


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


def trapezoid_weights(steps: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """alphas 0, 1/steps, ..., 1 and their trapezoid weights."""
    alphas = torch.linspace(0, 1, steps + 1, dtype=dtype)
    weights = torch.full((steps + 1,), 1.0 / steps, dtype=dtype)
    weights[0] = weights[-1] = 0.5 / steps
    return alphas, weights


def _masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)


def ig_vector(row: torch.Tensor, src: torch.Tensor, valid: torch.Tensor, steps: int) -> torch.Tensor:
    """g [firing, pos] with IG_atom = X[atom] . g (ACCPP.md 2.3, trapezoid along alpha * row)."""
    alphas, weights = trapezoid_weights(steps)
    p = _masked_softmax(alphas.view(-1, 1, 1) * row.unsqueeze(0), valid.unsqueeze(0))  # [step, firing, pos]
    p_j = p.gather(2, src.view(1, -1, 1).expand(len(alphas), -1, 1))  # [step, firing, 1]
    onehot = torch.nn.functional.one_hot(src, row.shape[-1]).to(row.dtype)
    return torch.einsum("m,mfo,mfp->fp", weights, p_j, onehot.unsqueeze(0) - p)


class LayerDecomposer:
    """Decomposes the firings of one downstream layer; projections shared by its firings are made once.

    Only the heads that have firings are projected (every firing of a layer reads the same
    upstream outputs, projected on its own head's singular vectors).
    """

    def __init__(self, layer: int, heads: torch.Tensor, residual: Residual, weights: AccppWeights):
        self.layer, self.residual = layer, residual
        self.n_heads = weights.U.shape[1]
        self.rank = weights.U.shape[-1]
        self.heads = torch.unique(heads)
        self.local = torch.full((self.n_heads,), -1, dtype=torch.long)
        self.local[self.heads] = torch.arange(len(self.heads))
        U, V = weights.U[layer, self.heads], weights.V[layer, self.heads]  # [h, d_model, r]
        self.S = weights.S[layer, self.heads] / math.sqrt(self.rank)  # [h, r], score scale folded in
        x = residual.normalized[:, layer]
        self.scale = residual.scale[:, layer]  # [prompt, pos]
        self.xu = torch.einsum("bpd,hdk->bphk", x, U)
        self.xv = torch.einsum("bpd,hdk->bphk", x, V)
        self.cu = torch.einsum("hd,hdk->hk", weights.c_d[layer, self.heads], U)
        self.cv = torch.einsum("hd,hdk->hk", weights.c_s[layer, self.heads], V)
        vo = residual.vo[:, :, :layer].flatten(2, 3)  # [prompt, tb, layer*head, d_model]
        self.Pu_heads = torch.einsum("bpnd,hdk->bpnhk", vo, U)
        self.Pv_heads = torch.einsum("bpnd,hdk->bpnhk", vo, V)
        dense, _ = residual.dense_upto(layer)
        dense = dense / self.scale[:, :, None, None]  # LN scale of this layer at the component's token
        self.Pu_dense = torch.einsum("bpcd,hdk->bpchk", dense, U)
        self.Pv_dense = torch.einsum("bpcd,hdk->bpchk", dense, V)
        self.A = residual.pattern[:, :layer].flatten(1, 2)  # [prompt, layer*head, dest, src]

    def layout(self) -> tuple[int, int, int, int]:
        return self.layer, self.n_heads + 4, self.rank, self.A.shape[-1]

    def decompose(self, firings: Firings, steps: int) -> dict[str, Selection]:
        """Both sides' selections for `firings` (all of this layer), chunked to bound memory."""
        atoms_per_firing = math.prod(self.layout())
        chunk = max(1, CHUNK_ELEMENTS // atoms_per_firing)
        parts = {side: [] for side in SIDES}
        for start in range(0, len(firings), chunk):
            index = torch.arange(start, min(start + chunk, len(firings)))
            for side, selection in self._chunk(firings.take(index), steps).items():
                selection.firing += start
                parts[side].append(selection)
        return {side: _concat(parts[side]) for side in SIDES}

    def _chunk(self, f: Firings, steps: int) -> dict[str, Selection]:
        row, valid, sides = self.atoms(f, steps)
        return {side: greedy(ig, rows_of, row, f, valid, self.layout()) for side, (ig, rows_of) in sides.items()}

    def atoms(self, f: Firings, steps: int):
        """(score row [F, pos], valid key columns [F, pos], {side: (IG [F, atoms], rows_of)}).

        rows_of(firings, atoms) gives the breakdown rows X [F', K, pos] of the atoms (flat
        indices [F', K]) of the firings (indices [F'] into f)."""
        n_layer, n_comp, r, n_pos = self.layout()
        H, L = self.n_heads, self.layer
        b, h, i, j = f.prompt, self.local[f.head], f.dest, f.src
        F = len(f)
        ar = torch.arange(F)
        S = self.S[h]  # [F, r]
        acoef = S * (self.xu[b, i, h] + self.cu[h])  # [F, r]
        bcoef = self.xv[b, :, h] + self.cv[h].unsqueeze(1)  # [F, pos, r]
        valid = torch.arange(n_pos).unsqueeze(0) <= i.unsqueeze(1)
        row = torch.einsum("fk,fpk->fp", acoef.double(), bcoef.double())
        g = ig_vector(row, j, valid, steps)  # [F, pos]

        # Query side: X[atom, j'] = value[atom] * bcoef[j', k].
        value = torch.zeros(F, n_layer, n_comp, r, n_pos)
        A_i = self.A[b, :, i, :]  # [F, layer*head, tb]
        heads = torch.einsum("fk,fnt,ftnk->fnkt", S, A_i, self.Pu_heads[b, :, :, h]) / self.scale[b, i].view(F, 1, 1, 1)
        value[:, :, :H] = heads.reshape(F, L, H, r, n_pos)
        dense = S.unsqueeze(1) * self.Pu_dense[b, i, :, h]  # [F, 2L + 1, r]
        value[ar, :, H, :, i] = dense[:, :L]
        value[ar, :, H + 1, :, i] = dense[:, L:2 * L]
        value[ar, 0, H + 2, :, i] = dense[:, 2 * L]
        value[ar, 0, H + 3, :, i] = S * self.cu[h]
        G = torch.einsum("fpk,fp->fk", bcoef.double(), g)
        query_ig = value.double() * G.view(F, 1, 1, r, 1)

        def query_rows(sel, idx):
            k = (idx // n_pos) % r
            rows = value.flatten(1)[sel.unsqueeze(1), idx].unsqueeze(-1) * bcoef[sel.unsqueeze(1), :, k]
            return rows.double()

        # Key side: IG = acoef[k] * sum_j' (v_k . y(j')) g[j'].
        scaled_g = g / self.scale[b].double()  # [F, pos]
        Ag = torch.einsum("fntp,ft->fnp", self.A[b].double(), scaled_g)  # [F, layer*head, tb]
        coef_heads = torch.einsum("fk,ftnk->fnkt", acoef, self.Pv_heads[b, :, :, h])  # [F, n, r, tb]
        key_ig = torch.zeros(F, n_layer, n_comp, r, n_pos, dtype=torch.float64)
        key_ig[:, :, :H] = (coef_heads.double() * Ag.unsqueeze(2)).reshape(F, L, H, r, n_pos)
        dense_g = acoef.double().unsqueeze(1) * torch.einsum("fpck,fp->fck", self.Pv_dense[b, :, :, h].double(), g)
        key_ig[ar, :, H, :, j] = dense_g[:, :L]
        key_ig[ar, :, H + 1, :, j] = dense_g[:, L:2 * L]
        key_ig[ar, 0, H + 2, :, j] = dense_g[:, 2 * L]
        key_ig[ar, 0, H + 3, :, j] = (acoef * self.cv[h]).double() * g.sum(1, keepdim=True)

        def key_rows(sel, idx):
            up, comp = idx // (n_comp * r * n_pos), (idx // (r * n_pos)) % n_comp
            k, tb = (idx // n_pos) % r, idx % n_pos
            fs = sel.unsqueeze(1).expand_as(idx)
            bs, hs = b[fs], h[fs]
            coef = acoef[fs, k]  # [F', K]
            rows = torch.zeros(*idx.shape, n_pos)
            is_head = comp < H
            n = (up * H + comp).clamp(max=L * H - 1)
            head_rows = (coef * self.Pv_heads[bs, tb, n, hs, k]).unsqueeze(-1) * self.A[bs, n, :, tb] / self.scale[bs]
            rows = torch.where(is_head.unsqueeze(-1), head_rows, rows)
            dense_index = torch.where(comp == H, up, torch.where(comp == H + 1, L + up, 2 * L)).clamp(max=2 * L)
            dense_rows = coef.unsqueeze(-1) * self.Pv_dense[bs, :, dense_index, hs, k]
            rows = torch.where(((comp >= H) & (comp < H + 3)).unsqueeze(-1), dense_rows, rows)
            offset_rows = (coef * self.cv[hs, k]).unsqueeze(-1).expand(-1, -1, n_pos)
            rows = torch.where((comp == H + 3).unsqueeze(-1), offset_rows, rows)
            # The layout's other slots hold no component: a non-head component sits at token j only,
            # the embedding and the offset at layer 0 only (their IG is 0; their rows must be too).
            exists = is_head | ((tb == j[fs]) & ((comp < H + 2) | (up == 0)))
            return torch.where(exists.unsqueeze(-1), rows, torch.zeros_like(rows)).double()

        return row, valid, {"query": (query_ig.flatten(1), query_rows), "key": (key_ig.flatten(1), key_rows)}


def greedy(ig: torch.Tensor, rows_of, row: torch.Tensor, f: Firings, valid: torch.Tensor, layout) -> Selection:
    """Zero atoms in descending IG order until p_j falls below the threshold (ACCPP.md 2.4).

    The attention after each step comes from the running score row row - cumsum(X) of the top
    atoms, for every firing at once; firings that need more than the first FIRST_TOP atoms are
    ranked again up to MAX_ATOMS + 1.
    """
    F, N = ig.shape
    n_atoms = torch.zeros(F, dtype=torch.long)
    attn_after = f.attn.double().clone()
    capped = torch.zeros(F, dtype=torch.bool)
    drops = torch.zeros(F, 0, dtype=torch.float64)
    picked = {}
    pending = torch.arange(F)
    for K in (min(FIRST_TOP, N), min(MAX_ATOMS + 1, N)):
        if len(pending) == 0:
            break
        top = torch.topk(ig[pending], K, dim=1).indices  # [F', K]
        X = rows_of(pending, top)  # [F', K, pos]
        running = row[pending].unsqueeze(1) - X.cumsum(dim=1)
        p = _masked_softmax(running, valid[pending].unsqueeze(1))
        a = p.gather(2, f.src[pending].view(-1, 1, 1).expand(-1, K, 1)).squeeze(2)  # [F', K]
        a_all = torch.cat([f.attn[pending].double().unsqueeze(1), a], dim=1)
        below = a < f.threshold[pending].unsqueeze(1)
        found = below.any(dim=1)
        stop = below.to(torch.int8).argmax(dim=1) + 1  # atoms zeroed
        done = found | (K == N) | (K > MAX_ATOMS)
        for local in torch.nonzero(done).flatten().tolist():
            firing = int(pending[local])
            m = int(stop[local]) if bool(found[local]) else K
            n_atoms[firing], attn_after[firing] = m, a_all[local, m]
            capped[firing] = m >= MAX_ATOMS
            picked[firing] = (top[local, :m], (a_all[local, :m] - a_all[local, 1:m + 1]))
        pending = pending[~done]
    return _selection(picked, layout, F, n_atoms, attn_after, capped)


def _selection(picked: dict, layout, F: int, n_atoms, attn_after, capped) -> Selection:
    _, n_comp, r, n_pos = layout
    firings = sorted(picked)
    idx = torch.cat([picked[k][0] for k in firings]) if firings else torch.zeros(0, dtype=torch.long)
    drop = torch.cat([picked[k][1] for k in firings]) if firings else torch.zeros(0, dtype=torch.float64)
    firing = torch.cat([torch.full((len(picked[k][0]),), k) for k in firings]) if firings else idx.clone()
    rank = torch.cat([torch.arange(len(picked[k][0])) for k in firings]) if firings else idx.clone()
    return Selection(
        firing=firing, rank=rank, up_layer=idx // (n_comp * r * n_pos), comp=(idx // (r * n_pos)) % n_comp,
        sv=(idx // n_pos) % r, token=idx % n_pos, drop=drop, n_atoms=n_atoms, attn_after=attn_after, capped=capped,
    )


def _concat(parts: list[Selection]) -> Selection:
    fields = Selection.__dataclass_fields__
    return Selection(**{name: torch.cat([getattr(p, name) for p in parts]) for name in fields})
