"""The per-head decomposition against SPEC.md's identities, computed independently."""

import numpy as np
import pytest
import torch

from catalog.methods.shared.svd import decompose, from_arrow, omega, to_arrow


def _random_weights(n_layers=2, n_heads=3, d_model=24, d_head=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_layers, n_heads, d_model, d_head, generator=g),
            torch.randn(n_layers, n_heads, d_head, generator=g),
            torch.randn(n_layers, n_heads, d_model, d_head, generator=g),
            torch.randn(n_layers, n_heads, d_head, generator=g))


def _reconstruct(d):
    return d.U @ torch.diag_embed(d.sigma) @ d.V.transpose(-1, -2)


def test_reconstructs_omega_from_factors():
    W_Q, b_Q, W_K, b_K = _random_weights()
    d = decompose(W_Q, b_Q, W_K, b_K)
    # Omega~ written out block by block, as SPEC.md states it
    top = torch.cat([W_Q @ W_K.transpose(-1, -2), (W_Q @ b_K.unsqueeze(-1))], dim=-1)
    bottom = torch.cat([(b_Q.unsqueeze(-2) @ W_K.transpose(-1, -2)), (b_Q * b_K).sum(-1)[..., None, None]], dim=-1)
    dense = torch.cat([top, bottom], dim=-2)
    assert torch.allclose(dense, omega(W_Q, b_Q, W_K, b_K), atol=1e-5)
    scale = dense.abs().amax(dim=(-1, -2), keepdim=True)
    assert ((_reconstruct(d) - dense).abs() / scale).max() < 1e-5


def test_singular_values_descending_nonnegative_and_match_dense_svd():
    W_Q, b_Q, W_K, b_K = _random_weights(seed=1)
    d = decompose(W_Q, b_Q, W_K, b_K)
    assert (d.sigma >= 0).all()
    assert (d.sigma[..., :-1] >= d.sigma[..., 1:]).all()
    dense = omega(W_Q, b_Q, W_K, b_K).double().numpy()
    expected = np.linalg.svd(dense, compute_uv=False)[..., : d.sigma.shape[-1]]
    np.testing.assert_allclose(d.sigma.numpy(), expected, rtol=1e-5)
    eye = torch.eye(d.U.shape[-1])
    assert torch.allclose(d.U.transpose(-1, -2) @ d.U, eye, atol=1e-5)
    assert torch.allclose(d.V.transpose(-1, -2) @ d.V, eye, atol=1e-5)


def test_sign_convention_largest_entry_of_u_positive():
    d = decompose(*_random_weights(seed=2))
    largest = torch.gather(d.U, -2, d.U.abs().argmax(dim=-2, keepdim=True))
    assert (largest > 0).all()


def test_arrow_round_trip():
    d = decompose(*_random_weights(seed=3))
    table = to_arrow(d)
    assert table.num_rows == 2 * 3 * 8
    assert len(table.column("u")[0].as_py()) == 24 + 1
    back = from_arrow(table, 2, 3)
    assert torch.equal(back.U, d.U) and torch.equal(back.V, d.V) and torch.equal(back.sigma, d.sigma)


def test_contributions_sum_to_models_raw_attention_score(tiny_model):
    """sum_k c_k(i, j) = s(i, j), the score read from the model's own hook, for every token pair."""
    lm = tiny_model
    d = decompose(*lm.attention_weights()[:4])
    tokens = torch.tensor([lm.tokenizer("When Mary and John went to the store, John gave a drink to")["input_ids"]])
    _, cache = lm.bridge.run_with_cache(tokens)
    n = tokens.shape[1]
    for layer in range(lm.n_layers):
        x = cache[f"blocks.{layer}.ln1.hook_normalized"][0]
        x_tilde = torch.cat([x, torch.ones(n, 1)], dim=1)
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0] * lm.d_head**0.5
        for head in range(lm.n_heads):
            dest = x_tilde @ d.U[layer, head]  # [i, k]
            src = x_tilde @ d.V[layer, head]  # [j, k]
            c_sum = torch.einsum("ik,k,jk->ij", dest, d.sigma[layer, head], src)
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
            expected = scores[head][causal]
            assert torch.allclose(c_sum[causal], expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.slow
def test_real_gpt2_attention_weights(attn_real_model):
    """All 144 heads of real GPT-2 small: the processed model's Omega~ equals the one folded by hand
    from the raw Hugging Face weights, and the decomposition reconstructs it."""
    from safetensors.torch import load_file

    from conftest import ATTN_WEIGHTS

    lm = attn_real_model
    raw = load_file(str(ATTN_WEIGHTS))
    n_layers, n_heads, d_model, d_head = 12, 12, 768, 64
    W_Q, b_Q, W_K, b_K = lm.attention_weights()[:4]
    d = decompose(W_Q, b_Q, W_K, b_K)
    assert d.sigma.shape == (n_layers, n_heads, d_head)
    for layer in range(n_layers):
        w = raw[f"transformer.h.{layer}.attn.c_attn.weight"].double()  # [d_model, 3 d_model], Conv1D [in, out]
        b = raw[f"transformer.h.{layer}.attn.c_attn.bias"].double()
        ln_w = raw[f"transformer.h.{layer}.ln_1.weight"].double()
        ln_b = raw[f"transformer.h.{layer}.ln_1.bias"].double()
        for head in range(n_heads):
            cols = slice(head * d_head, (head + 1) * d_head)
            wq, wk = w[:, :d_model][:, cols], w[:, d_model : 2 * d_model][:, cols]
            bq, bk = b[:d_model][cols], b[d_model : 2 * d_model][cols]
            # fold LayerNorm: weight into the matrix, bias into the bias; x is centred, so the
            # folded matrix is centred over d_model too (as HookedTransformer does)
            fq, fk = ln_w[:, None] * wq, ln_w[:, None] * wk
            fq, fk = fq - fq.mean(0), fk - fk.mean(0)
            A = torch.cat([fq, (bq + ln_b @ wq)[None]], 0)
            B = torch.cat([fk, (bk + ln_b @ wk)[None]], 0)
            expected = A @ B.T
            got = (d.U[layer, head].double() * d.sigma[layer, head].double()) @ d.V[layer, head].double().T
            assert ((got - expected).abs().max() / expected.abs().max()) < 1e-4, (layer, head)
