"""Formatting query results (Arrow tables) for the terminal: table, csv or json.

Shared by every CLI command that prints rows (its --format option: catalog.cli.output) and the
service's CSV, so the formats agree.

- json: a list of objects; FLOAT (float32) values are written with the shortest decimal that
  reads back as the same float32 (`0.1`, not `0.10000000149011612`); DOUBLE values as Python
  writes them; NaN and infinities as null; lists and structs as JSON arrays and objects.
- csv: one header line, then one line per row; floats as in json; list and struct cells as JSON
  text in one cell (`[3, 7]`, `[{"sv": 3, "share": 0.45}]`), which `json.loads` reads back.
- table: aligned columns for reading, floats to 4 significant digits.
"""

from __future__ import annotations

import csv
import io
import json
import math

from catalog.formats import TEXT_TABLE_FORMATS as FORMATS  # table, csv, json: what a terminal shows


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, dict):
        if set(value) == {"sv", "share"}:  # a singular direction and its share of an edge weight
            return f"{value['sv']}:{value['share']:.2f}" if value["share"] is not None else f"{value['sv']}:"
        if set(value) == {"pos_offset", "sv", "share"}:  # the same, of a rotary form: named d<offset>:sv<index>
            name = direction_name(value)
            return f"{name}:{value['share']:.2f}" if value["share"] is not None else f"{name}:"
        if set(value) == {"dictionary", "feature", "share"}:  # a dictionary's feature and its share (features.md)
            share = f"{value['share']:.2f}" if value["share"] is not None else ""
            return f"d{value['dictionary']}:f{value['feature']}:{share}"
        return " ".join(f"{key}={_cell(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def direction_name(direction: dict) -> str:
    """A singular direction's name in text: its index ("3"), or on a rotary model its form's offset
    and index ("d3:sv0"), since the same index is a different direction at each offset."""
    if direction.get("pos_offset") is None:
        return str(direction["sv"])
    return f"d{direction['pos_offset']}:sv{direction['sv']}"


def float32_text(value: float) -> str:
    """The shortest decimal text that reads back (as a float32, or as a double then rounded to
    float32) to this float32 value; Python's repr of it when no shorter text does."""
    import numpy as np

    stored = np.float32(value)
    text = str(stored)
    return text if np.float32(float(text)) == stored else repr(float(value))


def _float32_values(value, kind):
    """`value` (a Python value of Arrow type `kind`) with its float32 numbers replaced by the
    floats of their shortest text, so that json and csv write no float64 noise."""
    import pyarrow as pa

    if value is None:
        return None
    if pa.types.is_float32(kind):
        return float(float32_text(value)) if math.isfinite(value) else value
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return [_float32_values(v, kind.value_type) for v in value]
    if pa.types.is_struct(kind):
        return {field.name: _float32_values(value.get(field.name), field.type) for field in kind}
    return value


def _has_float32(kind) -> bool:
    import pyarrow as pa

    if pa.types.is_float32(kind):
        return True
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _has_float32(kind.value_type)
    if pa.types.is_struct(kind):
        return any(_has_float32(field.type) for field in kind)
    return False


def _rows(table) -> list[dict]:
    """The rows of an Arrow table, float32 numbers at their own precision."""
    rows = table.to_pylist()
    schema = getattr(table, "schema", None)
    if schema is None:
        return rows
    typed = [(field.name, field.type) for field in schema if _has_float32(field.type)]
    for row in rows:
        for name, kind in typed:
            row[name] = _float32_values(row[name], kind)
    return rows


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_jsonable(value), ensure_ascii=False)  # one cell, JSON text
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def render_json(table) -> str:
    """A list of objects, one per row."""
    return json.dumps([_jsonable(r) for r in _rows(table)], indent=2)


def render_csv(table) -> str:
    """One header line, then one line per row (no newline after the last)."""
    columns = list(table.column_names)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in _rows(table):
        writer.writerow([_csv_cell(row[c]) for c in columns])
    return buffer.getvalue().rstrip("\n")


def render_table(table) -> str:
    """Aligned columns for reading, floats to 4 significant digits."""
    columns = list(table.column_names)
    rows = table.to_pylist()
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    if not rows:
        lines.append("(no rows)")
    return "\n".join(line.rstrip() for line in lines)


def render(table, fmt: str = "table") -> str:
    """Render an Arrow table (or anything with column_names and to_pylist) as text: table, csv or json."""
    if fmt == "json":
        return render_json(table)
    if fmt == "csv":
        return render_csv(table)
    return render_table(table)
