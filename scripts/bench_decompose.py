"""Benchmark: decompose all 144 heads of a GPT-2-small-sized model.

Target (issue): all 144 heads of a GPT-2-small-sized model decomposed in under 5 seconds on
this 2-core machine. Measured: `catalog.methods.shared.svd.decompose` on the processed W_Q, b_Q, W_K,
b_K (best of 3), then the catalog's whole decomposition step into a fresh catalog
(`catalog.jobs.ingest.decompose_model`: weights digest, decomposition, Arrow conversion, write).

The model is "attn-real" (GPT-2 small with the real attention weights of
../shared/gpt2-small-attention) when that file exists, else a randomly initialised model of
GPT-2 small's size; the script says which. The built checkpoint is cached in --workdir, so
reruns skip building it.

    python scripts/bench_decompose.py [--workdir DIR] [--repeat 3]

Exit status 1 when the target is missed.
"""

from __future__ import annotations

import os
import sys
import time

TARGET_S = 5.0
from _bench_common import load_bench_model, parse_args, script_parser  # noqa: E402 (sibling module)


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="timed decompositions; the best counts (default 3)")
    args = parse_args(parser, argv)

    from catalog.methods.shared.svd import decompose, to_arrow
    from catalog.jobs.ingest import decompose_model
    from catalog.store import Catalog

    lm, load_s = load_bench_model(args.workdir)
    print(f"model load: {load_s:.2f} s "
          f"({lm.n_layers} layers x {lm.n_heads} heads = {lm.n_layers * lm.n_heads} heads, "
          f"d_model {lm.d_model}, d_head {lm.d_head})")

    W_Q, b_Q, W_K, b_K = lm.attention_weights()[:4]
    times = []
    for _ in range(max(1, args.repeat)):
        started = time.perf_counter()
        result = decompose(W_Q, b_Q, W_K, b_K)
        times.append(time.perf_counter() - started)
    best = min(times)
    print(f"decompose(): best of {len(times)} {best:.3f} s (runs: {', '.join(f'{t:.3f}' for t in times)})")

    started = time.perf_counter()
    table = to_arrow(result)
    arrow_s = time.perf_counter() - started
    print(f"  Arrow conversion alone: {arrow_s:.3f} s ({table.num_rows} singular triplets)")

    started = time.perf_counter()
    lm.weights_digest()
    print(f"  weights digest alone (sha256 of every processed parameter): {time.perf_counter() - started:.3f} s")

    db = args.workdir / "bench_decompose.duckdb"
    for leftover in (db, db.with_name(db.name + ".wal")):
        leftover.unlink(missing_ok=True)
    started = time.perf_counter()
    with Catalog(db) as cat:
        opened_s = time.perf_counter() - started
        model_id, stored = decompose_model(cat, lm)
        rows = cat.con.execute("SELECT count(*) FROM singular_vectors WHERE model_id = ?", [model_id]).fetchall()[0][0]
    stored_s = time.perf_counter() - started
    assert stored and rows == lm.n_layers * lm.n_heads * lm.d_head, (stored, rows)
    print(f"into a fresh catalog (Catalog(db) + decompose_model: open and migrate {opened_s:.2f} s, weights digest, "
          f"decompose, Arrow, write): {stored_s:.2f} s, {rows} rows, {db.stat().st_size / 2**20:.1f} MiB")

    heads = lm.n_layers * lm.n_heads
    verdicts = [(best < TARGET_S, f"{heads} heads decomposed (decompose()) in {best:.3f} s"),
                (stored_s < TARGET_S, f"{heads} heads decomposed and stored in a fresh catalog in {stored_s:.2f} s")]
    for ok, line in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}: {line} (target < {TARGET_S:.0f} s)")
    return 0 if all(ok for ok, _ in verdicts) else 1


if __name__ == "__main__":
    code = main()
    # Leave without Python's module teardown: once torch and DuckDB 2 share a process it prints
    # a wall of benign nanobind "leaked instances" lines (catalog.cli.entry does the same).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
