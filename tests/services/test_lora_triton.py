"""LoRA adapters on the Triton backend: a real tritonserver on conftest's lora_repositories
(the slotted repository: `export lora-slots` writes `<model>_lora`, the slotted graph as Triton
serves it). Images equal the embedded backend's for the same requests, alone and batched with
different adapter sets; calls without adapters go to the plain model; the adapters' factors
are registered once per combination and named by every call, not sent with each."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from services.engine.engine import DiffusionEngine, EngineConfig
from services.engine.request import RequestStatus
from services.pipelines.pipeline_stable_diffusion import (
    DiffusionRequest,
    StableDiffusionPipeline,
    discover_stable_diffusion,
)
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from services.runtime.triton_backend import TritonBackend
from services.runtime.triton_shm import SHM_DIR
from tests.conftest import running_server
from tests.fixtures.engine import drain
from tests.fixtures.images import psnr, to_uint8
from tests.fixtures.triton import start_triton

pytestmark = [pytest.mark.server, pytest.mark.slow]
UNET = "sd_random_unet"
SETS = [[], [("peft", 0.8)], [("kohya", 0.6)], [("peft", 0.3), ("kohya", 1.2)]]


@pytest.fixture(scope="module")
def slotted(lora_repositories):
    return lora_repositories[3]


@pytest.fixture(scope="module")
def triton(slotted, tmp_path_factory):
    server = start_triton(slotted, tmp_path_factory.mktemp("triton_lora"))
    yield server
    server.terminate()


def pipeline_on(backend) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline(backend, discover_stable_diffusion(backend.models())["sd_random"])
    pipeline.adapters.library.preload()
    return pipeline


def req(lora=(), seed=7) -> DiffusionRequest:
    return DiffusionRequest(prompt="a photo of a red cat", negative_prompt="blue", num_inference_steps=3,
                            guidance_scale=5.0, seed=seed, lora=list(lora))


def executions(triton, model: str) -> int:
    client = triton.grpc()
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
    finally:
        client.close()
    return sum(int(s.get("execution_count", 0)) for s in stats)


@pytest.fixture(scope="module")
def embedded(slotted):
    """The same requests on the embedded backend: the reference."""
    pipeline = pipeline_on(OnnxRuntimeBackend(ModelRepository(slotted)))
    return [asyncio.run(pipeline(req(lora, seed=7 + i))).images for i, lora in enumerate(SETS)]


def test_the_repository_lists_the_slotted_graph_under_the_model_it_serves(slotted):
    repository = ModelRepository(slotted)
    assert f"{UNET}_lora" not in repository.models  # not a model of its own to pipelines
    spec = repository.adapter_slots[UNET]
    assert spec.name == f"{UNET}_lora" and spec.max_batch_size == 0
    names = {t.name for t in spec.inputs}
    assert "lora_scale" in names and any(n.startswith("lora_down:") for n in names)
    plain = repository[UNET]
    assert {t.name for t in plain.inputs} <= names
    # The graph is the one the embedded backend serves, linked rather than copied.
    linked, beside = spec.model_file, plain.model_file.with_name("model_lora.onnx")
    assert linked.stat().st_ino == beside.stat().st_ino


def test_images_with_adapters_on_triton_equal_the_embedded_backend(triton, slotted, embedded):
    url = f"127.0.0.1:{triton.grpc_port}"

    async def scenario(shared_memory: str):
        backend = TritonBackend(ModelRepository(slotted), url, shared_memory=shared_memory)
        try:
            pipeline = pipeline_on(backend)
            assert pipeline.adapters.serves  # lora is accepted on Triton now
            lora_before, plain_before = executions(triton, f"{UNET}_lora"), executions(triton, UNET)
            images = [(await pipeline(req(lora, seed=7 + i))).images for i, lora in enumerate(SETS)]
            # Without adapters the plain model ran (3 steps); with them, its slotted graph.
            assert executions(triton, UNET) - plain_before == 3
            assert executions(triton, f"{UNET}_lora") - lora_before == 3 * (len(SETS) - 1)
            return images, backend.shared_memory_status()
        finally:
            await backend.close()

    for mode in ("auto", "off"):
        images, status = asyncio.run(scenario(mode))
        for lora, got, want in zip(SETS, images, embedded):
            assert psnr(got, want, peak=2.0) >= 60, (mode, lora)
        if mode == "auto":
            assert status["transport"] == "shared_memory", status["reason"]
            # One registration per adapter set and slotted graph it acts on (U-Net, text encoder),
            # for all the steps of a request: the factors are not sent per call.
            assert 1 <= status["adapter_factor_registrations"] <= 2 * (len(SETS) - 1)
        else:
            assert status["adapter_factor_registrations"] == 0


def test_different_adapter_sets_batched_on_triton_equal_each_alone(triton, slotted, embedded):
    """One slotted U-Net call per step for all four requests (one with no adapter), each image
    equal to its request alone; the batch's factors registered once for all its steps."""
    url = f"127.0.0.1:{triton.grpc_port}"

    async def batched():
        backend = TritonBackend(ModelRepository(slotted), url, shared_memory="auto")
        try:
            pipeline = pipeline_on(backend)
            engine = DiffusionEngine(pipeline, EngineConfig(32, 10_000), start_loop=False)
            handles = [engine.submit(req(lora, seed=7 + i), timeout_s=600) for i, lora in enumerate(SETS)]
            await drain(engine, handles)
            assert all(h.status == RequestStatus.FINISHED_DONE for h in handles)
            assert engine.iterations == 3
            status = backend.shared_memory_status()
            mine = [p for p in SHM_DIR.iterdir() if p.name.startswith(backend._pool.prefix)]
            assert mine and status["regions"] == len(mine)
            return [h.result.images for h in handles], status, backend._pool.prefix
        finally:
            await backend.close()

    images, status, prefix = asyncio.run(batched())
    # The U-Net's factors for the batch (all steps) and the text encoder's: two registrations.
    assert status["adapter_factor_registrations"] == 2
    assert status["socket_calls"] == 0
    assert not list(SHM_DIR.glob(prefix + "*")), "close() left pinned regions in /dev/shm"
    for lora, got, want in zip(SETS, images, embedded):
        assert psnr(got, want, peak=2.0) >= 60, lora


def test_a_service_on_triton_serves_lora_over_http(triton, slotted, tmp_path, embedded):
    """The whole path on GENSERVE_BACKEND=triton: the adapter list, a request naming adapters
    (the same image as the embedded backend's) and the registrations in GET /v1/models."""
    env = {"GENSERVE_MODEL_REPOSITORY": str(slotted), "GENSERVE_BACKEND": "triton",
           "GENSERVE_TRITON_URL": f"127.0.0.1:{triton.grpc_port}", "GENSERVE_TRITON_SHARED_MEMORY": "required"}
    service = running_server(env, tmp_path)
    server = next(service)
    try:
        listed = httpx.get(f"{server.url}/v1/adapters", timeout=30).json()
        assert {a["name"] for a in listed["adapters"]} >= {"peft", "kohya"}
        body = {"model": "sd_random", "prompt": "a photo of a red cat", "negative_prompt": "blue",
                "num_inference_steps": 3, "guidance_scale": 5.0, "seed": 7 + 3, "output_format": "png",
                "lora": [{"name": "peft", "scale": 0.3}, {"name": "kohya", "scale": 1.2}]}
        r = httpx.post(f"{server.url}/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["lora"] == body["lora"]
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["data"]))))
        assert psnr(image, to_uint8(embedded[3][0]).transpose(1, 2, 0)) >= 40
        status = httpx.get(f"{server.url}/v1/models", timeout=30).json()["triton_shared_memory"]
        assert status["transport"] == "shared_memory" and status["adapter_factor_registrations"] >= 1
    finally:
        next(service, None)
