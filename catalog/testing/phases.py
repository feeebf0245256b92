"""One phase of an ingest made slow in a child process, so that a test can stop it there.

With the tiny test checkpoints every phase before the batches takes milliseconds; a real model's
load or decomposition takes seconds to minutes. `slow(phase, seconds)`, run in the child before
the CLI starts (ServerProcess's and the tests' `prelude`), puts one long `time.sleep` (a single
call that no stop check can enter, as a large checkpoint's load is) in front of the phase's
function, and says on stderr when the phase begins: `slow phase: NAME`.
"""

from __future__ import annotations

import importlib
import sys
import time

# phase -> (module, function) that the ingest looks up when it reaches the phase
PHASES = {
    "load": ("catalog.models.loading", "load_model"),
    "decompose": ("catalog.methods.shared.svd", "decompose"),  # called once per layer
    # after the run's row is created, before its first batch (a method's forms being stored)
    "analysis": ("catalog.jobs.ingest", "_analysis_context"),
}


def slow(phase: str, seconds: float) -> None:
    module_name, name = PHASES[phase]
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    def slowed(*args, **kwargs):
        print(f"slow phase: {phase}", file=sys.stderr, flush=True)
        time.sleep(seconds)
        return original(*args, **kwargs)

    setattr(module, name, slowed)


def prelude(phase: str, seconds: float) -> str:
    """Python code for `python -c` that slows the phase (before the CLI's own code)."""
    return f"import catalog.testing.phases as p; p.slow({phase!r}, {seconds!r})"
