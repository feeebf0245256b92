"""Every model family against a plain computation written independently, on tiny random checkpoints.

For GPT-2, GPT-NeoX (rotary on a quarter of each head, parallel attention and MLP), Llama
(rotary, grouped-query attention, RMSNorm) and Qwen2 (the same plus QK biases), built offline
and loaded through `--model-path`:

- the contributions identity: for every stored firing, the stored singular vectors of its form
  (joined in SQL on pos_offset) give contributions that sum to the score the model's own hook reports;
- the decomposition: each stored form equals a dense numpy SVD of Omega~(i - j), built here from
  the bridge's raw weights and the rotation written out from the Hugging Face config;
- firings, signals and edges of each prompt equal a per-firing recomputation in numpy.
"""

import json

import duckdb
import numpy as np
import pytest
import torch
from _per_firing import compare, per_firing

from catalog.jobs.ingest import ingest
from catalog.testing.families import FAMILY_NAMES, save_random_family
from catalog.testing.tokenizers import llama_style_tokenizer

# A rope variant whose frequencies switch with the length (Phi-3's 'longrope'; short factors up to
# 32 positions, then long ones): read for prompts of up to 32 tokens, with its attention scaling.
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32, "factor": 4.0,
            "short_factor": [1.0 + 0.25 * p for p in range(8)], "long_factor": [2.0 + p for p in range(8)]}


@pytest.fixture(scope="module", params=[(f, None) for f in FAMILY_NAMES] + [("llama", LONGROPE)],
                ids=list(FAMILY_NAMES) + ["llama-longrope"])
def family_run(request, tmp_path_factory):
    from catalog.models.loading import load_model

    family, rope = request.param
    # Llama gets a SentencePiece-style tokenizer that prepends a BOS, as Llama's does; the others
    # GPT-2's byte-level BPE, which adds none (as Pythia's and Qwen2's own tokenizers).
    tokenizer = llama_style_tokenizer() if family == "llama" else None
    checkpoint = save_random_family(family, tmp_path_factory.mktemp(f"tiny-{family}"), tokenizer=tokenizer,
                                    rope_parameters=rope)
    lm = load_model(path=checkpoint)
    db = tmp_path_factory.mktemp(f"catalog-{family}") / "catalog.duckdb"
    summary = ingest(db, model_path=checkpoint, n_prompts=4, seed=2, batch_size=3, loaded_model=lm)
    con = duckdb.connect(str(db), read_only=True)
    yield family, checkpoint, lm, con, summary["run_id"]
    con.close()


# -- the model, written out independently ---------------------------------------------------------

def _raw_factors(lm):
    """Augmented A, B [layer, head, d+1, d_head] in float64 from the bridge's own stacked weights,
    key heads repeated over their query group here (not through the catalog's adapter)."""
    b = lm.bridge
    W_Q, W_K = b.W_Q.detach().double().numpy(), b.W_K.detach().double().numpy()
    n_layers, n_heads, _, d_head = W_Q.shape

    def bias(name, n):
        try:
            value = getattr(b, name)
        except Exception:
            value = None
        return np.zeros((n_layers, n, d_head)) if value is None else value.detach().double().numpy()

    b_Q, b_K = bias("b_Q", n_heads), bias("b_K", W_K.shape[1])
    group = n_heads // W_K.shape[1]
    W_K, b_K = np.repeat(W_K, group, axis=1), np.repeat(b_K, group, axis=1)
    A = np.concatenate([W_Q, b_Q[:, :, None, :]], axis=2)
    B = np.concatenate([W_K, b_K[:, :, None, :]], axis=2)
    return A, B


def _rotation(checkpoint, d_head):
    """offset -> M(offset) from config.json: q_i . k_j after rotating both = q^T M(i - j) k, or None."""
    config = json.loads((checkpoint / "config.json").read_text())
    if config["model_type"] == "gpt2":
        return None
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0)))
    fraction = rope.get("partial_rotary_factor", config.get("rotary_pct", 1.0))
    rotary_dim = int(d_head * fraction)
    half = rotary_dim // 2
    factors, magnitude = np.ones(half), 1.0
    if rope.get("rope_type") == "longrope":  # prompts within the original length: the short factors
        factors = np.array(rope["short_factor"])
        ratio = config["max_position_embeddings"] / rope["original_max_position_embeddings"]
        magnitude = 1.0 + np.log(ratio) / np.log(rope["original_max_position_embeddings"])  # q and k both scaled
    frequency = (1.0 / (factors * theta ** (np.arange(0, rotary_dim, 2) / rotary_dim))).astype(np.float32)

    def matrix(offset):
        M = np.eye(d_head)
        for p in range(half):
            # q rotated by i*f and k by j*f: the pair (p, p + half) sees cos((i-j) f) and sin((i-j) f)
            c, s = np.cos(offset * frequency[p]), np.sin(offset * frequency[p])
            M[p, p] = M[p + half, p + half] = c
            M[p, p + half], M[p + half, p] = s, -s
        M[:rotary_dim, :rotary_dim] *= magnitude
        return M

    return matrix


def _omega(A, B, rotation, layer, head, offset):
    middle = np.eye(A.shape[-1]) if rotation is None else rotation(offset)
    return A[layer, head] @ middle @ B[layer, head].T


def _svd(omega, r):
    U, S, Vt = np.linalg.svd(omega)
    return U[:, :r], S[:r], Vt[:r].T


# -- the checks -----------------------------------------------------------------------------------

def test_the_family_is_recorded_and_read(family_run):
    family, checkpoint, lm, con, run_id = family_run
    row = con.execute("SELECT family, pos_encoding, n_kv_heads, rotary_dim FROM model_families").fetchall()
    config = json.loads((checkpoint / "config.json").read_text())
    kv = config.get("num_key_value_heads", lm.n_heads)
    rotary = {"gpt2": None, "gpt_neox": lm.d_head // 4, "llama": lm.d_head, "qwen2": lm.d_head}[family]
    assert row == [(family, "learned" if family == "gpt2" else "rotary", kv, rotary)]
    assert lm.adapter.family == family
    n_firings = con.execute("SELECT count(*) FROM firings WHERE run_id = ?", [run_id]).fetchall()[0][0]
    n_edges = con.execute("SELECT count(*) FROM edges WHERE run_id = ?", [run_id]).fetchall()[0][0]
    assert n_firings > 20 and n_edges > 20  # the random weights really make heads fire
    # A BOS-adding tokenizer: recorded, position 0 of every prompt is the BOS, roles count it.
    has_bos = family == "llama"
    assert con.execute("SELECT has_bos FROM runs WHERE run_id = ?", [run_id]).fetchall() == [(has_bos,)]
    first = {t for (t,) in con.execute("SELECT DISTINCT token_id FROM tokens WHERE run_id = ? AND pos = 0",
                                       [run_id]).fetchall()}
    assert (first == {lm.tokenizer.bos_token_id}) == has_bos
    roles = con.execute("SELECT t.token FROM tokens t WHERE run_id = ? AND role = 'IO'", [run_id]).fetchall()
    assert roles and all(token.strip(" ▁") for (token,) in roles)  # a name, not the BOS or a space


def test_contributions_of_every_firing_sum_to_the_hook_score(family_run):
    """All d_head contributions of every stored firing, from the catalog's own forms (per head, or
    per head and offset), sum to the score the model's hook reports."""
    from catalog.methods.sad.forms import HeadForms
    from catalog.methods.sad.batch import qk_forms
    from catalog.methods.sad.signals import augment

    family, _, lm, con, run_id = family_run
    if lm.adapter.rotary is None:
        from catalog.methods.shared.svd import from_arrow

        table = con.sql("SELECT layer, head, sv, sigma, u, v FROM singular_vectors WHERE form = 'augmented'"
                        ).to_arrow_table()
        qk = HeadForms(from_arrow(table, lm.n_layers, lm.n_heads))
    else:
        qk = qk_forms(lm)  # rotary: built from the factors, needs no catalog
    checked = 0
    for (prompt_id,) in con.execute("SELECT prompt_id FROM prompts WHERE run_id = ?", [run_id]).fetchall():
        ids = [t for (t,) in con.execute("SELECT token_id FROM tokens WHERE run_id = ? AND prompt_id = ? ORDER BY pos",
                                         [run_id, prompt_id]).fetchall()]
        cache = lm.bridge.run_with_cache(torch.tensor([ids]))[1]
        for layer in range(lm.n_layers):
            rows = con.execute("SELECT head, dest_pos, src_pos FROM firings WHERE run_id = ? AND prompt_id = ? "
                               "AND layer = ?", [run_id, prompt_id, layer]).fetchall()
            if not rows:
                continue
            head, dest, src = (torch.tensor(column) for column in zip(*rows))
            forms, form = qk.layer_forms(layer, head, dest - src)
            x = augment(cache[f"blocks.{layer}.ln1.hook_normalized"].float())
            zeros = torch.zeros_like(head)
            dest_proj, src_proj = forms.projections(x, zeros, dest, src, form)
            total = (forms.sigma[form] * dest_proj * src_proj).sum(dim=1).double()
            hook = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, dest, src].double() * np.sqrt(lm.d_head)
            np.testing.assert_allclose(total.numpy(), hook.numpy(), rtol=1e-4, atol=1e-4)
            checked += len(rows)
    assert checked == con.execute("SELECT count(*) FROM firings WHERE run_id = ?", [run_id]).fetchall()[0][0]


def test_every_signal_direction_joins_its_stored_form_in_sql(family_run):
    """firing_svs -> firings -> singular_vectors on pos_offset: exactly one row per direction, whose
    sigma, u and v give back the stored contribution from a fresh forward pass."""
    family, _, lm, con, run_id = family_run
    rows = con.execute("""
        SELECT f.prompt_id, f.layer, f.head, f.dest_pos, f.src_pos, f.pos_offset, fs.contribution,
               list(s.sigma), list(s.u), list(s.v)
        FROM firing_svs fs JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)
        JOIN singular_vectors s ON s.form = 'augmented' AND s.layer = f.layer AND s.head = f.head
             AND s.sv = fs.sv AND s.pos_offset IS NOT DISTINCT FROM f.pos_offset
        WHERE f.run_id = ? GROUP BY ALL""", [run_id]).fetchall()
    assert len(rows) == con.execute("SELECT count(*) FROM firing_svs WHERE run_id = ?", [run_id]).fetchall()[0][0]
    assert all(len(r[7]) == 1 for r in rows)  # one stored direction each
    assert all((r[5] is None) == (family == "gpt2") and (r[5] is None or r[5] == r[3] - r[4]) for r in rows)
    caches = {}
    for prompt_id, layer, head, i, j, _, contribution, (sigma,), (u,), (v,) in rows:
        if prompt_id not in caches:
            ids = [t for (t,) in con.execute("SELECT token_id FROM tokens WHERE run_id = ? AND prompt_id = ? "
                                             "ORDER BY pos", [run_id, prompt_id]).fetchall()]
            caches[prompt_id] = lm.bridge.run_with_cache(torch.tensor([ids]))[1]
        x = caches[prompt_id][f"blocks.{layer}.ln1.hook_normalized"][0].double().numpy()
        xi, xj = np.append(x[i], 1.0), np.append(x[j], 1.0)
        assert sigma * (xi @ np.array(u)) * (np.array(v) @ xj) == pytest.approx(contribution, rel=1e-3, abs=1e-4)


def test_stored_forms_equal_a_dense_numpy_svd(family_run):
    family, checkpoint, lm, con, _ = family_run
    A, B = _raw_factors(lm)
    rotation = _rotation(checkpoint, lm.d_head)
    rows = con.execute("""SELECT layer, head, pos_offset, list(sv ORDER BY sv), list(sigma ORDER BY sv),
                                 list(u ORDER BY sv), list(v ORDER BY sv) FROM singular_vectors
                          WHERE form = 'augmented' GROUP BY ALL ORDER BY ALL""").fetchall()
    assert rows
    for layer, head, offset, svs, sigma, u, v in rows:
        dense = _omega(A, B, rotation, layer, head, offset or 0)
        U_all, S_all, Vt_all = np.linalg.svd(dense)
        U, S, V = np.array(u).T, np.array(sigma), np.array(v).T
        np.testing.assert_allclose(S, S_all[svs], rtol=1e-4, atol=1e-6 * S_all[0])
        for n, k in enumerate(svs):  # each stored triplet is the dense one (u_k v_k^T fixes the sign pair)
            np.testing.assert_allclose(np.outer(U[:, n], V[:, n]), np.outer(U_all[:, k], Vt_all[k]), atol=1e-3)
        largest = U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])]
        assert (largest > 0).all()  # the sign convention of decompose.py
        if family == "gpt2":  # learned positions: every direction of every head is stored
            assert svs == list(range(lm.d_head))
            np.testing.assert_allclose(U @ np.diag(S) @ V.T, dense, atol=1e-4 * np.abs(dense).max())


def test_firings_signals_and_edges_equal_a_per_firing_recomputation(family_run):
    """Every firing, signal, edge and per-direction edge term of two prompts, against SPEC.md one
    firing at a time with each Omega~(i - j) decomposed densely from the raw weights."""
    _, checkpoint, lm, con, run_id = family_run
    A, B = _raw_factors(lm)
    rotation = _rotation(checkpoint, lm.d_head)
    svd_of = lambda layer, head, offset: _svd(_omega(A, B, rotation, layer, head, offset), lm.d_head)  # noqa: E731
    W_O = lm.bridge.W_O.detach().double().numpy()
    checked_edges = 0
    for prompt_id, end_pos in con.execute("SELECT prompt_id, end_pos FROM prompts WHERE run_id = ? ORDER BY prompt_id",
                                          [run_id]).fetchall()[:2]:
        ids = [t for (t,) in con.execute("SELECT token_id FROM tokens WHERE run_id = ? AND prompt_id = ? ORDER BY pos",
                                         [run_id, prompt_id]).fetchall()]
        checked_edges += compare(con, run_id, prompt_id, per_firing(lm, ids, end_pos, svd_of, W_O))
    assert checked_edges > 10


# -- the command line -----------------------------------------------------------------------------

def _one_error_line(result, *words):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_another_family_gets_one_line_naming_the_families_read(tmp_path):
    from click.testing import CliRunner

    from catalog.cli import main

    checkpoint = tmp_path / "opt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "opt"}))
    result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / "c.duckdb"), "--model-path", str(checkpoint)])
    _one_error_line(result, "'opt'", "GPT-2", "GPT-NeoX / Pythia", "Llama", "Qwen2")
    assert not (tmp_path / "c.duckdb").exists()  # nothing written


def test_device_options(tmp_path, family_run):
    from click.testing import CliRunner

    from catalog.cli import main
    from catalog.models.loading import resolve_device

    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
    else:
        assert resolve_device("auto") == "cpu"
        result = CliRunner().invoke(main, ["decompose", "--db", str(tmp_path / "c.duckdb"),
                                           "--model-path", str(family_run[1]), "--device", "cuda"])
        _one_error_line(result, "--device cuda", "no CUDA GPU")
    result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / "c.duckdb"), "--device", "tpu"])
    _one_error_line(result, "--device")


def test_the_cli_catalogs_each_family_and_a_second_run_reuses_stored_forms(family_run, tmp_path):
    """`ingest --model-path` as users run it; a second run on other prompts stores only new forms."""
    from click.testing import CliRunner

    from catalog.cli import main

    family, checkpoint, _, _, _ = family_run
    db = tmp_path / "cli.duckdb"
    for seed in (0, 1):
        result = CliRunner().invoke(main, ["ingest", "--db", str(db), "--model-path", str(checkpoint),
                                           "--n-prompts", "3", "--seed", str(seed), "--batch-size", "2",
                                           "--device", "auto"])
        assert result.exit_code == 0, result.output
    con = duckdb.connect(str(db), read_only=True)
    try:
        # each form once, however many runs and batches needed it
        assert con.execute("""SELECT count(*) FROM (SELECT layer, head, pos_offset, sv, count(*) AS n
                              FROM singular_vectors GROUP BY ALL) WHERE n > 1""").fetchall() == [(0,)]
        used = con.execute("SELECT count(DISTINCT (layer, head, pos_offset)) FROM firings").fetchall()[0][0]
        stored = con.execute("SELECT count(DISTINCT (layer, head, pos_offset)) FROM singular_vectors").fetchall()[0][0]
        if family == "gpt2":
            assert stored == 3 * 4  # every head, position-free
        else:  # exactly the directions the stored signals use, at their offsets
            assert stored == used
            signal = con.execute("""SELECT DISTINCT layer, head, dest_pos - src_pos, sv FROM firing_svs
                                    ORDER BY ALL""").fetchall()
            assert con.execute("SELECT layer, head, pos_offset, sv FROM singular_vectors ORDER BY ALL").fetchall() == signal
        params = json.loads(con.execute("SELECT params FROM runs WHERE run_id = 1").fetchall()[0][0])
        assert params["device"] == "auto" and params["dtype"] == "float32"
    finally:
        con.close()


def lm_d_head(con) -> int:
    return con.execute("SELECT d_head FROM models").fetchall()[0][0]


def test_query_layer_joins_each_firing_to_its_own_form(family_run):
    """head and firing answers on every family: one sigma per direction of a firing's signal
    (a rotary model's other offsets must not multiply the rows)."""
    from catalog.read import query
    from catalog.read import browse as query_extra

    _, _, _, con, run_id = family_run
    prompt_id, layer, head, dest, src, n_svs, offset = con.execute(
        "SELECT prompt_id, layer, head, dest_pos, src_pos, n_svs, pos_offset FROM firings WHERE run_id = ? "
        "AND layer > 0 ORDER BY n_svs DESC, prompt_id, layer, head, dest_pos, src_pos LIMIT 1", [run_id]).fetchall()[0]
    answer = query_extra.firing(con, prompt_id, f"{layer}.{head}", dest, src, run_id=run_id)
    signal = answer["signal"].to_pylist()
    assert [s["rank"] for s in signal] == list(range(n_svs))
    sigma = dict(con.execute("SELECT sv, sigma FROM singular_vectors WHERE layer = ? AND head = ? "
                             "AND pos_offset IS NOT DISTINCT FROM ?", [layer, head, offset]).fetchall())
    assert all(s["sigma"] == pytest.approx(sigma[s["sv"]]) for s in signal)
    summary = query.head_summary(con, f"{layer}.{head}", run_id=run_id, top=100)
    assert len(summary["spectrum"]) == len(sigma) or offset is not None
    # A rotary spectrum says what it holds: the stored directions at the head's commonest offset.
    notes = query.head_document(con, f"{layer}.{head}", run_id=run_id, top=100)["notes"]
    mode_offset = con.execute("SELECT mode(pos_offset) FROM firings WHERE run_id = ? AND layer = ? AND head = ?",
                              [run_id, layer, head]).fetchall()[0][0]
    stored = con.execute("SELECT count(*) FROM singular_vectors WHERE layer = ? AND head = ? AND pos_offset = ?",
                         [layer, head, mode_offset]).fetchall()[0][0]
    spectrum_notes = [n for n in notes if n.startswith("spectrum: ")]
    if offset is None:
        assert spectrum_notes == []
    else:
        d_head = lm_d_head(con)
        kept = (f"only the {stored} of its {d_head} singular vectors that stored sparse signals use are kept "
                "(rows with stored = false: not in the catalog, sigma unknown)"
                if stored < d_head else f"stored sparse signals use all {d_head} of its singular vectors")
        assert spectrum_notes == [f"spectrum: rotary model: the spectrum of the form at offset {mode_offset}, the "
                                  f"offset this head fires at most; {kept}"]
        # every sv up to the last stored one is a row; the stored ones are marked
        assert sum(summary["spectrum"].column("stored").to_pylist()) == stored
    # a rotary run's directions are (pos_offset, sv): one row each
    keys = [c for c in ("pos_offset", "sv") if c in summary["top_svs"].column_names]
    assert (offset is not None) == (keys == ["pos_offset", "sv"])
    assert summary["top_svs"].num_rows == len(set(zip(*(summary["top_svs"].column(k).to_pylist() for k in keys))))


def test_a_rope_that_switches_with_length_is_read_up_to_its_switch(tmp_path):
    """longrope's short frequencies are read (even after the module has run a long sequence and
    switched to its long ones), and a prompt past the switch gets one line naming the rope."""
    from click.testing import CliRunner

    from catalog.cli import main
    from catalog.models.families.base import rotary_of
    from catalog.models.loading import load_model

    checkpoint = save_random_family("llama", tmp_path / "model", tokenizer=llama_style_tokenizer(),
                                    rope_parameters=LONGROPE)
    lm = load_model(path=checkpoint)
    short = _rotation(checkpoint, lm.d_head)
    assert lm.adapter.rotary.fixed_up_to == 32 and lm.adapter.rotary.rope_type == "longrope"
    lm.bridge.run_with_cache(torch.zeros(1, 40, dtype=torch.long))  # past 32: the module switches
    again = rotary_of(lm.bridge.original_model)
    from catalog.methods.sad.rotary import rotation

    for rotary in (lm.adapter.rotary, again):
        np.testing.assert_allclose(rotation(rotary, torch.tensor([5]), lm.d_head)[0].numpy(), short(5), rtol=1e-6,
                                   atol=1e-6)
    word = " Mary"
    for n_words, ok in ((30, True), (40, False)):
        path = tmp_path / f"{n_words}.jsonl"
        path.write_text(json.dumps({"text": word * n_words}) + "\n")
        result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / f"{n_words}.duckdb"), "--model-path",
                                           str(checkpoint), "--prompts", str(path)])
        if ok:
            assert result.exit_code == 0, result.output
        else:  # after the status line of the loading, one error line (prompts are read after loading)
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
            assert result.output.strip().splitlines()[-1].startswith("error: prompt 0: 42 tokens, more than the 32 ")
            assert "longrope" in result.output and not (tmp_path / "40.duckdb").exists()


@pytest.mark.parametrize("family,rope", [
    ("qwen2", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}),
    ("llama", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    ("llama", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    ("gpt_neox", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
], ids=["qwen2-yarn", "llama-llama3", "llama-linear", "gpt_neox-dynamic"])
def test_rope_variants_give_the_scores_the_model_computes(family, rope, tmp_path):
    """Every (head, destination, source) pair of a prompt, not only firings: the catalog's forms
    for the offset i - j give back the model's own attention score, for rope variants that change
    the frequencies (llama3, linear), scale the attention (yarn) or would change with length."""
    from catalog.methods.sad.batch import qk_forms
    from catalog.models.loading import load_model
    from catalog.methods.sad.signals import augment

    checkpoint = save_random_family(family, tmp_path / "model", rope_parameters=rope)
    assert json.loads((checkpoint / "config.json").read_text())["rope_parameters"]["rope_type"] == rope["rope_type"]
    lm = load_model(path=checkpoint)
    qk = qk_forms(lm)
    ids = lm.tokenizer("When Mary and John went to the store, John gave a drink to")["input_ids"]
    cache = lm.bridge.run_with_cache(torch.tensor([ids]))[1]
    dest, src = torch.tril_indices(len(ids), len(ids))
    for layer in range(lm.n_layers):
        x = augment(cache[f"blocks.{layer}.ln1.hook_normalized"].float())
        for head in range(lm.n_heads):
            heads = torch.full_like(dest, head)
            forms, form = qk.layer_forms(layer, heads, dest - src)
            dest_proj, src_proj = forms.projections(x, torch.zeros_like(dest), dest, src, form)
            total = (forms.sigma[form] * dest_proj * src_proj).sum(dim=1).double()
            hook = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, dest, src].double() * lm.adapter.score_scale
            np.testing.assert_allclose(total.numpy(), hook.numpy(), rtol=1e-4, atol=1e-4)
