"""The layers of docs/architecture.md hold: the import-linter contracts of `.importlinter` are kept
(no import upward, no circle between layers, no torch on the read path, no click below the CLI,
methods never open the store)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache", "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_a_query_command_imports_no_torch():
    """The contracts see imports in the code; this sees what a query actually loads."""
    code = ("import sys, catalog, catalog.cli, catalog.read.query, catalog.read.trace, catalog.formats.table; "
            "print(sorted(m for m in ('torch', 'transformer_lens', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
