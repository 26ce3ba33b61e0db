"""The service on GENSERVE_BACKEND=triton against a real tritonserver: same images as the
embedded backend, Triton's dynamic batching at work, and an outage turned into 503s the
service recovers from by itself."""

import base64
import io
import re
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.images import psnr
from tests.fixtures.triton import start_triton

pytestmark = pytest.mark.server


def pixels(body: dict) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(i["data"])))) for i in body["images"]])


def post(service, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{service.url}{path}", json=body, timeout=120)


@pytest.mark.parametrize("body", [
    {"model": "cgan_digits", "seed": 3, "num_images": 5, "class_label": 8, "truncation_psi": 0.8},
    {"model": "dcgan_digits", "seed": 9, "num_images": 3},
])
def test_gan_images_equal_the_embedded_backend(server, triton_service, body):
    embedded, remote = post(server, "/v1/gan/generate", body), post(triton_service, "/v1/gan/generate", body)
    assert embedded.status_code == remote.status_code == 200, remote.text
    assert remote.json()["backend"] == "triton"
    assert psnr(pixels(embedded.json()), pixels(remote.json())) >= 50


@pytest.mark.parametrize("cache_interval", [1, 3])
def test_txt2img_equals_the_embedded_backend(server, triton_service, cache_interval):
    """At 3, DeepCache: Triton serves the shallow U-Net and the full one's deep features too."""
    body = {"prompt": "a handwritten digit four", "seed": 4, "num_images": 2, "num_inference_steps": 10,
            "guidance_scale": 4.0, "scheduler": "euler", "cache_interval": cache_interval}
    embedded, remote = post(server, "/v1/txt2img", body), post(triton_service, "/v1/txt2img", body)
    assert embedded.status_code == remote.status_code == 200, remote.text
    assert psnr(pixels(embedded.json()), pixels(remote.json())) >= 50


def test_the_service_sends_tensors_through_shared_memory(triton, triton_service):
    """Same host, GENSERVE_TRITON_SHARED_MEMORY unset (auto): negotiated at start-up, the
    denoiser's calls go through regions Triton holds (the images above equal the embedded
    backend's), and /metrics says so."""
    body = {"prompt": "a handwritten digit one", "seed": 1, "num_inference_steps": 4}
    assert post(triton_service, "/v1/txt2img", body).status_code == 200
    metrics = httpx.get(f"{triton_service.url}/metrics", timeout=10).text
    assert re.search(r"^genserve_triton_shared_memory_active(\{[^}]*\})? 1\.0$", metrics, re.MULTILINE), metrics
    calls = re.search(r'^genserve_triton_calls_total\{model="sd_digits_unet",transport="shared_memory"\} (\S+)$',
                      metrics, re.MULTILINE)
    assert calls and float(calls.group(1)) >= 4
    assert 'transport="socket"' not in metrics
    models = httpx.get(f"{triton_service.url}/v1/models", timeout=10).json()
    assert models["backend"] == "triton"
    status = models["triton_shared_memory"]
    assert status["mode"] == "auto" and status["transport"] == "shared_memory", status
    assert status["regions"] >= 1 and status["shared_memory_calls"] >= 4 and status["socket_calls"] == 0
    client = triton.grpc()
    try:
        regions = client.get_system_shared_memory_status(as_json=True).get("regions", {})
    finally:
        client.close()
    assert any(name.startswith("genserve-") for name in regions)


def _counter(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} for {model} missing from Triton's metrics"
    return float(match.group(1))


def test_concurrent_requests_are_batched_by_triton(triton, triton_service):
    before = triton.metrics()
    barrier, statuses = threading.Barrier(8), []

    def client(i):
        barrier.wait()
        for j in range(4):
            statuses.append(post(triton_service, "/v1/gan/generate",
                                 {"seed": 100 * i + j, "class_label": i % 10}).status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 32
    deadline = time.monotonic() + 10
    while True:  # Triton updates its counters just after responding
        after = triton.metrics()
        inferences = (_counter(after, "nv_inference_count", "cgan_digits")
                      - _counter(before, "nv_inference_count", "cgan_digits"))
        if inferences >= 32 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    executions = (_counter(after, "nv_inference_exec_count", "cgan_digits")
                  - _counter(before, "nv_inference_exec_count", "cgan_digits"))
    assert inferences == 32
    assert executions < inferences, f"{executions} executions for {inferences} inferences: no batching"


def test_triton_outage_gives_503_and_the_service_recovers(triton, triton_service, repository, tmp_path):
    body = {"seed": 1, "num_images": 2, "class_label": 2}
    assert post(triton_service, "/v1/gan/generate", body).status_code == 200
    triton.kill()
    down = post(triton_service, "/v1/gan/generate", body)
    assert down.status_code == 503
    error = down.json()["error"]
    assert error["code"] == "backend_unavailable" and "Triton" in error["message"]
    # Where Triton runs and what gRPC said are for the operator's log, not for clients.
    address = f"127.0.0.1:{triton.grpc_port}"
    assert address not in down.text and "ipv4" not in down.text and "Connection refused" not in down.text
    assert address in triton_service.logs()
    ready = httpx.get(f"{triton_service.url}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    assert int(ready.headers["retry-after"]) >= 1

    restarted = start_triton(repository, tmp_path, ports=triton.ports)
    try:
        deadline = time.monotonic() + 30
        while (r := post(triton_service, "/v1/gan/generate", body)).status_code != 200:
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(0.5)
        assert httpx.get(f"{triton_service.url}/readyz", timeout=10).status_code == 200
    finally:
        triton.proc = restarted.proc  # the module fixture stops whichever server runs now
        triton.log_path = restarted.log_path
