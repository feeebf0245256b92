"""Gemma-2, Gemma-3, Qwen3 and OLMo-2 under the 2024 method, against their attention written out
independently from the raw checkpoint files (tests/_normed_reference.py), on tiny random
checkpoints whose every norm gain is away from 1 (docs/normed.md):

- the model itself: the reference's pattern (softcap, window, QK-norm, per-layer rope) is the
  model's own hook_pattern, so what it derives from it can be trusted;
- the contributions identity: every stored firing's d_head contributions, from the catalog's own
  forms and activations, sum to the model's score before the softcap;
- the decomposition: each stored triplet is one of a dense float64 SVD (LAPACK) of the form built
  in numpy from the raw weights (gains inside, rotation of the firing's layer);
- firings, signals, edges, per-direction terms, each side's projection and its heads' share equal a
  per-firing recomputation (which pins the choice that the ln1 scale and the QK-norm divisor both
  divide the upstream terms);
- sliding windows: no firing, so no edge, crosses a layer's window;
- ACC++ is refused on them, and families still not read, before the model loads.
"""

import json

import duckdb
import numpy as np
import pytest
import torch
from _normed_reference import RawModel, per_firing
from _per_firing import compare

from catalog.jobs.ingest import ingest
from catalog.testing.families import NORMED_FAMILY_NAMES, SOFTCAP, WINDOW, save_normed_family


@pytest.fixture(scope="module", params=NORMED_FAMILY_NAMES)
def normed_run(request, tmp_path_factory):
    from catalog.models.loading import load_model

    family = request.param
    checkpoint = save_normed_family(family, tmp_path_factory.mktemp(f"tiny-{family}"))
    lm = load_model(path=checkpoint)
    db = tmp_path_factory.mktemp(f"catalog-{family}") / "catalog.duckdb"
    summary = ingest(db, model_path=checkpoint, n_prompts=4, seed=2, batch_size=3, loaded_model=lm)
    con = duckdb.connect(str(db), read_only=True)
    yield family, checkpoint, lm, con, summary["run_id"], RawModel(checkpoint)
    con.close()


def _prompts(con, run_id, limit=None):
    rows = con.execute("SELECT prompt_id, end_pos FROM prompts WHERE run_id = ? ORDER BY prompt_id",
                       [run_id]).fetchall()
    for prompt_id, end_pos in rows[:limit]:
        ids = [t for (t,) in con.execute("SELECT token_id FROM tokens WHERE run_id = ? AND prompt_id = ? ORDER BY pos",
                                         [run_id, prompt_id]).fetchall()]
        yield prompt_id, end_pos, ids


def test_the_family_is_recorded_and_fires(normed_run):
    family, checkpoint, lm, con, run_id, raw = normed_run
    config = json.loads((checkpoint / "config.json").read_text())
    row = con.execute("SELECT family, pos_encoding, n_kv_heads, rotary_dim, norm, score_scale FROM model_families"
                      ).fetchall()
    assert row == [(family, "rotary", 2, raw.d_head, "RMSNorm", pytest.approx(raw.scale))]
    if family.startswith("gemma"):
        assert raw.scale != np.sqrt(raw.d_head)  # query_pre_attn_scalar, not d_head
    assert lm.adapter.family == family
    assert config["model_type"] == {"gemma3": "gemma3_text"}.get(family, family)
    n_firings, n_edges = (con.execute(f"SELECT count(*) FROM {t} WHERE run_id = ?", [run_id]).fetchall()[0][0]
                          for t in ("firings", "edges"))
    assert n_firings > 50 and n_edges > 50


def test_the_reference_pattern_is_the_models_own(normed_run):
    """Softcap, window, QK-norm and each layer's rope as the reference writes them give the model's
    hook_pattern: the reference's scores, firings and writes can be held against the catalog."""
    _, _, lm, con, run_id, raw = normed_run
    for _, _, ids in _prompts(con, run_id, 1):
        acts = raw.activations(lm.bridge.original_model, ids)
        cache = lm.bridge.run_with_cache(torch.tensor([ids]))[1]
        for layer, a in enumerate(acts):
            hook = cache[f"blocks.{layer}.attn.hook_pattern"][0].double().numpy()
            np.testing.assert_allclose(a["pattern"], hook, atol=2e-5)


def test_contributions_sum_to_the_score_before_the_softcap(normed_run):
    """Every stored firing: its d_head contributions from the catalog's forms and activations
    (catalog.methods.sad.batch.qk_forms, the adapter's residual and QK-norm divisors) sum to the
    reference's pre-softcap score, which is also the score stored."""
    from catalog.methods.sad.batch import qk_forms
    from catalog.methods.sad.signals import augment
    from catalog.models.families.base import qk_scales, residual_in

    family, _, lm, con, run_id, raw = normed_run
    qk = qk_forms(lm)
    checked = capped = 0
    for prompt_id, _, ids in _prompts(con, run_id):
        acts = raw.activations(lm.bridge.original_model, ids)
        cache = lm.run(torch.tensor([ids]))
        for layer in range(lm.n_layers):
            rows = con.execute("SELECT head, dest_pos, src_pos, score FROM firings WHERE run_id = ? AND prompt_id = ? "
                               "AND layer = ?", [run_id, prompt_id, layer]).fetchall()
            if not rows:
                continue
            head, dest, src = (torch.tensor(column) for column in list(zip(*rows))[:3])
            forms, form = qk.layer_forms(layer, head, dest - src)
            x, _ = residual_in(lm.adapter, cache, layer)
            dest_proj, src_proj = forms.projections(augment(x.float()), torch.zeros_like(head), dest, src, form)
            r = qk_scales(lm.adapter, cache, layer)
            if r is not None:
                dest_proj, src_proj = dest_proj / r[0][0, dest, head, None], src_proj / r[1][0, src, head, None]
            total = (forms.sigma[form] * dest_proj * src_proj).sum(dim=1).double().numpy()
            want = acts[layer]["score"][head.numpy(), dest.numpy(), src.numpy()]
            np.testing.assert_allclose(total, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            np.testing.assert_allclose([row[3] for row in rows], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            if family == "gemma2":  # the cap really changes these scores: the capped ones would fail above
                logit = want / raw.scale
                capped += int((np.abs(SOFTCAP * np.tanh(logit / SOFTCAP) - logit) > 1e-2 * np.abs(logit)).sum())
            checked += len(rows)
    assert checked == con.execute("SELECT count(*) FROM firings WHERE run_id = ?", [run_id]).fetchall()[0][0]
    assert family != "gemma2" or capped > 10


def test_stored_triplets_equal_a_dense_svd_of_the_raw_form(normed_run):
    _, _, lm, con, _, raw = normed_run
    rows = con.execute("""SELECT layer, head, pos_offset, list(sv ORDER BY sv), list(sigma ORDER BY sv),
                                 list(u ORDER BY sv), list(v ORDER BY sv) FROM singular_vectors
                          WHERE form = 'augmented' GROUP BY ALL ORDER BY ALL""").fetchall()
    assert len(rows) > 20
    layers_offsets = set()
    for layer, head, offset, svs, sigma, u, v in rows:
        U_all, S_all, Vt_all = raw.svd(layer, head, offset)
        U, S, V = np.array(u).T, np.array(sigma), np.array(v).T
        np.testing.assert_allclose(S, S_all[svs], rtol=1e-4, atol=1e-6 * S_all[0])
        # each stored pair (u_k, v_k) is the dense one up to the pair's shared sign
        sign = np.sign(np.einsum("dk,dk->k", U, U_all[:, svs]))
        np.testing.assert_allclose(U * sign, U_all[:, svs], atol=1e-3)
        np.testing.assert_allclose(V * sign, Vt_all[svs].T, atol=1e-3)
        layers_offsets.add((layer, offset))
    assert any(offset > 0 for _, offset in layers_offsets)


def test_firings_signals_edges_and_shares_equal_a_per_firing_recomputation(normed_run):
    """Two prompts, every firing: the firing set, each signal, edge, per-direction term; and each
    side's signal projection and its upstream heads' share of it (side_shares). The terms divide
    by the ln1 scale times the QK-norm divisor of the token: the choice docs/normed.md states."""
    _, _, lm, con, run_id, raw = normed_run
    checked_edges = checked_shares = 0
    for prompt_id, end_pos, ids in _prompts(con, run_id, 2):
        expected = per_firing(raw, raw.activations(lm.bridge.original_model, ids), end_pos)
        checked_edges += compare(con, run_id, prompt_id, expected)
        for layer, head, i, j, side, projection, head_share in con.execute(
                "SELECT layer, head, dest_pos, src_pos, side, projection, head_share FROM side_shares "
                "WHERE run_id = ? AND prompt_id = ?", [run_id, prompt_id]).fetchall():
            want = expected[layer, head, i, j]
            size = abs(want["projection"][side]) + 1e-3
            assert projection == pytest.approx(want["projection"][side], rel=1e-4, abs=1e-4 * size)
            if layer > 0 and head_share is not None and abs(want["projection"][side]) > 1e-3:
                assert head_share * projection == pytest.approx(want["head_part"][side], rel=1e-3, abs=1e-3 * size)
                checked_shares += 1
    assert checked_edges > 10 and checked_shares > 10


def test_no_firing_or_edge_crosses_a_sliding_window(normed_run):
    family, _, lm, con, run_id, raw = normed_run
    sliding = [layer for layer, window in enumerate(raw.window) if window]
    assert (sliding == [0, 2]) == family.startswith("gemma")
    for table in ("firings", "edges"):
        rows = con.execute(f"SELECT layer, max(dest_pos - src_pos) FROM {table} WHERE run_id = ? GROUP BY layer",
                           [run_id]).fetchall()
        for layer, widest in rows:
            if layer in sliding:
                assert widest < WINDOW
    longest = con.execute("SELECT max(dest_pos - src_pos) FROM firings WHERE run_id = ? AND layer = 1",
                          [run_id]).fetchall()[0][0]
    assert longest >= WINDOW  # a global layer reaches past the window: the rule is the layer's own


# -- refused before the model loads ---------------------------------------------------------------

def _one_error_line(result, *words):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "mixtral", "gemma3", "olmoe"])
def test_a_family_still_not_read_gets_one_line(model_type, tmp_path):
    from click.testing import CliRunner

    from catalog.cli import main

    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": model_type}))  # no weights: never loaded
    result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / "c.duckdb"), "--model-path", str(checkpoint)])
    _one_error_line(result, f"'{model_type}'", "Gemma-2", "Qwen3", "OLMo-2")
    assert not (tmp_path / "c.duckdb").exists()


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "qwen3", "olmo2"])
def test_accpp_is_refused_on_them_before_the_model_loads(model_type, tmp_path):
    from click.testing import CliRunner

    from catalog.cli import main

    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": model_type}))  # no weights: a load would fail
    result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / "c.duckdb"), "--model-path", str(checkpoint),
                                       "--method", "accpp"])
    _one_error_line(result, "--method accpp", "--method sad")
    assert not (tmp_path / "c.duckdb").exists()


def test_a_hub_model_of_a_family_not_read_is_refused_from_its_cached_config(tmp_path, monkeypatch):
    """`--model NAME` whose config.json is in the local hub cache: checked before the model loads."""
    import huggingface_hub
    from click.testing import CliRunner

    from catalog.cli import main

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda name, filename, *a, **k: str(snapshot / filename) if name == "org/moe" else None)
    result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / "c.duckdb"), "--model", "org/moe"])
    _one_error_line(result, "org/moe", "'qwen3_moe'")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "olmo2"}))
    result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / "c.duckdb"), "--model", "org/moe",
                                       "--method", "accpp"])
    _one_error_line(result, "--method accpp", "OLMo-2")
    assert not (tmp_path / "c.duckdb").exists()


def test_gemma3s_linear_global_rope_gives_the_scores_the_model_computes(tmp_path):
    """Gemma-3's larger models scale the global layers' rotation (rope_type 'linear', factor 8) and
    keep the local ones: every (head, destination, source) pair of a prompt, firing or not, gets
    back the model's own score from the catalog's forms of its layer."""
    from catalog.methods.sad.batch import qk_forms
    from catalog.methods.sad.signals import augment
    from catalog.models.families.base import layer_window, qk_scales, residual_in
    from catalog.models.loading import load_model

    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    lm = load_model(path=save_normed_family("gemma3", tmp_path / "model", rope_parameters=rope))
    rotaries = lm.adapter.rotaries
    assert rotaries[1].rope_type == "linear" and rotaries[0].rope_type == "default"
    assert rotaries[1].inv_freq[1] == pytest.approx(1e6 ** (-2 / 16) / 8, rel=1e-6)
    assert rotaries[0].inv_freq[1] == pytest.approx(1e4 ** (-2 / 16), rel=1e-6)
    qk = qk_forms(lm)
    ids = lm.tokenizer("When Mary and John went to the store, John gave a drink to")["input_ids"]
    cache = lm.run(torch.tensor([ids]))
    dest, src = torch.tril_indices(len(ids), len(ids))
    for layer in range(lm.n_layers):
        window = layer_window(lm.adapter, layer)
        seen = (dest - src < window) if window else torch.ones_like(dest, dtype=torch.bool)
        d, s = dest[seen], src[seen]
        x, _ = residual_in(lm.adapter, cache, layer)
        r_Q, r_K = qk_scales(lm.adapter, cache, layer)
        for head in range(lm.n_heads):
            heads = torch.full_like(d, head)
            forms, form = qk.layer_forms(layer, heads, d - s)
            dest_proj, src_proj = forms.projections(augment(x.float()), torch.zeros_like(d), d, s, form)
            dest_proj, src_proj = dest_proj / r_Q[0, d, head, None], src_proj / r_K[0, s, head, None]
            total = (forms.sigma[form] * dest_proj * src_proj).sum(dim=1).double()
            hook = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, d, s].double() * lm.adapter.score_scale
            np.testing.assert_allclose(total.numpy(), hook.numpy(), rtol=1e-4, atol=1e-4 * hook.abs().max().item())
