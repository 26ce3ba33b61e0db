"""Importing spandrel (which imports torchvision) beside the CPU build of torch.

The fact: spandrel 0.4.2 imports `torchvision.transforms.functional` at import time (for
its LaMa and RestoreFormer architectures only, neither a super-resolution one), and
`import torchvision` fails here with `RuntimeError: operator torchvision::nms does not
exist`. The cause, checked with ldd: PyPI's torchvision 0.28.0 wheel (the release paired
with torch 2.13.0) ships a C extension `_C.so` linked against libtorch_cuda.so and
libc10_cuda.so, which the CPU build of torch does not have. torchvision notices that
(`torchvision.extension._has_ops()` is False) and skips registering its ops, except in
`torchvision/_meta_registrations.py`, where two `torch.library.register_fake(...)`
decorators (for `torchvision::nms` and `torchvision::qnms`) run unconditionally and need
the operators' schemas, which only the C extension would have defined.

The way through, with nothing installed by hand: when (and only when) the C extension
cannot load, define those two schemas (the same signatures torchvision's C++ declares)
before importing torchvision. Then torchvision imports; its pure-Python parts (the
transforms spandrel uses) work; its C ops have schemas but no kernels, so calling one
raises torchvision's own "Couldn't load custom C++ ops" error. No super-resolution
architecture calls them. Where a matching torchvision is installed (a CUDA torch with
its torchvision, or a CPU pair from PyTorch's own index), its C extension loads and
nothing here changes anything.
"""

from __future__ import annotations

import importlib.util
import sys

# Ops torchvision 0.28's _meta_registrations registers without checking _has_ops().
_UNGUARDED_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: dropping a torch.library.Library removes its definitions


def _extension_loads() -> bool:
    """Whether torchvision's C extension loads beside this torch (without importing torchvision)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = spec.submodule_search_locations[0]
    import glob

    candidates = glob.glob(f"{folder}/_C*.so") + glob.glob(f"{folder}/_C*.pyd")
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError):
        return False
    return True


def import_torchvision():
    """`import torchvision`, defining the unguarded op schemas first when its C ops cannot load."""
    global _library
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        return None
    import torch

    if _library is None and not _extension_loads():
        _library = torch.library.Library("torchvision", "DEF")  # noqa: TOR  (schemas only, no kernels)
        for schema in _UNGUARDED_SCHEMAS:
            _library.define(schema)
    import torchvision

    return torchvision


def import_spandrel():
    """spandrel, with torchvision imported the way above."""
    import_torchvision()
    import spandrel

    return spandrel
