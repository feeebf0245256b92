"""`circuit-catalog train-sae` and `circuit-catalog features`: attention-output SAEs and the
features that carry a run's edges (docs/features.md).

train-sae collects a layer's hook_z over a corpus (a text file, a JSONL file of texts, or the
run's own prompts), trains an SAE on it (catalog.features.train), measures it, writes it in
SAELens's format and records it in `dictionaries`. features reads SAE directories (written by
train-sae, by SAELens, or by hand in that format), runs the run's prompts through its model once
per batch and stores every `head` edge's weight split by the upstream layer's features in
`edge_features`, one transaction per batch of prompts; prompts already stored for a dictionary
are skipped, so the same command resumes after an interruption.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from catalog.errors import CatalogError
from catalog.jobs.intervene import finished_run

KIND = "attn_sae"


def open_run(cat, run_id: int | None) -> dict:
    run = finished_run(cat.con, run_id)
    run["params"] = run["params"] if isinstance(run["params"], dict) else json.loads(run["params"] or "{}")
    return run


def load_run_model(run: dict, model: str | None, model_path, device: str):
    from catalog.models.loading import load_model

    params = run["params"]
    if model is None and model_path is None:
        model_path, model = params.get("model_path"), params.get("model") or "gpt2"
        if model_path and not (Path(model_path) / "config.json").is_file() and not Path(model_path).is_file():
            raise CatalogError(f"run {run['run_id']} was ingested from --model-path {model_path}, which is not there "
                               "any more: pass --model-path with the same checkpoint")
    return checked_model(run, load_model(model or "gpt2", model_path, device=device,
                                    dtype=params.get("dtype") or "float32"))


def checked_model(run: dict, lm):
    if lm.weights_digest() != run["weights_digest"]:
        raise CatalogError(f"the model given ({lm.name}) is not the model of run {run['run_id']} (other weights); "
                           "pass the run's checkpoint with --model-path")
    return lm


def run_tokens(con, run_id: int, prompt_ids: list[int] | None = None) -> dict[int, list[int]]:
    chosen = "" if prompt_ids is None else " AND list_contains(?, prompt_id)"
    rows = con.execute(f"SELECT prompt_id, list(token_id ORDER BY pos) FROM tokens WHERE run_id = ?{chosen} "
                       "GROUP BY prompt_id ORDER BY prompt_id",
                       [run_id] + ([] if prompt_ids is None else [prompt_ids])).fetchall()
    return {p: ids for p, ids in rows}


def read_corpus(path: str | Path, tokenizer, n_ctx: int) -> list[list[int]]:
    """Token ids of a corpus: a JSONL file (each line a JSON string or an object with "text" or
    "prompt"), else a text file (each non-empty line one text); each cut to n_ctx tokens."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"--corpus {path}: no such file")
    texts = []
    lines = path.read_text(encoding="utf-8").splitlines()
    is_jsonl = path.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{"))
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                item = json.loads(line)
            except ValueError:
                raise CatalogError(f"--corpus {path}, line {number}: not JSON") from None
            text = item if isinstance(item, str) else (item.get("text") or item.get("prompt")
                                                       if isinstance(item, dict) else None)
            if not isinstance(text, str):
                raise CatalogError(f"--corpus {path}, line {number}: no \"text\" (or \"prompt\") string")
            texts.append(text)
        else:
            texts.append(line)
    token_lists = [list(tokenizer(text)["input_ids"])[:n_ctx] for text in texts]
    token_lists = [ids for ids in token_lists if len(ids) >= 2]
    if not token_lists:
        raise CatalogError(f"--corpus {path} has no text of two tokens or more")
    return token_lists


def register_digest(path: Path) -> str:
    """sha256 of a weights file: a dictionary's identity."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register(cat, model_id: int, sae, sae_dir: Path) -> int:
    """The dictionary's id, inserting its row the first time its weights are seen."""
    from catalog.features.sae import CFG_FILE, weights_digest

    digest = weights_digest(sae_dir)
    found = cat.con.execute("SELECT dictionary_id FROM dictionaries WHERE model_id = ? AND weights_digest = ?",
                            [model_id, digest]).fetchall()
    if found:
        return found[0][0]
    new_id = cat.con.execute("SELECT coalesce(max(dictionary_id), 0) + 1 FROM dictionaries").fetchall()[0][0]
    insert_dictionary(cat, dict(
        dictionary_id=new_id, model_id=model_id, kind=KIND, layer=sae.layer, head=None, hook_name=sae.hook_name,
        architecture=sae.architecture, d_in=sae.d_in, d_sae=sae.d_sae, source=str(Path(sae_dir).resolve()),
        weights_digest=digest, figures=json.dumps(sae.figures) if sae.figures else None,
        config=(Path(sae_dir) / CFG_FILE).read_text(), created_at=datetime.now()))
    return new_id


def insert_dictionary(cat, row: dict) -> None:
    cat.con.execute(f"INSERT INTO dictionaries ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    list(row.values()))


def train_sae_job(db_path, layer: int, out_dir, *, corpus=None, run_id: int | None = None, settings=None,
                  model: str | None = None, model_path=None, device: str = "cpu", batch_size: int = 16,
                  loaded_model=None, say=None) -> dict:
    """Train an attention-output SAE of `layer` on a corpus (default: the run's prompts), write
    it to out_dir in SAELens's format with its figures, and record it in `dictionaries`."""
    import torch

    from catalog.features.activations import layer_z, loss_with_reconstruction
    from catalog.features.sae import save_sae
    from catalog.features.train import SaeTraining, reconstruction_figures, train_sae
    from catalog.models.loading import resolve_device
    from catalog.store import Catalog

    settings = settings or SaeTraining()
    device = resolve_device(device)
    if settings.architecture not in ("topk", "jumprelu"):
        raise CatalogError(f"--architecture must be topk or jumprelu, not '{settings.architecture}'")
    if settings.steps < 1 or settings.expansion < 1 or settings.k < 1 or settings.batch_size < 1:
        raise CatalogError("--steps, --expansion, --k and --train-batch must be at least 1")
    if not Path(db_path).is_file():
        raise CatalogError(f"no catalog at {db_path}")
    if corpus is not None and not Path(corpus).is_file():  # said before the model loads
        raise CatalogError(f"--corpus {corpus}: no such file")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CatalogError(f"--out {out_dir} exists and is not empty: give a new directory")
    started = time.perf_counter()
    with Catalog(db_path) as cat:
        run = open_run(cat, run_id)
        if not 0 <= layer < run["n_layers"]:
            raise CatalogError(f"--layer {layer} is not a layer of the model (0 .. {run['n_layers'] - 1})")
        lm = (checked_model(run, loaded_model) if loaded_model is not None
              else load_run_model(run, model, model_path, device))
        if corpus is not None:
            token_lists = read_corpus(corpus, lm.tokenizer, lm.n_ctx)
        else:
            token_lists = list(run_tokens(cat.con, run["run_id"]).values())
        activations = layer_z(lm, token_lists, layer, batch_size)
        torch.set_grad_enabled(False)
        sae = train_sae(activations, layer, lm.name, settings, say=say)
        figures = reconstruction_figures(sae, activations)
        figures.update(loss_with_reconstruction(lm, token_lists, sae, batch_size))
        figures.update(corpus=str(corpus) if corpus is not None else f"run {run['run_id']} prompts",
                       architecture=settings.architecture, k=sae.k, l0_coefficient=settings.l0_coefficient
                       if settings.architecture == "jumprelu" else None, steps=settings.steps, lr=settings.lr,
                       seed=settings.seed)
        sae.figures = figures
        save_sae(sae, out_dir)
        dictionary_id = register(cat, run["model_id"], sae, out_dir)
    return {"dictionary_id": dictionary_id, "layer": layer, "d_sae": sae.d_sae, "out": str(out_dir),
            **{k: figures[k] for k in ("fraction_variance_explained", "l0", "loss_change", "n_tokens")},
            "wall_s": time.perf_counter() - started}


# The 2024 method's head edges of some prompts from some upstream layers, one row per edge_svs
# rank, with the weighted direction's parts: s_k (the sign of the firing's dest_proj), sigma_k
# and the direction (u_k on the query side, v_k on the key side) of the run's form.
_EDGE_RANKS = """
SELECT e.prompt_id, e.edge_id, e.layer, e.up_layer, e.up_head,
       CASE WHEN e.side = 'query' THEN e.dest_pos ELSE e.src_pos END AS token_pos,
       es.rank, sign(fs.dest_proj) AS sign, sv.sigma,
       CASE WHEN e.side = 'query' THEN sv.u ELSE sv.v END AS direction
FROM edges e
JOIN edge_svs es USING (run_id, prompt_id, edge_id)
JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)
JOIN firing_svs fs ON fs.run_id = e.run_id AND fs.prompt_id = e.prompt_id AND fs.layer = e.layer
     AND fs.head = e.head AND fs.dest_pos = e.dest_pos AND fs.src_pos = e.src_pos AND fs.sv = es.sv
JOIN singular_vectors sv ON sv.model_id = $model AND sv.form = 'augmented' AND sv.layer = e.layer
     AND sv.head = e.head AND sv.sv = es.sv AND sv.pos_offset IS NOT DISTINCT FROM f.pos_offset
WHERE e.run_id = $run AND e.up_kind = 'head' AND e.up_layer = $up_layer AND list_contains($prompts, e.prompt_id)
ORDER BY e.prompt_id, e.edge_id, es.rank
"""


def features_run(db_path, sae_dirs: list, *, qk_dirs: list = (), n_pairs: int = 10, run_id: int | None = None,
                 model: str | None = None, model_path=None, device: str = "cpu", batch_size: int = 16,
                 loaded_model=None, say=None) -> dict:
    """Split every `head` edge of a finished 2024-method run by the features of the SAEs given
    (one per upstream layer at most) and store the parts in `edge_features`; and every firing of
    the heads of the QK transcoders given into feature pairs (`firing_feature_pairs`, both
    methods). Return a summary."""
    from catalog.features.sae import load_sae
    from catalog.models.loading import resolve_device
    from catalog.store import Catalog

    device = resolve_device(device)
    if not sae_dirs and not qk_dirs:
        raise CatalogError("give at least one --sae DIR or --qk DIR")
    if not Path(db_path).is_file():
        raise CatalogError(f"no catalog at {db_path}")
    started = time.perf_counter()
    with Catalog(db_path) as cat:
        run = open_run(cat, run_id)
        if run["method"] != "sad" and sae_dirs:
            raise CatalogError(f"run {run['run_id']} is an ACC++ run: features split the 2024 method's edges only "
                               "so far (an ACC++ edge weight is a probability drop, not a sum over directions)")
        saes = {}
        for sae_dir in sae_dirs:
            sae = load_sae(sae_dir, run["n_heads"], run["d_head"])
            if sae.layer >= run["n_layers"]:
                raise CatalogError(f"--sae {sae_dir} reads layer {sae.layer}; the model has {run['n_layers']}")
            if sae.layer in saes:
                raise CatalogError(f"two SAEs of layer {sae.layer} given: give one per layer")
            saes[sae.layer] = (sae, register(cat, run["model_id"], sae, Path(sae_dir)))
        summary = {"run_id": run["run_id"], "dictionaries": {layer: d for layer, (_, d) in saes.items()},
                   "edges": 0, "rows": 0, "already_stored": 0, "db": str(db_path)}
        lm = checked_model(run, loaded_model) if loaded_model is not None else None
        prompt_ids = [p for (p,) in cat.con.execute("SELECT prompt_id FROM prompts WHERE run_id = ? ORDER BY prompt_id",
                                                    [run["run_id"]]).fetchall()]
        for layer, (sae, dictionary_id) in sorted(saes.items()):
            done = {p for (p,) in cat.con.execute(
                "SELECT DISTINCT prompt_id FROM edge_features WHERE run_id = ? AND dictionary_id = ?",
                [run["run_id"], dictionary_id]).fetchall()}
            summary["already_stored"] += len(done)
            todo = [p for p in prompt_ids if p not in done]
            for first in range(0, len(todo), batch_size):
                batch = todo[first:first + batch_size]
                lm = lm or load_run_model(run, model, model_path, device)
                n_edges, table = _batch_rows(cat, run, lm, sae.to(lm.device), dictionary_id, batch)
                if table is not None:
                    cat.append_rows("edge_features", table, run_id=run["run_id"])
                    summary["rows"] += table.num_rows
                summary["edges"] += n_edges
                if say is not None:
                    say(f"layer {layer}: {min(first + batch_size, len(todo))} of {len(todo)} prompts")
        if qk_dirs:
            from catalog.jobs.features_qk import store_qk_pairs

            lm = lm or load_run_model(run, model, model_path, device)
            summary["qk"] = store_qk_pairs(cat, run, lm, list(qk_dirs), n_pairs, batch_size, say)
    summary["wall_s"] = time.perf_counter() - started
    return summary


def _batch_rows(cat, run, lm, sae, dictionary_id: int, batch: list[int]):
    import pyarrow as pa
    import torch

    from catalog.features.attribution import split_edges
    from catalog.methods.shared.tensors import pad_tokens

    found = cat.con.sql(_EDGE_RANKS, params={"model": run["model_id"], "run": run["run_id"], "up_layer": sae.layer,
                                             "prompts": batch}).fetchnumpy()
    if len(found["edge_id"]) == 0:
        return 0, None
    key = found["prompt_id"].astype(np.int64) * (1 << 32) + found["edge_id"]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])  # first rank row of each edge
    n_edges, n_ranks = len(starts), int(found["rank"].max()) + 1
    edge_of = np.repeat(np.arange(n_edges), np.diff(np.r_[starts, len(key)]))
    rank = found["rank"].astype(np.int64)
    d_aug = len(found["direction"][0])
    directions = np.zeros((n_edges, n_ranks, d_aug))
    weighted = np.stack(found["direction"]).astype(np.float64) * (found["sign"] * np.sqrt(found["sigma"]))[:, None]
    directions[edge_of, rank] = weighted
    first = {name: found[name][starts] for name in ("prompt_id", "edge_id", "layer", "up_head", "token_pos")}
    tokens = run_tokens(cat.con, run["run_id"], batch)
    row_of = {p: b for b, p in enumerate(batch)}
    layers = sorted(set(first["layer"].tolist()))
    hooks = (f"blocks.{sae.layer}.attn.hook_z",) + tuple(f"blocks.{layer}.ln1.hook_scale" for layer in layers)
    cache = lm.run(pad_tokens([tokens[p] for p in batch], lm.tokenizer.eos_token_id or 0), hooks)
    device = lm.device
    b = torch.as_tensor(np.array([row_of[p] for p in first["prompt_id"]]), device=device)
    t = torch.as_tensor(first["token_pos"].astype(np.int64), device=device)
    z = cache[f"blocks.{sae.layer}.attn.hook_z"].float().flatten(2)[b, t]
    scale = torch.zeros(n_edges, device=device)
    for layer in layers:
        mask = torch.as_tensor(first["layer"] == layer, device=device)
        scale[mask] = cache[f"blocks.{layer}.ln1.hook_scale"][..., 0].float()[b[mask], t[mask]]
    W_O = lm.attention_weights()[4][sae.layer].float().to(device)
    parts = split_edges(sae, z, torch.as_tensor(first["up_head"].astype(np.int64), device=device), W_O,
                        torch.as_tensor(directions, device=device), scale, bool(run["append_constant"]))
    n_of_edge = np.diff(np.r_[starts, len(key)])
    in_edge = np.arange(n_ranks)[None, :] < n_of_edge[:, None]  # [edge, R]: the edge's own ranks
    pieces = []

    def piece(edge_index, part, feature, activation, per_rank):
        """Rows of one part for some edges; per_rank [rows, R] keeps each edge's own ranks."""
        per_rank = per_rank.cpu().numpy() * in_edge[edge_index]
        offsets = np.r_[0, np.cumsum(n_of_edge[edge_index])].astype(np.int32)
        pieces.append(pa.table({
            "prompt_id": pa.array(first["prompt_id"][edge_index], pa.int32()),
            "edge_id": pa.array(first["edge_id"][edge_index], pa.int32()),
            "dictionary_id": pa.array(np.full(len(edge_index), dictionary_id), pa.int32()),
            "part": pa.array([part] * len(edge_index), pa.string()),
            "feature": pa.array(feature, pa.int32()), "activation": pa.array(activation, pa.float32()),
            "weight": pa.array(per_rank.sum(axis=1), pa.float64()),
            "sv_weights": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                                   pa.array(per_rank[in_edge[edge_index]], pa.float64())),
        }))

    every_edge, nothing = np.arange(n_edges), [None] * n_edges
    feature = parts.feature.cpu().numpy()
    e_idx, a_idx = np.nonzero(feature >= 0)
    piece(e_idx, "feature", feature[e_idx, a_idx], parts.activation.cpu().numpy()[e_idx, a_idx],
          parts.feature_part[torch.as_tensor(e_idx, device=device), torch.as_tensor(a_idx, device=device)])
    piece(every_edge, "decoder_bias", nothing, nothing, parts.bias_part)
    piece(every_edge, "error", nothing, nothing, parts.error_part)
    if run["append_constant"]:
        piece(every_edge, "constant", nothing, nothing, parts.constant_part)
    table = pa.concat_tables(pieces)
    return n_edges, table
