"""`circuit-catalog train-qk` and `features --qk`: query/key transcoders per head, and every
firing of those heads split into feature pairs (table firing_feature_pairs; docs/features.md)."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from catalog.errors import CatalogError
from catalog.heads import parse_head
from catalog.jobs.features import (checked_model, insert_dictionary, load_run_model, open_run, read_corpus,
                                   run_tokens)

KIND = "qk_transcoder"


def _refuse_rotary(cat, run: dict) -> None:
    found = cat.con.execute("SELECT pos_encoding FROM model_families WHERE model_id = ?", [run["model_id"]]).fetchall()
    if found and found[0][0] == "rotary":
        raise CatalogError("QK transcoders are for models with learned positions only so far (this model's "
                           "queries and keys rotate with the position)")


def _head_inputs(lm, token_lists, layer: int, head: int, batch_size: int):
    """x (ln1.hook_normalized), q and k of the head at every real token, and per prompt its rows."""
    import torch

    from catalog.features.activations import pad_tokens, real_tokens

    hooks = (f"blocks.{layer}.ln1.hook_normalized", f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k")
    xs, qs, ks, lengths = [], [], [], []
    for first in range(0, len(token_lists), batch_size):
        batch = token_lists[first:first + batch_size]
        cache = lm.run(pad_tokens(batch, lm.tokenizer.eos_token_id or 0), hooks)
        real = real_tokens([len(t) for t in batch], cache[hooks[0]].shape[1], cache[hooks[0]].device)
        xs.append(cache[hooks[0]].float()[real])
        qs.append(cache[hooks[1]][:, :, head].float()[real])
        ks.append(cache[hooks[2]][:, :, head].float()[real])
        lengths += [len(t) for t in batch]
    return torch.cat(xs), torch.cat(qs), torch.cat(ks), lengths


def _qk_figures(qk, x, q, k, lengths, score_scale: float) -> dict:
    """L0 per side, variance of the causal scores explained, mean KL(pattern || reconstructed pattern)."""
    import torch

    a, b = qk.query.encode(x), qk.key.encode(x)
    q_hat, k_hat = qk.query.decode(a), qk.key.decode(b)
    kl, residual, centred, n_rows = 0.0, 0.0, [], 0
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        start += n
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
        s, s_hat = q[rows] @ k[rows].T, q_hat[rows] @ k_hat[rows].T
        residual += float((s - s_hat)[mask].pow(2).sum())
        centred.append(s[mask])
        log_p = torch.log_softmax((s / score_scale).masked_fill(~mask, -torch.inf), dim=1)
        log_p_hat = torch.log_softmax((s_hat / score_scale).masked_fill(~mask, -torch.inf), dim=1)
        kl += float((log_p.exp() * (log_p - log_p_hat)).masked_fill(~mask, 0).sum())
        n_rows += n
    scores = torch.cat(centred)
    return {"score_variance_explained": 1 - residual / max(float((scores - scores.mean()).pow(2).sum()), 1e-30),
            "pattern_kl": kl / max(n_rows, 1), "l0_query": float((a > 0).sum(1).float().mean()),
            "l0_key": float((b > 0).sum(1).float().mean()), "n_tokens": int(x.shape[0])}


def train_qk_job(db_path, heads: str, out_dir, *, corpus=None, run_id=None, expansion: int = 8, k: int = 8,
                 steps: int = 2000, train_batch: int = 1024, lr: float = 1e-3, seed: int = 0, model=None,
                 model_path=None, device: str = "cpu", batch_size: int = 16, loaded_model=None) -> dict:
    """Train the query and key transcoders of each head, write each to out_dir/L{l}H{h}, record them."""
    from catalog.features.qk import QkTranscoders, save_qk, train_transcoder
    from catalog.jobs.features import register_digest
    from catalog.models.loading import resolve_device
    from catalog.store import Catalog

    device = resolve_device(device)
    if min(expansion, k, steps, train_batch) < 1:
        raise CatalogError("--expansion, --k, --steps and --train-batch must be at least 1")
    if not Path(db_path).is_file():
        raise CatalogError(f"no catalog at {db_path}")
    if corpus is not None and not Path(corpus).is_file():  # said before the model loads
        raise CatalogError(f"--corpus {corpus}: no such file")
    out_dir, started, written = Path(out_dir), time.perf_counter(), []
    with Catalog(db_path) as cat:
        run = open_run(cat, run_id)
        _refuse_rotary(cat, run)
        chosen = [parse_head(p.strip(), run["n_layers"], run["n_heads"]) for p in heads.split(",") if p.strip()]
        if not chosen:
            raise CatalogError("--heads names no head (L.H, comma-separated)")
        for layer, head in chosen:
            if (out_dir / f"L{layer}H{head}").exists():
                raise CatalogError(f"{out_dir / f'L{layer}H{head}'} exists: give a new --out")
        lm = (checked_model(run, loaded_model) if loaded_model is not None
              else load_run_model(run, model, model_path, device))
        token_lists = (read_corpus(corpus, lm.tokenizer, lm.n_ctx) if corpus is not None
                       else list(run_tokens(cat.con, run["run_id"]).values()))
        for layer, head in chosen:
            x, q, key, lengths = _head_inputs(lm, token_lists, layer, head, batch_size)
            d_sae = expansion * x.shape[1]
            sides = [train_transcoder(x, target, d_sae, k, steps, train_batch, lr, seed + n)
                     for n, target in enumerate((q, key))]
            qk = QkTranscoders(layer, head, *sides, model_name=lm.name)
            qk.figures = _qk_figures(qk, x, q, key, lengths, float(lm.adapter.score_scale))
            qk.figures.update(corpus=str(corpus) if corpus else f"run {run['run_id']} prompts", steps=steps, lr=lr,
                              seed=seed)
            where = save_qk(qk, out_dir / f"L{layer}H{head}")
            dictionary_id = register_qk(cat, run["model_id"], qk, where, register_digest)
            written.append({"head": f"L{layer}H{head}", "dictionary_id": dictionary_id, "out": str(where),
                            **{n: qk.figures[n] for n in ("score_variance_explained", "pattern_kl", "l0_query",
                                                           "l0_key", "n_tokens")}})
    return {"heads": written, "wall_s": time.perf_counter() - started}


def register_qk(cat, model_id: int, qk, qk_dir: Path, digest_of) -> int:
    from catalog.features.qk import CFG_FILE, WEIGHTS_FILE

    digest = digest_of(qk_dir / WEIGHTS_FILE)
    found = cat.con.execute("SELECT dictionary_id FROM dictionaries WHERE model_id = ? AND weights_digest = ?",
                            [model_id, digest]).fetchall()
    if found:
        return found[0][0]
    new_id = cat.con.execute("SELECT coalesce(max(dictionary_id), 0) + 1 FROM dictionaries").fetchall()[0][0]
    insert_dictionary(cat, dict(
        dictionary_id=new_id, model_id=model_id, kind=KIND, layer=qk.layer, head=qk.head,
        hook_name=f"blocks.{qk.layer}.ln1.hook_normalized", architecture="topk", d_in=qk.query.W_enc.shape[0],
        d_sae=qk.query.W_enc.shape[1], source=str(Path(qk_dir).resolve()), weights_digest=digest,
        figures=json.dumps(qk.figures) if qk.figures else None, config=(Path(qk_dir) / CFG_FILE).read_text(),
        created_at=datetime.now()))
    return new_id


_FIRINGS = """
SELECT prompt_id, dest_pos, src_pos FROM firings
WHERE run_id = ? AND layer = ? AND head = ? AND list_contains(?, prompt_id) ORDER BY prompt_id, dest_pos, src_pos
"""


def store_qk_pairs(cat, run: dict, lm, qk_dirs: list, n_pairs: int, batch_size: int, say=None) -> dict:
    """For every firing of each head with transcoders: its n_pairs largest pairs (by |weight|), the
    rest, and the error, which add up to its score; one transaction per batch of prompts."""
    import torch

    from catalog.features.activations import pad_tokens
    from catalog.features.qk import load_qk, split_scores
    from catalog.jobs.features import register_digest

    _refuse_rotary(cat, run)
    summary = {"firings": 0, "pair_rows": 0, "already_stored": 0}
    d_model = cat.con.execute("SELECT d_model FROM models WHERE model_id = ?", [run["model_id"]]).fetchall()[0][0]
    prompt_ids = [p for (p,) in cat.con.execute("SELECT prompt_id FROM prompts WHERE run_id = ? ORDER BY prompt_id",
                                                [run["run_id"]]).fetchall()]
    for qk_dir in qk_dirs:
        qk = load_qk(qk_dir, d_model, run["d_head"])
        if not (qk.layer < run["n_layers"] and qk.head < run["n_heads"]):
            raise CatalogError(f"--qk {qk_dir} is of head L{qk.layer}H{qk.head}, which the model lacks")
        dictionary_id = register_qk(cat, run["model_id"], qk, Path(qk_dir), register_digest)
        qk.query, qk.key = (type(qk.query)(*(t.to(lm.device) for t in (side.W_enc, side.b_enc, side.W_dec, side.b_dec)),
                                           k=side.k) for side in (qk.query, qk.key))
        done = {p for (p,) in cat.con.execute("SELECT DISTINCT prompt_id FROM firing_feature_pairs WHERE run_id = ? "
                                              "AND dictionary_id = ?", [run["run_id"], dictionary_id]).fetchall()}
        summary["already_stored"] += len(done)
        todo = [p for p in prompt_ids if p not in done]
        sigma, maps = _direction_maps(cat, run, lm, qk)
        hooks = tuple(f"blocks.{qk.layer}.{name}" for name in ("ln1.hook_normalized", "attn.hook_q", "attn.hook_k"))
        for first in range(0, len(todo), batch_size):
            batch = todo[first:first + batch_size]
            firings = np.array(cat.con.execute(_FIRINGS, [run["run_id"], qk.layer, qk.head, batch]).fetchall(),
                               dtype=np.int64).reshape(-1, 3)
            if not len(firings):
                continue
            tokens = run_tokens(cat.con, run["run_id"], batch)
            cache = lm.run(pad_tokens([tokens[p] for p in batch], lm.tokenizer.eos_token_id or 0), hooks)
            row_of = {p: n for n, p in enumerate(batch)}
            b = torch.as_tensor([row_of[p] for p in firings[:, 0]], device=lm.device)
            dest, src = (torch.as_tensor(firings[:, c], device=lm.device) for c in (1, 2))
            x = cache[hooks[0]].float()
            pairs = split_scores(qk, x[b, dest], x[b, src], cache[hooks[1]][b, dest, qk.head],
                                 cache[hooks[2]][b, src, qk.head], maps)
            table = _pair_rows(firings, pairs, n_pairs, qk, dictionary_id, sigma)
            cat.append_rows("firing_feature_pairs", table, run_id=run["run_id"])
            summary["firings"] += len(firings)
            summary["pair_rows"] += table.num_rows
            if say is not None:
                say(f"L{qk.layer}H{qk.head}: {min(first + batch_size, len(todo))} of {len(todo)} prompts")
    return summary


def _direction_maps(cat, run: dict, lm, qk):
    """The head's singular directions of the run's form (sad: bias-augmented, accpp: plain), as
    stored, and the maps of its query and key spaces onto them (catalog.features.qk.direction_maps)."""
    import torch

    from catalog.features.qk import direction_maps

    form = "plain" if run["method"] == "accpp" else "augmented"
    found = cat.con.execute("SELECT sigma, u, v FROM singular_vectors WHERE model_id = ? AND form = ? AND layer = ? "
                            "AND head = ? AND pos_offset IS NULL ORDER BY sv",
                            [run["model_id"], form, qk.layer, qk.head]).fetchall()
    if not found:
        raise CatalogError(f"the catalog has no '{form}' singular vectors of L{qk.layer}H{qk.head}")
    sigma = torch.tensor([r[0] for r in found], dtype=torch.float64, device=lm.device)
    U = torch.tensor([r[1] for r in found], dtype=torch.float64, device=lm.device)
    V = torch.tensor([r[2] for r in found], dtype=torch.float64, device=lm.device)
    W_Q, b_Q, W_K, b_K, _ = lm.attention_weights()
    W_Q, W_K = W_Q[qk.layer, qk.head], W_K[qk.layer, qk.head]
    if form == "augmented":  # x~ = [x ; 1]: the bias is the last row
        W_Q = torch.cat([W_Q, b_Q[qk.layer, qk.head].unsqueeze(0)])
        W_K = torch.cat([W_K, b_K[qk.layer, qk.head].unsqueeze(0)])
    return sigma, direction_maps(U, sigma, V, W_Q.to(lm.device), W_K.to(lm.device))


def _pair_rows(firings: np.ndarray, pairs, n_pairs: int, qk, dictionary_id: int, sigma=None):
    import pyarrow as pa
    import torch

    weight = pairs.weight
    keep = min(n_pairs, weight.shape[1])
    order = torch.topk(weight.abs(), keep, dim=1).indices  # [F, keep]
    pick = lambda t: torch.gather(t, 1, order).cpu().numpy()  # noqa: E731
    kept_weight = pick(weight)
    rest = (weight.sum(1) - torch.gather(weight, 1, order).sum(1)).cpu().numpy()
    n = len(firings)
    feature = lambda t: np.where(t >= 0, t, -1)  # noqa: E731
    q_feature, k_feature = feature(pick(pairs.query_feature)), feature(pick(pairs.key_feature))
    q_act, k_act = pick(pairs.query_activation), pick(pairs.key_activation)
    real = pick(pairs.query_feature) > -2  # not an inactive slot
    real &= pick(pairs.key_feature) > -2
    f_idx, p_idx = np.nonzero(real)
    repeat = lambda column: np.concatenate([firings[f_idx, column], firings[:, column], firings[:, column]])  # noqa: E731
    nulls = [None] * (2 * n)
    as_list = lambda values: [None if v < 0 else int(v) for v in values]  # noqa: E731
    as_float = lambda values: [None if np.isnan(v) else float(v) for v in values]  # noqa: E731
    columns = {}
    if pairs.alpha is not None:  # each kept pair through every singular direction: sigma_s alpha_is beta_js
        f_t = torch.as_tensor(f_idx, device=order.device)
        slot = order[f_t, torch.as_tensor(p_idx, device=order.device)]
        n_b = pairs.beta.shape[1]
        through = sigma * pairs.alpha[f_t, slot // n_b] * pairs.beta[f_t, slot % n_b]  # [rows, K]
        flat = through.cpu().numpy()
        offsets = np.arange(len(flat) + 1, dtype=np.int32) * flat.shape[1]
        listed = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat.ravel(), pa.float64()))
        columns["sv_parts"] = pa.concat_arrays([listed, pa.nulls(2 * n, pa.list_(pa.float64()))])
    return pa.table({
        "prompt_id": pa.array(repeat(0), pa.int32()),
        "layer": pa.array(np.full(len(f_idx) + 2 * n, qk.layer), pa.int16()),
        "head": pa.array(np.full(len(f_idx) + 2 * n, qk.head), pa.int16()),
        "dest_pos": pa.array(repeat(1), pa.int16()), "src_pos": pa.array(repeat(2), pa.int16()),
        "dictionary_id": pa.array(np.full(len(f_idx) + 2 * n, dictionary_id), pa.int32()),
        "part": pa.array(["pair"] * len(f_idx) + ["rest"] * n + ["error"] * n, pa.string()),
        "query_feature": pa.array(as_list(q_feature[f_idx, p_idx]) + nulls, pa.int32()),
        "key_feature": pa.array(as_list(k_feature[f_idx, p_idx]) + nulls, pa.int32()),
        "query_activation": pa.array(as_float(q_act[f_idx, p_idx]) + nulls, pa.float32()),
        "key_activation": pa.array(as_float(k_act[f_idx, p_idx]) + nulls, pa.float32()),
        "weight": pa.array(np.concatenate([kept_weight[f_idx, p_idx], rest, pairs.error.cpu().numpy()]),
                           pa.float64()),
        **columns,
    })
