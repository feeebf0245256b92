"""Benchmark: ACC++ ingests on GPT-2 small (attn-real), against the issue's targets.

Two timed jobs, each end to end into a fresh catalog (forward passes, decompositions, seeds,
writes; loading the model is timed apart and not counted):

1. circuits: 256 IOI prompts, each prompt's linear-seeded recursive circuit
   (`ingest --method accpp`); target < 5 minutes.
2. heads: every firing of 9.9, 9.6 and 10.0 on 256 IOI prompts
   (`ingest --method accpp --seeding none --heads 9.9,9.6,10.0`); target < 1 minute.

The reference library (accpp-tracer 0.3.0) is not installed here and cannot be: its timings on
this 2-core machine for the same work come from ../shared/reference/accpp-ioi2-seed1/
reference-meta.json (measured when the reference output was made) and are printed beside ours.

    python scripts/bench_accpp.py [--n-prompts 256] [--batch-size 16] [--only circuits|heads] [--workdir DIR]

Exit status 1 when a target is missed.
"""

from __future__ import annotations

import json
import os
import sys
import time

from _bench_common import SHARED, load_bench_model, parse_args, script_parser  # noqa: E402 (sibling module)

TARGETS_S = {"circuits": 300.0, "heads": 60.0}
JOBS = {
    "circuits": dict(seeding="linear"),
    "heads": dict(seeding="none", heads="9.9,9.6,10.0"),
}
REFERENCE_META = SHARED / "reference" / "accpp-ioi2-seed1" / "reference-meta.json"


def reference_timings() -> dict[str, float] | None:
    """Seconds per prompt of the reference library for the same two jobs, if its record is here."""
    if not REFERENCE_META.exists():
        return None
    timings = json.loads(REFERENCE_META.read_text())["timings"]
    heads = timings["firings_9.9_9.6_10.0_per_prompt_s"]
    return {"circuits": timings["graph_prompt0_linear_s"], "heads": sum(heads.values()) / len(heads)}


def run_job(name: str, lm, args) -> bool:
    from catalog.jobs.ingest import ingest

    db = args.workdir / f"bench_accpp_{name}.duckdb"
    for leftover in (db, db.with_name(db.name + ".wal")):
        leftover.unlink(missing_ok=True)
    print(f"\n{name}: {args.n_prompts} IOI prompts, {JOBS[name]}, batches of {args.batch_size} -> {db}", flush=True)
    started = time.perf_counter()
    summary = ingest(db, model_path=lm.name, dataset="ioi", n_prompts=args.n_prompts, seed=0,
                     batch_size=args.batch_size, method="accpp", show_progress=True, loaded_model=lm, **JOBS[name])
    wall_s = time.perf_counter() - started
    print(f"  {summary['prompts']} prompts, {summary['firings']} firings decomposed, {summary['seeds']} seeds, "
          f"{summary['edges']} edges in {wall_s:.1f} s")
    print(f"  {summary['prompts'] / wall_s:.2f} prompts/s, {summary['firings'] / wall_s:.1f} firings/s")
    reference = reference_timings()
    if reference:
        ref_total = reference[name] * summary["prompts"]
        print(f"  reference library: {reference[name]:.1f} s per prompt on this machine's kind "
              f"(reference-meta.json), so about {ref_total / 60:.0f} min for {summary['prompts']} prompts: "
              f"{ref_total / wall_s:.0f}x slower")
    passed = wall_s < TARGETS_S[name]
    print(f"  {'PASS' if passed else 'FAIL'}: {wall_s:.1f} s (target < {TARGETS_S[name]:.0f} s for 256 prompts)")
    return passed


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--n-prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--only", choices=sorted(JOBS), help="run one of the two jobs")
    args = parse_args(parser, argv)
    lm, load_s = load_bench_model(args.workdir)
    print(f"model load: {load_s:.2f} s (not counted)")
    results = [run_job(name, lm, args) for name in JOBS if args.only in (None, name)]
    if args.n_prompts != 256:
        print(f"note: the targets are for 256 prompts; this run had {args.n_prompts}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no module teardown: see bench_ingest.py
