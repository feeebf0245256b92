"""ACC++ seeded at a linear probe's direction (--seeding probe, the library's trace_from_probe)
on the tiny random GPT-2: every stored seed weight equals a plain recomputation, direction .
component at the output position, the components of layers 0..L summing to
blocks.L.hook_resid_post there; the linear cutoff rule picks the same set; the probe is recorded."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from catalog.cli import main
from catalog.jobs.ingest import ingest
from catalog.methods.accpp.settings import load_probe
from catalog.store import open_readonly

LAYER = 1


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("probe") / "direction.npy"
    np.save(path, np.random.default_rng(4).normal(size=tiny_model.d_model))
    return path


def _plain_contributions(lm, ids, end, direction):
    """{(kind, layer, head, src): direction . component} for the components of layers 0..LAYER,
    from the model's hooks; and direction . blocks.LAYER.hook_resid_post[end]."""
    cache = lm.bridge.run_with_cache(torch.tensor([ids]))[1]
    W_O = lm.attention_weights()[4].double()
    b_O = lm.output_weights()[0].double()
    d = torch.tensor(direction, dtype=torch.float64)
    found = {("embed", 0, None, None): float(cache["blocks.0.hook_resid_pre"][0, end].double() @ d)}
    for layer in range(LAYER + 1):
        pattern, v = cache[f"blocks.{layer}.attn.hook_pattern"][0], cache[f"blocks.{layer}.attn.hook_v"][0]
        for head in range(W_O.shape[1]):
            for src in range(end + 1):
                out = pattern[head, end, src].double() * (v[src, head].double() @ W_O[layer, head])
                found[("head", layer, head, src)] = float(out @ d)
        found[("mlp", layer, None, None)] = float(cache[f"blocks.{layer}.hook_mlp_out"][0, end].double() @ d)
        found[("attn_bias", layer, None, None)] = float(b_O[layer] @ d)
    return found, float(cache[f"blocks.{LAYER}.hook_resid_post"][0, end].double() @ d)


def test_probe_seeds_equal_a_plain_recomputation(tmp_path, tiny_checkpoint, tiny_model, probe_file):
    db = tmp_path / "probe.duckdb"
    ingest(db, model_path=tiny_checkpoint, n_prompts=3, seed=4, batch_size=3, method="accpp", seeding="probe",
           probe=probe_file, probe_layer=LAYER, loaded_model=tiny_model)
    direction = np.load(probe_file)
    con = open_readonly(db)
    settings = json.loads(con.execute("SELECT settings FROM runs").fetchone()[0])
    assert settings["seeding"] == "probe" and settings["probe_layer"] == LAYER
    assert settings["probe"] == str(probe_file) and len(settings["probe_digest"]) == 64
    checked = 0
    for prompt_id, end in con.execute("SELECT prompt_id, end_pos FROM prompts ORDER BY prompt_id").fetchall():
        ids = [t for (t,) in con.execute("SELECT token_id FROM tokens WHERE prompt_id = ? ORDER BY pos",
                                         [prompt_id]).fetchall()]
        plain, resid = _plain_contributions(tiny_model, ids, end, direction)
        total = sum(plain.values())
        assert total == pytest.approx(resid, abs=1e-4 * max(1.0, abs(resid)))
        (stored_total,) = con.execute("SELECT total FROM roots WHERE prompt_id = ?", [prompt_id]).fetchone()
        assert stored_total == pytest.approx(total, abs=1e-4 * max(1.0, abs(total)))
        seeds = con.execute("SELECT up_kind, up_layer, up_head, up_src_pos, weight FROM seeds WHERE prompt_id = ? "
                            "ORDER BY seed_rank", [prompt_id]).fetchall()
        for kind, layer, head, src, weight in seeds:
            assert kind == "embed" or layer <= LAYER  # the embedding has no layer
            key = (kind, 0 if kind == "embed" else layer, head, src)
            assert weight == pytest.approx(plain[key], abs=1e-4)
        # The linear rule over the plain values: every one at or above the cutoff.
        values = sorted((v for v in plain.values() if v != 0), reverse=True)
        if total <= 0:
            assert seeds == []
            continue
        running = np.cumsum(values)
        cutoff = min(values[int(np.argmax(running > total))], total / 2) if (running > total).any() else total / 2
        expected = [v for v in values if v >= cutoff]
        assert sorted(w for *_, w in seeds) == pytest.approx(sorted(expected), abs=1e-4)
        checked += len(seeds)
    con.close()
    assert checked > 0


def test_a_pt_probe_reads_as_the_npy(tmp_path, probe_file):
    pt = tmp_path / "direction.pt"
    torch.save(torch.from_numpy(np.load(probe_file)).float(), pt)
    assert np.allclose(load_probe(pt), np.load(probe_file), atol=1e-6)


def _error_line(result):
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return result.output.strip().splitlines()[-1]


@pytest.mark.parametrize("extra, says", [
    ([], "--seeding probe needs --probe FILE"),
    (["--probe", "PROBE", "--probe-layer", "3"], "--probe-layer 3 is not a layer"),
    (["--probe", "SHORT", "--probe-layer", "1"], "holds 5 numbers, but the model's d_model is 64"),
    (["--probe", "MISSING", "--probe-layer", "1"], "--probe: no file"),
])
def test_bad_probes_are_one_error_line(tmp_path, tiny_checkpoint, probe_file, extra, says):
    short = tmp_path / "short.npy"
    np.save(short, np.ones(5))
    paths = {"PROBE": str(probe_file), "SHORT": str(short), "MISSING": str(tmp_path / "none.npy")}
    args = ["ingest", "--db", str(tmp_path / "c.duckdb"), "--model-path", str(tiny_checkpoint), "--n-prompts", "2",
            "--method", "accpp", "--seeding", "probe"] + [paths.get(a, a) for a in extra]
    line = _error_line(CliRunner().invoke(main, args))
    assert line.startswith("error:") and says in line


def test_a_service_job_reads_no_probe_outside_its_allowed_directories(tmp_path, probe_file):
    from catalog.errors import CatalogError
    from catalog.service.jobs import IngestSettings as JobModel
    from catalog.service.validation import check_job

    job = JobModel(method="accpp", seeding="probe", probe=str(probe_file), probe_layer=1)
    with pytest.raises(CatalogError, match="--probe .*not inside a directory this service may read"):
        check_job(job, allowed_dirs=[tmp_path / "elsewhere"])
    check_job(job, allowed_dirs=[probe_file.parent])  # inside: the probe is read and accepted


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_probe_totals_on_rotary_families(tmp_path, family):
    """On GPT-NeoX (parallel attention and MLP) and Llama (RMSNorm, GQA) too, a prompt's probe
    total is the direction . blocks.L.hook_resid_post at its end, and no seed lies above L; the
    prompts are the pronouns dataset's, so it runs there as well."""
    from catalog.models.loading import load_model
    from catalog.testing.families import save_random_family

    checkpoint = save_random_family(family, tmp_path / family)
    lm = load_model(path=checkpoint)
    probe = tmp_path / "d.npy"
    np.save(probe, np.random.default_rng(1).normal(size=lm.d_model))
    db = tmp_path / "c.duckdb"
    ingest(db, model_path=checkpoint, dataset="pronouns", n_prompts=2, seed=0, method="accpp", seeding="probe",
           probe=probe, probe_layer=LAYER, loaded_model=lm)
    d = torch.tensor(np.load(probe))
    con = open_readonly(db)
    for prompt_id, end, total in con.execute("SELECT prompt_id, pos, total FROM roots ORDER BY prompt_id").fetchall():
        ids = [t for (t,) in con.execute("SELECT token_id FROM tokens WHERE prompt_id = ? ORDER BY pos",
                                         [prompt_id]).fetchall()]
        resid = lm.bridge.run_with_cache(torch.tensor([ids]))[1][f"blocks.{LAYER}.hook_resid_post"][0, end]
        expected = float(resid.double() @ d)
        assert total == pytest.approx(expected, abs=1e-4 * max(1.0, abs(expected)))
    assert con.execute("SELECT count(*) FROM seeds WHERE up_layer > ?", [LAYER]).fetchone()[0] == 0
    con.close()
