"""ACC++ on tiny random rotary models (GPT-NeoX, Llama, Qwen2 with random query/key/value biases):
ACCPP.md's identities, whatever the weights, without ../shared.

Independent checks: every atom of a firing (the rotations per position, the repeated key/value
heads, the rotated offsets) sums to the model's own hook_attn_scores row on both sides; the IG
shortcut equals the trapezoid integral over the full breakdown; and an ingest with `--seeding
none --heads` decomposes exactly the firings of those heads that the hook's pattern gives.
"""

import pytest
import torch
from test_accpp import _all_firings, _full_rows

from catalog.jobs.ingest import ingest
from catalog.methods.accpp.components import HOOKS, residual_components
from catalog.methods.accpp.firing import LayerDecomposer, dynamic_threshold, trapezoid_weights
from catalog.methods.accpp.weights import accpp_weights
from catalog.methods.shared.tensors import pad_tokens
from catalog.prompts import ioi_prompts, tokenize_prompts
from catalog.store import open_readonly
from catalog.testing.families import save_random_family

FAMILIES = ("gpt_neox", "llama", "qwen2")


def _with_random_biases(checkpoint):
    """Qwen2's Linear biases start at zero: fill the query, key and value biases so that the offset
    and the attention-output bias go through the rotation and the grouped heads."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.copy_(torch.randn(proj.bias.shape, generator=generator) * 0.5)
    model.save_pretrained(checkpoint)
    return checkpoint


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    from catalog.models.loading import load_model

    checkpoint = save_random_family(request.param, tmp_path_factory.mktemp(f"accpp-{request.param}"))
    if request.param == "qwen2":
        _with_random_biases(checkpoint)
    lm = load_model(path=checkpoint)
    items = ioi_prompts(2, seed=5, tokenizer=lm.tokenizer)
    token_lists = tokenize_prompts(items, lm.tokenizer)
    _, cache = lm.run(pad_tokens(token_lists, 0), HOOKS, with_logits=True)
    W_Q, b_Q, W_K, b_K, W_O = lm.attention_weights()
    res = residual_components(cache, W_O, lm.output_weights()[0])
    return request.param, checkpoint, lm, items, res, accpp_weights(W_Q, b_Q, W_K, b_K, rotary=lm.adapter.rotary)


def test_qwen2_biases_are_not_zero(family):
    name, _, lm, _, _, weights = family
    if name != "qwen2":
        pytest.skip("only the Qwen2 model has random biases")
    assert weights.offset_q.abs().max() > 0.1 and lm.output_weights()[0].abs().max() > 0.1


@pytest.mark.parametrize("layer", [1, 2])
def test_atoms_sum_to_the_hooks_score_row(family, layer):
    name, _, _, items, res, weights = family
    firings = _all_firings(res, layer, items)
    decomposer = LayerDecomposer(layer, firings, res, weights)
    row, valid, sides = _full_rows(decomposer, firings)
    hook = res.attn_scores[firings.prompt, layer, firings.head, firings.dest].double()
    hook = torch.where(valid, hook, torch.zeros_like(hook))
    scale = hook.abs().max()
    assert (torch.where(valid, row, torch.zeros_like(row)) - hook).abs().max() <= 1e-4 * scale, name
    for side, (_, X) in sides.items():
        total = torch.where(valid, X.sum(dim=1), torch.zeros_like(hook))
        diff = (total - hook).abs().max()
        assert diff <= 1e-4 * scale, f"{name} {side}: atoms do not sum to hook_attn_scores ({diff})"


def test_ig_shortcut_equals_the_trapezoid_over_the_full_breakdown(family):
    name, _, _, items, res, weights = family
    every = _all_firings(res, 2, items)
    firings = every.take(torch.arange(min(8, len(every))))  # the full breakdown of a few is enough here
    decomposer = LayerDecomposer(2, firings, res, weights)
    row, valid, sides = _full_rows(decomposer, firings, steps=16)
    alphas, w = trapezoid_weights(16)
    for side, (ig, X) in sides.items():
        expected = torch.zeros_like(ig)
        for a, weight in zip(alphas, w):
            p = torch.softmax((a * row).masked_fill(~valid, float("-inf")), dim=-1)
            p_j = p.gather(1, firings.src.unsqueeze(1))
            expected += weight * p_j * (X.gather(2, firings.src.view(-1, 1, 1).expand(-1, X.shape[1], 1)).squeeze(2)
                                        - torch.einsum("fnp,fp->fn", X, p))
        assert (ig - expected).abs().max() <= 1e-9 + 1e-6 * expected.abs().max(), (name, side)


def test_seeding_none_decomposes_every_firing_of_the_heads(family, tmp_path):
    name, checkpoint, lm, items, res, _ = family
    db = tmp_path / "c.duckdb"
    run = ingest(db, model_path=checkpoint, method="accpp", seeding="none", heads="2.0,2.3", n_prompts=2, seed=5,
                 loaded_model=lm)["run_id"]
    stored = set(open_readonly(db).execute("SELECT prompt_id, layer, head, dest_pos, src_pos FROM firings "
                                           "WHERE run_id = ? AND layer = 2", [run]).fetchall())
    expected = set()
    for b, item in enumerate(items):
        for head in (0, 3):
            for i in range(1, item.roles["end"] + 1):
                for j in range(i + 1):
                    if res.pattern[b, 2, head, i, j] >= dynamic_threshold(torch.tensor(i)):
                        expected.add((b, 2, head, i, j))
    assert expected and stored == expected, name  # (lower layers hold the firings these lead to)
