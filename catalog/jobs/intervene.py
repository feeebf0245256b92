"""`circuit-catalog intervene`: causal checks of a finished run's edges, stored in `interventions`.

Selects edges of a run (by weight, prompt, downstream head), loads the run's model, runs its
prompts once (the clean pass) and every selected edge in its own perturbed copy of its prompt
(catalog.interventions.core), and writes one row per (edge, mode, direction), one transaction
per batch of prompts. Edges that already have a row for this mode and direction are skipped, so
the same command resumes after an interruption and never stores a row twice.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from catalog.errors import CatalogError
from catalog.heads import parse_head
from catalog.jobs.settings import InterveneSettings
from catalog.settings import build

# The selected edges of a run, with their singular directions in selection order.
_SELECT = """
WITH chosen AS (
    SELECT e.*, row_number() OVER (PARTITION BY e.prompt_id ORDER BY e.weight DESC, e.edge_id) AS weight_rank
    FROM edges e
    WHERE e.run_id = $run AND ($prompt IS NULL OR e.prompt_id = $prompt)
      AND ($min_weight IS NULL OR e.weight >= $min_weight)
      AND ($heads IS NULL OR list_contains($heads, e.layer * 1000 + e.head))
)
SELECT c.prompt_id, c.edge_id, c.layer, c.head, c.dest_pos, c.src_pos, c.side, c.up_kind,
       coalesce(c.up_layer, -1) AS up_layer, coalesce(c.up_head, -1) AS up_head,
       coalesce(c.up_src_pos, -1) AS up_src_pos,
       (SELECT s.svs FROM edge_sv_lists s  -- stored in rank order (edge_svs, one row per edge)
        WHERE s.run_id = $run AND s.prompt_id = c.prompt_id AND s.edge_id = c.edge_id) AS svs,
       EXISTS (SELECT 1 FROM interventions i
               WHERE i.run_id = $run AND i.prompt_id = c.prompt_id AND i.edge_id = c.edge_id
                 AND i.mode = $mode AND i.boost = $boost) AS done
FROM chosen c
WHERE $top IS NULL OR c.weight_rank <= $top
ORDER BY c.prompt_id, c.edge_id
"""


def intervene_run(db_path, *, settings: InterveneSettings | None = None, loaded_model=None, max_rows: int = 256,
                  say=None, **keywords) -> dict:
    """Intervene on the selected edges of a finished run and store the results; return a summary.

    The twin of `circuit-catalog intervene`: `settings` (catalog.jobs.settings.InterveneSettings)
    and/or keywords named as its options (run_id, mode="local", boost, top_edges, min_weight,
    prompt_id, heads, model, model_path, device="cpu", batch_size=16), with the same defaults.
    top_edges keeps the N heaviest edges of each prompt; min_weight the edges of at least that
    weight (in the run's weight unit); heads ("9.9,9.6" or a list) the edges into those
    downstream heads. The model is the run's own (its recorded --model-path or hub name) unless
    model / model_path / loaded_model is given; its weights must be the run's. device ('cpu',
    'cuda', 'auto') is where it runs (a loaded model stays where it is).
    """
    from catalog.models.loading import resolve_device
    from catalog.store import Catalog

    given = dict(dataclasses.asdict(settings) if settings is not None else {}, **keywords)
    chosen = build(InterveneSettings, given)
    run_id, mode, boost, top_edges, min_weight = (chosen.run_id, chosen.mode, chosen.boost, chosen.top_edges,
                                                  chosen.min_weight)
    prompt_id, heads, model, model_path, batch_size = (chosen.prompt_id, chosen.heads, chosen.model,
                                                       chosen.model_path, chosen.batch_size)
    device = resolve_device(chosen.device)  # a missing GPU is said before anything is read
    if top_edges is not None and min_weight is not None:
        raise CatalogError("give at most one of --top-edges N and --min-weight W")
    if max_rows < 1:
        raise CatalogError("max_rows must be at least 1")
    if not Path(db_path).is_file():
        raise CatalogError(f"no catalog at {db_path}: create one with `circuit-catalog ingest --db {db_path}`")
    started = time.perf_counter()
    with Catalog(db_path) as cat:
        run = finished_run(cat.con, run_id)
        _check_family(run)  # before anything is selected or loaded
        head_keys = [layer * 1000 + head for layer, head in _heads(heads, run)]
        if prompt_id is not None and not cat.con.execute(
                "SELECT count(*) FROM prompts WHERE run_id = ? AND prompt_id = ?", [run["run_id"], prompt_id]
        ).fetchall()[0][0]:
            raise CatalogError(f"run {run['run_id']} has no prompt {prompt_id}")
        params = {"run": run["run_id"], "prompt": prompt_id, "min_weight": min_weight, "heads": head_keys or None,
                  "mode": mode, "boost": boost, "top": top_edges}
        selected = cat.con.sql(_SELECT, params=params).to_arrow_table().to_pydict()
        n_selected = len(selected["edge_id"])
        keep = [k for k in range(n_selected) if not selected["done"][k]
                and not (mode == "global" and selected["up_kind"][k] == "offset")]
        n_done = sum(selected["done"])
        n_offsets = sum(1 for k in range(n_selected) if mode == "global" and selected["up_kind"][k] == "offset"
                        and not selected["done"][k])
        summary = {"run_id": run["run_id"], "method": run["method"], "mode": mode, "boost": boost,
                   "selected": n_selected, "stored": 0, "already_stored": n_done, "skipped_offsets": n_offsets,
                   "mean_attn_change": None, "wall_s": 0.0, "intervene_s": 0.0, "intervene_cpu_s": 0.0,
                   "db": str(db_path)}
        if n_selected == 0:
            raise CatalogError(f"no edge of run {run['run_id']} matches the selection")
        if keep:
            lm = loaded_model or _load_run_model(run, model, model_path, device)
            _check_weights(cat.con, run, lm)
            edges = {name: [values[k] for k in keep] for name, values in selected.items()}
            timing = _intervene_and_store(cat, run, lm, edges, mode, boost, batch_size, max_rows, say)
            summary.update(timing)
            summary["stored"] = len(keep)
    summary["wall_s"] = time.perf_counter() - started
    return summary


def finished_run(con, run_id: int | None) -> dict:
    """The run (the latest finished one when run_id is None) with its model's shape and family, or
    one CatalogError line; what intervene and features (catalog.jobs.features) both start from."""
    columns = ["run_id", "model_id", "method", "status", "params", "append_constant"]
    if run_id is None:
        found = con.execute(f"SELECT {', '.join(columns)} FROM runs WHERE status = 'finished' "
                            "ORDER BY run_id DESC LIMIT 1").fetchall()
        if not found:
            raise CatalogError("no finished run in the catalog: ingest prompts first")
    else:
        found = con.execute(f"SELECT {', '.join(columns)} FROM runs WHERE run_id = ?", [int(run_id)]).fetchall()
        if not found:
            known = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()]
            raise CatalogError(f"no run {run_id} in the catalog (runs: {', '.join(map(str, known)) or 'none'})")
    run = dict(zip(columns, found[0]))
    if run["status"] != "finished":
        raise CatalogError(f"run {run['run_id']} is not finished: finish its ingest first (run the same "
                           "ingest command again)")
    shape = con.execute("SELECT n_layers, n_heads, d_head, name, weights_digest FROM models WHERE model_id = ?",
                        [run["model_id"]]).fetchall()[0]
    run.update(zip(("n_layers", "n_heads", "d_head", "model_name", "weights_digest"), shape))
    run["method"] = run["method"] or "sad"
    family = con.execute("SELECT family FROM model_families WHERE model_id = ?", [run["model_id"]]).fetchall()
    run["family"] = family[0][0] if family else "gpt2"  # catalogs before model_families held GPT-2 only
    return run


def _check_family(run: dict) -> None:
    """Refuse, before the model is loaded, a run of a family whose forward pass is not replayed."""
    from catalog.models.families import intervening_families

    if run["family"] not in intervening_families():
        raise CatalogError(f"interventions do not replay {run['family']} models yet (run {run['run_id']}); they "
                           f"replay {', '.join(intervening_families())} models")


def _heads(heads, run) -> list[tuple[int, int]]:
    if heads is None:
        return []
    texts = [heads] if isinstance(heads, str) else list(heads)
    parts = [p.strip() for text in texts for p in str(text).split(",") if p.strip()]
    return [parse_head(p, run["n_layers"], run["n_heads"]) for p in parts]


def _load_run_model(run: dict, model: str | None, model_path, device: str = "cpu"):
    import json

    from catalog.models.loading import load_model

    params = run["params"] if isinstance(run["params"], dict) else json.loads(run["params"] or "{}")
    if model is None and model_path is None:
        model_path = params.get("model_path")
        model = params.get("model") or "gpt2"
        if model_path and not (Path(model_path) / "config.json").is_file():
            raise CatalogError(f"run {run['run_id']} was ingested from --model-path {model_path}, which is not "
                               "there any more: pass --model-path DIR with the same checkpoint")
    # The run's own precision: a bfloat16 run's weights are other weights (its digest says so).
    return load_model(model or "gpt2", model_path, device=device, dtype=params.get("dtype") or "float32")


def _check_weights(con, run: dict, lm) -> None:
    if lm.weights_digest() != run["weights_digest"]:
        raise CatalogError(f"the model given ({lm.name}) is not the model of run {run['run_id']} "
                           f"({run['model_name']}: other weights); pass the run's checkpoint with --model-path")


def _directions(con, run: dict, lm, need_offsets: bool):
    """The directions the run's edges name, read from the catalog's singular_vectors (the form
    of the run's method; the 2024 method's bias-augmented vectors cut to their d_model part,
    see docs/interventions.md), and for ACC++ offset edges the offsets c_d, c_s."""
    from catalog.methods.shared.svd import from_arrow
    from catalog.interventions.core import Directions

    form = "plain" if run["method"] == "accpp" else "augmented"
    params = {"m": run["model_id"], "f": form}
    table = con.sql("SELECT layer, head, sv, sigma, u, v FROM singular_vectors WHERE model_id = $m AND form = $f "
                    "AND pos_offset IS NULL", params=params).to_arrow_table()
    d_model = lm.d_model
    if table.num_rows:
        dec = from_arrow(table, run["n_layers"], run["n_heads"])
        directions = Directions(U=dec.U[:, :, :d_model].contiguous(), V=dec.V[:, :, :d_model].contiguous())
    else:  # a rotary model's 2024-method forms: one per (head, offset), only the directions some signal uses
        directions = _offset_forms(con, params, run, d_model)
    if run["method"] != "accpp" or not need_offsets:
        return directions
    W_Q, b_Q, W_K, b_K, _ = lm.attention_weights()
    return Directions(U=directions.U, V=directions.V, c_d=_offset(W_Q, b_Q), c_s=_offset(W_K, b_K),
                      form_index=directions.form_index)


def _offset_forms(con, params: dict, run: dict, d_model: int):
    """Directions of the forms stored per (layer, head, pos_offset): U, V [form, d_model, sv] (zeros
    for directions not stored: no edge names them) and form_index [layer, head, offset]."""
    import torch

    from catalog.interventions.core import Directions

    rows = con.execute("SELECT layer, head, pos_offset, sv, u, v FROM singular_vectors WHERE model_id = $m "
                       "AND form = $f AND pos_offset IS NOT NULL ORDER BY layer, head, pos_offset, sv",
                       params).fetchall()
    if not rows:
        raise CatalogError(f"the catalog has no '{params['f']}' singular vectors of run {run['run_id']}'s model")
    keys = sorted({(r[0], r[1], r[2]) for r in rows})
    index = {key: f for f, key in enumerate(keys)}
    n_sv = max(r[3] for r in rows) + 1
    U, V = np.zeros((len(keys), d_model, n_sv), np.float32), np.zeros((len(keys), d_model, n_sv), np.float32)
    for layer, head, offset, sv, u, v in rows:
        f = index[(layer, head, offset)]
        U[f, :, sv], V[f, :, sv] = np.asarray(u[:d_model]), np.asarray(v[:d_model])
    form_index = torch.full((run["n_layers"], run["n_heads"], max(k[2] for k in keys) + 1), -1, dtype=torch.long)
    for (layer, head, offset), f in index.items():
        form_index[layer, head, offset] = f
    return Directions(U=torch.from_numpy(U), V=torch.from_numpy(V), form_index=form_index)


def _offset(W, b):
    """ACC++'s AH offset b W^+ (ACCPP.md section 1) for every head, [layer, head, d_model]. W has full
    column rank, so W^+ = (W^T W)^-1 W^T: a d_head x d_head solve per head (float64)."""
    import torch

    W, b = W.double(), b.double()
    coef = torch.linalg.solve(W.transpose(-1, -2) @ W, b.unsqueeze(-1))  # [layer, head, d_head, 1]
    return (W @ coef).squeeze(-1).float()


def _prompt_inputs(con, run_id: int, prompt_ids: list[int]):
    """Token ids, end positions, answer and wrong tokens of some prompts of a run.

    The answer / wrong tokens are the prompt's own (prompts.answer_token_id, wrong_token_id) or,
    for IOI prompts stored without them, the tokens of the IO and S1 roles; -1 when unknown.
    """
    rows = con.execute("""
        SELECT p.prompt_id, p.end_pos,
               (SELECT list(t.token_id ORDER BY t.pos) FROM tokens t
                WHERE t.run_id = p.run_id AND t.prompt_id = p.prompt_id) AS ids,
               coalesce(p.answer_token_id, (SELECT any_value(t.token_id) FROM tokens t WHERE t.run_id = p.run_id
                        AND t.prompt_id = p.prompt_id AND t.role = 'IO'), -1) AS answer,
               coalesce(p.wrong_token_id, (SELECT any_value(t.token_id) FROM tokens t WHERE t.run_id = p.run_id
                        AND t.prompt_id = p.prompt_id AND t.role = 'S1'), -1) AS wrong
        FROM prompts p WHERE p.run_id = ? AND list_contains(?, p.prompt_id) ORDER BY p.prompt_id
    """, [run_id, prompt_ids]).fetchall()
    return {r[0]: {"end": r[1], "ids": r[2], "answer": r[3], "wrong": r[4]} for r in rows}


def _intervene_and_store(cat, run, lm, edges: dict, mode, boost, batch_size, max_rows, say) -> dict:
    import pyarrow as pa
    import torch

    from catalog.methods.shared.tensors import pad_tokens, rows_of
    from catalog.interventions.core import UP_KINDS, Directions, EdgeBatch, intervene
    from catalog.interventions.forward import ModelWeights, clean_forward

    torch.set_grad_enabled(False)
    weights = ModelWeights.from_model(lm)  # the family's forward pass (its ForwardSpec)
    device = weights.W_E.device  # the model's: every tensor of a batch is made or moved there
    read = _directions(cat.con, run, lm, "offset" in edges["up_kind"])
    directions = Directions(**{name: None if value is None else value.to(device) for name, value in vars(read).items()})
    prompt_of = np.asarray(edges["prompt_id"])
    prompt_ids = sorted(set(prompt_of.tolist()))
    inputs = _prompt_inputs(cat.con, run["run_id"], prompt_ids)
    pad_id = lm.tokenizer.eos_token_id or 0
    kind_code = {kind: k for k, kind in enumerate(UP_KINDS)}
    n_done, busy, cpu, changes = 0, 0.0, 0.0, []
    for first in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[first:first + batch_size]
        index = {p: b for b, p in enumerate(batch)}
        sel = np.nonzero(np.isin(prompt_of, batch))[0]
        if len(sel) == 0:
            continue
        tick, cpu_tick = time.perf_counter(), time.process_time()
        clean = clean_forward(weights, pad_tokens([inputs[p]["ids"] for p in batch], pad_id).to(device),
                              torch.tensor([inputs[p]["end"] for p in batch], device=device))
        k_max = max(len(edges["svs"][k]) for k in sel)
        svs = torch.full((len(sel), k_max), -1, dtype=torch.long)
        for row, k in enumerate(sel):  # building the index tensor; the work itself is batched
            svs[row, : len(edges["svs"][k])] = torch.tensor(edges["svs"][k])
        column = lambda name: torch.tensor([edges[name][k] for k in sel])  # noqa: E731
        on_host = EdgeBatch(
            prompt=torch.tensor([index[edges["prompt_id"][k]] for k in sel]), layer=column("layer").long(),
            head=column("head").long(), dest=column("dest_pos").long(), src=column("src_pos").long(),
            query_side=torch.tensor([edges["side"][k] == "query" for k in sel]),
            up_kind=torch.tensor([kind_code[edges["up_kind"][k]] for k in sel]),
            up_layer=column("up_layer").long(), up_head=column("up_head").long(), up_src=column("up_src_pos").long(),
            svs=svs,
        )
        batch_edges = EdgeBatch(**{name: value.to(device) for name, value in vars(on_host).items()})
        result = intervene(weights, clean, batch_edges, directions, mode, boost,
                           answer=torch.tensor([inputs[p]["answer"] for p in batch], device=device),
                           wrong=torch.tensor([inputs[p]["wrong"] for p in batch], device=device), max_rows=max_rows)
        busy += time.perf_counter() - tick
        cpu += time.process_time() - cpu_tick
        table = pa.table({
            "prompt_id": pa.array(prompt_of[sel], pa.int32()),
            "edge_id": pa.array([edges["edge_id"][k] for k in sel], pa.int32()),
            "mode": pa.array([mode] * len(sel), pa.string()),
            "boost": pa.array([bool(boost)] * len(sel), pa.bool_()),
            "pos": pa.array(rows_of(result.pos), pa.int16()),
            **{name: _floats(getattr(result, name)) for name in (
                "signal_norm", "norm_ratio", "cos_sim", "attn_before", "attn_after", "logit_diff_before",
                "logit_diff_after", "kl_div", "other_logit_change")},
        })
        cat.append_rows("interventions", table, run_id=run["run_id"], created_at=datetime.now())
        changes.append(rows_of(result.attn_after - result.attn_before))
        n_done += len(sel)
        if say is not None:
            say(f"{n_done} of {len(prompt_of)} edges intervened")
    change = np.concatenate(changes) if changes else np.zeros(0)
    return {"intervene_s": busy, "intervene_cpu_s": cpu,
            "mean_attn_change": float(change.mean()) if len(change) else None}


def _floats(values) -> "object":
    import pyarrow as pa

    return pa.array(values.double().cpu().numpy(), pa.float64(), from_pandas=True).cast(pa.float32())
