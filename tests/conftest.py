"""Shared fixtures: the demo model repository, the digit classifier, a live server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    """The repository `make model-repository` built, or a fresh export when absent."""
    built = ROOT / "model_repository"
    if (built / ".built").exists():
        return built
    from export.__main__ import main

    out = tmp_path_factory.mktemp("model_repository")
    assert main(["demo", "--repository", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def classifier():
    """Judges generated digits: [N, 1, 32, 32] in [-1, 1] -> predicted digit [N]."""
    import numpy as np
    import torch

    from zoo.checkpoint import load_checkpoint

    model = load_checkpoint("digit_classifier")

    def predict(images: "np.ndarray") -> "np.ndarray":
        with torch.no_grad():
            return model(torch.from_numpy(images.astype("float32"))).argmax(1).numpy()

    return predict


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real `bentoml serve` on a free loopback port; logs kept for failure reports."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "bentoml"), "serve", "services.service:GenServe",
             "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"bentoml serve not ready after {timeout}s:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    """Base URL of a live service on the embedded backend."""
    proc = ServerProcess(
        {"GENSERVE_MODEL_REPOSITORY": str(repository), "GENSERVE_BACKEND": "onnxruntime"},
        tmp_path_factory.mktemp("server") / "bentoml.log",
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def random_sd(tmp_path_factory):
    """(folder, repository) for a randomly initialised SD-format folder unlike the demo."""
    from export.stable_diffusion import export_stable_diffusion
    from tests.fixtures.sd_folder import build_random_sd_folder

    folder = build_random_sd_folder(tmp_path_factory.mktemp("sd_random"))
    repo = tmp_path_factory.mktemp("sd_random_repository")
    export_stable_diffusion(folder, repo, "sd_random", progress=lambda _: None)
    return folder, repo
