"""One batch of prompts through the model and the method: tokens in, catalog rows out.

The forward pass caches the five activations of SPEC.md; then, layer by layer, firings,
sparse signals and both sides' edges are computed for all prompts and heads at once, and
returned as Arrow tables shaped like the catalog's tables (without run_id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from catalog.decompose import Decomposition
from catalog.edges import SIDES, trace_side, upstream_outputs
from catalog.outputs import prompt_outputs
from catalog.rows import concat, number_edges, table, take
from catalog.signals import find_firings, sparse_signals


@dataclass(frozen=True)
class Settings:
    attn_threshold: float = 0.5
    sv_threshold: float = 1.0
    edge_threshold: float = 0.7
    append_constant: bool = True


def pad_tokens(token_lists: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad to one [prompt, pos] tensor. Attention is causal, so padding after a prompt's
    last token cannot change any activation at its real positions."""
    tokens = torch.full((len(token_lists), max(map(len, token_lists))), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens


def analyse_batch(model, decomposition: Decomposition, W_O, token_lists, end_pos, prompt_ids,
                  settings: Settings, answer_ids=None, wrong_ids=None) -> dict:
    """Rows of firings, firing_svs, edges, edge_svs and prompt_outputs for a batch of tokenized prompts."""
    pad_id = model.tokenizer.eos_token_id or 0
    logits, cache = model.run(pad_tokens(token_lists, pad_id), with_logits=True)
    outputs_table = prompt_outputs(logits, end_pos, answer_ids or [None] * len(end_pos),
                                   wrong_ids or [None] * len(end_pos), list(prompt_ids), model.tokenizer)
    end_pos = torch.as_tensor(end_pos)
    prompt_ids = np.asarray(prompt_ids)
    z = [cache[f"blocks.{layer}.attn.hook_z"] for layer in range(model.n_layers - 1)]
    outputs = upstream_outputs(z, W_O) if z else None
    rows = {name: [] for name in ("firings", "firing_svs", "edges", "edge_svs")}
    for layer in range(model.n_layers):
        firings = find_firings(
            cache[f"blocks.{layer}.attn.hook_pattern"], cache[f"blocks.{layer}.attn.hook_attn_scores"],
            end_pos, settings.attn_threshold, model.d_head,
        )
        if len(firings) == 0:
            continue
        U, V, sigma = decomposition.U[layer], decomposition.V[layer], decomposition.sigma[layer]
        signals = sparse_signals(firings, cache[f"blocks.{layer}.ln1.hook_normalized"], U, V, sigma,
                                 settings.sv_threshold)
        key = {"prompt_id": prompt_ids[firings.prompt.numpy()], "layer": np.full(len(firings), layer),
               "head": firings.head.numpy(), "dest_pos": firings.dest.numpy(), "src_pos": firings.src.numpy()}
        rows["firings"].append(dict(key, attn_weight=firings.attn_weight.numpy(),
                                    score=firings.score.numpy(), n_svs=signals.n_svs.numpy()))
        selected = signals.selected()  # [firing, rank]: which ranks belong to each signal
        f, rank = selected.nonzero(as_tuple=True)
        sv = signals.order[f, rank]
        rows["firing_svs"].append(dict(
            take(key, f), rank=rank.numpy(), sv=sv.numpy(), contribution=signals.contribution[f, sv].numpy(),
            dest_proj=signals.dest_proj[f, sv].numpy(), src_proj=signals.src_proj[f, sv].numpy(),
        ))
        if layer == 0:
            continue  # nothing is upstream of layer 0
        scale = cache[f"blocks.{layer}.ln1.hook_scale"][..., 0]
        upstream = outputs[:, :, : layer * model.n_heads]
        for side in SIDES:
            result = trace_side(side, firings, signals, U, V, sigma, upstream, scale,
                                settings.append_constant, settings.edge_threshold)
            f, up = result.is_edge.nonzero(as_tuple=True)
            first_row = sum(len(part["prompt_id"]) for part in rows["edges"])
            edge = dict(take(key, f), side=np.full(len(f), side), up_kind=np.full(len(f), "head"),
                        up_layer=(up // model.n_heads).numpy(), up_head=(up % model.n_heads).numpy())
            rows["edges"].append(dict(edge, weight=result.weight[f, up].numpy()))
            # One row per (edge, direction of the firing's signal), in the signal's order.
            e, rank = selected[f, : result.terms.shape[2]].nonzero(as_tuple=True)
            rows["edge_svs"].append(dict(edge_row=first_row + e.numpy(), rank=rank.numpy(),
                                         sv=signals.order[f[e], rank].numpy(), weight=result.terms[f[e], up[e], rank].numpy()))
    if rows["edges"]:
        edges, edge_svs = number_edges(concat(rows["edges"]), concat(rows["edge_svs"]))
        rows["edges"], rows["edge_svs"] = [edges], [edge_svs]
    return dict({name: table(COLUMNS[name], parts) for name, parts in rows.items()}, prompt_outputs=outputs_table)


COLUMNS = {
    "firings": ["prompt_id", "layer", "head", "dest_pos", "src_pos", "attn_weight", "score", "n_svs"],
    "firing_svs": ["prompt_id", "layer", "head", "dest_pos", "src_pos", "rank", "sv", "contribution",
                   "dest_proj", "src_proj"],
    "edges": ["prompt_id", "edge_id", "layer", "head", "dest_pos", "src_pos", "side", "up_kind", "up_layer",
              "up_head", "weight"],
    "edge_svs": ["prompt_id", "edge_id", "rank", "sv", "weight"],
}
