"""Export trained checkpoints to ONNX, verify them against PyTorch, and write a Triton
model repository (`model_repository/`) that both serving backends read.

Torch is imported here (and in zoo/), never in services/.
"""

# transformers and diffusers import torchvision when it is installed (spandrel needs it), and
# PyPI's torchvision fails to import beside the CPU torch unless export/torchvision_compat.py
# prepares it first: every torch-side entry point goes through this package, so it is done here.
try:
    from export.torchvision_compat import import_torchvision as _import_torchvision

    _import_torchvision()
except ImportError:  # no torch here (the serving side never needs it)
    pass
