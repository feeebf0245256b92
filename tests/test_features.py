"""Attention-output SAEs on the catalog's edges (docs/features.md): train-sae writes SAELens's
format with figures that a plain recomputation agrees with; `features` splits every head edge
so that its parts add up to the weight the ingest stored (edges, and edge_svs per direction);
an SAE written by hand in SAELens's format is read; bad input is one error line."""

from __future__ import annotations

import json
from pathlib import Path
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from _catalog_fixture import LATEST_RUN, assert_one_line_error, fetch_dicts, invoke

N_HEADS, D_HEAD = 4, 16  # the tiny model of conftest.py (d_model 64)


@pytest.fixture(scope="module")
def features_db(catalog_db, tmp_path_factory):
    """A copy of the query tests' catalog (never change theirs)."""
    db = tmp_path_factory.mktemp("features") / "ioi.duckdb"
    shutil.copy(catalog_db, db)
    return db


@pytest.fixture(scope="module")
def trained(features_db, tiny_model, tmp_path_factory):
    """A tiny TopK SAE of layer 1, trained on run 2's prompts."""
    from catalog.features.train import SaeTraining
    from catalog.jobs.features import train_sae_job

    out = tmp_path_factory.mktemp("sae") / "L1"
    summary = train_sae_job(features_db, 1, out, settings=SaeTraining(expansion=2, k=4, steps=60, batch_size=256),
                            loaded_model=tiny_model)
    return out, summary


@pytest.fixture(scope="module")
def by_hand(tmp_path_factory):
    """A JumpReLU SAE of layer 0 written by hand in SAELens's older format (fields at the top level,
    no b_dec subtracted from the input), with weights such that a few features fire per token."""
    out = tmp_path_factory.mktemp("sae") / "L0-by-hand"
    out.mkdir()
    rng = np.random.default_rng(3)
    d_in, d_sae = N_HEADS * D_HEAD, 48
    weights = {"W_enc": rng.normal(0, 0.5, (d_in, d_sae)).astype(np.float32),
               "W_dec": rng.normal(0, 0.2, (d_sae, d_in)).astype(np.float32),
               "b_enc": rng.normal(0, 0.1, d_sae).astype(np.float32),
               "b_dec": rng.normal(0, 0.05, d_in).astype(np.float32),
               "threshold": np.full(d_sae, 0.3, np.float32)}
    save_file(weights, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "hook_name": "blocks.0.attn.hook_z",
        "hook_layer": 0, "hook_head_index": None, "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "hook_z", "model_name": "tiny-gpt2", "dtype": "float32"}))
    return out, weights


@pytest.fixture(scope="module")
def featured(features_db, trained, by_hand, tiny_model):
    """The latest run's head edges split by the trained SAE (layer 1) and the hand-written one (layer 0)."""
    result = invoke("features", "--db", features_db, "--sae", trained[0], "--sae", by_hand[0],
                    "--model-path", tiny_model.name)
    assert result.exit_code == 0, result.output
    return features_db


def _z(tiny_model, db, layer):
    """hook_z of every prompt of the latest run: {prompt_id: [pos, n_heads * d_head]} (a plain forward pass)."""
    rows = fetch_dicts(db, "SELECT prompt_id, list(token_id ORDER BY pos) AS ids FROM tokens WHERE run_id = ? "
                           "GROUP BY prompt_id", [LATEST_RUN])
    found = {}
    for row in rows:
        cache = tiny_model.run(torch.tensor([row["ids"]]), (f"blocks.{layer}.attn.hook_z",))
        found[row["prompt_id"]] = cache[f"blocks.{layer}.attn.hook_z"][0].flatten(1).double().numpy()
    return found


def test_train_sae_writes_saelens_format_with_its_figures(trained, features_db, tiny_model):
    out, summary = trained
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4
    assert (cfg["d_in"], cfg["d_sae"]) == (N_HEADS * D_HEAD, 2 * N_HEADS * D_HEAD)
    for place in (cfg, cfg["meta"]):  # SAELens 5 reads the top level, SAELens 6 `meta`
        assert place["hook_name"] == "blocks.1.attn.hook_z" and place["hook_head_index"] is None
    assert cfg["reshape_activations"] == "hook_z" and cfg["normalize_activations"] == "none"
    weights = load_file(str(out / "sae_weights.safetensors"))
    assert {name: w.shape for name, w in weights.items()} == {
        "W_enc": (64, 128), "W_dec": (128, 64), "b_enc": (128,), "b_dec": (64,)}
    # The figures, recomputed from the saved weights by SAELens's TopK formula in numpy.
    x = np.concatenate(list(_z(tiny_model, features_db, 1).values()))
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    acts = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :4]
    np.put_along_axis(acts, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0), axis=1)
    recon = acts @ weights["W_dec"] + weights["b_dec"]
    fve = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    assert summary["n_tokens"] == len(x)
    assert summary["fraction_variance_explained"] == pytest.approx(fve, abs=1e-4)
    assert summary["l0"] == pytest.approx((acts > 0).sum(axis=1).mean(), abs=1e-6)
    assert fve > 0.5  # it learned something in 60 steps
    stored = fetch_dicts(features_db, "SELECT * FROM dictionaries WHERE dictionary_id = ?", [summary["dictionary_id"]])
    figures = json.loads(stored[0]["figures"])
    assert stored[0]["layer"] == 1 and stored[0]["kind"] == "attn_sae"
    assert figures["loss_change"] == pytest.approx(figures["loss_patched"] - figures["loss_clean"])


def test_jumprelu_training_writes_thresholds(features_db, tiny_model, tmp_path):
    from catalog.features.sae import load_sae
    from catalog.features.train import SaeTraining
    from catalog.jobs.features import train_sae_job

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in
                                ["The cat sat on the mat and looked at the door.", "When Mary and John went to the "
                                 "store, John gave a drink to Mary.", "A quiet river runs under the old bridge."]))
    summary = train_sae_job(features_db, 0, tmp_path / "jump", corpus=corpus, loaded_model=tiny_model,
                            settings=SaeTraining(architecture="jumprelu", expansion=1, steps=30, batch_size=64))
    sae = load_sae(tmp_path / "jump", N_HEADS, D_HEAD)
    assert sae.architecture == "jumprelu" and sae.threshold.shape == (64,) and bool((sae.threshold > 0).all())
    assert summary["n_tokens"] == sum(len(tiny_model.tokenizer(t)["input_ids"]) for t in [
        "The cat sat on the mat and looked at the door.", "When Mary and John went to the store, John gave a drink to "
        "Mary.", "A quiet river runs under the old bridge."])


def test_edge_parts_add_up_to_the_stored_weights(featured):
    """Every head edge from layers 0 and 1 is split; its parts add up to edges.weight (and, per
    singular direction, to edge_svs.weight) as the ingest stored them, to 1e-5 relative."""
    features_db = featured
    edges = fetch_dicts(features_db, """
        SELECT e.prompt_id, e.edge_id, e.weight, e.up_layer,
               (SELECT list(s.weight ORDER BY s.rank) FROM edge_svs s WHERE s.run_id = e.run_id
                AND s.prompt_id = e.prompt_id AND s.edge_id = e.edge_id) AS sv_weights
        FROM edges e WHERE e.run_id = ? AND e.up_kind = 'head'""", [LATEST_RUN])
    parts = fetch_dicts(features_db, "SELECT * FROM edge_features WHERE run_id = ?", [LATEST_RUN])
    assert {e["up_layer"] for e in edges} == {0, 1}
    by_edge = {}
    for row in parts:
        by_edge.setdefault((row["prompt_id"], row["edge_id"]), []).append(row)
    assert set(by_edge) == {(e["prompt_id"], e["edge_id"]) for e in edges}
    for edge in edges:
        rows = by_edge[(edge["prompt_id"], edge["edge_id"])]
        assert sorted(r["part"] for r in rows if r["feature"] is None) == ["constant", "decoder_bias", "error"]
        magnitude = max(abs(edge["weight"]), sum(abs(r["weight"]) for r in rows))
        assert abs(sum(r["weight"] for r in rows) - edge["weight"]) <= 1e-5 * magnitude
        per_sv = np.sum([r["sv_weights"] for r in rows], axis=0)
        assert np.allclose(per_sv, edge["sv_weights"], rtol=0, atol=1e-5 * magnitude)
        for r in rows:
            assert r["weight"] == pytest.approx(sum(r["sv_weights"]), rel=1e-9, abs=1e-12)


def test_feature_rows_are_the_sae_activations_at_the_edge_token(featured, by_hand, tiny_model):
    """The hand-written JumpReLU SAE's features at each layer-0 edge's token, recomputed in numpy:
    the stored rows are exactly the active ones, with their activations."""
    _, weights = by_hand
    features_db = featured
    z = _z(tiny_model, features_db, 0)
    dictionary = fetch_dicts(features_db, "SELECT dictionary_id FROM dictionaries WHERE layer = 0 AND d_sae = 48")
    rows = fetch_dicts(features_db, """
        SELECT e.prompt_id, e.edge_id, CASE WHEN e.side = 'query' THEN e.dest_pos ELSE e.src_pos END AS pos,
               list(f.feature ORDER BY f.feature) FILTER (WHERE f.part = 'feature') AS features,
               list(f.activation ORDER BY f.feature) FILTER (WHERE f.part = 'feature') AS activations
        FROM edges e JOIN edge_features f USING (run_id, prompt_id, edge_id)
        WHERE e.run_id = ? AND f.dictionary_id = ? GROUP BY ALL""", [LATEST_RUN, dictionary[0]["dictionary_id"]])
    assert rows and any(r["features"] for r in rows)
    for row in rows:
        pre = z[row["prompt_id"]][row["pos"]] @ weights["W_enc"] + weights["b_enc"]  # apply_b_dec_to_input false
        active = np.flatnonzero(pre > weights["threshold"])
        assert (row["features"] or []) == active.tolist()
        assert np.allclose(row["activations"] or [], pre[active], rtol=1e-4, atol=1e-5)


def test_features_again_stores_nothing_twice(featured, features_db, trained, tiny_model):
    before = fetch_dicts(features_db, "SELECT count(*) AS n FROM edge_features")[0]["n"]
    result = invoke("features", "--db", features_db, "--sae", trained[0], "--model-path", tiny_model.name)
    assert result.exit_code == 0 and "already stored" in result.output, result.output
    assert fetch_dicts(features_db, "SELECT count(*) AS n FROM edge_features")[0]["n"] == before


def test_bad_sae_directories_are_one_error_line(features_db, by_hand, tmp_path):
    assert_one_line_error(invoke("features", "--db", features_db, "--sae", tmp_path))
    wrong = tmp_path / "wrong"
    shutil.copytree(by_hand[0], wrong)
    cfg = json.loads((wrong / "cfg.json").read_text())
    (wrong / "cfg.json").write_text(json.dumps(dict(cfg, hook_name="blocks.0.hook_resid_pre")))
    assert_one_line_error(invoke("features", "--db", features_db, "--sae", wrong))
    (wrong / "cfg.json").write_text(json.dumps(dict(cfg, d_in=32)))
    assert_one_line_error(invoke("features", "--db", features_db, "--sae", wrong))
    assert_one_line_error(invoke("train-sae", "--db", features_db, "--layer", 7, "--out", tmp_path / "x"))


def _parts_by_group(db, where: str, group: str) -> dict:
    """{group value: (edge weight total, {(dictionary, feature): part total}, error total)}, by plain
    Python over the stored rows (the read side's answers, recomputed)."""
    edges = fetch_dicts(db, f"""
        SELECT e.prompt_id, e.edge_id, e.weight, {group} AS grp FROM edges e
        LEFT JOIN tokens t ON t.run_id = e.run_id AND t.prompt_id = e.prompt_id
             AND t.pos = CASE WHEN e.side = 'query' THEN e.dest_pos ELSE e.src_pos END
        WHERE e.run_id = ? AND e.up_kind = 'head' AND {where}""", [LATEST_RUN])
    parts = fetch_dicts(db, "SELECT * FROM edge_features WHERE run_id = ?", [LATEST_RUN])
    of_edge = {}
    for row in parts:
        of_edge.setdefault((row["prompt_id"], row["edge_id"]), []).append(row)
    found = {}
    for edge in edges:
        rows = of_edge.get((edge["prompt_id"], edge["edge_id"]))
        if not rows:
            continue
        total, features, error = found.get(edge["grp"], (0.0, {}, 0.0))
        for row in rows:
            if row["part"] == "feature":
                key = (row["dictionary_id"], row["feature"])
                features[key] = features.get(key, 0.0) + row["weight"]
            elif row["part"] == "error":
                error += row["weight"]
        found[edge["grp"]] = (total + edge["weight"], features, error)
    return found


def test_edges_features_lists_the_top_shares(featured):
    head = fetch_dicts(featured, "SELECT layer || '.' || head AS h, count(*) AS n FROM edges WHERE run_id = ? "
                                 "AND up_layer = 1 GROUP BY ALL ORDER BY n DESC LIMIT 1", [LATEST_RUN])[0]["h"]
    layer, index = map(int, head.split("."))
    result = invoke("edges", "--db", featured, "--into", head, "--features", 2, "--format", "json")
    assert result.exit_code == 0, result.output
    expected = _parts_by_group(featured, f"e.layer = {layer} AND e.head = {index}",
                               "'L' || e.up_layer || 'H' || e.up_head || e.side")
    shown = json.loads(result.stdout)
    assert {r["upstream"] + r["side"] for r in shown if r["top_features"]} == set(expected)
    for row in shown:
        if row["upstream"] + row["side"] not in expected:
            assert row["top_features"] is None
            continue
        total, features, error = expected[row["upstream"] + row["side"]]
        ranked = sorted(features.items(), key=lambda item: (-item[1], item[0]))[:2]
        assert [(f["dictionary"], f["feature"]) for f in row["top_features"]] == [key for key, _ in ranked]
        assert [f["share"] for f in row["top_features"]] == pytest.approx([w / total for _, w in ranked], rel=1e-5)
        assert row["error_share"] == pytest.approx(error / total, rel=1e-4, abs=1e-7)


def test_head_features_and_feature_pages(featured):
    head = fetch_dicts(featured, "SELECT layer || '.' || head AS h, count(*) AS n FROM edges WHERE run_id = ? "
                                 "AND up_layer = 1 GROUP BY ALL ORDER BY n DESC LIMIT 1", [LATEST_RUN])[0]["h"]
    result = invoke("head", "--db", featured, head, "--features", "--top", 3, "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["features"]
    assert len(rows) == 3 and rows[0]["total_weight"] >= rows[1]["total_weight"] >= rows[2]["total_weight"]
    top = rows[0]
    result = invoke("feature", "--db", featured, f"d{top['dictionary']}:f{top['feature']}", "--format", "json")
    assert result.exit_code == 0, result.output
    stored = fetch_dicts(featured, "SELECT sum(weight) AS w, count(*) AS n FROM edge_features WHERE run_id = ? AND "
                                   "dictionary_id = ? AND feature = ?", [LATEST_RUN, top["dictionary"], top["feature"]])
    pages = json.loads(result.stdout)
    assert sum(r["n_edges"] for r in pages) == stored[0]["n"]
    assert sum(r["feature_weight"] for r in pages) == pytest.approx(stored[0]["w"], rel=1e-6)
    assert_one_line_error(invoke("feature", "--db", featured, "seventeen"))


def test_qk_pairs_add_up_to_the_firing_scores(features_db, tiny_model, tmp_path):
    """train-qk's transcoders of the busiest head; every firing's stored pairs, rest and error add
    up to the score the ingest stored, and a kept pair's part is a_i b_j <D_i, E_j> recomputed in
    numpy from the weights file."""
    from catalog.jobs.features_qk import train_qk_job

    from _catalog_fixture import busiest_heads

    head = busiest_heads(features_db)[0]
    layer, index = map(int, head.split("."))
    trained = train_qk_job(features_db, head, tmp_path / "qk", expansion=2, k=3, steps=40, train_batch=256,
                           loaded_model=tiny_model)["heads"][0]
    assert 0 <= trained["pattern_kl"] and trained["l0_query"] <= 3 and trained["l0_key"] <= 3
    result = invoke("features", "--db", features_db, "--qk", trained["out"], "--pairs", 4,
                    "--model-path", tiny_model.name)
    assert result.exit_code == 0, result.output
    firings = fetch_dicts(features_db, """
        SELECT f.prompt_id, f.dest_pos, f.src_pos, f.score, list(p.weight) AS parts, list(p.part) AS kinds
        FROM firings f JOIN firing_feature_pairs p USING (run_id, prompt_id, layer, head, dest_pos, src_pos)
        WHERE f.run_id = ? AND f.layer = ? AND f.head = ? GROUP BY ALL""", [LATEST_RUN, layer, index])
    n_firings = fetch_dicts(features_db, "SELECT count(*) AS n FROM firings WHERE run_id = ? AND layer = ? AND head = ?",
                            [LATEST_RUN, layer, index])[0]["n"]
    assert len(firings) == n_firings > 0
    for firing in firings:
        assert sorted(firing["kinds"]).count("pair") <= 4 and {"rest", "error"} <= set(firing["kinds"])
        magnitude = max(abs(firing["score"]), sum(abs(w) for w in firing["parts"]))
        assert abs(sum(firing["parts"]) - firing["score"]) <= 1e-5 * magnitude
    weights = load_file(str(Path(trained["out"]) / "qk_weights.safetensors"))
    pair = fetch_dicts(features_db, """
        SELECT * FROM firing_feature_pairs WHERE run_id = ? AND layer = ? AND head = ? AND part = 'pair'
          AND query_feature IS NOT NULL AND key_feature IS NOT NULL LIMIT 1""", [LATEST_RUN, layer, index])[0]
    inner = float(weights["q_W_dec"][pair["query_feature"]] @ weights["k_W_dec"][pair["key_feature"]])
    assert pair["weight"] == pytest.approx(pair["query_activation"] * pair["key_activation"] * inner, rel=1e-4)
    shown = invoke("head", "--db", features_db, head, "--features", "--format", "json")
    assert shown.exit_code == 0, shown.output
    top = json.loads(shown.stdout)["qk_pairs"][0]
    same = fetch_dicts(features_db, """
        SELECT sum(weight) AS w FROM firing_feature_pairs WHERE run_id = ? AND layer = ? AND head = ? AND part = 'pair'
          AND query_feature IS NOT DISTINCT FROM ? AND key_feature IS NOT DISTINCT FROM ?""",
                       [LATEST_RUN, layer, index, top["query_feature"], top["key_feature"]])[0]["w"]
    assert top["total_weight"] == pytest.approx(same, rel=1e-9)
    # Through the singular directions: each kept pair's parts add up to its weight, and the same
    # maps turn the head's true q and k into the firing's stored contributions c_s (firing_svs).
    for row in fetch_dicts(features_db, "SELECT weight, sv_parts FROM firing_feature_pairs WHERE run_id = ? AND "
                                        "layer = ? AND head = ? AND part = 'pair'", [LATEST_RUN, layer, index]):
        assert sum(row["sv_parts"]) == pytest.approx(row["weight"], rel=1e-4, abs=1e-6)
    from catalog.features.qk import direction_maps

    svs = fetch_dicts(features_db, "SELECT sigma, u, v FROM singular_vectors WHERE form = 'augmented' AND layer = ? "
                                   "AND head = ? ORDER BY sv", [layer, index])
    W_Q, b_Q, W_K, b_K, _ = tiny_model.attention_weights()
    to_q, to_k = direction_maps(torch.tensor([r["u"] for r in svs]), torch.tensor([r["sigma"] for r in svs]),
                                torch.tensor([r["v"] for r in svs]), torch.cat([W_Q[layer, index], b_Q[layer, index][None]]),
                                torch.cat([W_K[layer, index], b_K[layer, index][None]]))
    signal = fetch_dicts(features_db, """
        SELECT s.prompt_id, s.dest_pos, s.src_pos, s.sv, s.contribution,
               (SELECT list(token_id ORDER BY pos) FROM tokens t WHERE t.run_id = s.run_id AND t.prompt_id = s.prompt_id) AS ids
        FROM firing_svs s WHERE s.run_id = ? AND s.layer = ? AND s.head = ? AND s.rank = 0 LIMIT 3""",
                         [LATEST_RUN, layer, index])
    for row in signal:
        cache = tiny_model.run(torch.tensor([row["ids"]]), (f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"))
        alpha = cache[f"blocks.{layer}.attn.hook_q"][0, row["dest_pos"], index].double() @ to_q
        beta = cache[f"blocks.{layer}.attn.hook_k"][0, row["src_pos"], index].double() @ to_k
        expected = svs[row["sv"]]["sigma"] * float(alpha[row["sv"]] * beta[row["sv"]])
        assert expected == pytest.approx(row["contribution"], rel=1e-3, abs=1e-4 * abs(row["contribution"]) + 1e-5)
    # The query feature's page: every firing whose kept pairs use it, their parts summed.
    if top["query_feature"] is not None:
        page = invoke("feature", "--db", features_db, f"d{top['dictionary']}:f{top['query_feature']}", "--format", "json")
        assert page.exit_code == 0, page.output
        used = fetch_dicts(features_db, """
            SELECT sum(weight) AS w FROM firing_feature_pairs WHERE run_id = ? AND dictionary_id = ? AND part = 'pair'
              AND (query_feature = ? OR key_feature = ?)""",
                           [LATEST_RUN, top["dictionary"], top["query_feature"], top["query_feature"]])[0]["w"]
        assert sum(r["pair_weight"] for r in json.loads(page.stdout)) == pytest.approx(used, rel=1e-9)


def test_a_rotary_model_edges_split_at_their_firing_offsets(tmp_path):
    """Qwen2 (rotary, grouped-query): each edge's directions are its form's at the firing's offset;
    the parts still add up to the stored weights."""
    from catalog.features.train import SaeTraining
    from catalog.jobs.features import features_run, train_sae_job
    from catalog.jobs.ingest import ingest
    from catalog.models.loading import load_model
    from catalog.testing.families import save_random_family

    checkpoint = save_random_family("qwen2", tmp_path / "model")
    lm = load_model(path=checkpoint)
    db = tmp_path / "catalog.duckdb"
    ingest(db, model_path=checkpoint, n_prompts=3, seed=2, batch_size=3, loaded_model=lm)
    train_sae_job(db, 1, tmp_path / "sae", settings=SaeTraining(expansion=2, k=4, steps=20, batch_size=256),
                  loaded_model=lm)
    summary = features_run(db, [tmp_path / "sae"], loaded_model=lm)
    found = fetch_dicts(db, """
        WITH s AS (SELECT run_id, prompt_id, edge_id, sum(weight) AS parts, sum(abs(weight)) AS magnitude
                   FROM edge_features GROUP BY ALL)
        SELECT e.weight, s.parts, s.magnitude, f.pos_offset
        FROM edges e JOIN s USING (run_id, prompt_id, edge_id)
        JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)""")
    assert len(found) == summary["edges"] > 0 and len({r["pos_offset"] for r in found}) > 1
    for row in found:
        assert abs(row["parts"] - row["weight"]) <= 1e-5 * max(abs(row["weight"]), row["magnitude"])
