"""A real Triton (CPU, from nvidia-pytriton) serves the model repository unchanged.

The configs say ``backend: "onnxruntime"``; here that resolves to the Python-based
backend in deploy/triton_cpu/backends/onnxruntime/model.py. These tests start
``deploy/triton_cpu/launch.py`` in foreground mode (so the child *is* tritonserver)
on free loopback ports and talk to it with tritonclient, like any Triton client would.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from services.pipelines.controlnet import zero_residuals
from services.runtime.repository import ModelRepository
from tests.fixtures.triton import TritonProcess, start_triton

pytestmark = pytest.mark.server

@pytest.fixture(scope="module")
def triton_repository(repository, tmp_path_factory) -> Path:
    """A private copy of the repository `make model-repository` builds."""
    copy = tmp_path_factory.mktemp("triton_repo") / "model_repository"
    shutil.copytree(repository, copy)
    return copy


@pytest.fixture(scope="module")
def triton(triton_repository, tmp_path_factory):
    server = start_triton(triton_repository, tmp_path_factory.mktemp("triton_work"))
    try:
        yield server
    finally:
        code = server.terminate()
        assert code == 0, f"tritonserver exited with {code} on SIGTERM:\n{server.logs()}"


# --- helpers ---------------------------------------------------------------------------

def _config(triton: TritonProcess, model: str) -> dict:
    return triton.grpc().get_model_config(model, as_json=True)["config"]


def _random_inputs(config: dict, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Valid inputs in the config's dims (as a Triton client sends them)."""
    classes = int(config["parameters"].get("genserve.num_classes", {}).get("string_value", "10") or 10)
    feeds = {}
    for spec in config["input"]:
        shape = [batch] + [int(d) for d in spec["dims"]]
        dtype = triton_to_np_dtype(spec["data_type"].removeprefix("TYPE_"))
        if np.issubdtype(dtype, np.integer):
            feeds[spec["name"]] = rng.integers(0, max(classes, 1), size=shape).astype(dtype)
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _infer(client, model: str, feeds: dict[str, np.ndarray], output: str = "image") -> np.ndarray:
    inputs = []
    for name, array in feeds.items():
        tensor = grpcclient.InferInput(name, list(array.shape), _triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(output)])
    return result.as_numpy(output)


def _triton_dtype(dtype) -> str:
    return {np.float32: "FP32", np.float64: "FP64", np.int64: "INT64", np.int32: "INT32"}[np.dtype(dtype).type]


def _onnx_reference(repository: Path, model: str, config: dict, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """ONNX Runtime run directly on the same model.onnx, inputs reshaped as the config says."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    graph_feeds = {}
    for spec in config["input"]:
        array = feeds[spec["name"]]
        if "reshape" in spec:
            array = array.reshape([array.shape[0]] + [int(d) for d in spec["reshape"].get("shape", [])])
        graph_feeds[spec["name"]] = array
    return session.run(["image"], graph_feeds)[0]


def _metric(triton: TritonProcess, name: str, model: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{triton.metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} for {model} not in metrics:\n{text[:2000]}"
    return float(match.group(1))


def _gan_models(triton: TritonProcess) -> list[str]:
    """The generators (input z, output image [C, H, W] as their configs say) the inference checks use."""
    return [m for m in triton.models
            if _config(triton, m)["parameters"].get("genserve.pipeline", {}).get("string_value") == "gan"]


def _image_dims(config: dict) -> tuple[int, ...]:
    return tuple(int(d) for d in next(o for o in config["output"] if o["name"] == "image")["dims"])


# --- tests -----------------------------------------------------------------------------

def test_models_ready_with_their_config_unchanged(triton):
    client = triton.grpc()
    assert triton.models, "repository has no models"
    for model in triton.models:
        assert client.is_model_ready(model), triton.logs()
        served = _config(triton, model)
        on_disk = text_format.Parse((triton.repository / model / "config.pbtxt").read_text(),
                                    model_config_pb2.ModelConfig())
        assert served["backend"] == "onnxruntime"
        assert served["max_batch_size"] == 16
        assert "dynamic_batching" in served
        assert served["instance_group"][0]["kind"] == "KIND_CPU"
        genserve = {k: v["string_value"] for k, v in served["parameters"].items() if k.startswith("genserve.")}
        assert genserve, "no genserve.* parameters served"
        assert genserve == {k: v.string_value for k, v in on_disk.parameters.items() if k.startswith("genserve.")}


def test_grpc_inference_matches_onnxruntime(triton):
    rng = np.random.default_rng(0)
    client = triton.grpc()
    assert _gan_models(triton)
    for model in _gan_models(triton):
        config = _config(triton, model)
        feeds = _random_inputs(config, batch=3, rng=rng)
        image = _infer(client, model, feeds)
        expected = _onnx_reference(triton.repository, model, config, feeds)
        assert image.shape == (3, *_image_dims(config)) == expected.shape
        np.testing.assert_allclose(image, expected, atol=1e-6, rtol=1e-6)


def test_bad_input_is_an_error_response_not_a_crash(triton):
    model = _gan_models(triton)[0]
    config = _config(triton, model)
    client = triton.grpc()
    good = _random_inputs(config, batch=2, rng=np.random.default_rng(1))
    first = config["input"][0]["name"]
    wrong_dtype = {**good, first: good[first].astype(np.float64 if good[first].dtype != np.float64 else np.float32)}
    wrong_shape = {**good, first: good[first][:, :-1]}
    too_big = _random_inputs(config, batch=17, rng=np.random.default_rng(2))  # max_batch_size is 16
    for bad in (wrong_dtype, wrong_shape, too_big):
        with pytest.raises(InferenceServerException):
            _infer(client, model, bad)
    assert triton.proc.poll() is None, triton.logs()
    assert client.is_server_ready() and client.is_model_ready(model)
    assert _infer(client, model, good).shape == (2, *_image_dims(config))


def test_backend_error_stays_with_its_request(triton):
    """An input Triton accepts but the graph rejects (class label out of range) fails in
    ONNX Runtime inside our backend: that request gets an error, its batch-mates do not."""
    model = next((m for m in _gan_models(triton)
                  if any(i["data_type"] == "TYPE_INT64" for i in _config(triton, m)["input"])), None)
    if model is None:
        pytest.skip("no model with an integer input")
    config = _config(triton, model)
    label = next(i["name"] for i in config["input"] if i["data_type"] == "TYPE_INT64")
    feeds = _random_inputs(config, batch=8, rng=np.random.default_rng(5))
    feeds[label][3] = 10**6
    try:
        _onnx_reference(triton.repository, model, config, {n: a[3:4] for n, a in feeds.items()})
        pytest.skip(f"{model} accepts out-of-range labels")
    except Exception:  # ORT rejects it: Triton must too
        pass
    outcome: dict[int, object] = {}
    start = threading.Barrier(8)

    def one(i: int) -> None:
        client = triton.grpc()
        start.wait()
        try:
            outcome[i] = _infer(client, model, {n: a[i:i + 1] for n, a in feeds.items()})
        except InferenceServerException as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert isinstance(outcome[3], InferenceServerException) and "ONNXRuntimeError" in str(outcome[3])
    good = [i for i in range(8) if i != 3]
    expected = _onnx_reference(triton.repository, model, config, {n: a[good] for n, a in feeds.items()})
    np.testing.assert_allclose(np.concatenate([outcome[i] for i in good]), expected, atol=1e-6, rtol=1e-6)
    assert triton.proc.poll() is None, triton.logs()


def test_concurrent_batch1_requests_are_batched(triton):
    """8 clients x 6 batch-1 requests: fewer executions than inferences, right answers."""
    model = _gan_models(triton)[0]
    config = _config(triton, model)
    clients, per_client = 8, 6
    feeds = _random_inputs(config, batch=clients * per_client, rng=np.random.default_rng(3))
    expected = _onnx_reference(triton.repository, model, config, feeds)
    results = np.full_like(expected, np.nan)
    errors: list[BaseException] = []
    start = threading.Barrier(clients)

    def client_loop(c: int) -> None:
        try:
            client = triton.grpc()
            start.wait()
            for k in range(per_client):
                i = c * per_client + k
                results[i] = _infer(client, model, {n: a[i:i + 1] for n, a in feeds.items()})[0]
        except BaseException as exc:  # reported below
            errors.append(exc)

    count0 = _metric(triton, "nv_inference_count", model)
    exec0 = _metric(triton, "nv_inference_exec_count", model)
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    # Triton updates its counters just after sending a response: let them catch up.
    deadline = time.monotonic() + 10
    while (_metric(triton, "nv_inference_count", model) - count0 < clients * per_client
           and time.monotonic() < deadline):
        time.sleep(0.1)
    inferences = _metric(triton, "nv_inference_count", model) - count0
    executions = _metric(triton, "nv_inference_exec_count", model) - exec0
    print(f"{model}: {inferences:.0f} inferences in {executions:.0f} executions")
    assert inferences == clients * per_client
    assert executions < inferences, "the dynamic batcher never grouped requests"
    # Splitting the batch back must hand every request its own image.
    np.testing.assert_allclose(results, expected, atol=1e-6, rtol=1e-6)


def test_each_request_gets_the_outputs_it_asked_for(triton):
    """The U-Net has two outputs (noise_pred, and DeepCache's deep_features): concurrent
    requests asking for one or both, batched together by Triton, each get exactly theirs."""
    import onnxruntime as ort

    model = "sd_digits_unet"
    config = _config(triton, model)
    assert [o["name"] for o in config["output"]] == ["noise_pred", "deep_features"]
    rng = np.random.default_rng(5)
    feeds = [{"sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32),
              "timestep": rng.uniform(0, 999, (1, 1)).astype(np.float32),
              "encoder_hidden_states": rng.standard_normal((1, 16, 64), dtype=np.float32),
              **zero_residuals(ModelRepository(triton.repository).models[model], 1, 8, 8)} for _ in range(12)]
    session = ort.InferenceSession(str(triton.repository / model / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    wanted = [["noise_pred"] if i % 2 else ["noise_pred", "deep_features"] for i in range(12)]
    got: dict[int, dict] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            inputs = []
            for name, array in feeds[i].items():
                tensor = grpcclient.InferInput(name, list(array.shape), _triton_dtype(array.dtype))
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            result = triton.grpc().infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in wanted[i]])
            got[i] = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, outputs in got.items():
        assert sorted(outputs) == sorted(wanted[i])
        graph = {**feeds[i], "timestep": feeds[i]["timestep"].reshape(1)}
        for name, value in zip(["noise_pred", "deep_features"], session.run(["noise_pred", "deep_features"], graph)):
            if name in outputs:
                np.testing.assert_allclose(outputs[name], value, atol=1e-5)
    assert len(got) == 12


def test_sigterm_stops_it_cleanly(triton_repository, tmp_path_factory):
    """A server of its own, so stopping it does not depend on test order."""
    server = start_triton(triton_repository, tmp_path_factory.mktemp("triton_stop"))
    try:
        client = server.grpc()
        model = server.models[0]
        _infer(client, model, _random_inputs(_config(server, model), 1, np.random.default_rng(4)))
        started = time.monotonic()
        code = server.terminate()
        print(f"ready in {server.ready_s:.1f}s; stopped in {time.monotonic() - started:.1f}s")
    finally:
        server.kill()
    assert code == 0, server.logs()
    log = server.logs()
    assert "successfully unloaded" in log and "Segmentation fault" not in log, log
