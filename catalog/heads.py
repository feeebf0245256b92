"""Head names: "L.H" (as in "9.9"), "L9H9" accepted too."""

import re

from catalog.errors import CatalogError

# At most 4 digits each: no model has 10,000 layers, and a longer number would overflow DuckDB's SMALLINT.
_DOTTED = re.compile(r"^\s*(\d{1,4})\.(\d{1,4})\s*$")
_LH = re.compile(r"^\s*[Ll](\d{1,4})[Hh](\d{1,4})\s*$")


def parse_head(text: str, n_layers: int | None = None, n_heads: int | None = None) -> tuple[int, int]:
    """Return (layer, head) for "9.9" or "L9H9"; check the bounds when the model's shape is given."""
    match = _DOTTED.match(text) or _LH.match(text)
    if not match:
        shown = text if len(text) <= 24 else text[:20] + "..."
        raise CatalogError(f"'{shown}' is not a head: write it as LAYER.HEAD, for example 9.9 (or L9H9)")
    layer, head = int(match.group(1)), int(match.group(2))
    if n_layers is not None and layer >= n_layers:
        raise CatalogError(f"no head {text}: the model has layers 0..{n_layers - 1}")
    if n_heads is not None and head >= n_heads:
        raise CatalogError(f"no head {text}: the model has heads 0..{n_heads - 1} in each layer")
    return layer, head


def format_head(layer: int, head: int) -> str:
    return f"{layer}.{head}"
