"""loadtests/chaos.py: load on the Triton backend while Triton is stopped and killed, each
time with diffusion requests in flight; every request gets a definite answer, in-flight
requests resume to the same images, and the service needs no restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.server
@pytest.mark.slow
def test_triton_stopped_and_killed_under_load(repository, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "loadtests" / "chaos.py"), "--users", "16",
                           "--duration", "50", "--repository", str(repository), "--reports", str(tmp_path)],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count("same images as without the outage") == 4
    assert "SIGTERM" in done.stdout and "SIGKILL" in done.stdout
