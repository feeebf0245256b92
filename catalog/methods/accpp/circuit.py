"""One batch of prompts through ACC++: tokens in, catalog rows out (ACCPP.md sections 3 and 4).

What is decomposed: each prompt's circuit, seeded at the output and followed recursively, and/or
every firing of chosen heads. The recursion always goes to a strictly lower layer, so it runs
breadth-first, top layer down: the firings reached at a layer (in every prompt of the batch) are
decomposed together, and the head slices they select become the next layers' firings. A firing
is decomposed once per prompt however many paths reach it, as the reference's `traced` set does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from catalog.methods.accpp.components import HOOKS, component_kind, residual_components
from catalog.methods.accpp.firing import SIDES, Firings, LayerDecomposer, threshold_at
from catalog.methods.accpp.seeds import linear_seeds, prob_seeds, probe_seeds
from catalog.methods.accpp.settings import AccppSettings
from catalog.methods.accpp.weights import AccppWeights, accpp_weights
from catalog.methods.shared.tensors import pad_tokens, rows_of
from catalog.methods.shared.tensors import prompt_outputs
from catalog.schema.rows import concat, number_edges, table

@dataclass
class BatchPrompts:
    """What the batch needs of its prompts (positions are those of the model's tokens)."""

    token_lists: list[list[int]]
    end_pos: list[int]
    prompt_ids: list[int]
    answer_ids: list[int | None]
    wrong_ids: list[int | None]
    role_positions: list[dict[str, int]] = field(default_factory=list)


def batch_analysis(context):
    """ACC++'s batch function for a job: prompt ids -> the batch's tables. Stores the model's
    plain form (its singular vectors, read by the read side) once, before the first batch."""
    from catalog.methods.shared.svd import Decomposition, to_arrow

    context.say("preparing the ACC++ decomposition ...")
    weights = accpp_weights(*context.model.attention_weights()[:4], rotary=context.model.adapter.rotary)
    context.store_form("plain", lambda: to_arrow(Decomposition(sigma=weights.S, U=weights.U, V=weights.V),
                                                 form="plain"))

    def analyse(ids):
        prompts = BatchPrompts(**context.prompts_of(ids), role_positions=[context.items[i].roles for i in ids])
        return analyse_batch(context.model, weights, prompts, context.settings)

    return analyse


def analyse_batch(model, weights: AccppWeights, prompts: BatchPrompts, settings: AccppSettings) -> dict:
    """Rows of firings, firing_sides, edges, edge_svs, roots, seeds and prompt_outputs (no run_id)."""
    tokens = pad_tokens(prompts.token_lists, model.tokenizer.eos_token_id or 0)
    logits, cache = model.run(tokens, HOOKS, with_logits=True)
    W_O = model.attention_weights()[4]
    b_O, W_U, b_U = model.output_weights()
    res = residual_components(cache, W_O, b_O)
    n_layers, n_heads = res.pattern.shape[1], res.pattern.shape[2]
    frontier: list[set] = [set() for _ in range(n_layers)]  # per layer: {(batch index, head, dest, src)}
    rows = {name: [] for name in ("roots", "seeds")}
    if settings.seeding != "none":
        _seed(res, prompts, settings, logits, W_U, b_U, frontier, rows, model.tokenizer)
    for layer, head in settings.heads:
        _add_head_firings(res, prompts, settings, layer, head, frontier)
    out = {name: [] for name in ("firings", "firing_sides", "edges", "edge_svs")}
    for layer in range(n_layers - 1, 0, -1):
        firings = _firings(res, layer, frontier[layer], settings)
        if len(firings) == 0:
            continue
        decomposer = LayerDecomposer(layer, firings, res, weights)
        selections = decomposer.decompose(firings, settings.ig_steps)
        _collect(res, prompts, layer, firings, selections, n_heads, model.d_head ** 0.5, frontier, out)
    edges, edge_svs = number_edges(concat(out["edges"]), concat(out["edge_svs"])) if out["edges"] else ({}, {})
    return {
        "firings": table(COLUMNS["firings"], out["firings"]),
        "firing_sides": table(COLUMNS["firing_sides"], out["firing_sides"]),
        "edges": table(COLUMNS["edges"], [edges] if edges else []),
        "edge_svs": table(COLUMNS["edge_svs"], [edge_svs] if edges else []),
        "roots": table(COLUMNS["roots"], rows["roots"]),
        "seeds": table(COLUMNS["seeds"], rows["seeds"], {"weight": pa.float64()}),
        "prompt_outputs": prompt_outputs(logits, prompts.end_pos, prompts.answer_ids, prompts.wrong_ids,
                                         prompts.prompt_ids, model.tokenizer),
    }


COLUMNS = {
    "firings": ["prompt_id", "layer", "head", "dest_pos", "src_pos", "attn_weight", "score"],
    "firing_sides": ["prompt_id", "layer", "head", "dest_pos", "src_pos", "side", "threshold", "n_atoms",
                     "attn_after", "capped"],
    "edges": ["prompt_id", "edge_id", "layer", "head", "dest_pos", "src_pos", "side", "up_kind", "up_layer",
              "up_head", "up_src_pos", "up_attn", "weight"],
    "edge_svs": ["prompt_id", "edge_id", "rank", "sv", "weight"],
    "roots": ["prompt_id", "root_id", "seeding", "objective", "pos", "total", "n_seeds"],
    "seeds": ["prompt_id", "root_id", "seed_rank", "up_kind", "up_layer", "up_head", "up_src_pos", "pos", "weight"],
}


def _seed(res, prompts: BatchPrompts, settings, logits, W_U, b_U, frontier, rows, tokenizer) -> None:
    n_heads = res.pattern.shape[2]
    text = lambda token_id: repr(tokenizer.decode([token_id]))
    probe = None
    if settings.seeding == "probe":
        from catalog.methods.accpp.probe import read_probe

        probe = torch.from_numpy(read_probe(settings.probe)).to(res.pattern.device)
    for b, (end, prompt_id) in enumerate(zip(prompts.end_pos, prompts.prompt_ids)):
        answer, wrong = prompts.answer_ids[b], prompts.wrong_ids[b]
        if settings.seeding == "linear":
            seeds = linear_seeds(res, b, end, W_U[:, answer] - W_U[:, wrong],
                                 f"logit({text(answer)}) - logit({text(wrong)})")
        elif settings.seeding == "probe":
            seeds = probe_seeds(res, b, end, probe, settings.probe_layer,
                                f"probe {settings.probe.name} at layer {settings.probe_layer}")
        else:
            target = answer if settings.prob_target == "answer" else int(logits[b, end].argmax())
            seeds = prob_seeds(res, b, end, W_U, b_U, [target], settings.tau, settings.ig_steps,
                               f"log p({text(target)})")
        n = len(seeds.weight)
        rows["roots"].append({"prompt_id": np.array([prompt_id]), "root_id": np.array([0]),
                              "seeding": np.array([settings.seeding]), "objective": np.array([seeds.objective]),
                              "pos": np.array([end]), "total": np.array([seeds.total]), "n_seeds": np.array([n])})
        kinds = [component_kind(c, n_heads) for c in seeds.comp]
        rows["seeds"].append({
            "prompt_id": np.full(n, prompt_id), "root_id": np.zeros(n, int), "seed_rank": np.arange(n),
            "up_kind": np.array(kinds, dtype=object), "up_layer": _up_layer(seeds.layer, kinds),
            "up_head": _only_heads(seeds.comp, kinds), "up_src_pos": _only_heads(seeds.token, kinds),
            "pos": np.full(n, end), "weight": np.array(seeds.weight, dtype=np.float64),
        })
        for layer, comp, token, kind in zip(seeds.layer, seeds.comp, seeds.token, kinds):
            if kind == "head":
                frontier[layer].add((b, comp, end, token))


def _add_head_firings(res, prompts: BatchPrompts, settings, layer: int, head: int, frontier) -> None:
    """Every firing of one head: pattern >= threshold(i), 1 <= i <= end, at the chosen dest roles."""
    pattern = res.pattern[:, layer, head]  # [prompt, dest, src]
    n_pos, device = pattern.shape[-1], pattern.device
    dest = torch.arange(n_pos, device=device).view(1, -1, 1)
    mask = (pattern.double() >= threshold_at(settings.threshold, dest)) & (dest >= 1)
    mask &= dest <= torch.tensor(prompts.end_pos, device=device).view(-1, 1, 1)
    mask &= torch.arange(n_pos, device=device).view(1, 1, -1) <= dest
    if settings.dest_roles:
        allowed = torch.zeros(len(prompts.end_pos), n_pos, dtype=torch.bool)
        for b, roles in enumerate(prompts.role_positions):
            for role in settings.dest_roles:
                if role in roles:
                    allowed[b, roles[role]] = True
        mask &= allowed.to(device).unsqueeze(-1)
    for b, i, j in torch.nonzero(mask).tolist():
        frontier[layer].add((b, head, i, j))


def _firings(res, layer: int, keys: set, settings) -> Firings:
    """The reached firings of a layer that are decomposed: i >= 1 and pattern >= threshold(i)."""
    device = res.pattern.device
    if not keys:
        return Firings(*(torch.zeros(0, dtype=torch.long, device=device) for _ in range(4)),
                       torch.zeros(0, device=device), torch.zeros(0, device=device))
    b, h, i, j = torch.tensor(sorted(keys), device=device).T
    attn = res.pattern[b, layer, h, i, j]
    threshold = threshold_at(settings.threshold, i)
    keep = (i >= 1) & (j <= i) & (attn.double() >= threshold)
    return Firings(b[keep], h[keep], i[keep], j[keep], attn[keep], threshold[keep])


def _collect(res, prompts, layer, firings: Firings, selections, n_heads, score_scale, frontier, out) -> None:
    """Rows of one layer's decomposed firings, and the upstream firings they lead to."""
    prompt_ids = np.asarray(prompts.prompt_ids)[rows_of(firings.prompt)]
    key = {"prompt_id": prompt_ids, "layer": np.full(len(firings), layer), "head": rows_of(firings.head),
           "dest_pos": rows_of(firings.dest), "src_pos": rows_of(firings.src)}
    # hook_attn_scores is q . k / sqrt(d_head); the catalog stores the raw score q . k, as for the 2024 method.
    raw_score = res.attn_scores[firings.prompt, layer, firings.head, firings.dest, firings.src] * score_scale
    out["firings"].append(dict(key, attn_weight=rows_of(firings.attn), score=rows_of(raw_score)))
    for side in SIDES:
        sel = selections[side]
        out["firing_sides"].append(dict(key, side=np.full(len(firings), side),
                                        threshold=rows_of(firings.threshold), n_atoms=rows_of(sel.n_atoms),
                                        attn_after=rows_of(sel.attn_after), capped=rows_of(sel.capped)))
        keep = ~sel.capped[sel.firing]
        f, up_layer, comp, token = sel.firing[keep], sel.up_layer[keep], sel.comp[keep], sel.token[keep]
        if len(f) == 0:
            continue
        # One edge per (firing, upstream layer, component, token); its atoms in selection order.
        edge_key = torch.stack([f, up_layer, comp, token], dim=1)
        unique, edge_of_atom = torch.unique(edge_key, dim=0, return_inverse=True)
        weight = torch.zeros(len(unique), dtype=torch.float64, device=f.device).index_add_(0, edge_of_atom,
                                                                                          sel.drop[keep])
        ef, el, ec, et = unique.T
        kinds = np.array([component_kind(c, n_heads) for c in ec.tolist()], dtype=object)
        is_head = ec < n_heads
        written = firings.dest[ef] if side == "query" else firings.src[ef]  # where the component writes
        up_attn = res.pattern[firings.prompt[ef], el, ec.clamp(max=n_heads - 1), written, et]
        first_row = sum(len(part["prompt_id"]) for part in out["edges"])
        out["edges"].append({
            **{name: values[rows_of(ef)] for name, values in key.items()},
            "side": np.full(len(unique), side), "up_kind": kinds, "up_layer": _up_layer(el.tolist(), kinds),
            "up_head": _only_heads(ec.tolist(), kinds), "up_src_pos": _only_heads(et.tolist(), kinds),
            "up_attn": np.where(rows_of(is_head), rows_of(up_attn), np.nan), "weight": rows_of(weight),
        })
        out["edge_svs"].append({"edge_row": first_row + rows_of(edge_of_atom), "rank": rows_of(sel.rank[keep]),
                                "sv": rows_of(sel.sv[keep]), "weight": rows_of(sel.drop[keep])})
        for b, l, c, t, tb in zip(firings.prompt[ef][is_head].tolist(), el[is_head].tolist(), ec[is_head].tolist(),
                                  written[is_head].tolist(), et[is_head].tolist()):
            frontier[l].add((b, c, t, tb))


def _up_layer(layers, kinds) -> np.ndarray:
    """The upstream layer, NULL (NaN) for the embedding and the offset, which have none."""
    return np.array([np.nan if k in ("embed", "offset") else l for l, k in zip(layers, kinds)], dtype=np.float64)


def _only_heads(values, kinds) -> np.ndarray:
    return np.array([v if k == "head" else np.nan for v, k in zip(values, kinds)], dtype=np.float64)
