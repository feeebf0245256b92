"""Compare every table of two catalogs row for row: do two ingests hold the same rows?

    python scripts/compare_catalogs.py A.duckdb B.duckdb [--rtol 1e-6] [--ignore TABLE.COLUMN ...]

Prints one line per table (`same`, `N rows differ`, or why the table cannot be compared) and exits
1 on any difference. Rows are matched in a canonical order (every compared column, exact ones
first), so the order rows were inserted in does not matter. Floats (and float lists) are equal
within --rtol (0: exactly); everything else exactly, NULL equal to NULL.

Never compared, because they legitimately differ between two ingests of the same prompts:
every TIMESTAMP column (when a row was written), and the columns in IGNORED below.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb
import numpy as np

IGNORED = {
    "runs.package_version",  # the code's version, which is what a comparison usually varies
    "runs.params",           # the command's arguments as given, with the catalog's own path
    "service_jobs.settings",  # the job's request, with paths
}
FLOAT_TYPES = {"FLOAT", "DOUBLE", "REAL"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance of float columns (0: exact)")
    parser.add_argument("--ignore", action="append", default=[], metavar="TABLE.COLUMN",
                        help="another column not to compare (repeatable)")
    args = parser.parse_args(argv)
    for path in (args.a, args.b):
        if not path.is_file():
            print(f"error: no catalog at {path}", file=sys.stderr)
            return 2
    if args.rtol < 0:
        print(f"error: --rtol must be >= 0, not {args.rtol}", file=sys.stderr)
        return 2
    ignored = IGNORED | set(args.ignore)

    con = duckdb.connect()
    con.execute(f"ATTACH '{args.a}' AS a (READ_ONLY)")
    con.execute(f"ATTACH '{args.b}' AS b (READ_ONLY)")
    tables = {side: _tables(con, side) for side in ("a", "b")}
    differ = False
    for name in sorted(set(tables["a"]) | set(tables["b"])):
        verdict = _compare(con, name, tables["a"].get(name), tables["b"].get(name), ignored, args.rtol)
        differ |= verdict != "same"
        print(f"{name}: {verdict}")
    return 1 if differ else 0


def _tables(con, catalog: str) -> dict[str, dict[str, str]]:
    """{table: {column: type}} of one attached catalog's base tables (views are derived from them)."""
    rows = con.execute("""SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c
                          JOIN information_schema.tables t USING (table_catalog, table_schema, table_name)
                          WHERE c.table_catalog = ? AND t.table_type = 'BASE TABLE'
                          ORDER BY c.table_name, c.ordinal_position""", [catalog]).fetchall()
    out: dict[str, dict[str, str]] = {}
    for table, column, data_type in rows:
        out.setdefault(table, {})[column] = data_type
    return out


def _compare(con, name: str, columns_a, columns_b, ignored: set[str], rtol: float) -> str:
    if columns_a is None or columns_b is None:
        return "only in " + ("B" if columns_a is None else "A")
    if columns_a != columns_b:
        return f"columns differ: {sorted(set(columns_a.items()) ^ set(columns_b.items()))}"
    kept = {c: t for c, t in columns_a.items() if t != "TIMESTAMP" and f"{name}.{c}" not in ignored}
    floats = [c for c, t in kept.items() if _base(t) in FLOAT_TYPES]
    exact = [c for c in kept if c not in floats]
    order = ", ".join(f'"{c}" NULLS FIRST' for c in exact + floats)
    select = ", ".join(f'"{c}"' for c in kept)
    fetched = [con.execute(f'SELECT {select} FROM {side}."{name}"' + (f" ORDER BY {order}" if order else "")).fetchnumpy()
               for side in ("a", "b")]
    n_a, n_b = (len(next(iter(f.values()))) if f else 0 for f in fetched)
    if n_a != n_b:
        return f"{abs(n_a - n_b)} rows differ ({n_a} rows in A, {n_b} in B)"
    bad = np.zeros(n_a, dtype=bool)
    for column in kept:
        a, b = fetched[0][column], fetched[1][column]
        bad |= _floats_differ(a, b, rtol, kept[column].endswith("[]")) if column in floats else _exact_differ(a, b)
    return "same" if not bad.any() else f"{int(bad.sum())} rows differ"


def _base(data_type: str) -> str:
    return data_type.removesuffix("[]")


def _exact_differ(a, b) -> np.ndarray:
    return np.array([not _same_value(x, y) for x, y in zip(_values(a), _values(b))], dtype=bool)


def _floats_differ(a, b, rtol: float, is_list: bool) -> np.ndarray:
    if is_list:
        return np.array([_list_differs(x, y, rtol) for x, y in zip(_values(a), _values(b))], dtype=bool)
    x, y = (np.ma.filled(np.ma.asarray(v).astype(np.float64), np.nan) for v in (a, b))
    return ~(np.isclose(x, y, rtol=rtol, atol=0.0, equal_nan=True) | (x == y))


def _list_differs(x, y, rtol: float) -> bool:
    if x is None or y is None:
        return (x is None) != (y is None)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return x.shape != y.shape or not bool(np.all(np.isclose(x, y, rtol=rtol, atol=0.0, equal_nan=True) | (x == y)))


def _values(column) -> list:
    """A fetched column as Python values, NULL as None (DuckDB returns masked arrays for NULLs)."""
    if isinstance(column, np.ma.MaskedArray):
        return [None if m else v for v, m in zip(column.data.tolist(), np.ma.getmaskarray(column).tolist())]
    return list(column)


def _same_value(x, y) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return np.array_equal(np.asarray(x), np.asarray(y))
    return x == y or (x is None and y is None)


if __name__ == "__main__":
    sys.exit(main())
