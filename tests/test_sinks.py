"""Attention sinks (docs/schema.md, "Attention sinks"): the rule against a plain numpy reading of
the model's own patterns, what a sink does to firings and edges, and what is recorded."""

import duckdb
import pytest

from catalog.jobs.ingest import ingest
from catalog.methods.shared.tensors import pad_tokens
from catalog.prompts import end_positions


def _head_shares(lm, token_lists, end_pos, sink_attention):
    """[prompt][pos]: the share of all heads whose mean attention to pos, over the destinations
    pos < i <= end, is at least sink_attention; each prompt run alone, loops over plain numpy."""
    shares = []
    for ids, end in zip(token_lists, end_pos):
        cache = lm.run(pad_tokens([ids], 0), ("hook_pattern",))
        patterns = [cache[f"blocks.{layer}.attn.hook_pattern"][0].double().numpy() for layer in range(lm.n_layers)]
        row = [0.0] * len(ids)
        for j in range(1, end):
            giving = 0
            for pattern in patterns:
                for head in range(pattern.shape[0]):
                    mean = sum(pattern[head, i, j] for i in range(j + 1, end + 1)) / (end - j)
                    giving += mean >= sink_attention
            row[j] = giving / (lm.n_layers * lm.n_heads)
        shares.append(row)
    return shares


def _ingest(db, tiny_checkpoint, tiny_model, **settings):
    return ingest(db, model_path=tiny_checkpoint, n_prompts=6, seed=3, batch_size=4, loaded_model=tiny_model,
                  new_run=True, **settings)["run_id"]


@pytest.fixture(scope="module")
def sink_runs(tiny_checkpoint, tiny_model, tmp_path_factory):
    """Runs of the tiny model with a rule loose enough to find sinks in it (chosen from the
    independent shares so that some tokens are sinks and some are not), without and with
    --keep-sinks, and one with the defaults."""
    from catalog.jobs.ingest import load_prompts

    items, token_lists = load_prompts("ioi", 6, 3, None, tiny_model)
    end_pos = end_positions(items, token_lists, tiny_model.tokenizer)
    sink_attention = 0.15
    shares = _head_shares(tiny_model, token_lists, end_pos, sink_attention)
    judged = sorted({s for row, end in zip(shares, end_pos) for s in row[1:end]})
    assert len(judged) > 4
    # Between two observed shares near the top: a few sinks, and no share equal to the threshold.
    sink_head_share = (judged[-3] + judged[-4]) / 2
    expected = {(p, j) for p, row in enumerate(shares) for j, s in enumerate(row) if s >= sink_head_share}
    db = tmp_path_factory.mktemp("sinks") / "sinks.duckdb"
    rule = dict(sink_attention=sink_attention, sink_head_share=sink_head_share, sink_min_heads=1)
    runs = {"default": _ingest(db, tiny_checkpoint, tiny_model),
            "dropped": _ingest(db, tiny_checkpoint, tiny_model, **rule),
            "kept": _ingest(db, tiny_checkpoint, tiny_model, keep_sinks=True, **rule)}
    con = duckdb.connect(str(db), read_only=True)
    yield con, runs, expected, rule
    con.close()


def test_sink_tokens_are_the_rule_applied_to_the_patterns(sink_runs):
    con, runs, expected, _ = sink_runs
    for name in ("dropped", "kept"):
        stored = set(con.execute("SELECT prompt_id, pos FROM tokens WHERE run_id = ? AND is_sink",
                                 [runs[name]]).fetchall())
        assert stored == expected and expected
        assert con.execute("SELECT count(*) FROM tokens WHERE run_id = ? AND is_sink IS NULL",
                           [runs[name]]).fetchall()[0][0] == 0


def test_the_defaults_flag_nothing_on_a_random_model(sink_runs):
    con, runs, _, _ = sink_runs
    assert con.execute("SELECT count(*), count(*) FILTER (is_sink) FROM tokens WHERE run_id = ?",
                       [runs["default"]]).fetchall()[0][1] == 0


def test_firings_to_sinks_are_flagged_and_get_no_edges_unless_kept(sink_runs):
    con, runs, expected, _ = sink_runs

    def firings(run):
        return con.execute("SELECT prompt_id, layer, head, dest_pos, src_pos, to_sink FROM firings WHERE run_id = ? "
                           "ORDER BY ALL", [run]).fetchall()

    def edges(run, where):
        return set(con.execute(
            "SELECT e.prompt_id, e.layer, e.head, e.dest_pos, e.src_pos, side, up_layer, up_head, weight FROM edges e "
            f"JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos) WHERE run_id = ? AND {where}",
            [run]).fetchall())

    dropped, kept, default = firings(runs["dropped"]), firings(runs["kept"]), firings(runs["default"])
    # The same firings in all three runs; flagged exactly where the source is a sink.
    assert [f[:5] for f in dropped] == [f[:5] for f in kept] == [f[:5] for f in default]
    assert [f[5] for f in dropped] == [(f[0], f[4]) in expected for f in dropped]
    assert dropped == kept and not any(f[5] for f in default)
    sink_firings = sum(f[5] for f in dropped if f[1] >= 1)
    assert sink_firings > 0 and len(dropped) - sink_firings > 0
    assert edges(runs["dropped"], "to_sink") == set()
    assert edges(runs["kept"], "to_sink")
    # Kept, sinks are traced as before; dropped, the other firings keep exactly those edges.
    assert edges(runs["kept"], "true") == edges(runs["default"], "true")
    assert edges(runs["dropped"], "true") == edges(runs["kept"], "NOT to_sink")
    # edge_svs rows only for the edges that are stored.
    assert con.execute("SELECT count(*) FROM edge_svs s ANTI JOIN edges e USING (run_id, prompt_id, edge_id) "
                       "WHERE run_id = ?", [runs["dropped"]]).fetchall()[0][0] == 0


def test_the_rule_is_recorded_with_the_run(sink_runs):
    con, runs, _, rule = sink_runs
    recorded = {name: con.execute("SELECT sink_attention, sink_head_share, sink_min_heads, keep_sinks FROM runs "
                                  "WHERE run_id = ?", [run]).fetchall()[0] for name, run in runs.items()}
    assert recorded["dropped"] == (rule["sink_attention"], rule["sink_head_share"], 1, False)
    assert recorded["kept"] == (rule["sink_attention"], rule["sink_head_share"], 1, True)
    assert recorded["default"] == (0.3, 0.15, 8, False)


def test_the_options_are_on_the_command_line():
    from click.testing import CliRunner

    from catalog.cli import main  # noqa: F401 (commands are added on import)

    text = CliRunner().invoke(main, ["ingest", "--help"]).output
    for flag in ("--sink-attention", "--sink-head-share", "--sink-min-heads", "--keep-sinks"):
        assert flag in text


def test_heads_role_pairs_leave_sinks_out_unless_kept(sink_runs):
    from collections import Counter

    from catalog.read.overview import heads, heads_notes

    con, runs, expected, _ = sink_runs
    for name, counted in (("dropped", lambda f: (f[0], f[4]) not in expected), ("kept", lambda f: True)):
        firings = con.execute("SELECT prompt_id, layer, head, dest_pos, src_pos, coalesce(dest_role, 'other'), "
                              "coalesce(src_role, 'other') FROM firing_roles WHERE run_id = ?",
                              [runs[name]]).fetchall()
        pairs = {}
        for f in firings:
            if counted(f):
                pairs.setdefault((f[1], f[2]), Counter())[f"{f[5]}->{f[6]}"] += 1
        want = {head: [p for p, _ in sorted(c.items(), key=lambda item: (-item[1], item[0]))[:3]]
                for head, c in pairs.items()}
        got = {(r["layer"], r["head"]): r["roles"] for r in heads(con, runs[name]).to_pylist() if r["roles"]}
        assert got == want
        assert heads_notes(con, runs[name]) and "sinks" in heads_notes(con, runs[name])[0]
    assert heads_notes(con, runs["default"]) == []
