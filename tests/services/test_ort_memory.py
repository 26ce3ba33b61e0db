"""The embedded backend's memory policy per graph: image-to-image graphs run without ONNX
Runtime's arena, graphs whose export recorded large activations per row shrink it after each
call (a real-size U-Net held gigabytes after one request otherwise: bench/results/real_scale.md),
small graphs keep it. Same outputs whichever way."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np

from services.engine.memory import ACTIVATION_BYTES_PARAMETER
from services.runtime.onnxruntime_backend import ARENA_MAX_ROW_BYTES, OnnxRuntimeBackend, shrinks_arena
from services.runtime.repository import ModelRepository

MODEL = "cgan_digits"


def with_activation(repository, tmp_path, row_bytes: int):
    """A copy of MODEL whose config records `row_bytes` of activations per row."""
    from google.protobuf import text_format

    from services.runtime.repository import parse_model_config

    repo = tmp_path / "repo"
    shutil.copytree(repository / MODEL, repo / MODEL)
    path = repo / MODEL / "config.pbtxt"
    config = parse_model_config(path.read_text())
    config.parameters[ACTIVATION_BYTES_PARAMETER].string_value = str(row_bytes)
    path.write_text(text_format.MessageToString(config))
    return ModelRepository(repo)


def test_large_activations_shrink_the_arena_after_each_call_with_the_same_outputs(repository, tmp_path):
    small = ModelRepository(repository)
    assert not shrinks_arena(small[MODEL])
    large = with_activation(repository, tmp_path, ARENA_MAX_ROW_BYTES)
    assert large[MODEL].parameters[ACTIVATION_BYTES_PARAMETER] == str(ARENA_MAX_ROW_BYTES)
    assert shrinks_arena(large[MODEL])
    backends = [OnnxRuntimeBackend(small), OnnxRuntimeBackend(large)]
    assert MODEL not in backends[0]._shrinking and MODEL in backends[1]._shrinking
    options = []
    session = backends[1]._sessions[MODEL]
    real_run = session.run

    class Recording:
        def run(self, names, feeds, run_options=None):
            options.append(run_options)
            return real_run(names, feeds, run_options)

    backends[1]._sessions[MODEL] = Recording()
    spec = small[MODEL]
    feeds = {t.name: np.zeros((2, *t.dims), t.dtype) for t in spec.inputs}
    plain, shrunk = (asyncio.run(b.infer(MODEL, feeds)) for b in backends)
    for name in plain:
        np.testing.assert_array_equal(plain[name], shrunk[name])
    assert options and options[0] is not None
    assert options[0].get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"


def test_image_to_image_graphs_run_without_the_arena_and_do_not_shrink(repository):
    repo = ModelRepository(repository)
    upscalers = [s for s in repo.models.values() if s.parameters.get("genserve.pipeline") == "image_to_image"]
    assert upscalers
    assert not any(shrinks_arena(s) for s in upscalers)
