"""The worker's memory: what it holds (RSS), giving freed memory back to the system, the
container's limit, and the guard that refuses new work near GENSERVE_MEMORY_LIMIT_MB.

Why trimming: glibc's malloc keeps freed memory in its heaps for reuse; a large request's
buffers (an upscale canvas, a tile's activations) would stay in the worker's RSS after
the request. `trim()` (malloc_trim) hands the free pages back, and `limit_arenas()` keeps
worker threads in two shared arenas, whose pages trimming does give back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from pathlib import Path

log = logging.getLogger("genserve")

# cgroup v2 and v1 files holding the container's memory limit.
CGROUP_LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
# The default GENSERVE_MEMORY_LIMIT_MB is this share of the container's limit: the rest is
# headroom for one request's work admitted just under the limit, before the kernel's OOM killer.
CONTAINER_SHARE = 0.85
RETRY_AFTER_S = 2
# cgroup v1 says "no limit" with a huge number (PAGE_COUNTER_MAX pages).
_UNLIMITED = 1 << 60

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


M_ARENA_MAX = -8  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MALLOC_ARENAS = 2
# Allocations from this size on are their own mappings, unmapped when freed.
MMAP_THRESHOLD_BYTES = 1 << 20


def limit_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """At most `arenas` malloc arenas for the threads made from now on (glibc; unless the
    operator set MALLOC_ARENA_MAX). glibc gives threads arenas of their own, up to 8 per
    core, and trimming does not hand their freed pages back: measured on a 256 px tile x4,
    worker threads kept +8, +34, +50, +112 MB after four calls; with two arenas, nothing.

    Also a fixed mmap threshold (unless MALLOC_MMAP_THRESHOLD_ is set): glibc otherwise raises
    it to the size of each large block freed (up to 32 MB), after which request bodies and
    images of several MB come from the heap and stay there, fragmented, until a trim finds
    them; as their own mappings they go back to the system when freed. The 10,000-request
    soak's worker stayed 101 MB over its warm level without it (bench/results/soak.md)."""
    lib = _glibc()
    if lib is None:
        return
    if "MALLOC_ARENA_MAX" not in os.environ:
        lib.mallopt(M_ARENA_MAX, arenas)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def collect_cycles() -> None:
    """Frees what reference cycles still hold now, not at the next full collection: a request's
    objects can sit in a cycle that reaches the oldest generation, which Python's collector
    visits rarely. Measured: 40 bodies of 6.7 MB on one kept-alive connection left the worker
    +64 to +158 MB in about half the runs; with a full collection after each, -16 to +1 MB
    (a young-generation collection, or a frozen start-up heap, still left +64 to +109 MB).
    Costs one full collection, ~60-70 ms of the GIL with the demo repository loaded: called
    after requests whose bodies are large, whose own work costs far more."""
    gc.collect()


def freeze_startup_heap() -> int:
    """Takes every object alive now (modules, the app, the models' metadata: the start-up heap)
    out of the garbage collector's full collections (gc.freeze), after collecting what is
    garbage already; returns how many objects are frozen. Python runs a full collection by
    itself whenever enough objects have survived, and it holds the GIL throughout: every
    request and engine iteration stalls for it. Measured in a worker with the demo repository
    loaded (132,000 objects): 71-76 ms per full collection, 0.0 ms with the start-up heap
    frozen. The goodput benchmark's shortest requests have targets of 45 ms. vLLM freezes its
    heap after start-up for the same reason. Objects made later are collected as before."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def trim() -> None:
    """Returns the allocator's free memory to the system (glibc; elsewhere nothing)."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


def rss_bytes() -> int:
    """This process's resident memory."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def container_limit_bytes(files=CGROUP_LIMIT_FILES) -> int | None:
    """The container's (cgroup's) memory limit, or None when it has none."""
    for path in files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return None if value >= _UNLIMITED else value
    return None


def default_limit_mb(files=CGROUP_LIMIT_FILES) -> int:
    """GENSERVE_MEMORY_LIMIT_MB when unset: CONTAINER_SHARE of the container's limit; 0 (off)
    without one."""
    limit = container_limit_bytes(files)
    return int(limit * CONTAINER_SHARE) >> 20 if limit else 0


class MemoryGuard:
    """Admission by memory: new work is refused (503 with Retry-After) while the worker's
    RSS plus the work's own estimate would pass the limit; what is running goes on. A
    refusal first trims the allocator and looks again, so freed-but-kept pages do not refuse
    anyone."""

    def __init__(self, limit_bytes: int, read_rss=rss_bytes):
        self.limit_bytes = limit_bytes
        self._read_rss = read_rss

    def admits(self, extra_bytes: int = 0) -> bool:
        if self.limit_bytes <= 0:
            return True
        if self._read_rss() + extra_bytes <= self.limit_bytes:
            return True
        trim()
        return self._read_rss() + extra_bytes <= self.limit_bytes

    def check(self, what: str, extra_bytes: int = 0) -> None:
        """Raises MemoryLimited (503, Retry-After) when `what` does not fit now."""
        from services.errors import MemoryLimited

        if not self.admits(extra_bytes):
            raise MemoryLimited(self.refusal(what, extra_bytes), retry_after_s=RETRY_AFTER_S)

    def refusal(self, what: str, extra_bytes: int) -> str:
        used = self._read_rss() >> 20
        return (
            f"this server is near its memory limit ({used} MB used of GENSERVE_MEMORY_LIMIT_MB="
            f"{self.limit_bytes >> 20}); {what} needs about {max(1, extra_bytes >> 20)} MB more: retry shortly "
            "(another replica may answer)")
