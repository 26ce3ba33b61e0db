"""Demo models trained in this repository on data that ships inside scikit-learn.

Torch lives here and in export/, never in services/.
"""

# transformers and diffusers import torchvision when it is installed (spandrel needs it), and
# PyPI's torchvision fails to import beside the CPU torch unless export/torchvision_compat.py
# prepares it first: every torch-side entry point goes through this package, so it is done here.
try:
    from export.torchvision_compat import import_torchvision as _import_torchvision

    _import_torchvision()
except ImportError:  # no torch here (the serving side never needs it)
    pass
