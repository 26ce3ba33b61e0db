"""The failures exporters raise on purpose, and what `python -m export` answers to each.

Every family raises these (never another family's own), so a family module imports no other
family to fail, and the command line maps each failure to its message and exit code in one place:
1 when a graph does not reproduce PyTorch, 2 when what was given cannot be exported as given.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class ExportError(ValueError):
    """What was given cannot be exported as given; the message says what to change (a user error)."""


class UnsupportedFolder(ExportError):
    """The folder is not one of the families served here; the message names what it is."""


class WeightsError(ExportError):
    """A weight file that cannot be read as a state dict as given (a user error)."""


class GANExportError(ExportError):
    """The generator, its weights or the arguments cannot be exported as given (a user error)."""


class StyleGANExportError(GANExportError):
    """The module is not a StyleGAN-style generator as this exporter needs it (a user error)."""


class ImageExportError(ExportError):
    """The checkpoint, architecture or arguments cannot be exported as given (a user error)."""


class ControlNetExportError(ExportError):
    """The ControlNet does not fit the pipeline it is exported for (a 2 on the command line)."""


class UnsupportedAdapter(ExportError):
    """The file holds something that cannot be served as a low-rank adapter of this pipeline."""


class ParityError(RuntimeError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance."""


class VerificationBudgetError(RuntimeError):
    """Not even the smallest check fits the memory budget."""


class TensorRTUnavailable(RuntimeError):
    """No NVIDIA GPU or no TensorRT here."""


# failure -> (exit code, what the message starts with; {command} is the subcommand), first match wins
CLI_FAILURES: tuple[tuple[type[BaseException], int, str], ...] = (
    (ParityError, 1, "export FAILED parity check"),
    (UnsupportedFolder, 2, "export"),
    (VerificationBudgetError, 2, "export"),
    (TensorRTUnavailable, 2, "--tensorrt"),
    (ExportError, 2, "export {command}"),
    (FileNotFoundError, 2, "export {command}"),
)
CLI_FAILURE_TYPES = tuple(kind for kind, _, _ in CLI_FAILURES)


def exit_code(exc: BaseException, command: str) -> int:
    """Prints the failure for the command line (stderr) and returns the exit code it maps to."""
    code, prefix = next((code, prefix) for kind, code, prefix in CLI_FAILURES if isinstance(exc, kind))
    print(f"{prefix.format(command=command)}: {exc}", file=sys.stderr)
    return code


def run_command(command: str, body: Callable[[], int]) -> int:
    """`body()`, with the failures exporters raise on purpose answered as exit codes."""
    try:
        return body()
    except CLI_FAILURE_TYPES as exc:
        return exit_code(exc, command)
