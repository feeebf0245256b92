"""What a job hands a method's batch analysis: the model, the prompts and a door to the stored forms.

Methods never open the store: the job passes the singular vectors already stored for this model
(`stored_form`) and a way to store a form once per model (`store_form`). Importing this module
imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class AnalysisContext:
    model: Any                                   # a catalog.models.loading.LoadedModel
    settings: Any                                # the method's settings (its registry entry's class)
    items: list                                  # the prompts (catalog.prompts.Prompt)
    token_lists: list[list[int]]
    end_pos: list[int]
    answers: list[int | None]
    wrongs: list[int | None]
    # form -> the stored singular_vectors rows (layer, head, sv, sigma, u, v) of this model, per head
    stored_form: Callable[[str], Any]
    # (form, make_table) -> stores make_table() unless the model already has that form
    store_form: Callable[[str, Callable[[], Any]], None]
    say: Callable[[str], None] = field(default=lambda text: None)  # a status line for slow steps

    def prompts_of(self, ids) -> dict:
        """The batch's slice of every per-prompt list."""
        ids = list(ids)
        return {"token_lists": [self.token_lists[i] for i in ids], "end_pos": [self.end_pos[i] for i in ids],
                "prompt_ids": ids, "answer_ids": [self.answers[i] for i in ids],
                "wrong_ids": [self.wrongs[i] for i in ids]}
