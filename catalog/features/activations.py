"""A layer's attention output over a corpus, and the model's loss with it replaced by an SAE's
reconstruction (the third figure of a trained SAE)."""

from __future__ import annotations

import torch

from catalog.features.sae import AttentionSae


def pad_tokens(token_lists: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-padded [batch, pos] ids; attention is causal, so padding changes no real position."""
    tokens = torch.full((len(token_lists), max(map(len, token_lists))), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens


def _batches(token_lists: list[list[int]], batch_size: int):
    for first in range(0, len(token_lists), batch_size):
        yield token_lists[first:first + batch_size]


def real_tokens(lengths: list[int], n_pos: int, device) -> torch.Tensor:
    """Mask [batch, pos] of the real (not padding) tokens."""
    return torch.arange(n_pos, device=device).unsqueeze(0) < torch.tensor(lengths, device=device).unsqueeze(1)


def layer_z(model, token_lists: list[list[int]], layer: int, batch_size: int = 16) -> torch.Tensor:
    """The layer's hook_z at every real token, flattened head-major: [n_tokens, n_heads * d_head]."""
    pad_id = model.tokenizer.eos_token_id or 0
    found = []
    for batch in _batches(token_lists, batch_size):
        cache = model.run(pad_tokens(batch, pad_id), (f"blocks.{layer}.attn.hook_z",))
        z = cache[f"blocks.{layer}.attn.hook_z"].float()  # [batch, pos, head, d_head]
        found.append(z.flatten(2)[real_tokens([len(t) for t in batch], z.shape[1], z.device)])
    return torch.cat(found)


def loss_with_reconstruction(model, token_lists: list[list[int]], sae: AttentionSae,
                             batch_size: int = 16) -> dict:
    """Mean next-token cross-entropy (nats) over the corpus, clean and with the layer's hook_z
    replaced by the SAE's reconstruction (so the layer's output is the reconstruction's z W_O)."""
    pad_id = model.tokenizer.eos_token_id or 0
    totals = {"clean": 0.0, "patched": 0.0}
    n_predicted = 0

    def replace(z, hook):
        shape = z.shape
        return sae.decode(sae.encode(z.flatten(2).float())).to(z.dtype).view(shape)

    for batch in _batches(token_lists, batch_size):
        tokens = pad_tokens(batch, pad_id).to(model.device)
        mask = real_tokens([len(t) for t in batch], tokens.shape[1], tokens.device)[:, 1:]
        with torch.no_grad():
            clean = model.bridge(tokens, return_type="logits")
            patched = model.bridge.run_with_hooks(tokens, return_type="logits",
                                                  fwd_hooks=[(sae.hook_name, replace)])
        for name, logits in (("clean", clean), ("patched", patched)):
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                                                     reduction="none").view(mask.shape)
            totals[name] += float(loss[mask].sum())
        n_predicted += int(mask.sum())
    n_predicted = max(n_predicted, 1)
    clean, patched = totals["clean"] / n_predicted, totals["patched"] / n_predicted
    return {"loss_clean": clean, "loss_patched": patched, "loss_change": patched - clean}
