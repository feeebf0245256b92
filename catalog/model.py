"""Loading GPT-2 through TransformerLens, with HookedTransformer-equivalent processing.

The one place that knows how a model is found: `--model gpt2` (the Hugging Face hub or its
local cache) or `--model-path DIR` (a checkpoint directory as `save_pretrained` writes it,
loaded with no network access). Weight processing happens once, here, and is recorded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from catalog.errors import CatalogError

PROCESSING = (
    "TransformerBridge.enable_compatibility_mode(): fold_ln, center_writing_weights, "
    "center_unembed, fold_value_biases"
)

# Activations the method reads (SPEC.md, "Model and activations"), cached per forward pass.
HOOK_SUFFIXES = (
    "ln1.hook_normalized",
    "ln1.hook_scale",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
)


@dataclass
class LoadedModel:
    bridge: object  # transformer_lens TransformerBridge, in compatibility mode
    tokenizer: object
    name: str
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    n_ctx: int
    processing: str = PROCESSING

    def attention_weights(self):
        """W_Q, b_Q, W_K, b_K, W_O as processed: [layer, head, d_model, d_head], [layer, head, d_head], ..."""
        b = self.bridge
        return b.W_Q.detach(), b.b_Q.detach(), b.W_K.detach(), b.b_K.detach(), b.W_O.detach()

    def weights_digest(self) -> str:
        """sha256 over every processed parameter, by name: the identity of a model in the catalog."""
        import torch

        digest = hashlib.sha256()
        for name, tensor in sorted(self.bridge.state_dict().items()):
            if not torch.is_floating_point(tensor):
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def run(self, tokens, hooks: tuple[str, ...] = HOOK_SUFFIXES, with_logits: bool = False):
        """Forward pass on a [batch, pos] token tensor; returns the activation cache of the hooks
        whose names end with one of `hooks` (and the logits first, with_logits=True)."""
        import torch

        with torch.no_grad():
            logits, cache = self.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith(hooks))
        return (logits, cache) if with_logits else cache

    def output_weights(self):
        """b_O [layer, d_model] (value biases folded in), W_U [d_model, vocab] (centred), b_U [vocab]."""
        b = self.bridge
        return b.b_O.detach(), b.W_U.detach(), b.b_U.detach()


def load_model(name: str = "gpt2", path: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Load GPT-2 (hub name or local checkpoint directory) as a processed TransformerBridge."""
    if path is not None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise CatalogError(f"--model-path {path} is not a checkpoint directory (no config.json in it)")
        # A local checkpoint must never reach for the network.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        source, display = str(path), str(path)
    else:
        source, display = name, name
        if _in_hub_cache(name):
            os.environ["HF_HUB_OFFLINE"] = "1"  # everything needed is cached: stay offline
        elif not _hub_reachable():
            raise CatalogError(
                f"model '{name}' is not in the local Hugging Face cache and the hub cannot be reached; "
                "offline, pass --model-path DIR with a local GPT-2 checkpoint"
            )
    import logging
    import warnings

    import torch

    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore")
    for logger in ("transformer_lens", "huggingface_hub", "transformers", ""):
        logging.getLogger(logger).setLevel(logging.ERROR)  # one line of our own on failure, no noise
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one that counts

    try:
        bridge = TransformerBridge.boot_transformers(source, device=device)
    except Exception as err:  # hub, cache and file errors come in many types
        if path is not None:
            raise CatalogError(f"could not load the checkpoint in {path}: {_first_line(err)}") from None
        raise CatalogError(
            f"could not load model '{name}' from the Hugging Face hub or its local cache "
            f"({_first_line(err)}); offline, pass --model-path DIR with a local GPT-2 checkpoint"
        ) from None
    model_type = getattr(getattr(bridge.original_model, "config", None), "model_type", "gpt2")
    if model_type != "gpt2":
        raise CatalogError(f"{display} is a '{model_type}' model; the catalog reads GPT-2 models")
    bridge.enable_compatibility_mode(disable_warnings=True)
    cfg = bridge.cfg
    # The bridge's own tokenizer prepends BOS (<|endoftext|>) to every text; SPEC.md positions
    # count from the first word, so prompts are tokenized by the checkpoint's plain tokenizer.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    return LoadedModel(
        bridge=bridge, tokenizer=tokenizer, name=display, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        d_model=cfg.d_model, d_head=cfg.d_head, n_ctx=cfg.n_ctx,
    )


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an unusual cache layout: let the real load decide
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection check, so that an offline machine fails in seconds, not after retries."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
