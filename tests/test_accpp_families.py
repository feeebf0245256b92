"""ACC++ on GPT-NeoX, Llama and Qwen2 against the reference library's own output
(../shared/reference/accpp-{neox,llama,qwen2,qwen2-bias}-seed1).

The tiny checkpoints are rebuilt byte for byte by ../shared/reference/families (sha256 checked
against each reference's README), then ingested through the real ingest path with the
reference's prompts (Llama's with the BOS TransformerLens prepends, `"prepend_bos": true`).
For each family: every firing of the reference's three heads is found, and every reference
firing (those and the three extra ones) has per side the same components with the same
singular-vector lists in selection order and weights within 1e-4; each reference graph (linear
IO - S, linear S - IO where the reference adds it, prob on IO, prob on the top-1 token) has the
same nodes, edges and seeds.
"""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _accpp_compare import SIDES, reference_label, stored_decompositions, stored_seeds, tie

from catalog.jobs.ingest import ingest
from catalog.read.trace import trace
from catalog.store import open_readonly

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
FAMILIES = ("neox", "llama", "qwen2", "qwen2-bias")

pytestmark = pytest.mark.slow


def _reference(family: str) -> Path:
    path = SHARED / f"accpp-{family}-seed1"
    if not path.exists():
        pytest.skip(f"{path} is absent: the ACC++ family references are not available here")
    return path


def _sha256_in_readme(reference: Path) -> str:
    return re.search(r"`model\.safetensors` sha256 `([0-9a-f]{64})`", (reference / "README.md").read_text()).group(1)


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The four checkpoints, rebuilt by the references' own scripts and checked byte for byte."""
    if not (SHARED / "families").exists():
        pytest.skip(f"{SHARED / 'families'} is absent")
    root = tmp_path_factory.mktemp("accpp-families")
    make = SHARED / "families"
    for kind in ("neox", "llama", "qwen2"):
        subprocess.run([sys.executable, str(make / "make_family_model.py"), kind, str(root / kind)], check=True,
                       capture_output=True)
    subprocess.run([sys.executable, str(make / "make_bias_variant.py"), str(root / "qwen2"), str(root / "qwen2-bias")],
                   check=True, capture_output=True)
    for family in FAMILIES:
        digest = hashlib.sha256((root / family / "model.safetensors").read_bytes()).hexdigest()
        assert digest == _sha256_in_readme(_reference(family)), f"{family}: the rebuilt checkpoint differs"
    return {family: root / family for family in FAMILIES}


def _swapped_prompts(reference: Path, out: Path) -> Path:
    """The reference prompts with answer and wrong exchanged: linear seeding along S - IO."""
    lines = []
    for line in (reference / "prompts.jsonl").read_text().splitlines():
        record = json.loads(line)
        record["answer"], record["wrong"] = record["wrong"], record["answer"]
        lines.append(json.dumps(record))
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_catalog(request, family_checkpoints, tmp_path_factory):
    """One catalog per family: a linear run with every firing of the reference heads and of the
    extra firings' heads, prob on IO, prob on the top-1 token, and linear S - IO where the
    reference has that graph."""
    from catalog.models.loading import load_model

    family = request.param
    reference = _reference(family)
    meta = json.loads((reference / "reference-meta.json").read_text())
    graphs = json.loads((reference / "reference-graphs.json").read_text())
    checkpoint = family_checkpoints[family]
    lm = load_model(path=checkpoint)
    tmp = tmp_path_factory.mktemp(f"accpp-{family}")
    # extra firings are [layer, head, dest, src]
    heads = list(meta["heads"]) + [f"{f['firing'][0]}.{f['firing'][1]}" for f in meta["extra_firings"]]
    common = dict(model_path=checkpoint, method="accpp", loaded_model=lm, prompts_file=reference / "prompts.jsonl")
    db = tmp / "accpp.duckdb"
    runs = {
        "linear": ingest(db, seeding="linear", heads=",".join(dict.fromkeys(heads)), **common)["run_id"],
        "prob": ingest(db, seeding="prob", prob_target="answer", **common)["run_id"],
        "prob_top1": ingest(db, seeding="prob", prob_target="top1", **common)["run_id"],
    }
    if "linear_s_minus_io" in graphs:
        swapped = dict(common, prompts_file=_swapped_prompts(reference, tmp / "swapped.jsonl"))
        runs["linear_s_minus_io"] = ingest(db, seeding="linear", **swapped)["run_id"]
    return family, lm.n_heads, db, runs


def test_same_firings_components_svs_and_weights(family_catalog):
    family, n_heads, db, runs = family_catalog
    reference = _reference(family)
    meta = json.loads((reference / "reference-meta.json").read_text())
    firings = json.loads((reference / "reference-firings.json").read_text())
    con = open_readonly(db)
    stored = stored_decompositions(con, runs["linear"], n_heads)
    chosen = [tuple(int(x) for x in h.split(".")) for h in meta["heads"]]
    want = {(f["prompt_idx"], f["layer"], f["head"], f["dest"], f["src"]) for f in firings
            if f["group"] == "chosen_heads"}
    placeholders = ", ".join(f"({layer}, {head})" for layer, head in chosen)
    ours = set(con.execute(f"SELECT prompt_id, layer, head, dest_pos, src_pos FROM firings WHERE run_id = ? "
                           f"AND (layer, head) IN ({placeholders})", [runs["linear"]]).fetchall())
    assert ours == want  # the same firings of the three heads (dynamic threshold, any source)
    checked = 0
    for firing in firings:
        key = (firing["prompt_idx"], firing["layer"], firing["head"], firing["dest"], firing["src"])
        for side, prefix in SIDES.items():
            expected = {(c["upstream_layer"], c["component_id"], c["token"]): (c["svs"], c["weight"])
                        for c in firing[f"{prefix}_components"]}
            got = stored.get(key, {"query": {}, "key": {}})[side]
            assert set(got) == set(expected), f"{family} {key} {side}: components differ"
            for component, (svs, weight) in expected.items():
                assert got[component][0] == svs or tie(firing, side, component, got[component][0], svs), \
                    (family, key, side, component, got[component][0], svs)
                assert got[component][1] == pytest.approx(weight, abs=1e-4), (family, key, side, component)
                checked += 1
    assert checked > 100


@pytest.mark.parametrize("graph_name", ["linear", "linear_s_minus_io", "prob", "prob_top1"])
def test_same_graph_nodes_edges_and_seeds(family_catalog, graph_name):
    family, n_heads, db, runs = family_catalog
    graphs = json.loads((_reference(family) / "reference-graphs.json").read_text())
    if graph_name not in graphs:
        pytest.skip(f"the {family} reference has no {graph_name} graph")
    want, prompt = graphs[graph_name], graphs["prompt_idx"]
    tokens = {int(k): v for k, v in graphs["idx_to_token"].items()}
    con = open_readonly(db)
    graph = trace(con, prompt_id=prompt, run_id=runs[graph_name])
    label = lambda node: reference_label(node, tokens, want["root"])  # noqa: E731
    edge_types = {"query": "d", "key": "s", "seed": "d"}
    got = {(label(e["source"]), label(e["target"]), edge_types[e["side"]]): e["mean_weight"]
           for e in graph.edges.to_pylist()}
    expected = {(e["u"], e["v"], e["type"]): e["weight"] for e in want["edges"]}
    assert set(got) == set(expected), family
    for key, weight in expected.items():
        assert got[key] == pytest.approx(weight, abs=1e-4), (family, key)
    assert {label(n) for n in graph.nodes.column("node").to_pylist()} == {n["node"] for n in want["nodes"]}
    seeds = stored_seeds(con, runs[graph_name], prompt, n_heads)
    expected_seeds = {(s["layer"], s["component_id"], s["token"]): s["weight"] for s in want["seeds"]}
    assert set(seeds) == set(expected_seeds), family
    for key, weight in expected_seeds.items():
        assert seeds[key] == pytest.approx(weight, abs=1e-4), (family, key)


def test_prepended_bos_is_fed_and_recorded(family_catalog):
    """Llama's reference prompts ask for the BOS TransformerLens prepends: position 0 of every
    stored prompt is the BOS token, the run says so, and roles count it."""
    family, _, db, runs = family_catalog
    if family != "llama":
        pytest.skip("only the Llama reference prepends a BOS")
    con = open_readonly(db)
    has_bos, asked = con.execute("SELECT has_bos, json_extract(params, '$.prepend_bos') FROM runs WHERE run_id = ?",
                                 [runs["linear"]]).fetchone()
    assert has_bos and json.loads(asked) == [0, 1]
    first = con.execute("SELECT DISTINCT token_id, token FROM tokens WHERE run_id = ? AND pos = 0",
                        [runs["linear"]]).fetchall()
    assert first == [(50256, "<|endoftext|>")]
    prompts = [json.loads(line) for line in (_reference(family) / "prompts.jsonl").read_text().splitlines()]
    for prompt_id, prompt in enumerate(prompts):
        stored = [t for (t,) in con.execute("SELECT token FROM tokens WHERE run_id = ? AND prompt_id = ? ORDER BY pos",
                                             [runs["linear"], prompt_id]).fetchall()]
        assert stored[:len(prompt["tokens"])] == prompt["tokens"]
