"""Shared fixtures: the demo model repository, the digit classifier, a live server."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.local_server import LocalServer

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


# One implementation of "start a local service", shared with the load tests and benchmarks.
ServerProcess = LocalServer


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
