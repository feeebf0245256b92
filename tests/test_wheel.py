"""The built wheel installs and works without the source tree (issue 18, point 4).

An editable install (what CI and developers use) imports from the source tree, so a subpackage
or data file missing from the wheel goes unnoticed there. This test builds the wheel from a copy
of the sources, installs it (not editable) into a fresh virtual environment and runs the
command-line tool from a directory outside the repository.

The new environment reuses the dependencies already installed for the tests: a `.pth` file in
its site-packages names the test environment's site-packages. A path listed in a `.pth` file is
added to sys.path but its own `.pth` files are not run, so the test environment's editable
install of this package (a `.pth` finder) stays invisible, and the wheel's copy is the one found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import duckdb
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    """The wheel built from a clean copy of the sources (no stale build/ directory to borrow from)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "catalog", source / "catalog", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), "."],
         cwd=source, env=os.environ.copy())
    wheels = list(out.glob("circuit_catalog-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(built_wheel, tmp_path_factory) -> tuple[Path, dict]:
    """(bin directory, environment) of a fresh virtual environment with the wheel installed."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(built_wheel)],
         cwd=venv, env=env)
    return venv / "bin", env


def test_the_wheel_holds_every_subpackage_and_data_file(built_wheel):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "catalog").rglob("*.py") if "__pycache__" not in p.parts}
    packages = {str(Path(p).parent) for p in sources if p.endswith("/__init__.py")}
    assert len(packages) >= 10, packages  # catalog, schema, store, models, methods (3), jobs, read, ...
    assert sources - names == set()
    data = [p.relative_to(REPO).as_posix() for pattern in ("catalog/schema/migrations/*.sql", "catalog/service/static/*")
            for p in REPO.glob(pattern)]
    assert any(d.endswith("001_decomposition.sql") for d in data) and any(d.endswith("index.html") for d in data)
    assert set(data) - names == set()


def test_the_installed_wheel_runs_and_ingests_with_each_method(installed, tmp_path):
    bin_dir, env = installed
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert REPO not in outside.parents

    version = _run([str(bin_dir / "circuit-catalog"), "--version"], cwd=outside, env=env)
    assert "0.1.0" in version.stdout

    where = _run([str(bin_dir / "python"), "-c", "import catalog; print(catalog.__file__)"], cwd=outside, env=env)
    assert Path(where.stdout.strip()).is_relative_to(bin_dir.parent), where.stdout

    checkpoint = outside / "tiny-gpt2"
    _run([str(bin_dir / "python"), "-c",
          f"from catalog.testing import save_random_gpt2; save_random_gpt2({str(checkpoint)!r}, n_layer=2, n_head=2, n_embd=32)"],
         cwd=outside, env=env)
    db = outside / "catalog.duckdb"
    for method in ("sad", "accpp"):
        _run([str(bin_dir / "circuit-catalog"), "ingest", "--db", str(db), "--model-path", str(checkpoint),
              "--method", method, "--n-prompts", "2", "--batch-size", "2"], cwd=outside, env=env)

    with duckdb.connect(str(db), read_only=True) as con:
        runs = con.execute("SELECT method, status, n_prompts FROM runs ORDER BY run_id").fetchall()
        firings_per_run = con.execute("SELECT run_id, count(*) FROM firings GROUP BY run_id ORDER BY run_id").fetchall()
        n_prompts = con.execute("SELECT count(*) FROM prompts").fetchone()[0]
        n_sad_edges = con.execute("SELECT count(*) FROM edges WHERE run_id = 1").fetchone()[0]
        accpp_rows = [con.execute(f"SELECT count(*) FROM {name} WHERE run_id = 2").fetchone()[0]
                      for name in ("roots", "seeds")]
    assert runs == [("sad", "finished", 2), ("accpp", "finished", 2)]
    assert n_prompts == 4
    # ACC++ finds no firing on a random model (its roots are too weak to seed one); it still
    # writes the roots and seeds it started from, which the 2024 method never writes.
    assert [run for run, n in firings_per_run if n > 0] == [1], firings_per_run
    assert n_sad_edges > 0
    assert min(accpp_rows) > 0, accpp_rows
