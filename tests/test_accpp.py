"""ACC++ on a small random GPT-2: ACCPP.md's identities, a plain per-firing greedy, and the catalog.

Nothing here needs ../shared: the identities hold whatever the weights. Independent checks:
the atoms of a firing sum to the hook's score row; the IG shortcut equals the trapezoid integral
over the full breakdown; a plain Python greedy over the full breakdown picks the same atoms; the
stored drops sum to the attention lost; the seed components sum to ln_final's normalized residual.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from catalog.methods.accpp.components import HOOKS, residual_components
from catalog.methods.accpp.firing import MAX_ATOMS, Firings, LayerDecomposer, dynamic_threshold, trapezoid_weights
from catalog.methods.accpp.seeds import component_output, linear_seeds
from catalog.methods.accpp.weights import accpp_weights
from catalog.methods.shared.tensors import pad_tokens
from catalog.cli import main
from catalog.jobs.ingest import ingest
from catalog.prompts import ioi_prompts, tokenize_prompts
from catalog.store import open_readonly


@pytest.fixture(scope="module")
def batch(tiny_model):
    items = ioi_prompts(3, seed=5, tokenizer=tiny_model.tokenizer)
    token_lists = tokenize_prompts(items, tiny_model.tokenizer)
    logits, cache = tiny_model.run(pad_tokens(token_lists, 0), HOOKS, with_logits=True)
    W_Q, b_Q, W_K, b_K, W_O = tiny_model.attention_weights()
    res = residual_components(cache, W_O, tiny_model.output_weights()[0])
    return items, res, accpp_weights(W_Q, b_Q, W_K, b_K)


def _all_firings(res, layer, items):
    """Every firing of a layer with the dynamic threshold, 1 <= i <= end."""
    found = []
    for b, item in enumerate(items):
        for h in range(res.pattern.shape[2]):
            for i in range(1, item.roles["end"] + 1):
                for j in range(i + 1):
                    if res.pattern[b, layer, h, i, j] >= dynamic_threshold(torch.tensor(i)):
                        found.append((b, h, i, j))
    b, h, i, j = torch.tensor(found).T
    return Firings(b, h, i, j, res.pattern[b, layer, h, i, j], dynamic_threshold(i))


def _full_rows(decomposer, firings, steps=64):
    """Score row, valid columns, and per side (IG by the shortcut X . g, X) over every atom of the layout."""
    atoms = decomposer.atoms(firings, steps)
    everything = torch.arange(atoms.n_atoms).expand(len(firings), -1)
    sides = {}
    for side, (_, rows_of) in atoms.sides.items():
        X = rows_of(torch.arange(len(firings)), everything)
        sides[side] = (torch.einsum("fnp,fp->fn", X, atoms.g), X)
    return atoms.row, atoms.valid, sides


@pytest.mark.parametrize("layer", [1, 2])
def test_atoms_sum_to_the_hooks_score_row(batch, layer):
    items, res, weights = batch
    firings = _all_firings(res, layer, items)
    assert len(firings) > 3
    decomposer = LayerDecomposer(layer, firings, res, weights)
    row, valid, sides = _full_rows(decomposer, firings)
    hook = res.attn_scores[firings.prompt, layer, firings.head, firings.dest].double()  # [F, pos], -inf after i
    hook = torch.where(valid, hook, torch.zeros_like(hook))
    for side, (_, X) in sides.items():
        total = torch.where(valid, X.sum(dim=1), torch.zeros_like(hook))
        diff = (total - hook).abs().max()
        assert diff <= 1e-4 * hook.abs().max(), f"{side}: atoms do not sum to hook_attn_scores ({diff})"


def test_ig_shortcut_equals_the_trapezoid_over_the_full_breakdown(batch):
    items, res, weights = batch
    firings = _all_firings(res, 2, items)
    decomposer = LayerDecomposer(2, firings, res, weights)
    row, valid, sides = _full_rows(decomposer, firings, steps=16)
    alphas, w = trapezoid_weights(16)
    for side, (ig, X) in sides.items():
        for f in range(len(firings)):
            T = int(firings.dest[f]) + 1
            Xf, j = X[f, :, :T], int(firings.src[f])
            direct = torch.zeros(Xf.shape[0], dtype=torch.float64)
            for a, wa in zip(alphas, w):  # ACCPP.md 2.3, literally
                p = torch.softmax(a * Xf.sum(0), dim=0)
                direct += wa * p[j] * (Xf[:, j] - Xf @ p)
            # X rows are float32 products: agreement to float32 precision of the largest atom.
            assert (ig[f] - direct).abs().max() <= 1e-6 * direct.abs().max(), side


def test_greedy_matches_a_plain_loop(batch):
    items, res, weights = batch
    firings = _all_firings(res, 2, items)
    decomposer = LayerDecomposer(2, firings, res, weights)
    row, valid, sides = _full_rows(decomposer, firings)
    selections = decomposer.decompose(firings, 64)
    for side, (ig, X) in sides.items():
        sel = selections[side]
        for f in range(len(firings)):
            T, j = int(firings.dest[f]) + 1, int(firings.src[f])
            Xf = X[f, :, :T].clone()
            order = np.argsort(ig[f].numpy(), kind="stable")[::-1]
            a = prev = float(firings.attn[f])
            picked, drops = [], []
            while a >= float(firings.threshold[f]) and len(picked) <= MAX_ATOMS:
                atom = int(order[len(picked)])
                Xf[atom] = 0
                a = float(torch.softmax(Xf.sum(0), dim=0)[j])
                picked.append(atom)
                drops.append(prev - a)
                prev = a
            mine = sel.firing == f
            assert int(sel.n_atoms[f]) == len(picked)
            n_comp, r, n_pos = decomposer.layout()[1:]
            flat = ((sel.up_layer[mine] * n_comp + sel.comp[mine]) * r + sel.sv[mine]) * n_pos + sel.token[mine]
            assert flat.tolist() == picked, (side, f)
            assert np.allclose(sel.drop[mine].numpy(), drops, atol=1e-6)
            assert float(sel.attn_after[f]) == pytest.approx(a, abs=1e-6)


def test_seed_components_sum_to_the_final_normalized_residual(batch):
    items, res, weights = batch
    L, H = res.pattern.shape[1], res.pattern.shape[2]
    for b, item in enumerate(items):
        end = item.roles["end"]
        total = torch.zeros(res.final_normalized.shape[-1], dtype=torch.float64)
        for layer in range(L):
            for comp in range(H):
                for token in range(end + 1):
                    total += component_output(res, b, end, layer, comp, token)
            total += component_output(res, b, end, layer, H, end) + component_output(res, b, end, layer, H + 1, end)
        total += component_output(res, b, end, 0, H + 2, end)
        assert torch.allclose(total, res.final_normalized[b, end].double(), atol=1e-4)


def test_linear_seed_rule(batch, tiny_model):
    """Every component at or above the cutoff, the cutoff as ACCPP.md section 3 states it."""
    items, res, weights = batch
    W_U = tiny_model.output_weights()[1]
    direction = (W_U[:, 10] - W_U[:, 20]).double()
    seeds = linear_seeds(res, 0, items[0].roles["end"], direction, "test")
    contributions = []
    L, H = res.pattern.shape[1], res.pattern.shape[2]
    end = items[0].roles["end"]
    for layer in range(L):
        contributions += [float(component_output(res, 0, end, layer, c, t) @ direction) for c in range(H)
                          for t in range(end + 1)]
        contributions += [float(component_output(res, 0, end, layer, c, end) @ direction) for c in (H, H + 1)]
    contributions.append(float(component_output(res, 0, end, 0, H + 2, end) @ direction))
    total = sum(contributions)
    if total <= 0:
        assert seeds.weight == []
        return
    ordered = sorted(contributions, reverse=True)
    running = np.cumsum(ordered)
    cutoff = min(ordered[int(np.argmax(running > total))], total / 2) if (running > total).any() else total / 2
    expected = sorted(c for c in contributions if c >= cutoff)
    assert sorted(seeds.weight) == pytest.approx(expected, abs=1e-9)


@pytest.fixture(scope="module")
def accpp_db(tiny_checkpoint, tiny_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("accpp") / "accpp.duckdb"
    summary = ingest(db, model_path=tiny_checkpoint, n_prompts=6, seed=2, batch_size=4, method="accpp",
                     heads="2.0,2.1", loaded_model=tiny_model)
    return db, summary


def test_stored_drops_sum_to_the_attention_lost(accpp_db):
    db, summary = accpp_db
    con = open_readonly(db)
    assert summary["firings"] > 0 and summary["edges"] > 0
    sides = con.execute("""
        SELECT f.attn_weight - s.attn_after, coalesce(sum(e.weight), 0), s.capped, count(e.edge_id)
        FROM firing_sides s JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)
        LEFT JOIN edges e USING (run_id, prompt_id, layer, head, dest_pos, src_pos, side)
        GROUP BY ALL""").fetchall()
    assert len(sides) == 2 * summary["firings"]
    for lost, summed, capped, n_edges in sides:
        if capped:
            assert n_edges == 0
        else:
            assert summed == pytest.approx(lost, abs=1e-5)
    per_edge = con.execute("""
        SELECT e.weight, sum(s.weight), count(*) FROM edges e JOIN edge_svs s USING (run_id, prompt_id, edge_id)
        GROUP BY ALL""").fetchall()
    assert len(per_edge) == summary["edges"]
    assert all(w == pytest.approx(t, abs=1e-5) for w, t, _ in per_edge)
    # Every decomposed firing clears the dynamic threshold, and every prompt has its output.
    assert con.execute("SELECT count(*) FROM firings WHERE attn_weight < least(1, 2.5 / (dest_pos + 1)) - 1e-6"
                       ).fetchall()[0][0] == 0
    assert con.execute("SELECT count(*) FROM prompts WHERE logit_diff IS NULL OR top_token IS NULL").fetchall()[0][0] == 0
    assert con.execute("SELECT DISTINCT method, weight_unit FROM runs").fetchall() == [("accpp", "attn_prob")]


def test_a_bfloat16_model_is_traced_from_its_own_activations(tiny_checkpoint, tmp_path):
    """--dtype bfloat16 with ACC++ (it used to stop on mixed dtypes): the activations of the
    bfloat16 model, read in float32, give the stored attention; the drops still add up."""
    from catalog.models.loading import load_model

    db = tmp_path / "bf16.duckdb"
    summary = ingest(db, model_path=tiny_checkpoint, n_prompts=3, seed=2, batch_size=3, method="accpp",
                     heads="2.0", dtype="bfloat16")
    assert summary["firings"] > 0 and summary["edges"] > 0
    lm = load_model(path=tiny_checkpoint, dtype="bfloat16")
    con = open_readonly(db)
    for prompt_id, in con.execute("SELECT prompt_id FROM prompts").fetchall():
        ids = [t for (t,) in con.execute("SELECT token_id FROM tokens WHERE prompt_id = ? ORDER BY pos",
                                         [prompt_id]).fetchall()]
        cache = lm.bridge.run_with_cache(torch.tensor([ids]))[1]
        for layer, head, i, j, attn in con.execute("SELECT layer, head, dest_pos, src_pos, attn_weight FROM firings "
                                                   "WHERE prompt_id = ?", [prompt_id]).fetchall():
            assert attn == pytest.approx(float(cache[f"blocks.{layer}.attn.hook_pattern"][0, head, i, j]), abs=1e-6)
    lost = con.execute("""SELECT f.attn_weight - s.attn_after, coalesce(sum(e.weight), 0) FROM firing_sides s
        JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)
        LEFT JOIN edges e USING (run_id, prompt_id, layer, head, dest_pos, src_pos, side)
        WHERE NOT s.capped GROUP BY ALL""").fetchall()
    assert lost and all(summed == pytest.approx(drop, abs=1e-5) for drop, summed in lost)
    con.close()


def test_interrupted_accpp_ingest_resumes_to_the_same_catalog(accpp_db, tiny_checkpoint, tiny_model, tmp_path):
    db, summary = accpp_db
    resumed = tmp_path / "resumed.duckdb"
    settings = dict(model_path=tiny_checkpoint, n_prompts=6, seed=2, batch_size=4, method="accpp", heads="2.0,2.1",
                    loaded_model=tiny_model)

    def stop(batch_index):
        raise KeyboardInterrupt

    with pytest.raises(Exception, match="interrupted: 4 of 6 prompts"):
        ingest(resumed, on_batch=stop, **settings)
    again = ingest(resumed, **settings)
    assert again["resumed"] and again["edges"] == summary["edges"]
    queries = ["SELECT * EXCLUDE (run_id) FROM edges ORDER BY ALL", "SELECT * EXCLUDE (run_id) FROM edge_svs ORDER BY ALL",
               "SELECT * EXCLUDE (run_id) FROM seeds ORDER BY ALL", "SELECT * EXCLUDE (run_id) FROM firing_sides ORDER BY ALL",
               "SELECT prompt_id, logit_diff, top_token FROM prompts ORDER BY ALL"]
    for sql in queries:
        assert open_readonly(db).execute(sql).fetchall() == open_readonly(resumed).execute(sql).fetchall(), sql
    assert ingest(resumed, **settings)["already_finished"]


def test_cli_accpp_queries(accpp_db, tmp_path):
    db, _ = accpp_db
    runner = CliRunner()
    into = runner.invoke(main, ["edges", "--db", str(db), "--into", "2.0", "--format", "json"])
    assert into.exit_code == 0, into.output
    kinds = runner.invoke(main, ["edges", "--db", str(db), "--into", "2.0", "--kind", "mlp,offset", "--format", "json"])
    import json

    rows = json.loads(kinds.stdout)
    assert rows and all(r["upstream"].startswith(("MLP", "offset")) for r in rows)
    assert all(r["up_kind"] in ("mlp", "offset") and (r["up_layer"] is None) == (r["up_kind"] == "offset")
               for r in rows)
    assert kinds.stderr.startswith("note: run ") and "(accpp, finished" in kinds.stderr
    assert runner.invoke(main, ["head", "--db", str(db), "2.0"]).exit_code == 0
    for fmt in ("graphml", "dot", "html", "json"):
        result = runner.invoke(main, ["trace", "--db", str(db), "--prompt", "0", "--format", fmt])
        assert result.exit_code == 0, result.output
        if fmt == "json":  # one object: nodes and edges with the run and notes
            document = json.loads(result.stdout)
            assert {"run_id", "run", "notes", "nodes", "edges"} <= set(document)
            assert all(e["up_kind"] is not None for e in document["edges"])
            assert all(isinstance(s["sv"], int) for e in document["edges"] for s in e["top_svs"])
            # Stored edges the drawing leaves out (a head slice reading a token after the firing's
            # source, as the reference does) are counted in a note, not dropped silently.
            drawn = {(f["layer"], f["head"], *map(int, f["node"].split("@")[1].split(">")))
                     for f in document["nodes"] if f["kind"] == "firing"}
            later = sum(1 for layer, head, dest, src, up_src in open_readonly(db).execute(
                """SELECT layer, head, dest_pos, src_pos, up_src_pos FROM edges WHERE prompt_id = 0
                   AND up_kind = 'head' AND side = 'key' AND up_src_pos > src_pos""").fetchall()
                if (layer, head, dest, src) in drawn)
            assert later == 0 or f"{later} stored key-side edges" in " ".join(document["notes"])
    png = tmp_path / "c.png"
    assert runner.invoke(main, ["trace", "--db", str(db), "--format", "png", "--out", str(png)]).exit_code == 0
    assert png.stat().st_size > 1000
    bad = runner.invoke(main, ["edges", "--db", str(db), "--into", "2.0", "--kind", "neuron"])
    assert bad.exit_code == 1 and "unknown component kind" in bad.output
    root = runner.invoke(main, ["trace", "--db", str(db), "--root", "2.0"])
    assert root.exit_code == 1 and "ACC++ run" in root.output
    # An empty answer says why, in ACC++'s terms: a head whose firings were never decomposed.
    silent = open_readonly(db).execute("""
        SELECT l.layer, h.head FROM range(3) l(layer), range(4) h(head)
        WHERE (l.layer, h.head) NOT IN (SELECT (layer, head) FROM firings) ORDER BY 1 DESC, 2 LIMIT 1""").fetchall()
    if silent:
        empty = runner.invoke(main, ["edges", "--db", str(db), "--into", f"{silent[0][0]}.{silent[0][1]}"])
        assert empty.exit_code == 0 and "(no rows)" in empty.stdout
        assert f"note: no firing of L{silent[0][0]}H{silent[0][1]} is decomposed in run" in empty.stderr


@pytest.mark.parametrize("args, message", [
    (["--heads", "9.9"], "no head 9.9"),
    (["--dest-roles", "end"], "--dest-roles applies to the firings of --heads"),
    (["--seeding", "none"], "decomposes nothing"),
    (["--threshold", "often"], "--threshold must be"),
    (["--tau", "0"], "--tau must be"),
])
def test_cli_accpp_bad_settings(tiny_checkpoint, tmp_path, args, message):
    db = tmp_path / "bad.duckdb"
    result = CliRunner().invoke(main, ["ingest", "--db", str(db), "--model-path", str(tiny_checkpoint),
                                       "--n-prompts", "2", "--method", "accpp", *args])
    last = result.output.strip().splitlines()[-1]  # status lines (loading the model) may come first
    assert result.exit_code == 1 and last.startswith("error:") and message in last, result.output
    assert not db.exists()  # nothing is stored before the settings are known to be good


@pytest.mark.parametrize("args, message", [
    (["--method", "accpp", "--sv-threshold", "0.9"], "--sv-threshold applies to --method sad"),
    (["--tau", "0.5"], "--tau applies to --method accpp"),
    (["--heads", "2.0"], "--heads applies to --method accpp"),
])
def test_options_of_the_other_method_are_refused(tiny_checkpoint, tmp_path, args, message):
    db = tmp_path / "c.duckdb"
    result = CliRunner().invoke(main, ["ingest", "--db", str(db), "--model-path", str(tiny_checkpoint), *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not db.exists()


def test_linear_seeding_needs_answer_and_wrong(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "When Mary and John went to the store, John gave a drink to"}\n')
    result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / "c.duckdb"), "--model-path",
                                       str(tiny_checkpoint), "--prompts", str(prompts), "--method", "accpp"])
    assert result.exit_code == 1 and "no answer token" in result.output
