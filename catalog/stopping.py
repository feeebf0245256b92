"""Stopping a job from outside its thread, between its steps.

Ctrl-C stops the CLI's ingest by itself (Python raises KeyboardInterrupt in the main thread), but
the service runs its job in a worker thread, where no signal arrives. There the service sets a
check with `stop_when(...)`, and the job's long loops (prompt generation, tokenizing) and its
phase boundaries (before the model load, before the batches) call `check_stop()`. The check
raises StopRequested, a KeyboardInterrupt, so that every place that keeps what is committed on
Ctrl-C (the batch loop names the saved prompts) does the same for a service's stop or cancel.
Without a check set (the CLI, the Python API) `check_stop()` does nothing.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Callable, Iterator


class StopRequested(KeyboardInterrupt):
    """A stop asked for from outside the job's thread: the service stopping, or the job cancelled."""


_requested: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("stop_requested",
                                                                                        default=None)


@contextmanager
def stop_when(requested: Callable[[], bool]) -> Iterator[None]:
    """Within the block (in this thread), check_stop() raises StopRequested once requested() holds."""
    token = _requested.set(requested)
    try:
        yield
    finally:
        _requested.reset(token)


def check_stop() -> None:
    requested = _requested.get()
    if requested is not None and requested():
        raise StopRequested()
