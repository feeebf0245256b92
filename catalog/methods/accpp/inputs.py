"""What ACC++ needs of the model and the prompts, checked by the job before anything is stored."""

from __future__ import annotations

from catalog.errors import CatalogError
from catalog.heads import parse_head


def check_inputs(settings, model, items, answers, wrongs) -> None:
    """One CatalogError line for a head the model lacks, a role no
    prompt has, or a prompt without the answer/wrong token its seeding needs."""
    for layer, head in settings.heads:
        parse_head(f"{layer}.{head}", model.n_layers, model.n_heads)
    for role in settings.dest_roles:
        if not any(role in p.roles for p in items):
            raise CatalogError(f"--dest-roles: no prompt has a token with role '{role}'")
    needs_wrong = settings.seeding == "linear"
    needs_answer = needs_wrong or (settings.seeding == "prob" and settings.prob_target == "answer")
    for index, (answer, wrong) in enumerate(zip(answers, wrongs)):
        if (needs_answer and answer is None) or (needs_wrong and wrong is None):
            raise CatalogError(
                f"prompt {index} has no {'answer' if answer is None else 'wrong'} token, which --seeding "
                f"{settings.seeding} needs: give \"answer\" and \"wrong\" in the JSONL (or IO and S1 roles)"
            )


def check_config(settings, config: dict) -> None:
    """Before the model is loaded: every --heads head exists in the checkpoint's config.json."""
    n_layers = config.get("num_hidden_layers", config.get("n_layer"))
    n_heads = config.get("num_attention_heads", config.get("n_head"))
    if isinstance(n_layers, int) and isinstance(n_heads, int):
        for layer, head in settings.heads:
            parse_head(f"{layer}.{head}", n_layers, n_heads)
