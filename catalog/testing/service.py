"""Starting `circuit-catalog serve` as a child process on a free loopback port, and stopping it.

For the tests (which use the service as a person does, over HTTP) and the benchmark.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running service: `url`, `token`, `stop()` (SIGTERM, clean), `kill()` (SIGKILL)."""

    started: list["ServerProcess"] = []  # every server of this process, so tests can stop what they leave

    def __init__(self, db_path: str | Path, token: str | None = None, args: tuple[str, ...] = (),
                 timeout: float = 60.0, log_path: str | Path | None = None, prelude: str = ""):
        """`prelude`: Python code the child runs before the CLI (catalog.testing.phases.prelude)."""
        self.db_path, self.token = Path(db_path), token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = (prelude + "; " if prelude else "") + "from catalog.cli import entry; entry()"
        command = [sys.executable, "-c", code, "serve", "--db", str(db_path),
                   "--port", str(self.port), *(["--token", token] if token else ["--no-token"]), *args]
        self.log_path = Path(log_path or f"{db_path}.serve-{self.port}.log")
        self._log = open(self.log_path, "w")
        # SIGINT handled by default in the server even when the tests run as a background job
        # (started with SIGINT ignored), so that stop(sig=SIGINT) is a terminal's Ctrl-C.
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        ServerProcess.started.append(self)
        self._wait_ready(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}: {self.log()}")
            try:
                request = urllib.request.Request(self.url + "/openapi.json")
                if self.token:
                    request.add_header("Authorization", f"Bearer {self.token}")
                urllib.request.urlopen(request, timeout=2).close()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the service did not answer within {timeout} s: {self.log()}")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str) -> dict:
        """GET a JSON document (raises on an error status)."""
        request = urllib.request.Request(self.url + path, headers=self.headers())
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop(self, timeout: float = 60.0, sig: int = signal.SIGTERM) -> int:
        """SIGTERM as a service manager would stop it (SIGINT: Ctrl-C); returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (what a crash or an OOM kill does)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
