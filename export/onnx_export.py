"""torch -> ONNX with a dynamic batch axis, then a parity check against PyTorch.

Every exported graph is verified (design principle 3): ONNX Runtime must reproduce the
PyTorch module on fresh random inputs within a tolerance, or the export fails loudly.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from export.errors import ParityError

log = logging.getLogger(__name__)

OPSET = 17


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    output_names: Sequence[str],
    path: Path,
    dynamic_axes: Mapping[str, Mapping[int, str]],
    dynamo: bool = False,
    large: bool = False,
) -> Path:
    """Exports `module(**example_inputs)` to `path` with the given dynamic axes.

    The TorchScript-based exporter is the default: it is fast, deterministic and handles the
    static-control-flow generators we export. `dynamo=True` takes the torch.export-based one
    (opset 18), for models whose Python shape arithmetic the tracer would freeze into
    constants (FLUX's rotary embeddings): axes sharing a name share one symbolic size.
    Inputs keep the names given here so the Triton config and the graph agree by construction.
    `large`: the weights pass protobuf's 2 GB (the dynamo exporter then writes them beside the
    graph; the TorchScript one does so by itself).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Inference mode for the whole tree: a wrapper module starts in training mode, and the
    # exporter restores the mode it found (recursively), which would re-enable dropout in
    # the wrapped model for the parity check that follows (T5 has dropout 0.1).
    module.eval()
    names = list(example_inputs)
    if dynamo:
        dims: dict[str, torch.export.Dim] = {}
        shapes = {n: {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in
                      dynamic_axes.get(n, {}).items()} for n in names}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (), kwargs=dict(example_inputs), dynamo=True, dynamic_shapes=shapes,
                                        input_names=names, output_names=list(output_names),
                                        opset_version=max(OPSET, 18), verbose=False)
        program.save(str(path), external_data=large)  # type: ignore[union-attr]  # stub: dynamo=True returns it
        return path
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        torch.onnx.export(
            module,
            tuple(example_inputs[n] for n in names),
            str(path),
            input_names=names,
            output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


def verify_onnx(
    module: torch.nn.Module,
    path: Path,
    inputs: Mapping[str, np.ndarray],
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> float:
    """Runs the graph in ONNX Runtime and the module in PyTorch on the same inputs.

    Returns the largest absolute difference over all outputs; raises ParityError when
    any element fails |onnx - torch| <= atol + rtol * |torch|.
    """
    import gc

    import onnxruntime as ort

    module.eval()
    # One engine at a time: the session (its copy of the weights, its buffers) is freed before
    # PyTorch runs, and without ONNX Runtime's arena its buffers go back when the run ends.
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    onnx_outputs = session.run(None, dict(inputs))
    output_names = [o.name for o in session.get_outputs()]
    del session
    gc.collect()
    with torch.no_grad():
        torch_outputs = module(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    if isinstance(torch_outputs, torch.Tensor):
        torch_outputs = (torch_outputs,)
    worst = 0.0
    for name, got, want in zip(output_names, onnx_outputs, torch_outputs):
        want = want.detach().numpy()
        if got.shape != want.shape:
            raise ParityError(f"{path}: output {name!r} has shape {got.shape}, PyTorch {want.shape}")
        err = np.abs(got.astype(np.float64) - want.astype(np.float64))
        worst = max(worst, float(err.max(initial=0.0)))
        bad = err > atol + rtol * np.abs(want)
        if bad.any():
            raise ParityError(
                f"{path}: output {name!r} differs from PyTorch in {int(bad.sum())} of {bad.size} "
                f"elements (max abs error {err.max():.3g}, tolerance atol={atol} rtol={rtol})"
            )
    log.debug("verified %s: max abs error %.3g", path, worst)
    return worst
