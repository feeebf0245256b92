"""A batch's tensors stay on the model's device until `rows_of` converts them for writing.

CI has no GPU; tests/_second_device.py emulates one on the CPU, so what would raise on CUDA
(`.numpy()` of a device tensor, an op mixing devices) and every value that leaves the device
are seen here, for each family's path (per-head forms for GPT-2, per-offset forms for the
rotary families) and for ACC++.
"""

from __future__ import annotations

import pytest
import torch
from _second_device import SecondDevice, on_device

from catalog.jobs.ingest import ingest
from catalog.testing.families import FAMILY_NAMES, NORMED_FAMILY_NAMES, save_normed_family, save_random_family
from catalog.testing.tokenizers import llama_style_tokenizer

# Where a batch may take values off the device, and why each is small.
BATCH_EXITS = {
    "tensors.py:rows_of": "the catalog's rows, converted for writing",
    "tensors.py:prompt_outputs": "the logits at each prompt's end position only, [prompt, vocab]",
    "rotary.py:layer_forms": "the distinct (head, offset) pairs of a layer's firings, to look their forms up",
    "edges.py:trace_side": "the largest signal size of a bucket, one number",
}


def test_the_emulated_device_sees_what_cuda_would_refuse():
    with SecondDevice() as device:
        x = device.put(torch.ones(3))
        y = x * 2
        assert on_device(y) and not on_device(y.cpu()) and not on_device(torch.ones(3))
        y.cpu().numpy()
        assert device.problems == [] and [t.how for t in device.transfers] == ["cpu", "cpu"]
        y + torch.ones(3)  # a host tensor with a dimension: CUDA raises
        y.numpy()  # CUDA raises
        y[torch.tensor([0, 2])]  # host indices: CUDA allows
        int(y.sum())  # a read: allowed, but a transfer
        assert on_device(torch.arange(3, device=y.device)) and not on_device(torch.arange(3))
    assert len(device.problems) == 2
    assert [t.how for t in device.transfers] == ["cpu", "cpu", "numpy", "__int__"]


# ACC++ (GPT-2): the frontier of firings still to decompose is a host set, so a batch reads back
# the keys it adds, and each prompt's few seeds; the rest stays on the device.
ACCPP_EXITS = {
    "tensors.py:rows_of": BATCH_EXITS["tensors.py:rows_of"],
    "tensors.py:prompt_outputs": BATCH_EXITS["tensors.py:prompt_outputs"],
    "circuit.py:_collect": "the upstream firings an edge reaches, added to the frontier",
    "circuit.py:_add_head_firings": "the firings of --heads, added to the frontier",
    "seeds.py:_decode": "a prompt's seed components, added to the frontier",
    "seeds.py:_linear_rule": "a prompt's total and cutoff, and its seeds' weights (linear and probe seeding)",
    "seeds.py:prob_seeds": "the attribution of the next seed candidate, and the seeds' weights",
    "seeds.py:J": "the objective after removing a seed (one number)",
    "weights.py:through_output": "the distinct heads of a layer's firings, to cache their projections",
    "firing.py:_per_head": "the distinct heads of a chunk's firings, one matmul each",
    "firing.py:_weighted_by_prompt": "the distinct prompts of a chunk's firings, one matmul each",
    "firing.py:atoms": "the largest destination of a chunk (one number)",
}


def _ingest_on_second_device(tmp_path, monkeypatch, checkpoint, **options):
    """Ingest with the model's weights and activations on the emulated device: (summary, device,
    the transfers made inside batch functions)."""
    import catalog.methods.accpp.circuit
    import catalog.methods.sad.batch
    from catalog.models.loading import load_model

    lm = load_model(path=checkpoint)
    device = SecondDevice()
    device.put(list(lm.bridge.parameters()) + list(lm.bridge.buffers()))
    forward = lm.run

    def run_on_device(*args, **kwargs):
        # The forward pass itself is the model's business; what it returns is on the device.
        with device.unwatched():
            logits, cache = forward(*args, **kwargs)
        device.put([logits, cache.cache_dict])
        return logits, cache

    monkeypatch.setattr(lm, "run", run_on_device)
    batch_transfers = []
    for module in (catalog.methods.sad.batch, catalog.methods.accpp.circuit):
        analyse_batch = module.analyse_batch

        def watched(*args, analyse_batch=analyse_batch, **kwargs):
            before = len(device.transfers)
            tables = analyse_batch(*args, **kwargs)
            batch_transfers.extend(device.transfers[before:])
            return tables

        monkeypatch.setattr(module, "analyse_batch", watched)
    with device:
        summary = ingest(tmp_path / "c.duckdb", model_path=checkpoint, n_prompts=5, seed=2, batch_size=3,
                         loaded_model=lm, show_progress=False, **options)
    return summary, device, batch_transfers, lm


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_batch_leaves_the_device_only_through_its_rows(family, tmp_path, monkeypatch):
    tokenizer = llama_style_tokenizer() if family == "llama" else None
    checkpoint = save_random_family(family, tmp_path / "model", tokenizer=tokenizer)
    summary, device, batch_transfers, lm = _ingest_on_second_device(tmp_path, monkeypatch, checkpoint)
    assert summary["firings"] > 0 and summary["edges"] > 0  # the batches did the whole method's work
    assert device.problems == []
    assert batch_transfers, "the emulation saw nothing leave the device"
    assert {t.site for t in batch_transfers} <= set(BATCH_EXITS), {t.site for t in batch_transfers}
    vocab = lm.tokenizer.vocab_size + 16
    for transfer in batch_transfers:
        if transfer.site == "edges.py:trace_side":
            assert transfer.numel == 1
        if transfer.site == "tensors.py:prompt_outputs":
            assert transfer.numel <= 3 * vocab


@pytest.mark.parametrize("family", NORMED_FAMILY_NAMES)
def test_a_normed_familys_batch_leaves_the_device_only_through_its_rows(family, tmp_path, monkeypatch):
    """QK-norm divisors, post-norm scales, pre-softcap scores and windows (docs/normed.md) stay on it too."""
    checkpoint = save_normed_family(family, tmp_path / "model")
    summary, device, batch_transfers, _ = _ingest_on_second_device(tmp_path, monkeypatch, checkpoint)
    assert summary["firings"] > 0 and summary["edges"] > 0
    assert device.problems == []
    assert {t.site for t in batch_transfers} <= set(BATCH_EXITS), {t.site for t in batch_transfers}


@pytest.mark.parametrize("seeding", ["linear", "prob"])
def test_an_accpp_batch_stays_on_the_device_but_for_its_frontier(seeding, tmp_path, monkeypatch):
    checkpoint = save_random_family("gpt2", tmp_path / "model")
    summary, device, batch_transfers, _ = _ingest_on_second_device(
        tmp_path, monkeypatch, checkpoint, method="accpp", seeding=seeding, heads="2.1", ig_steps=8)
    assert summary["firings"] > 0 and summary["edges"] > 0
    assert device.problems == []
    sites = {t.site for t in batch_transfers}
    assert "tensors.py:rows_of" in sites and sites <= set(ACCPP_EXITS), sites - set(ACCPP_EXITS)


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "qwen2"])
def test_an_accpp_batch_of_a_rotary_model_stays_on_the_device_but_for_its_frontier(family, tmp_path, monkeypatch):
    tokenizer = llama_style_tokenizer() if family == "llama" else None
    checkpoint = save_random_family(family, tmp_path / "model", tokenizer=tokenizer)
    summary, device, batch_transfers, _ = _ingest_on_second_device(
        tmp_path, monkeypatch, checkpoint, method="accpp", seeding="linear", heads="2.1", ig_steps=8)
    assert summary["firings"] > 0 and summary["edges"] > 0
    assert device.problems == []
    sites = {t.site for t in batch_transfers}
    assert "tensors.py:rows_of" in sites and sites <= set(ACCPP_EXITS), sites - set(ACCPP_EXITS)


# Interventions: the clean pass and every intervened copy run on the device; what leaves it is
# the stored rows, and the sizes that steer the incremental forward pass.
INTERVENTION_EXITS = {
    "tensors.py:rows_of": BATCH_EXITS["tensors.py:rows_of"],
    "intervene.py:_floats": "the stored rows' measurements, converted for writing",
    "forward.py:propagate": "the number of tokens and rows active at a layer (numbers)",
    "forward.py:_head_stage": "the distinct heads patched at a layer, one matmul each",
    "core.py:upstream_output": "the distinct upstream layers of a chunk's edges, one matmul each",
    "core.py:edge_signals": "whether a chunk holds an offset edge (global mode refuses one)",
    "core.py:intervene": "the first layer a chunk's rows enter at (one number)",
}


@pytest.mark.parametrize("method,mode", [("sad", "local"), ("sad", "global"), ("accpp", "local"),
                                         ("accpp", "global")])
def test_interventions_stay_on_the_device_but_for_their_rows(method, mode, tmp_path, monkeypatch):
    from catalog.jobs.intervene import intervene_run

    checkpoint = save_random_family("gpt2", tmp_path / "model")
    options = {"method": "accpp", "ig_steps": 8} if method == "accpp" else {}
    _, _, _, lm = _ingest_on_second_device(tmp_path, monkeypatch, checkpoint, **options)
    device = SecondDevice()
    device.put(list(lm.bridge.parameters()) + list(lm.bridge.buffers()))
    with device:
        summary = intervene_run(tmp_path / "c.duckdb", mode=mode, top_edges=3, loaded_model=lm)
    assert summary["stored"] > 0 and device.problems == []
    sites = {t.site for t in device.transfers if t.site != "loading.py:weights_digest"}  # the run's model check
    assert "intervene.py:_floats" in sites and sites <= set(INTERVENTION_EXITS), sites - set(INTERVENTION_EXITS)
