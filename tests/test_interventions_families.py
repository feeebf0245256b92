"""Interventions on GPT-NeoX, Llama, Qwen2 (issue 21 point 2): the forward pass against the
Hugging Face model's logits, each family reference of the library (accpp-{neox,llama,qwen2,
qwen2-bias}-seed1) on its own tiny checkpoint, and random edges of every kind against the same
edge done alone through the bridge's own hooks.

The checkpoints are rebuilt byte for byte by ../shared/reference/families (sha256 from each
reference's README); the tests skip when ../shared is absent. The reference's edge is given to
the intervention core directly (its layer, head, tokens, component and singular vectors, from
reference-interventions.json), with the reference's token ids (reference-meta.json; Llama's carry
the BOS the library's TransformerLens prepends).
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog.interventions.core import HEAD, Directions, EdgeBatch, intervene
from catalog.interventions.forward import ModelWeights, clean_forward

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
FAMILIES = ("neox", "llama", "qwen2", "qwen2-bias")
SHA256 = {"neox": "f24e47c3b1ac42f358dd82dad145f8c3581d68d35ece03d9341f7050c76f5132",
          "llama": "d17868facd5ea2c4232c38fe57cca713f790bb6086b0c4a98f848818ac458521",
          "qwen2": "52115f409c8723bdd9e404b14b80e03677706249e0f34f9341ed6d95f043b086",
          "qwen2-bias": "e6f245236fdada88f37136250277ad914299b21bbea7586f559c2b61732cf8db"}


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory):
    """The four reference checkpoints, rebuilt by the reference's own scripts and checked by sha256."""
    if not (SHARED / "families" / "make_family_model.py").exists():
        pytest.skip(f"{SHARED} is absent")
    root = tmp_path_factory.mktemp("family-references")
    scripts = SHARED / "families"
    builds = [subprocess.Popen([sys.executable, str(scripts / "make_family_model.py"), name, str(root / name)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
              for name in ("neox", "llama", "qwen2")]  # side by side: each is mostly one process' start-up
    for build in builds:
        assert build.wait() == 0, build.stderr.read().decode()[-2000:]
    subprocess.run([sys.executable, str(scripts / "make_bias_variant.py"), str(root / "qwen2"),
                    str(root / "qwen2-bias")], check=True, capture_output=True)
    for name, digest in SHA256.items():
        assert hashlib.sha256((root / name / "model.safetensors").read_bytes()).hexdigest() == digest, name
        assert digest in (SHARED / f"accpp-{name}-seed1" / "README.md").read_text(), name
    return root


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, family_checkpoints):
    """One family's model, weights, the reference's prompts in one batch (as the library ran them),
    their clean pass and ACC++'s directions."""
    from catalog.methods.accpp.weights import accpp_weights
    from catalog.models.loading import load_model

    name = request.param
    reference = SHARED / f"accpp-{name}-seed1"
    meta = json.loads((reference / "reference-meta.json").read_text())
    lm = load_model(path=family_checkpoints / name)
    w = ModelWeights.from_model(lm)
    ids = [p["token_ids"] for p in meta["prompts"]]
    width = max(map(len, ids))
    tokens = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    end = torch.tensor([p["roles"]["end"] for p in meta["prompts"]])
    acc = accpp_weights(*lm.attention_weights()[:4])
    return dict(name=name, lm=lm, w=w, meta=meta, ids=ids, tokens=tokens, end=end,
                clean=clean_forward(w, tokens, end), directions=Directions(acc.U, acc.V, acc.c_d, acc.c_s),
                interventions=json.loads((reference / "reference-interventions.json").read_text()))


def test_the_forward_pass_gives_the_hugging_face_models_logits(family):
    """Every family's clean pass against the Hugging Face model itself (no TransformerLens): the
    logits at every position of each prompt, up to the constant per position that centring the
    unembedding removes; and the family was replayed as its config says."""
    lm, w, ids = family["lm"], family["w"], family["ids"]
    hf = lm.bridge.original_model
    expected = {"neox": ("LN", True, 4), "llama": ("RMS", False, 2), "qwen2": ("RMS", False, 2),
                "qwen2-bias": ("RMS", False, 2)}[family["name"]]
    assert (w.norm, w.parallel_attn_mlp, w.kv_heads) == expected
    for row in ids:
        tokens = torch.tensor([row])
        theirs = hf(tokens).logits[0].double()
        clean = clean_forward(w, tokens, torch.tensor([len(row) - 1]))
        ours = _all_logits(w, clean).double()
        theirs, ours = theirs - theirs.mean(-1, keepdim=True), ours - ours.mean(-1, keepdim=True)
        assert (ours - theirs).abs().max() < 1e-4 * max(1.0, float(theirs.abs().max()))


def _all_logits(w, clean):
    from catalog.interventions.blocks import unembed

    final = clean.resid_pre[-1][0]
    return unembed(w, final)


@pytest.mark.parametrize("mode", ["local", "global"])
@pytest.mark.parametrize("boost", [False, True])
def test_each_family_reference_intervention_agrees(family, mode, boost):
    """The reference's edge (an MLP slice into a head; query side on Llama and Qwen2, key side on
    GPT-NeoX and on the biased Qwen2, whose key head is shared by a group of two): attention
    before and after, norm_ratio, cos_sim, the signal's norm and the IO - S logit difference."""
    expected = family["interventions"][f"{mode}_{'boost' if boost else 'ablate'}"]
    edge = expected["edge"]
    n_heads = family["lm"].n_heads
    component = edge["upstream_component_id"]
    kind = HEAD if component < n_heads else component - n_heads + 1  # MLP, AH bias, Embedding, AH offset
    edges = EdgeBatch(
        prompt=torch.tensor([family["meta"]["graph_prompt"]]), layer=torch.tensor([edge["downstream_layer"]]),
        head=torch.tensor([edge["downstream_ah_idx"]]), dest=torch.tensor([edge["downstream_dest_token"]]),
        src=torch.tensor([edge["downstream_src_token"]]), query_side=torch.tensor([edge["edge_type"] == "d"]),
        up_kind=torch.tensor([kind]), up_layer=torch.tensor([edge["upstream_layer"]]),
        up_head=torch.tensor([component if kind == HEAD else -1]),
        up_src=torch.tensor([edge["upstream_src_token"] if kind == HEAD else -1]), svs=torch.tensor([edge["svs_used"]]))
    prompts = family["meta"]["prompts"]
    result = intervene(family["w"], family["clean"], edges, family["directions"], mode, boost,
                       answer=[p["io_token_id"] for p in prompts], wrong=[p["s_token_id"] for p in prompts])
    for ours, theirs in (("attn_before", "attn_clean"), ("attn_after", "attn_interv"), ("norm_ratio", "norm_ratio"),
                         ("cos_sim", "cos_sim"), ("logit_diff_before", "logit_diff_io_s_clean"),
                         ("logit_diff_after", "logit_diff_io_s_interv")):
        assert float(getattr(result, ours)[0]) == pytest.approx(expected[theirs], abs=1e-4), ours
    assert float(result.signal_norm[0]) == pytest.approx(expected["delta_norm_at_pos"], rel=1e-5)
    assert float(result.other_logit_change[0]) == expected["max_abs_logit_change_other_prompts"] == 0.0
    assert int(result.pos[0]) == expected["intervention_position"]


# -- `circuit-catalog intervene` on a 2024-method run of each family ------------------------------

@pytest.fixture(scope="module", params=["gpt_neox", "llama", "qwen2"])
def family_catalog(request, tmp_path_factory):
    """A 2024-method run (2 IOI prompts) of a tiny random model of the family: on rotary models its
    edges name forms per (head, offset), read back from singular_vectors.pos_offset."""
    from catalog.jobs.ingest import ingest
    from catalog.testing.families import save_random_family

    name = request.param
    checkpoint = save_random_family(name, tmp_path_factory.mktemp(f"tiny-{name}"))
    db = tmp_path_factory.mktemp(f"interventions-{name}") / "ioi.duckdb"
    ingest(db, model_path=checkpoint, n_prompts=2, seed=0, batch_size=2)
    return name, checkpoint, db


def _sql(db, query):
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def test_the_cli_intervenes_on_each_family(family_catalog):
    """Local ablate and boost, global ablate, the 40 heaviest edges of each prompt: one row per edge; the clean
    attention is the firing's stored one and the clean logit difference the prompt's; nothing leaks
    into the other prompts; ablate and boost of a local edge are symmetric around the clean input
    (cos_a nr_a + cos_b nr_b = 2 and nr_a^2 + nr_b^2 = 2 + 2 |sig|^2 / |x|^2, from the stored numbers)."""
    from click.testing import CliRunner

    from catalog.cli import main

    name, _, db = family_catalog
    n_edges = _sql(db, "SELECT count(*) FROM (SELECT prompt_id FROM edges WHERE run_id = 1 "
                       "QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY weight DESC, edge_id) <= 40)")[0][0]
    assert n_edges > 0
    for args in ([], ["--boost"], ["--mode", "global"]):
        result = CliRunner().invoke(main, ["intervene", "--db", str(db), "--top-edges", "40", *args])
        assert result.exit_code == 0, result.output
    rows = _sql(db, """
        SELECT i.mode, i.boost, i.attn_before, f.attn_weight, i.logit_diff_before, p.logit_diff, i.other_logit_change
        FROM interventions i JOIN edges e USING (run_id, prompt_id, edge_id)
        JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)
        JOIN prompts p USING (run_id, prompt_id)""")
    modes = [(r[0], r[1]) for r in rows]
    assert all(modes.count(m) == n_edges for m in (("local", False), ("local", True), ("global", False)))
    for _, _, before, stored, diff_before, prompt_diff, other in rows:
        assert before == pytest.approx(stored, abs=1e-5)
        if prompt_diff is not None:
            assert diff_before == pytest.approx(prompt_diff, abs=1e-4)
        assert other == 0.0
    pairs = _sql(db, """
        SELECT a.norm_ratio, a.cos_sim, b.norm_ratio, b.cos_sim, a.signal_norm
        FROM interventions a JOIN interventions b USING (run_id, prompt_id, edge_id)
        WHERE a.mode = 'local' AND b.mode = 'local' AND NOT a.boost AND b.boost""")
    assert len(pairs) == n_edges
    for nr_a, cos_a, nr_b, cos_b, sig in pairs:
        assert cos_a * nr_a + cos_b * nr_b == pytest.approx(2.0, abs=1e-5)
        # |x| of an RMSNorm input is sqrt(d_model) (less eps), of a LayerNorm input sqrt(d_model) too
        assert nr_a ** 2 + nr_b ** 2 == pytest.approx(2.0 + 2.0 * sig ** 2 / 64.0, rel=1e-3)


def test_a_family_without_a_forward_pass_is_refused_before_the_model_is_loaded(family_catalog, tmp_path):
    """A run whose family the interventions do not replay: one error line, before the model (here
    at a path that no longer exists) is looked for."""
    import shutil

    import duckdb
    from click.testing import CliRunner

    from catalog.cli import main

    _, _, db = family_catalog
    copy = tmp_path / "other.duckdb"
    shutil.copy(db, copy)
    con = duckdb.connect(str(copy))
    con.execute("UPDATE model_families SET family = 'gemma2'")
    con.close()
    result = CliRunner().invoke(main, ["intervene", "--db", str(copy), "--model-path", str(tmp_path / "gone")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: interventions do not replay gemma2 models yet"), result.output


# -- random edges of every kind against the same edge alone, through the bridge's hooks -----------

def _random_edges(family, n, seed):
    from catalog.interventions.core import UP_KINDS

    lm, end = family["lm"], family["end"]
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("prompt", "layer", "head", "dest", "src", "query_side", "up_kind", "up_layer", "up_head",
                            "up_src", "svs")}
    for _ in range(n):
        p = int(rng.integers(len(end)))
        layer = int(rng.integers(1, lm.n_layers))
        dest = int(rng.integers(1, int(end[p]) + 1))
        src = int(rng.integers(0, dest + 1))
        query = bool(rng.integers(2))
        kind = int(rng.integers(len(UP_KINDS)))
        pos = dest if query else src
        up_layer = int(rng.integers(layer)) if kind in (0, 1, 2) else -1
        for name, value in (("prompt", p), ("layer", layer), ("head", int(rng.integers(lm.n_heads))),
                            ("dest", dest), ("src", src), ("query_side", query), ("up_kind", kind),
                            ("up_layer", up_layer), ("up_head", int(rng.integers(lm.n_heads)) if kind == 0 else -1),
                            ("up_src", int(rng.integers(pos + 1)) if kind == 0 and rng.integers(2) else -1),
                            ("svs", list(rng.choice(lm.d_head, size=3, replace=False)))):
            cols[name].append(value)
    svs = torch.tensor(cols.pop("svs"))
    return EdgeBatch(svs=svs, **{k: torch.tensor(v) for k, v in cols.items()})


def _alone(family, edges, mode, boost, k):
    """Edge k alone through the bridge: the signal built with numpy (QR of the directions; pinv for
    the offsets; centred on LayerNorm models only), patched into hook_q / hook_k (before the
    rotation; a key patch replaces the key head h // group) or added to hook_attn_out / hook_mlp_out /
    hook_resid_pre. Returns (attention after, logits at the prompt's end, |sig|, norm_ratio, cos_sim)."""
    from catalog.interventions.core import ATTN_BIAS, EMBED, MLP

    lm, w, tokens = family["lm"], family["w"], family["tokens"]
    bridge, group = lm.bridge, w.group
    W_Q, b_Q, W_K, b_K, W_O = (t.double().numpy() for t in lm.attention_weights())
    if "bridge_cache" not in family:
        family["bridge_cache"] = bridge.run_with_cache(tokens)[1]
    cache = family["bridge_cache"]
    get = lambda name: cache[name].double().numpy()  # noqa: E731
    p, layer, head = int(edges.prompt[k]), int(edges.layer[k]), int(edges.head[k])
    dest, src, query = int(edges.dest[k]), int(edges.src[k]), bool(edges.query_side[k])
    kind, up_layer, up_head, up_src = (int(edges.up_kind[k]), int(edges.up_layer[k]), int(edges.up_head[k]),
                                       int(edges.up_src[k]))
    t = dest if query else src
    if kind == HEAD and up_src >= 0:
        y = get(f"blocks.{up_layer}.attn.hook_pattern")[p, up_head, t, up_src] * \
            get(f"blocks.{up_layer}.attn.hook_v")[p, up_src, up_head // group] @ W_O[up_layer, up_head]
    elif kind == HEAD:
        y = get(f"blocks.{up_layer}.attn.hook_z")[p, t, up_head] @ W_O[up_layer, up_head]
    elif kind == MLP:
        y = get(f"blocks.{up_layer}.hook_mlp_out")[p, t]
    elif kind == ATTN_BIAS:
        y = w.b_O[up_layer].double().numpy()
    elif kind == EMBED:
        y = get("blocks.0.hook_resid_pre")[p, t]
    else:
        W, b = (W_Q, b_Q) if query else (W_K, b_K)
        y = b[layer, head] @ np.linalg.pinv(W[layer, head])
    directions = family["directions"]
    basis = (directions.U if query else directions.V)[layer, head][:, edges.svs[k]].double().numpy()
    Q, _ = np.linalg.qr(basis)
    sig = Q @ (Q.T @ y)
    if family["name"] == "neox":
        sig -= sig.mean()
    sign = 1.0 if boost else -1.0
    if mode == "local":
        sig = sig / get(f"blocks.{layer}.ln1.hook_scale")[p, t, 0]
        before = get(f"blocks.{layer}.ln1.hook_normalized")[p, t]
        after = before + sign * sig
        W, b, name, slot = (W_Q, b_Q, "q", head) if query else (W_K, b_K, "k", head // group)
        new = torch.tensor(after @ W[layer, head] + b[layer, head], dtype=torch.float32)
        hook = f"blocks.{layer}.attn.hook_{name}"

        def change(value, hook):
            value = value.clone()
            value[p, t, slot] = new
            return value
    else:
        hook = {HEAD: f"blocks.{up_layer}.hook_attn_out", ATTN_BIAS: f"blocks.{up_layer}.hook_attn_out",
                MLP: f"blocks.{up_layer}.hook_mlp_out", EMBED: "blocks.0.hook_resid_pre"}[kind]
        before = get(hook)[p, t]
        after = before + sign * sig
        delta = torch.tensor(sign * sig, dtype=torch.float32)

        def change(value, hook):
            value = value.clone()
            value[p, t] += delta
            return value
    patterns = {}

    def keep(value, hook):
        patterns["pattern"] = value.detach().clone()
    logits = bridge.run_with_hooks(tokens, fwd_hooks=[(hook, change), (f"blocks.{layer}.attn.hook_pattern", keep)])
    return (float(patterns["pattern"][p, head, dest, src]), logits[p, int(family["end"][p])].double(),
            float(np.linalg.norm(sig)), float(np.linalg.norm(after) / np.linalg.norm(before)),
            float(after @ before / np.linalg.norm(after) / np.linalg.norm(before)))


@pytest.mark.parametrize("mode", ["local", "global"])
def test_random_edges_equal_the_same_edge_alone_through_the_bridges_hooks(family, mode):
    """Every kind of component on both sides (head slices, whole heads, MLPs, the attention bias, the
    embedding, offsets in local mode), local ablate and global boost, batched on both prompts, against
    each edge alone: downstream
    attention, logits at the end token (so also the logit difference), |sig|, norm_ratio, cos_sim."""
    from catalog.interventions.core import OFFSET

    edges = _random_edges(family, n=10, seed=7)
    if mode == "global":
        edges = edges.take(torch.nonzero(edges.up_kind != OFFSET).flatten())
    prompts = family["meta"]["prompts"]
    for boost in [mode == "global"]:  # local ablate and global boost (both directions, at half the cost)
        result = intervene(family["w"], family["clean"], edges, family["directions"], mode, boost,
                           answer=[q["io_token_id"] for q in prompts], wrong=[q["s_token_id"] for q in prompts])
        for k in range(len(edges)):
            attn, logits, norm, ratio, cos = _alone(family, edges, mode, boost, k)
            p = int(edges.prompt[k])
            diff = float(logits[prompts[p]["io_token_id"]] - logits[prompts[p]["s_token_id"]])
            assert float(result.attn_after[k]) == pytest.approx(attn, abs=2e-5), k
            assert float(result.logit_diff_after[k]) == pytest.approx(diff, abs=1e-4), k
            assert float(result.signal_norm[k]) == pytest.approx(norm, rel=1e-4, abs=1e-6), k
            assert float(result.norm_ratio[k]) == pytest.approx(ratio, abs=1e-5), k
            assert float(result.cos_sim[k]) == pytest.approx(cos, abs=1e-5), k
