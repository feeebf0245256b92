"""Measure what a precision or a device changes: the same prompts ingested two ways, compared.

    python scripts/compare_dtype.py [--n-prompts 64] [--device cpu] [--model-path DIR] [--workdir DIR]
    python scripts/compare_dtype.py --sides cpu:float32,cuda:float32     # does the GPU path agree?
    python scripts/compare_dtype.py --sides cpu:float32,cuda:float32 --method accpp

By default float32 against bfloat16 on --device; --sides names the two (device, dtype) settings
instead. Both runs use the default benchmark model (attn-real where ../shared has it) unless
--model-path is given, each into a fresh catalog. Printed: how many firings and edges each run
found, how many of them are the same (Jaccard), and on the common ones the relative change of
the score and of the edge weight, and how often the sparse signal (its list of singular
vectors) is the same. The README's numbers come from this script.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from _bench_common import load_bench_model, parse_args, script_parser

FIRING = "prompt_id, layer, head, dest_pos, src_pos"
# An edge's identity across two catalogs (edge_id is per catalog): ACC++ edges also have a kind
# and a source token, NULL where they do not apply (hence IS NOT DISTINCT FROM in the joins).
EDGE = {"sad": FIRING + ", side, up_layer, up_head",
        "accpp": FIRING + ", side, up_kind, up_layer, up_head, up_src_pos"}


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sides", default=None, metavar="DEVICE:DTYPE,DEVICE:DTYPE",
                        help="the two settings compared (default: DEVICE:float32,DEVICE:bfloat16 with --device)")
    parser.add_argument("--method", choices=("sad", "accpp"), default="sad", help="the tracing method (default sad)")
    parser.add_argument("--model-path", type=Path, default=None)
    args = parse_args(parser, argv)
    sides = (args.sides or f"{args.device}:float32,{args.device}:bfloat16").split(",")
    if len(sides) != 2 or any(len(side.split(":")) != 2 for side in sides) or sides[0] == sides[1]:
        parser.error("--sides takes two different DEVICE:DTYPE settings, e.g. cpu:float32,cuda:float32")
    from catalog.jobs.ingest import ingest

    dbs = {}
    for side in sides:
        device, dtype = side.split(":")
        lm, _ = load_bench_model(args.workdir, device, dtype, args.model_path)
        db = dbs[side] = args.workdir / f"compare_{device}_{dtype}.duckdb"
        for leftover in (db, db.with_name(db.name + ".wal")):
            leftover.unlink(missing_ok=True)
        started = time.perf_counter()
        summary = ingest(db, model_path=lm.name, n_prompts=args.n_prompts, seed=0, loaded_model=lm,
                         method=args.method)
        print(f"{side}: {summary['firings']} firings, {summary['edges']} edges in "
              f"{time.perf_counter() - started:.1f} s on {lm.device}", flush=True)
        del lm
    compare(*(dbs[side] for side in sides), names=sides, method=args.method)
    return 0


def _same(key: str) -> str:
    return " AND ".join(f"x.{c} IS NOT DISTINCT FROM y.{c}" for c in key.split(", "))


def compare(first: Path, second: Path, names=("float32", "bfloat16"), method: str = "sad") -> None:
    import duckdb

    con = duckdb.connect()
    con.execute(f"ATTACH '{first}' AS a (READ_ONLY)")
    con.execute(f"ATTACH '{second}' AS b (READ_ONLY)")
    one = lambda sql: con.execute(sql).fetchall()[0]
    for table, key in (("firings", FIRING), ("edges", EDGE[method])):
        n_a, n_b, common = one(f"""SELECT (SELECT count(*) FROM a.{table}), (SELECT count(*) FROM b.{table}),
                                   (SELECT count(*) FROM (SELECT {key} FROM a.{table} INTERSECT SELECT {key} FROM b.{table}))""")
        value = "score" if table == "firings" else "weight"
        median, p95 = one(f"""SELECT median(d), quantile_cont(d, 0.95) FROM (
                                SELECT abs(x.{value} - y.{value}) / greatest(abs(x.{value}), 1e-6) AS d
                                FROM a.{table} x JOIN b.{table} y ON {_same(key)})""")
        print(f"{table}: {names[0]} {n_a}, {names[1]} {n_b}, common {common} (Jaccard {common / (n_a + n_b - common):.3f}); "
              f"relative {value} change on the common ones: median {median:.2e}, 95th percentile {p95:.2e}")
    if method == "accpp":  # no sparse signal: how often a side's greedy zeroed as many atoms
        same, total = one(f"""SELECT count(*) FILTER (WHERE x.n_atoms = y.n_atoms), count(*) FROM a.firing_sides x
                              JOIN b.firing_sides y USING ({FIRING}, side)""")
        print(f"greedy: the same number of atoms zeroed on {same} of {total} common firing sides "
              f"({same / max(total, 1):.1%})")
        return
    same, total = one(f"""SELECT count(*) FILTER (WHERE x.svs = y.svs), count(*) FROM
                          (SELECT {FIRING}, list(sv ORDER BY rank) AS svs FROM a.firing_svs GROUP BY ALL) x
                          JOIN (SELECT {FIRING}, list(sv ORDER BY rank) AS svs FROM b.firing_svs GROUP BY ALL) y
                          USING ({FIRING})""")
    print(f"sparse signals: the same list of singular vectors in {same} of {total} common firings ({same / max(total, 1):.1%})")


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
