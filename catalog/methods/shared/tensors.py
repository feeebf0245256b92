"""Tensor helpers both methods use: a batch's padded tokens, its rows leaving the device, and what
the model answered at each prompt's end position, stored with the prompt.

logit_diff = logit(answer) - logit(wrong) and the answer's probability need the prompt's
answer and wrong tokens (NULL where the prompt has none); the top token needs nothing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


def prompt_outputs(logits: torch.Tensor, end_pos, answer_ids, wrong_ids, prompt_ids, tokenizer) -> pa.Table:
    """Rows (prompt_id, logit_diff, answer_prob, top_token_id, top_token) for a batch."""
    batch = torch.arange(len(end_pos))
    # Only the end positions' logits leave the device (the catalog's rows are built on the CPU).
    final = logits[batch.to(logits.device), torch.as_tensor(end_pos, device=logits.device)].double().cpu()
    top = final.argmax(dim=-1)
    known = [a is not None and w is not None for a, w in zip(answer_ids, wrong_ids)]
    answer = torch.tensor([a if a is not None else 0 for a in answer_ids])
    wrong = torch.tensor([w if w is not None else 0 for w in wrong_ids])
    diff = (final[batch, answer] - final[batch, wrong]).numpy()
    prob = torch.softmax(final, dim=-1)[batch, answer].numpy()
    has_answer = np.array([a is not None for a in answer_ids])
    return pa.table({
        "prompt_id": pa.array(prompt_ids, pa.int32()),
        "logit_diff": pa.array(np.where(known, diff, np.nan), pa.float64(), from_pandas=True).cast(pa.float32()),
        "answer_prob": pa.array(np.where(has_answer, prob, np.nan), pa.float64(), from_pandas=True).cast(pa.float32()),
        "top_token_id": pa.array(top.numpy(), pa.int32()),
        "top_token": [tokenizer.decode([t]) for t in top.tolist()],
    })


def pad_tokens(token_lists: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad to one [prompt, pos] tensor. Attention is causal, so padding after a prompt's
    last token cannot change any activation at its real positions."""
    tokens = torch.full((len(token_lists), max(map(len, token_lists))), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens


def rows_of(values: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy column for writing: the one place a batch leaves its device."""
    return values.detach().cpu().numpy()
