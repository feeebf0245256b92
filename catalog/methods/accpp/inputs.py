"""What ACC++ needs of the model and the prompts, checked by the job before anything is stored."""

from __future__ import annotations

from catalog.errors import CatalogError
from catalog.heads import parse_head


def check_inputs(settings, model, items, answers, wrongs) -> None:
    """One CatalogError line for a head the model lacks, a role no
    prompt has, or a prompt without the answer/wrong token its seeding needs."""
    for layer, head in settings.heads:
        parse_head(f"{layer}.{head}", model.n_layers, model.n_heads)
    if settings.seeding == "probe":
        _check_probe(settings, model.n_layers, model.d_model)
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
    d_model = config.get("hidden_size", config.get("n_embd"))
    if settings.seeding == "probe" and isinstance(n_layers, int) and isinstance(d_model, int):
        _check_probe(settings, n_layers, d_model)


def _check_probe(settings, n_layers: int, d_model: int) -> None:
    """The probe's layer exists and its direction is a d_model vector."""
    from catalog.methods.accpp.settings import load_probe

    if not 0 <= settings.probe_layer < n_layers:
        raise CatalogError(f"--probe-layer {settings.probe_layer} is not a layer of this model (0..{n_layers - 1})")
    size = load_probe(settings.probe).shape[0]
    if size != d_model:
        raise CatalogError(f"--probe: {settings.probe} holds {size} numbers, but the model's d_model is {d_model}")
