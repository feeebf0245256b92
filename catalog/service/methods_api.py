"""GET /api/v1/methods: the tracing methods the service ingests with, from the registry, and each
one's settings with their defaults and choices (the same as `circuit-catalog ingest`'s options)."""

from __future__ import annotations

from fastapi import APIRouter

from catalog.methods import DEFAULT, REGISTRY
from catalog.settings import fields_of, flag_of

router = APIRouter(prefix="/api/v1")


def describe_methods() -> list[dict]:
    return [{"name": m.name, "title": m.title, "default": m.name == DEFAULT, "weight_unit": m.weight_unit,
             "tables": list(m.tables), "notes": list(m.notes),
             "settings": [{"name": f.name, "flag": flag_of(f), "default": _json(f.default), "help": f.metadata["help"],
                           "choices": list(f.metadata["choices"]) if f.metadata.get("choices") else None}
                          for f in fields_of(m.settings)]}
            for m in REGISTRY.values()]


def _json(value):
    return list(value) if isinstance(value, tuple) else value


@router.get("/methods", summary="The tracing methods and their settings")
def methods() -> list[dict]:
    return describe_methods()
