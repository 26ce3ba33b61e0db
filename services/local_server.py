"""Start genserve as a local `bentoml serve` subprocess on a free loopback port.

For load tests, benchmarks and tests. Each server gets its own BENTOML_HOME: BentoML
clears files there at start-up (its task result store), so two servers sharing one
would disturb each other (metrics are per server whatever the home: services.metrics_dir).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


PR_SET_PDEATHSIG = 1  # prctl(2)


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, so an
    interrupted test run or benchmark leaves no server behind (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`root`: the checkout whose services/ is served (default this one; benchmarks pass
    another revision's to compare the two in one run)."""

    def __init__(self, env: dict[str, str], log_path: Path, root: Path = ROOT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._home = tempfile.TemporaryDirectory(prefix="genserve-bentoml-")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "bentoml"), "serve", "services.service:GenServe",
             "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=root, env={**os.environ, "BENTOML_HOME": self._home.name, **env},
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_stop_with_parent,
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"bentoml serve not ready after {timeout:.0f}s:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        self._home.cleanup()
