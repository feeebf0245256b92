"""One batch of prompts through the model and the method: tokens in, catalog rows out.

The forward pass caches the five activations of SPEC.md; then, layer by layer, firings,
sparse signals and both sides' edges are computed for all prompts and heads at once, and
returned as Arrow tables shaped like the catalog's tables (without run_id).
"""

from __future__ import annotations

import numpy as np
import torch

from catalog.methods.sad import shares
from catalog.methods.sad.edges import SIDES, trace_side, upstream_outputs
from catalog.methods.sad.settings import SadSettings
from catalog.models.families.base import (attention_logits, head_z, layer_rotary, layer_window, qk_scales,
                                          residual_in)
from catalog.methods.shared.tensors import pad_tokens, prompt_outputs, rows_of
from catalog.schema.rows import concat, number_edges, table, take
from catalog.methods.sad.signals import find_firings, find_sinks, sparse_signals, subset


def batch_analysis(context):
    """The 2024 method's batch function for a job: prompt ids -> the batch's tables."""
    qk = qk_forms(context.model, context.stored_form)
    W_O = context.model.attention_weights()[4]
    return lambda ids: analyse_batch(context.model, qk, W_O, settings=context.settings, **context.prompts_of(ids))


def qk_forms(model, stored_form=None):
    """The QK forms the method reads: per head from the stored decomposition (learned positions;
    stored_form('augmented') gives its rows), or per (head, offset) computed from the factors as
    firings need them (rotary; nothing stored is read)."""
    if model.adapter.rotary is not None:
        from catalog.methods.sad.rotary import RotaryForms

        by_layer = [layer_rotary(model.adapter, layer) for layer in range(model.n_layers)]
        return RotaryForms(*model.adapter.qk_factors(), model.adapter.rotary, device=model.device,
                           rotary_by_layer=by_layer if any(r is not model.adapter.rotary for r in by_layer) else None)
    from catalog.methods.sad.forms import HeadForms
    from catalog.methods.shared.svd import from_arrow

    return HeadForms(from_arrow(stored_form("augmented"), model.n_layers, model.n_heads), device=model.device)


def analyse_batch(model, qk, W_O, token_lists, end_pos, prompt_ids, settings: SadSettings, answer_ids=None,
                  wrong_ids=None) -> dict:
    """Rows of firings, firing_svs, edges, edge_svs and prompt_outputs for a batch of tokenized prompts,
    and the singular_vectors its signals use that were not stored yet (rotary models; else None).

    qk: the model's QK forms (catalog.methods.sad.forms.HeadForms, or catalog.methods.sad.rotary.RotaryForms for rotary
    models), which give each layer's forms for its firings. Every tensor stays on the model's
    device until its rows are converted for writing (`rows_of`)."""
    pad_id = model.tokenizer.eos_token_id or model.tokenizer.pad_token_id or 0
    logits, cache = model.run(pad_tokens(token_lists, pad_id), model.adapter.hooks + shares.HOOKS, with_logits=True)
    outputs_table = prompt_outputs(logits, end_pos, answer_ids or [None] * len(end_pos),
                                   wrong_ids or [None] * len(end_pos), list(prompt_ids), model.tokenizer)
    device = logits.device
    end_pos = torch.as_tensor(end_pos, device=device)
    prompt_ids = np.asarray(prompt_ids)
    n_heads, adapter = model.n_heads, model.adapter
    # What each head writes is z W_O (over the post-attention norm's scale, where the family has one).
    z = [head_z(adapter, cache, layer).float() for layer in range(model.n_layers - 1)]
    outputs = upstream_outputs(z, W_O.float()) if z else None
    residual = shares.residual_by_kind(cache, model.n_layers, outputs, n_heads, model.output_weights()[0])
    rows = {name: [] for name in ("firings", "firing_svs", "side_shares", "edges", "edge_svs")}
    is_sink = find_sinks([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.n_layers)],
                         end_pos, settings.sink_attention, settings.sink_head_share,
                         settings.sink_min_heads)  # [prompt, pos]
    sink_tokens = _sink_tokens(is_sink, [len(tokens) for tokens in token_lists], prompt_ids)
    for layer in range(model.n_layers):
        firings = find_firings(
            cache[f"blocks.{layer}.attn.hook_pattern"].float(), attention_logits(adapter, cache, layer).float(),
            end_pos, settings.attn_threshold, adapter.score_scale, window=layer_window(adapter, layer),
        )
        if len(firings) == 0:
            continue
        to_sink = is_sink[firings.prompt, firings.src]
        offset = firings.dest - firings.src
        forms, firings.form = qk.layer_forms(layer, firings.head, offset)
        normalized, scale = residual_in(adapter, cache, layer)
        r_QK = qk_scales(adapter, cache, layer)  # None without QK-norm
        signals = sparse_signals(firings, normalized, forms, settings.sv_threshold, r_QK)
        key = {"prompt_id": prompt_ids[rows_of(firings.prompt)], "layer": np.full(len(firings), layer),
               "head": rows_of(firings.head), "dest_pos": rows_of(firings.dest), "src_pos": rows_of(firings.src)}
        pos_offset = rows_of(offset) if forms.pos_offset is not None else np.full(len(firings), np.nan)
        rows["firings"].append(dict(key, attn_weight=rows_of(firings.attn_weight), score=rows_of(firings.score),
                                    n_svs=rows_of(signals.n_svs), pos_offset=pos_offset,
                                    to_sink=rows_of(to_sink)))
        selected = signals.selected()  # [firing, rank]: which ranks belong to each signal
        f, rank = selected.nonzero(as_tuple=True)
        sv = signals.order[f, rank]
        rows["firing_svs"].append(dict(
            take(key, rows_of(f)), rank=rows_of(rank), sv=rows_of(sv), contribution=rows_of(signals.contribution[f, sv]),
            dest_proj=rows_of(signals.dest_proj[f, sv]), src_proj=rows_of(signals.src_proj[f, sv]),
        ))
        scale = scale.float()
        qk_scale = dict(zip(SIDES, r_QK)) if r_QK is not None else dict.fromkeys(SIDES)
        weights = shares.signal_weights(firings, signals, forms)  # the same on both sides
        for side in SIDES:
            rows["side_shares"].append(_side_shares(side, key, firings, signals, weights, forms, residual[layer],
                                                    scale, qk_scale[side]))
        if layer == 0:
            continue  # nothing is upstream of layer 0
        # Firings to a sink keep their rows above but get no edges unless keep_sinks: their edges
        # would mostly say what writes the sink's key, the same in every prompt, and flood the
        # catalog (SmolLM2: about half of all firings; README, "Attention sinks").
        traced = torch.arange(len(firings), device=device) if settings.keep_sinks else (~to_sink).nonzero()[:, 0]
        if len(traced) == 0:
            continue
        traced_rows = rows_of(traced)
        firings, signals, selected = subset(firings, traced), subset(signals, traced), selected[traced]
        upstream = outputs[:, :, : adapter.upstream_heads(layer)]
        for side in SIDES:
            result = trace_side(side, firings, signals, forms, upstream, scale, settings.append_constant,
                                settings.edge_threshold, qk_scale[side])
            f, up = result.is_edge.nonzero(as_tuple=True)
            first_row = sum(len(part["prompt_id"]) for part in rows["edges"])
            edge = dict(take(key, traced_rows[rows_of(f)]), side=np.full(len(f), side),
                        up_kind=np.full(len(f), "head"), up_layer=rows_of(up // n_heads), up_head=rows_of(up % n_heads))
            rows["edges"].append(dict(edge, weight=rows_of(result.weight[f, up])))
            # One row per (edge, direction of the firing's signal), in the signal's order.
            e, rank = selected[f, : result.terms.shape[2]].nonzero(as_tuple=True)
            rows["edge_svs"].append(dict(edge_row=first_row + rows_of(e), rank=rows_of(rank),
                                         sv=rows_of(signals.order[f[e], rank]),
                                         weight=rows_of(result.terms[f[e], up[e], rank])))
    if rows["edges"]:
        edges, edge_svs = number_edges(concat(rows["edges"]), concat(rows["edge_svs"]))
        rows["edges"], rows["edge_svs"] = [edges], [edge_svs]
    tables = {name: table(COLUMNS[name], parts) for name, parts in rows.items()}
    return dict(tables, prompt_outputs=outputs_table, sink_tokens=sink_tokens,
                singular_vectors=qk.take_new(tables["firing_svs"]))


def _sink_tokens(is_sink, n_tokens, prompt_ids):
    """tokens.is_sink of every token of the batch's prompts (the padding left out), as rows that
    update the run's tokens (catalog.store: UPDATES)."""
    keep = torch.arange(is_sink.shape[1], device=is_sink.device).view(1, -1) < torch.as_tensor(
        n_tokens, device=is_sink.device).view(-1, 1)
    prompt, pos = keep.nonzero(as_tuple=True)
    return table(["prompt_id", "pos", "is_sink"], [dict(prompt_id=prompt_ids[rows_of(prompt)], pos=rows_of(pos),
                                                        is_sink=rows_of(is_sink[prompt, pos]))])


def _side_shares(side, key, firings, signals, weights, forms, residual, scale, qk_scale=None) -> dict:
    """One side_shares row per firing: the side's signal projection and each kind's share of it."""
    parts = shares.side_parts(side, firings, weights, forms, residual, scale, qk_scale)  # [firing, kind]
    total = parts.sum(dim=1, keepdim=True)
    # An empty signal projects to 0: its shares are NULL (NaN here) rather than a division by 0.
    share = torch.where(total != 0, parts / total, torch.full_like(parts, float("nan")))
    row = dict(key, side=np.full(len(firings), side),
               projection=rows_of(shares.signal_projection(side, signals, weights)))
    share = rows_of(share)
    return dict(row, **{f"{kind}_share": share[:, k] for k, kind in enumerate(shares.KINDS)})


COLUMNS = {
    "side_shares": ["prompt_id", "layer", "head", "dest_pos", "src_pos", "side", "projection"]
                   + [f"{kind}_share" for kind in shares.KINDS],
    "firings": ["prompt_id", "layer", "head", "dest_pos", "src_pos", "attn_weight", "score", "n_svs", "pos_offset",
                "to_sink"],
    "firing_svs": ["prompt_id", "layer", "head", "dest_pos", "src_pos", "rank", "sv", "contribution",
                   "dest_proj", "src_proj"],
    "edges": ["prompt_id", "edge_id", "layer", "head", "dest_pos", "src_pos", "side", "up_kind", "up_layer",
              "up_head", "weight"],
    "edge_svs": ["prompt_id", "edge_id", "rank", "sv", "weight"],
}
