"""A checkpoint's identity from its files, without loading the model.

`ingest` records the digest of the files a model was loaded from in the run's `params`
(`checkpoint_digest`), so that the same command run again on a finished run can say so at once,
without the 10-25 s of loading GPT-2: the run's identity is the checkpoint's files, the prompts
and the settings. For the built-in IOI prompts the prompts come from the tokenizer, which is read
here from the checkpoint's tokenizer.json (tokenizers only, not transformers or torch). Should it
encode differently than the tokenizer transformers loads, the prompts' digest differs and the
shortcut merely misses: the model is loaded and the run found (or made) as usual.

A GGUF file (`--model-path FILE.gguf`) is one file holding the configuration, the weights and the
tokenizer: its digest is the file's, and its tokenizer is not read here (building it from the
file's metadata takes transformers), so the shortcut misses for it and the model is loaded.

Never imports torch or transformers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# The files loading reads: the configuration, the weights, the tokenizer.
CHECKPOINT_FILES = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
    "special_tokens_map.json",
)


def checkpoint_dir(model: str = "gpt2", model_path=None) -> Path | None:
    """The directory the model is loaded from: model_path, or the hub cache's snapshot of `model`
    (None when it is not cached: nothing to digest without the network)."""
    if model_path is not None:
        path = Path(model_path)
        return path if (path / "config.json").is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # an unusual cache layout: no shortcut, the model is loaded
        return None
    return Path(found).parent if isinstance(found, str) else None


def is_gguf(model_path) -> bool:
    """Whether --model-path names a GGUF file (config, weights and tokenizer in one file)."""
    return model_path is not None and Path(model_path).suffix.lower() == ".gguf"


def checkpoint_digest(model: str = "gpt2", model_path=None, dtype: str = "float32") -> str | None:
    """sha256 over the names and contents of the checkpoint's files (config, weights, tokenizer),
    or None when the files cannot be found. A model loaded in another dtype than float32 has
    other weights: its digest also covers the dtype's name."""
    if is_gguf(model_path):
        files = [Path(model_path)] if Path(model_path).is_file() else []
    else:
        directory = checkpoint_dir(model, model_path)
        if directory is None:
            return None
        names = sorted(set(CHECKPOINT_FILES) | {p.name for p in directory.glob("model-*.safetensors")})
        files = [directory / name for name in names]
    digest = hashlib.sha256()
    found = False
    for path in files:
        name = path.name
        if not path.is_file():
            continue
        found = True
        digest.update(name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    if dtype != "float32":
        digest.update(b"dtype\0" + dtype.encode())
    return digest.hexdigest() if found else None


class FileTokenizer:
    """The checkpoint's tokenizer.json through the tokenizers package, called like a Hugging Face
    tokenizer for the IOI prompt generator: `tokenizer(text)["input_ids"]` with the special tokens
    the file's post-processor adds (a BOS for Llama's, none for GPT-2's), as transformers adds
    them, or without (`add_special_tokens=False`); `decode(ids)`; `name_or_path`."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self.name_or_path = str(path.parent)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids) -> str:
        # transformers keeps special tokens in decode by default; the tokenizers package drops them.
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


def file_tokenizer(model: str = "gpt2", model_path=None) -> FileTokenizer | None:
    """The checkpoint's tokenizer without transformers, or None when it has no tokenizer.json."""
    directory = None if is_gguf(model_path) else checkpoint_dir(model, model_path)
    if directory is None or not (directory / "tokenizer.json").is_file():
        return None
    try:
        return FileTokenizer(directory / "tokenizer.json")
    except Exception:  # an older tokenizer file: no shortcut
        return None
