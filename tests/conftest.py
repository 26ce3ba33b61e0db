"""Shared fixtures: the demo model repository, the digit classifier, a live server."""

from __future__ import annotations

from pathlib import Path

import pytest

import export  # noqa: F401 - first, so transformers/diffusers find torchvision importable (export/__init__.py)
from tests.fixtures.local_server import LocalServer

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

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images.astype("float32"))).argmax(1).numpy()

    return predict


def running_server(env: dict[str, str], log_dir: Path):
    """Yields a ready local service with `env`, stopped afterwards (a fixture body)."""
    proc = LocalServer(env, log_dir / "bentoml.log")  # shared with the load tests and benchmarks
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    """A live service on the embedded backend."""
    yield from running_server({"GENSERVE_MODEL_REPOSITORY": str(repository), "GENSERVE_BACKEND": "onnxruntime"},
                              tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def triton(repository, tmp_path_factory):
    """A real tritonserver on the repository (one per test module: some tests stop it)."""
    from tests.fixtures.triton import start_triton

    server = start_triton(repository, tmp_path_factory.mktemp("triton"))
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def triton_service(triton, repository, tmp_path_factory):
    """A live service on GENSERVE_BACKEND=triton, pointed at the module's Triton."""
    yield from running_server(
        {"GENSERVE_MODEL_REPOSITORY": str(repository), "GENSERVE_BACKEND": "triton",
         "GENSERVE_TRITON_URL": f"127.0.0.1:{triton.grpc_port}", "GENSERVE_TRITON_TIMEOUT_S": "20"},
        tmp_path_factory.mktemp("service_triton"))


@pytest.fixture(scope="session")
def random_sd(tmp_path_factory):
    """(folder, repository) for a randomly initialised SD-format folder unlike the demo."""
    from export.stable_diffusion import export_stable_diffusion
    from tests.fixtures.sd_folder import build_random_sd_folder

    folder = build_random_sd_folder(tmp_path_factory.mktemp("sd_random"))
    repo = tmp_path_factory.mktemp("sd_random_repository")
    export_stable_diffusion(folder, repo, "sd_random", progress=lambda _: None)
    return folder, repo


@pytest.fixture(scope="session")
def lora_repositories(random_sd, tmp_path_factory):
    """(folder, LoRA files as published, repository with adapters but no slots, the same with
    slots): random_sd with a PEFT-format and a kohya-format LoRA stored (`export lora`) as
    `peft` and `kohya`, and its U-Net and text encoder given adapter slots (`export lora-slots`)."""
    import shutil

    import export.torchvision_compat  # noqa: F401
    from export.__main__ import main
    from export.lora import export_lora
    from tests.fixtures.lora_files import write_kohya_lora, write_peft_lora

    folder, exported = random_sd
    tmp = tmp_path_factory.mktemp("lora_repositories")
    plain = tmp / "plain"  # a copy: other modules may add adapters to random_sd's
    shutil.copytree(exported, plain, ignore=shutil.ignore_patterns("adapters", "model_lora.onnx", "*_lora"))
    files = {"peft": write_peft_lora(folder, tmp / "peft"),
             "kohya": write_kohya_lora(folder, tmp / "kohya.safetensors")}
    for name, path in files.items():
        export_lora(path, plain, "sd_random", name, progress=lambda _: None)
    slotted = tmp / "slotted"
    shutil.copytree(plain, slotted)
    assert main(["lora-slots", "--pipeline", "sd_random", "--repository", str(slotted)]) == 0
    return folder, files, plain, slotted


# API keys of the shared keyed server: one per test module that spends its rate limit.
SERVER_KEYS = ("key-openai", "key-openai-rate", "key-openai-compat", "key-client", "key-client-rate",
               "key-playground")
KEYED_RATE_LIMIT = "30/min"


@pytest.fixture(scope="session")
def keyed_server(repository, tmp_path_factory):
    """A live service with API keys on (SERVER_KEYS) and GENSERVE_RATE_LIMIT=30/min per key:
    shared by the OpenAI SDK, client and playground tests."""
    folder = tmp_path_factory.mktemp("keyed_server")
    keys = folder / "keys.txt"
    keys.write_text("\n".join(SERVER_KEYS) + "\n")
    yield from running_server({"GENSERVE_MODEL_REPOSITORY": str(repository), "GENSERVE_BACKEND": "onnxruntime",
                               "GENSERVE_API_KEYS_FILE": str(keys), "GENSERVE_RATE_LIMIT": KEYED_RATE_LIMIT}, folder)


@pytest.fixture(scope="session")
def flux_export(tmp_path_factory):
    """(folder, repository) of a random FLUX-format folder exported by the detecting command, as
    users run it: `python -m export sd --folder F --name fx --max-sequence-length 16
    --native-size 24`. Its text encoders are saved in bfloat16, as FLUX.1's are. Shared by the
    export and service tests (an export takes ~25 s)."""
    import subprocess
    import sys

    from tests.fixtures.flux_folder import build_random_flux_folder

    folder = build_random_flux_folder(tmp_path_factory.mktemp("flux"), seed=2, t5_max_length=64,
                                      text_encoder_dtype="bfloat16")
    repo = tmp_path_factory.mktemp("flux_repo")
    run = subprocess.run([sys.executable, "-m", "export", "sd", "--folder", str(folder), "--name", "fx",
                          "--repository", str(repo), "--max-sequence-length", "16", "--native-size", "24"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fx: flux, 5 graphs verified" in run.stdout
    return folder, repo


def pytest_generate_tests(metafunc):
    """A family test class's `bad_requests` parametrize its inherited refusal test
    (tests/fixtures/family_tests.py)."""
    if "bad_request" in metafunc.fixturenames:
        metafunc.parametrize("bad_request", metafunc.cls.bad_requests, ids=str)
