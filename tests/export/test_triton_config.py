"""Generated configs must be what Triton parses: checked with Triton's own proto."""

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.triton_config import (
    BatchingPolicy,
    DeploymentTarget,
    ModelConfigSpec,
    TensorSpec,
    build_model_config,
    config_to_text,
    default_batching,
    write_model_config,
)


def _spec(**overrides) -> ModelConfigSpec:
    args = dict(
        name="cgan",
        inputs=[TensorSpec("z", "float32", (64,)), TensorSpec("class_label", "int64", (1,), reshape=())],
        outputs=[TensorSpec("image", "float32", (1, 32, 32))],
        batching=default_batching(16, 2000),
        parameters={"genserve.pipeline": "gan", "genserve.latent_dim": "64"},
    )
    args.update(overrides)
    return ModelConfigSpec(**args)


def test_config_round_trips_through_triton_text_format(tmp_path):
    path = write_model_config(build_model_config(_spec()), tmp_path / "cgan")
    parsed = text_format.Parse(path.read_text(), mc.ModelConfig())

    assert parsed.name == "cgan"
    assert parsed.backend == "onnxruntime"
    assert parsed.max_batch_size == 16
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 2000
    assert parsed.version_policy.latest.num_versions == 1
    assert [(g.kind, g.count) for g in parsed.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    z, label = parsed.input
    assert (z.name, z.data_type, list(z.dims)) == ("z", mc.TYPE_FP32, [64])
    assert not z.HasField("reshape")
    assert (label.data_type, list(label.dims)) == (mc.TYPE_INT64, [1])
    assert label.HasField("reshape") and list(label.reshape.shape) == []
    assert list(parsed.output[0].dims) == [1, 32, 32]
    assert parsed.parameters["genserve.latent_dim"].string_value == "64"
    (warmup,) = parsed.model_warmup
    assert warmup.batch_size == 1 and warmup.inputs["z"].zero_data
    assert list(warmup.inputs["class_label"].dims) == [1]


def test_gpu_target_and_instance_count():
    config = build_model_config(_spec(target=DeploymentTarget("gpu", 2)))
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2)]


def test_unbatched_model_has_no_dynamic_batching():
    text = config_to_text(build_model_config(_spec(batching=BatchingPolicy(0))))
    assert "dynamic_batching" not in text
    assert text_format.Parse(text, mc.ModelConfig()).max_batch_size == 0


@pytest.mark.parametrize("max_batch, sizes", [(1, ()), (4, (4,)), (12, (4, 8, 12)), (64, (4, 8, 16, 32, 64))])
def test_preferred_batch_sizes_never_exceed_the_maximum(max_batch, sizes):
    assert default_batching(max_batch, 100).preferred_batch_sizes == sizes


def test_bad_dtype_and_target_are_rejected():
    with pytest.raises(ValueError, match="no Triton type"):
        build_model_config(_spec(outputs=[TensorSpec("image", "complex64", (1,))]))
    with pytest.raises(ValueError, match="'cpu' or 'gpu'"):
        DeploymentTarget("tpu")


def test_warmup_uses_given_sizes_for_dynamic_dims():
    spec = _spec(inputs=[TensorSpec("sample", "float32", (4, -1, -1)), TensorSpec("t", "float32", (1,), reshape=())],
                 warmup_dims={"sample": (4, 8, 8)})
    (warmup,) = build_model_config(spec).model_warmup
    assert list(warmup.inputs["sample"].dims) == [4, 8, 8]
    assert list(warmup.inputs["t"].dims) == [1]
