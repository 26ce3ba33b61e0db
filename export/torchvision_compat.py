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

Not only our code imports torchvision: `from diffusers import StableDiffusionPipeline` does,
through transformers' image processors, in any process of the environment. So the install
(`make install`) also writes a startup file, `genserve_torchvision.pth`, into the
environment's site-packages (`python -m export.torchvision_compat`): at interpreter start it
loads this file alone (by path, not the `export` package: nothing heavy is imported) and puts
an import hook first on `sys.meta_path`, whose loader defines the schemas just before
torchvision's own code runs, whoever imports it. A process that never imports torchvision
pays nothing but reading this file. There is no cleaner
way here: no CPU build of torchvision 0.28 installs from the registries this project reaches
(PyPI's is CUDA-built; 0.29 has the same unguarded registrations and pairs with torch 2.14),
and spandrel cannot be imported without torchvision.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

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


def define_unguarded_schemas() -> None:
    """Defines the op schemas torchvision's fake registrations need, when its C extension cannot
    load and nothing defined them yet (idempotent: the startup hook's loader and
    `import_torchvision` may both get here)."""
    global _library
    import torch

    if _extension_loads():
        return
    for schema in _UNGUARDED_SCHEMAS:
        if torch._C._jit_get_schemas_for_operator(f"torchvision::{schema.split('(')[0]}"):
            continue
        if _library is None:
            _library = torch.library.Library("torchvision", "DEF")  # schemas only, no kernels
        _library.define(schema)


def import_torchvision():
    """`import torchvision`, defining the unguarded op schemas first when its C ops cannot load."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        return None
    define_unguarded_schemas()
    import torchvision

    return torchvision


class _PrepareTorchvision(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: finds `torchvision` as the other finders do, with a loader that
    defines the schemas just before torchvision's own code runs (a mere look-up, such as
    transformers' find_spec probe, defines nothing)."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = _SchemasFirst(spec.loader)
                    return spec
        return None


class _SchemasFirst(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        define_unguarded_schemas()
        self.loader.exec_module(module)

    def __getattr__(self, name):  # resource readers and the like: the real loader's
        return getattr(self.loader, name)


def install_import_hook() -> None:
    if "torchvision" not in sys.modules and not any(type(f).__name__ == "_PrepareTorchvision" for f in sys.meta_path):
        sys.meta_path.insert(0, _PrepareTorchvision())


STARTUP_FILE = "genserve_torchvision.pth"


def startup_line(module_path: str = __file__) -> str:
    """The .pth line: loads this file by path as a stand-alone module and installs the hook;
    nothing when the file is gone (the checkout moved)."""
    return (f"import importlib.util as _gu, os as _go; _gp = {str(Path(module_path).resolve())!r}; "
            f"_gs = _go.path.exists(_gp) and _gu.spec_from_file_location('genserve_torchvision_hook', _gp); "
            f"_gm = _gs and _gu.module_from_spec(_gs); _gs and _gs.loader.exec_module(_gm); "
            f"_gm and _gm.install_import_hook()\n")


def write_startup_file(site_dir: str | Path) -> Path:
    path = Path(site_dir) / STARTUP_FILE
    path.write_text(startup_line())
    return path


def import_spandrel():
    """spandrel, with torchvision imported the way above."""
    import_torchvision()
    import spandrel

    return spandrel


if __name__ == "__main__":  # make install: the startup file in this environment's site-packages
    import sysconfig

    print(f"wrote {write_startup_file(sysconfig.get_paths()['purelib'])}")
