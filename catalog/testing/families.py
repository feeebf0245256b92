"""Tiny random checkpoints of every model family the catalog reads, built offline.

Each is a Hugging Face config with random weights saved by `save_pretrained`, loaded back
through the same `--model-path` path users take. Their query and key weights get a realistic
scale (as catalog.testing does for GPT-2), so that heads fire. GPT-2 and GPT-NeoX carry GPT-2's
tokenizer (no BOS); Llama and Qwen2 carry the given tokenizer (by default GPT-2's too).
"""

from __future__ import annotations

from pathlib import Path

FAMILY_NAMES = ("gpt2", "gpt_neox", "llama", "qwen2")


def save_random_family(family: str, out_dir: str | Path, tokenizer=None, n_layers: int = 3, n_heads: int = 4,
                       n_kv_heads: int = 2, d_model: int = 64, n_positions: int = 128, seed: int = 0,
                       rope_parameters: dict | None = None) -> Path:
    """Write a random checkpoint of `family` (one of FAMILY_NAMES) with its tokenizer; return out_dir.

    Llama and Qwen2 use grouped-query attention (n_kv_heads key heads); GPT-NeoX rotates a
    quarter of each head's dims and runs attention and MLP in parallel, as Pythia does.
    rope_parameters (rotary families): a rope variant, as in the config's own `rope_parameters`."""
    import torch

    from catalog.testing import gpt2_tokenizer, save_random_gpt2

    out_dir = Path(out_dir)
    if family == "gpt2":
        return save_random_gpt2(out_dir, n_layer=n_layers, n_head=n_heads, n_embd=d_model,
                                n_positions=n_positions, seed=seed)
    tokenizer = tokenizer if tokenizer is not None else gpt2_tokenizer()
    torch.manual_seed(seed)
    model = _build(family, len(tokenizer), n_layers, n_heads, n_kv_heads, d_model, n_positions, tokenizer,
                   rope_parameters)
    _spread_attention(model, family, d_model, seed)
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _build(family, vocab, n_layers, n_heads, n_kv_heads, d_model, n_positions, tokenizer, rope_parameters=None):
    import transformers as tf

    special = {"bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    common = dict(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  intermediate_size=2 * d_model, max_position_embeddings=n_positions, **special)
    if family == "gpt_neox":
        config = tf.GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True)
        if rope_parameters:  # set after: the config folds rotary_pct into its rope parameters
            config.rope_parameters = dict(config.rope_parameters, **rope_parameters)
        return tf.GPTNeoXForCausalLM(config)
    rope = {"rope_parameters": rope_parameters} if rope_parameters else {}
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, **rope, num_key_value_heads=n_kv_heads))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, **rope, num_key_value_heads=n_kv_heads))
    raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILY_NAMES)}")


def _spread_attention(model, family: str, d_model: int, seed: int) -> None:
    """Query/key weights of std 1.5/sqrt(d_model) (and biases of std 0.3 where the family has
    them): with the default init every pattern is nearly uniform and nothing fires."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    scale = 1.5 / d_model**0.5

    def redraw(tensor, std):
        with torch.no_grad():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)

    for name, parameter in sorted(model.named_parameters()):
        if family == "gpt_neox" and "attention.query_key_value" in name:
            redraw(parameter, scale if name.endswith("weight") else 0.3)  # q, k and v: v's scale is harmless
        elif family in ("llama", "qwen2") and (".q_proj." in name or ".k_proj." in name):
            redraw(parameter, scale if name.endswith("weight") else 0.3)


# -- Families with QK-norm, post-norms, softcaps and sliding windows (docs/normed.md) -------------

NORMED_FAMILY_NAMES = ("gemma2", "gemma3", "qwen3", "olmo2")
WINDOW = 5          # the sliding window of the tiny Gemmas: shorter than every IOI prompt
SOFTCAP = 4.0       # Gemma-2's attention softcap, small enough that the cap changes most firing scores


def save_normed_family(family: str, out_dir: str | Path, n_layers: int = 3, d_model: int = 64, seed: int = 0,
                       rope_parameters: dict | None = None) -> Path:
    """Write a random checkpoint of `family` (one of NORMED_FAMILY_NAMES) with GPT-2's tokenizer.

    4 heads of width 16 over 2 key heads; the Gemmas slide a window of WINDOW on layers 0 and 2
    (Gemma-3 with rope bases 10,000 there and 1,000,000 on its global layer) and scale scores by
    query_pre_attn_scalar 24, not d_head. Every norm gain is redrawn away from 1 (a gain left out
    of a form would go unnoticed at 1), and the query/key weights and QK-norm gains are scaled up
    so that heads fire. rope_parameters: the config's own (Gemma-3: one dict per layer type)."""
    import torch
    import transformers as tf

    from catalog.testing import gpt2_tokenizer

    out_dir = Path(out_dir)
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, bos_token_id=tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    gemma = dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24)
    if rope_parameters:
        common["rope_parameters"] = rope_parameters
    if family == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, **gemma, attn_logit_softcapping=SOFTCAP,
                                                     final_logit_softcapping=30.0))
    elif family == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, **gemma, sliding_window_pattern=2,
                                                         rope_local_base_freq=10000.0, rope_theta=1e6))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=16))
    elif family == "olmo2":
        model = tf.Olmo2ForCausalLM(tf.Olmo2Config(**common))
    else:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(NORMED_FAMILY_NAMES)}")
    _redraw_norms_and_qk(model, family, d_model, seed)
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _redraw_norms_and_qk(model, family: str, d_model: int, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    gemma = family.startswith("gemma")  # Gemma's norms multiply by 1 + weight

    def redraw(tensor, mean, std):
        with torch.no_grad():
            tensor.copy_(mean + torch.randn(tensor.shape, generator=generator) * std)

    for name, parameter in sorted(model.named_parameters()):
        if ".q_proj." in name or ".k_proj." in name:
            redraw(parameter, 0.0, 1.5 / d_model**0.5)
        elif ".q_norm." in name or ".k_norm." in name:   # a normalised q.k is small: larger gains fire
            redraw(parameter, 1.0 if gemma else 2.0, 0.4)
        elif "norm" in name and name.endswith("weight"):
            redraw(parameter, 0.0 if gemma else 1.0, 0.3)
