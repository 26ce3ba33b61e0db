"""GAN pipeline: per-image determinism, truncation, chunking, conditioning."""

import asyncio

import numpy as np
import pytest

from services.pipelines.pipeline_gan import GANPipeline, prepare_latents
from services.runtime.base import InferenceBackend
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository, ModelSpec, TensorInfo


class EchoGenerator(InferenceBackend):
    """A stand-in generator whose 'image' encodes its inputs, and records every call."""

    name = "echo"

    def __init__(self, max_batch_size=4, conditional=True):
        super().__init__()
        inputs = [TensorInfo("z", np.dtype(np.float32), (8,))]
        if conditional:
            inputs.append(TensorInfo("class_label", np.dtype(np.int64), (1,), reshape=()))
        self.spec = ModelSpec(
            "echo", "1", max_batch_size, tuple(inputs),
            (TensorInfo("image", np.dtype(np.float32), (1, 2, 4)),),
            {"genserve.latent_dim": "8", "genserve.num_classes": "10" if conditional else "0",
             "genserve.image_channels": "1", "genserve.image_size": "4"},
        )
        self.calls = []

    def models(self):
        return {"echo": self.spec}

    async def _execute(self, spec, inputs):
        self.calls.append({k: v.copy() for k, v in inputs.items()})
        z = inputs["z"]
        label = inputs.get("class_label", np.zeros((len(z), 1), np.int64)).astype(np.float32)
        return {"image": np.concatenate([z, np.repeat(label, 8, axis=1)], axis=1).reshape(-1, 1, 2, 8)}


def run(coro):
    return asyncio.run(coro)


def test_image_i_is_reproduced_alone_by_seed_plus_i():
    pipe = GANPipeline(EchoGenerator(), "echo")
    batch = run(pipe(seed=100, num_images=6, truncation_psi=0.7))
    for i in range(6):
        alone = run(pipe(seed=100 + i, num_images=1, truncation_psi=0.7))
        np.testing.assert_array_equal(batch.images[i], alone.images[0])
        assert alone.class_labels == [batch.class_labels[i]]
    assert batch.seeds == [100 + i for i in range(6)]


def test_latents_follow_the_documented_recipe():
    z, labels = prepare_latents(seed=7, num_images=2, latent_shape=8, truncation_psi=0.5, num_classes=10)
    rng = np.random.default_rng(8)
    np.testing.assert_array_equal(z[1], 0.5 * rng.standard_normal(8, dtype=np.float32))
    assert labels[1] == rng.integers(10)


def test_truncation_zero_gives_the_mean_latent():
    z, _ = prepare_latents(seed=1, num_images=3, latent_shape=8, truncation_psi=0.0)
    assert not z.any()


def test_calls_are_chunked_by_max_batch_size_with_wire_shapes():
    backend = EchoGenerator(max_batch_size=4)
    out = run(GANPipeline(backend, "echo")(seed=0, num_images=10, class_label=3))
    assert [len(c["z"]) for c in backend.calls] == [4, 4, 2]
    assert all(c["class_label"].shape == (len(c["z"]), 1) for c in backend.calls)
    assert out.images.shape == (10, 1, 2, 8) and out.class_labels == [3] * 10


def test_unconditional_model_gets_no_label_input():
    backend = EchoGenerator(conditional=False)
    out = run(GANPipeline(backend, "echo")(seed=0, num_images=2))
    assert set(backend.calls[0]) == {"z"} and out.class_labels is None


def test_observers_see_every_execution():
    backend = EchoGenerator(max_batch_size=4)
    seen = []
    backend.add_observer(lambda model, name, batch, seconds: seen.append((model, name, batch)))
    run(GANPipeline(backend, "echo")(seed=0, num_images=5))
    assert seen == [("echo", "echo", 4), ("echo", "echo", 1)]


def test_embedded_backend_rejects_what_triton_would_reject(repository):
    backend = OnnxRuntimeBackend(ModelRepository(repository))
    ok = {"z": np.zeros((2, 64), np.float32), "class_label": np.zeros((2, 1), np.int64)}
    assert run(backend.infer("cgan_digits", ok))["image"].shape == (2, 1, 32, 32)
    for bad, match in [
        ({"z": ok["z"]}, "inputs"),
        ({**ok, "class_label": ok["class_label"].astype(np.int32)}, "dtype"),
        ({**ok, "z": np.zeros((2, 63), np.float32)}, "dims"),
        ({**ok, "class_label": np.zeros((3, 1), np.int64)}, "disagree"),
    ]:
        with pytest.raises(ValueError, match=match):
            run(backend.infer("cgan_digits", bad))


def test_backend_splits_batches_past_the_model_limit(repository):
    backend = OnnxRuntimeBackend(ModelRepository(repository))
    sizes = []
    backend.add_observer(lambda model, name, batch, seconds: sizes.append(batch))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((17, 64), dtype=np.float32)
    labels = rng.integers(0, 10, (17, 1))
    whole = run(backend.infer("cgan_digits", {"z": z, "class_label": labels}))["image"]
    assert sizes == [16, 1] and whole.shape == (17, 1, 32, 32)
    last = run(backend.infer("cgan_digits", {"z": z[16:], "class_label": labels[16:]}))["image"]
    np.testing.assert_allclose(whole[16:], last, atol=1e-6)


@pytest.mark.parametrize("num_images", [1, 16])
def test_conditional_demo_generates_the_requested_digit(repository, classifier, num_images):
    pipe = GANPipeline(OnnxRuntimeBackend(ModelRepository(repository)), "cgan_digits")
    hits = 0
    for digit in range(10):
        out = run(pipe(seed=1000 * digit, num_images=num_images, class_label=digit))
        assert out.images.shape == (num_images, 1, 32, 32)
        assert -1.0 <= out.images.min() and out.images.max() <= 1.0
        hits += int((classifier(out.images) == digit).sum())
    assert hits / (10 * num_images) >= 0.8
