"""Memory facts the serving side sizes itself by (torch-free; the exporter uses them too).

A denoiser's config carries `genserve.activation_bytes_per_row`: the activation memory one batch
row needs at the native size, computed at export from the model's dimensions
(export/verification.py). A call of N rows needs about N times that on ONNX Runtime's CPU
provider, which materialises attention score matrices; the engine runs no more rows than the
memory available at start-up allows.
"""

from __future__ import annotations

import os

ACTIVATION_BYTES_PARAMETER = "genserve.activation_bytes_per_row"
# Share of the memory available at start-up one denoiser call may take (the rest: other models'
# calls, the responses, the neighbours).
ACTIVATION_MEMORY_SHARE = 0.5


def available_memory() -> int:
    """Bytes the kernel says new work can take (MemAvailable), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rows_that_fit(row_bytes: int | None, max_rows: int, available: int | None = None,
                  share: float = ACTIVATION_MEMORY_SHARE) -> int:
    """The most rows (1 ... max_rows) whose activations fit `share` of the available memory;
    max_rows when the row size is unknown (a repository exported before it was recorded)."""
    if not row_bytes:
        return max_rows
    budget = share * (available_memory() if available is None else available)
    return max(1, min(max_rows, int(budget // row_bytes)))


def engine_max_rows(denoiser, available: int | None = None) -> int:
    """A denoiser's rows per call: its config's max_batch_size, less where the rows'
    activations (its `genserve.activation_bytes_per_row`) would not fit the memory available."""
    row_bytes = int(float(denoiser.parameters.get(ACTIVATION_BYTES_PARAMETER, 0) or 0))
    return rows_that_fit(row_bytes, denoiser.max_batch_size, available)
