"""Benchmark: `edges`, `head` and a pruned `trace` on a large catalog, cold from the CLI and in the service.

Targets (issue 20, on the 256-prompt SmolLM2 catalog): `edges --into H` and `head H` under
0.5 s and a pruned `trace` under 1 s cold from the CLI (a new process each time, its imports
included), and each under 100 ms in the service (every answer computed: `Cache-Control:
no-cache`).

    python scripts/bench_queries.py --db CATALOG[=CODE_DIR] [--db OTHER[=CODE_DIR] ...]
                                    [--head 23.0] [--repeat 5] [--requests 20] [--no-service]

Each --db is measured with the circuit-catalog code in CODE_DIR (default: this checkout), so an
older checkout (`git archive`) on its catalog and this one on the same catalog migrated give
the current code against the new on the same content. Every measurement is reported as the
median wall time and the median CPU time (user + system of the CLI process; of the server
process for the service), since wall times on a shared 2-core machine say more about the
other work on it than about the code; the load average is printed before and after. The
commands are those of the README's SmolLM2 section (the pruned trace: --top-k 3 --max-depth 2
--min-count 10).

Exit status 1 when a target is missed (by the median wall time of the last --db).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from _bench_common import parse_args, script_parser  # sibling module

HERE = Path(__file__).resolve().parents[1]
CLI_TARGET_S = {"edges": 0.5, "head": 0.5, "trace": 1.0}
SERVICE_TARGET_S = 0.1
PRUNED = ("--top-k", "3", "--max-depth", "2", "--min-count", "10")


def commands(db: Path, head: str) -> dict[str, list[str]]:
    return {"edges": ["edges", "--db", str(db), "--into", head],
            "head": ["head", "--db", str(db), head],
            "trace": ["trace", "--db", str(db), "--root", head, *PRUNED, "--format", "csv"]}


def service_paths(head: str) -> dict[str, str]:
    return {"edges": f"/api/v1/edges_into/{head}", "head": f"/api/v1/heads/{head}",
            "trace": f"/api/v1/trace?roots={head}&top_k=3&max_depth=2&min_count=10"}


def cli_times(code: Path, argv: list[str], repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `circuit-catalog ARGV` as a new process, `repeat` times."""
    env = dict(os.environ, PYTHONPATH=str(code))
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", "from catalog.cli import entry; entry()", *argv], env=env,
                              cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"error: {' '.join(argv)} failed:\n{done.stderr}")
    return statistics.median(walls), statistics.median(cpus)


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_times(code: Path, db: Path, head: str, requests: int) -> dict[str, tuple[float, float]]:
    """Median wall and server CPU seconds per request, every answer computed."""
    os.environ["PYTHONPATH"] = str(code)  # the server process runs this code (started in its folder,
    here = os.getcwd()                    # which comes first on its path)
    os.chdir(code)
    sys.path.insert(0, str(code))
    from catalog.testing.service import ServerProcess  # only launches it: any checkout's will do

    found = {}
    with ServerProcess(db, args=("--no-resume",)) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        for name, path in service_paths(head).items():
            client.get(path, headers={"Cache-Control": "no-cache"}).raise_for_status()  # warm: first read of the file
            walls, cpus = [], []
            for _ in range(requests):
                cpu0, started = server_cpu(server.process.pid), time.perf_counter()
                client.get(path, headers={"Cache-Control": "no-cache"}).raise_for_status()
                walls.append(time.perf_counter() - started)
                cpus.append(server_cpu(server.process.pid) - cpu0)
            found[name] = (statistics.median(walls), statistics.median(cpus))
    sys.path.remove(str(code))
    os.chdir(here)
    return found


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--db", action="append", required=True, metavar="CATALOG[=CODE_DIR]",
                        help="a catalog, and the checkout whose code reads it (default: this one); repeatable")
    parser.add_argument("--head", default="23.0", help="the head asked about (default 23.0, SmolLM2's name mover)")
    parser.add_argument("--repeat", type=int, default=5, help="CLI runs per command (default 5)")
    parser.add_argument("--requests", type=int, default=20, help="service requests per endpoint (default 20)")
    parser.add_argument("--no-service", action="store_true", help="only the CLI")
    args = parse_args(parser, argv)
    print(f"machine: {os.cpu_count()} CPU cores; load average before: {os.getloadavg()}")
    rows, missed = [], []
    for spec in args.db:
        db, _, code = spec.partition("=")
        db, code = Path(db).resolve(), Path(code or HERE).resolve()
        size = db.stat().st_size / 2**20
        print(f"\n{db} ({size:.1f} MiB) read by the code in {code}", flush=True)
        for name, argv_ in commands(db, args.head).items():
            wall, cpu = cli_times(code, argv_, args.repeat)
            rows.append((db.name, code.name, "cli", name, wall, cpu, CLI_TARGET_S[name]))
            print(f"  cli      {name:<6} wall {wall:6.2f} s  cpu {cpu:6.2f} s", flush=True)
        if not args.no_service:
            for name, (wall, cpu) in service_times(code, db, args.head, args.requests).items():
                rows.append((db.name, code.name, "service", name, wall, cpu, SERVICE_TARGET_S))
                print(f"  service  {name:<6} wall {wall * 1000:6.0f} ms cpu {cpu * 1000:6.0f} ms", flush=True)
    print(f"\nload average after: {os.getloadavg()}")
    print(f"\n{'catalog':<28} {'code':<16} {'where':<8} {'query':<6} {'wall s':>8} {'cpu s':>8} {'target s':>9}")
    last = rows[-1][0], rows[-1][1]
    for db, code, where, name, wall, cpu, target in rows:
        print(f"{db:<28} {code:<16} {where:<8} {name:<6} {wall:>8.3f} {cpu:>8.3f} {target:>9.2f}"
              + ("" if wall < target else "  (missed)"))
        if (db, code) == last and wall >= target:
            missed.append(f"{where} {name}")
    print("PASS: every target met" if not missed else f"FAIL: missed {', '.join(missed)} (the last catalog)")
    return 1 if missed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
