"""Loading a model through TransformerLens, with HookedTransformer-equivalent processing.

The one place that knows how a model is found: `--model NAME` (the Hugging Face hub or its
local cache, e.g. gpt2, EleutherAI/pythia-160m) or `--model-path DIR` (a checkpoint directory
as `save_pretrained` writes it, or one GGUF file, dequantized to float32 by transformers; both loaded
with no network access). Weight processing happens once,
here, and is recorded; the model's family (catalog.models.families) is found from its config, before
the weights are read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from catalog.errors import CatalogError
from catalog.models.checkpoint import is_gguf
from catalog.models.families import FamilyAdapter

PROCESSING = (
    "TransformerBridge.enable_compatibility_mode(): fold_ln, center_writing_weights, "
    "center_unembed, fold_value_biases"
)

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "bfloat16")


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
    adapter: FamilyAdapter
    device: str = "cpu"
    dtype: str = "float32"
    processing: str = PROCESSING

    @property
    def family(self) -> str:
        return self.adapter.family

    def attention_weights(self):
        """W_Q, b_Q, W_K, b_K, W_O as processed, per query head: [layer, head, d_model, d_head],
        [layer, head, d_head], ..., W_O [layer, head, d_head, d_model] (zero biases where the model has
        none, key heads repeated over their query group)."""
        return (*self.adapter.qk_factors(), self.adapter.W_O())

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

    def run(self, tokens, hooks: tuple[str, ...] | None = None, with_logits: bool = False):
        """Forward pass on a [batch, pos] token tensor; returns the activation cache of the hooks
        whose names end with one of `hooks` (default: those the family's adapter names for the
        2024 method), and the logits first with with_logits=True."""
        import torch

        hooks = hooks if hooks is not None else self.adapter.hooks
        with torch.no_grad():
            logits, cache = self.bridge.run_with_cache(tokens.to(self.device), names_filter=lambda n: n.endswith(hooks))
        return (logits, cache) if with_logits else cache

    def output_weights(self):
        """b_O [layer, d_model] (value biases folded in), W_U [d_model, vocab] (centred), b_U [vocab]."""
        import torch

        from catalog.models.families.base import parameter_or_none

        b = self.bridge
        W_U = b.W_U.detach()
        b_O = parameter_or_none(b, "b_O")
        b_U = parameter_or_none(b, "b_U")
        zeros = lambda *shape: torch.zeros(shape, dtype=W_U.dtype, device=W_U.device)  # bias-free models
        return (b_O if b_O is not None else zeros(self.n_layers, self.d_model),
                W_U, b_U if b_U is not None else zeros(W_U.shape[1]))


def load_model(name: str = "gpt2", path: str | Path | None = None, device: str = "cpu",
               dtype: str = "float32") -> LoadedModel:
    """Load a model of a family the catalog reads (hub name or local checkpoint directory) as a
    processed TransformerBridge on `device` ('cpu', 'cuda' or 'auto') in `dtype`."""
    device = resolve_device(device)
    if dtype not in DTYPES:
        raise CatalogError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    gguf = is_gguf(path)
    if gguf:
        path = Path(path)
        if not path.is_file():
            raise CatalogError(f"--model-path {path}: no such GGUF file")
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        source, display = str(path), str(path)
        _family_of_gguf(path, display)
    elif path is not None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise CatalogError(f"--model-path {path} is not a checkpoint directory (no config.json in it)")
        # A local checkpoint must never reach for the network.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        source, display = str(path), str(path)
        _family_of_config(path / "config.json", display)  # another family fails before the weights load
    else:
        source, display = name, name
        if _in_hub_cache(name):
            os.environ["HF_HUB_OFFLINE"] = "1"  # everything needed is cached: stay offline
        elif not _hub_reachable():
            raise CatalogError(
                f"model '{name}' is not in the local Hugging Face cache and the hub cannot be reached; "
                "offline, pass --model-path DIR with a local checkpoint"
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
        if gguf:
            hf_model, tokenizer = _load_gguf(path, getattr(torch, dtype))
            bridge = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=tokenizer,
                                                         device=device, dtype=getattr(torch, dtype))
        else:
            bridge = TransformerBridge.boot_transformers(source, device=device, dtype=getattr(torch, dtype))
    except Exception as err:  # hub, cache and file errors come in many types
        if path is not None:
            raise CatalogError(f"could not load the checkpoint in {path}: {_first_line(err)}") from None
        raise CatalogError(
            f"could not load model '{name}' from the Hugging Face hub or its local cache "
            f"({_first_line(err)}); offline, pass --model-path DIR with a local checkpoint"
        ) from None
    from catalog.models.families import family_for

    model_type = getattr(getattr(bridge.original_model, "config", None), "model_type", "gpt2")
    family = family_for(model_type, display)
    bridge.enable_compatibility_mode(disable_warnings=True)
    cfg = bridge.cfg
    # The bridge's own tokenizer would prepend a BOS to every text whatever the model; prompts are
    # tokenized by the checkpoint's own tokenizer, exactly as it encodes them (GPT-2's adds no
    # BOS, so SPEC.md positions count from the first word; Llama's adds one at position 0).
    if not gguf:  # a GGUF file's tokenizer was built from its metadata above
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    return LoadedModel(
        bridge=bridge, tokenizer=tokenizer, name=display, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        d_model=cfg.d_model, d_head=cfg.d_head, n_ctx=cfg.n_ctx, adapter=family.adapter(bridge),
        device=device, dtype=dtype,
    )


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' where a GPU is usable, else 'cpu'; 'cuda' without one is an error."""
    if device not in DEVICES:
        raise CatalogError(f"--device must be one of {', '.join(DEVICES)}, not '{device}'")
    if device == "cpu":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise CatalogError("--device cuda: no CUDA GPU is usable here (torch sees none); use --device cpu or auto")
    return "cpu"


def check_family(model: str = "gpt2", path=None, method: str | None = None) -> None:
    """For a local checkpoint, CatalogError at once (before any slow load) unless its config names a
    family the catalog reads (by `method`, when given); so is a hub model whose config is cached,
    and any other hub model when it loads."""
    if is_gguf(path):
        if not Path(path).is_file():
            raise CatalogError(f"--model-path {path}: no such GGUF file")
        _family_of_gguf(Path(path), str(path), method)
    elif path is not None and (Path(path) / "config.json").is_file():
        _family_of_config(Path(path) / "config.json", str(path), method)
    elif path is None:  # a hub name whose config is in the local cache is checked the same way
        from catalog.models.checkpoint import checkpoint_dir

        directory = checkpoint_dir(model)
        if directory is not None:
            _family_of_config(directory / "config.json", model, method)


def _family_of_config(config_path: Path, display: str, method: str | None = None):
    import json

    from catalog.models.families import family_for

    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError) as err:
        raise CatalogError(f"could not read {config_path}: {_first_line(err)}") from None
    return family_for(str(model_type), display, method)


def _family_of_gguf(path: Path, display: str, method: str | None = None):
    """The family a GGUF file's `general.architecture` names (llama, qwen2, gpt2, ...: transformers
    gives the model the same model_type), read from the header without the weights."""
    from catalog.models.families import family_for

    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    except ImportError:
        raise CatalogError("reading a GGUF file needs the gguf package (pip install gguf)") from None
    except Exception as err:  # not a GGUF file, or one without an architecture
        raise CatalogError(f"could not read the GGUF file {path}: {_first_line(err)}") from None
    return family_for(architecture, display, method)


def _load_gguf(path: Path, dtype):
    """(Hugging Face model, tokenizer) of a GGUF file, both built from it by transformers; the
    weights are dequantized (a Q4_1 file becomes a float32 model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


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
