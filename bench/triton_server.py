"""A real Triton for the benchmarks: deploy/triton_cpu/launch.py in the background on free
loopback ports, stopped on the way out (the tests use tests/fixtures/triton.py's foreground one,
which also pins one ONNX Runtime thread per model instance; the benchmarks keep launch.py's
defaults)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.fixtures.local_server import free_port

LAUNCH = Path(__file__).resolve().parents[1] / "deploy" / "triton_cpu" / "launch.py"


@contextmanager
def started_triton(repository: Path, workdir: Path, wait_ready_s: int = 180) -> Iterator[str]:
    """Yields the gRPC address of a Triton serving `repository`, ready (its files in `workdir`)."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    subprocess.run([sys.executable, str(LAUNCH), "--model-repository", str(repository),
                    "--address", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                    "--metrics-port", str(metrics_port), "--workdir", str(workdir), "--wait-ready", str(wait_ready_s)],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        yield f"127.0.0.1:{grpc_port}"
    finally:
        subprocess.run([sys.executable, str(LAUNCH), "stop", "--workdir", str(workdir)], stdout=subprocess.DEVNULL)
