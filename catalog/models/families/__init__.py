"""Model families the catalog reads, one module each (the way TransformerLens keeps one module
per architecture). A family module names the Hugging Face `model_type`s it reads and builds a
FamilyAdapter (catalog.models.families.base) for a loaded bridge; nothing else in the catalog knows a
family by name."""

from __future__ import annotations

from catalog.errors import CatalogError
from catalog.models.families import gemma2, gemma3, gpt2, gpt_neox, llama, olmo2, qwen2, qwen3
from catalog.models.families.base import HOOK_SUFFIXES, FamilyAdapter, Rotary

FAMILIES = (gpt2, gpt_neox, llama, qwen2, qwen3, gemma2, gemma3, olmo2)

__all__ = ["FAMILIES", "HOOK_SUFFIXES", "FamilyAdapter", "Rotary", "families_read", "family_for", "forward_spec",
           "intervening_families"]


def families_read() -> str:
    """'GPT-2 (every size), GPT-NeoX / Pythia, Llama and Qwen2 / Qwen2.5', for messages."""
    names = [family.DESCRIPTION for family in FAMILIES]
    return ", ".join(names[:-1]) + " and " + names[-1]


def family_for(model_type: str, display: str, method: str | None = None):
    """The family module reading Hugging Face `model_type`, or one CatalogError line naming those read
    (or, given `method`, the methods the family is read by when that one is not among them)."""
    from catalog.models.families.base import methods_read

    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            allowed = methods_read(family)
            if method is not None and allowed is not None and method not in allowed:
                raise CatalogError(f"--method {method} does not read {family.DESCRIPTION} models yet ({display} "
                                   f"is one); use --method {' or '.join(allowed)}")
            return family
    raise CatalogError(f"{display} is a model of type '{model_type}'; the catalog reads {families_read()} models")


def intervening_families() -> list[str]:
    """The families whose module says how their forward pass computes (`forward_spec`): those
    `intervene` replays."""
    return [family.NAME for family in FAMILIES if hasattr(family, "forward_spec")]


def forward_spec(adapter: FamilyAdapter):
    """The ForwardSpec of a loaded model, from its family module; CatalogError when the family has none."""
    for family in FAMILIES:
        if family.NAME == adapter.family and hasattr(family, "forward_spec"):
            return family.forward_spec(adapter)
    raise CatalogError(f"interventions do not replay {adapter.family} models yet; they replay "
                       f"{', '.join(intervening_families())} models")
