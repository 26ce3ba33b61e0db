"""System shared-memory regions for the Triton backend: tensors cross to a Triton on the
same host through /dev/shm instead of through the gRPC socket.

A region is a file in the shared-memory directory (``/dev/shm``, what POSIX ``shm_open``
names on Linux), mapped here and registered in Triton under a name unique to this
process. The gRPC request then carries only (region, offset, size) for each tensor;
Triton reads the inputs from, and writes the outputs into, the same pages.

Regions are pooled: a call takes one free region for itself (inputs and outputs side by
side), and gives it back once the outputs are copied out, so concurrent calls never
share one and steady state allocates nothing. A region too small for a call is replaced
by one of twice the size (the only allocation after warm-up). Pinned regions hold tensors
that many calls read and none writes (a call's LoRA adapter factors): written once,
registered once, named by every call that needs them until the pool's owner unpins them.

Files are created mode 0660 so a Triton running as another user of the same group (two
containers of one pod, see deploy/README.md) can open them; they are unlinked when the
region is dropped, on ``close`` and, for a process that dies without closing, by the next
process on this host that starts with the same prefix (``sweep_stale``).
"""

from __future__ import annotations

import mmap
import os
import re
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
ALIGN = 64
MIN_REGION_BYTES = 64 * 1024
# Triton's messages when a request names a region it does not hold (e.g. after a restart),
# when a region is too small, or when it cannot open a key at registration.
SHM_ERROR = re.compile(r"shared memory", re.I)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def region_prefix() -> str:
    """`genserve-<host>-`: what this host's service processes name their regions with."""
    return f"genserve-{_UNSAFE.sub('_', socket.gethostname())[:40]}-"


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(eq=False)
class Region:
    """One mapped file in the shared-memory directory; Triton knows it as `name`."""

    name: str
    path: Path
    size: int
    mm: mmap.mmap = field(repr=False)

    @property
    def key(self) -> str:
        """The key Triton passes to shm_open: `/` + the file name."""
        return "/" + self.path.name

    @classmethod
    def create(cls, directory: Path, name: str, size: int) -> Region:
        path = directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o660)
        try:
            os.fchmod(fd, 0o660)  # past the umask: Triton may run as another user of the group
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return cls(name, path, size, mm)

    def write(self, offset: int, array: np.ndarray) -> None:
        np.ndarray(array.shape, array.dtype, buffer=self.mm, offset=offset)[...] = array

    def read(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A copy: the region is reused by the next call as soon as this one returns it."""
        return np.ndarray(shape, dtype, buffer=self.mm, offset=offset).copy()

    def destroy(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # a view still exported: the mapping goes when it does
            pass
        self.path.unlink(missing_ok=True)


class RegionPool:
    """Free regions for calls to take, one call per region; at most `max_regions` exist.

    Registration with Triton is the caller's (TritonBackend's): the pool creates, hands
    out and destroys local regions and remembers which exist and which are out on a call."""

    def __init__(self, directory: Path, prefix: str, max_regions: int = 32):
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_regions = max_regions
        self._free: list[Region] = []
        self._busy: set[Region] = set()
        self._pinned: set[Region] = set()
        self.regions: set[Region] = set()
        self.allocations = 0  # regions ever created: flat in steady state

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self.regions)

    def take(self, nbytes: int = 0) -> Region | None:
        """The smallest free region that holds `nbytes`, else the largest free one (for the
        caller to replace), now the caller's; None when none is free. Best fit, so a small
        call does not take the region a larger call in flight beside it needs."""
        if not self._free:
            return None
        fitting = [r for r in self._free if r.size >= nbytes]
        region = min(fitting, key=lambda r: r.size) if fitting else max(self._free, key=lambda r: r.size)
        self._free.remove(region)
        self._busy.add(region)
        return region

    def can_grow(self) -> bool:
        return len(self.regions) < self.max_regions

    def create(self, nbytes: int) -> Region:
        """A new region of at least `nbytes` (a power of two), already the caller's."""
        size = max(MIN_REGION_BYTES, 1 << max(0, (nbytes - 1).bit_length()))
        region = Region.create(self.directory, f"{self.prefix}{uuid.uuid4().hex[:12]}", size)
        self.regions.add(region)
        self._busy.add(region)
        self.allocations += 1
        return region

    def pin(self, nbytes: int) -> Region:
        """A new region of exactly `nbytes` (aligned) kept out of the calls' rotation until
        drop(); it counts toward max_regions (can_grow) like the others."""
        region = Region.create(self.directory, f"{self.prefix}{uuid.uuid4().hex[:12]}", max(ALIGN, aligned(nbytes)))
        self.regions.add(region)
        self._pinned.add(region)
        self.allocations += 1
        return region

    def give_back(self, region: Region) -> None:
        self._busy.discard(region)
        if region in self.regions:
            self._free.append(region)
        else:  # dropped by clear() while out on a call
            region.destroy()

    def drop(self, region: Region) -> None:
        self.regions.discard(region)
        self._busy.discard(region)
        self._pinned.discard(region)
        if region in self._free:
            self._free.remove(region)
        region.destroy()

    def clear(self) -> list[Region]:
        """Forgets every region; free ones are destroyed now, those out on a call when the
        call gives them back. Returns them all (for the caller to unregister)."""
        dropped = list(self.regions)
        for region in (*self._free, *self._pinned):
            region.destroy()
        self.regions.clear()
        self._free.clear()
        self._pinned.clear()
        return dropped


def process_prefix(host_prefix: str) -> str:
    """`<host prefix><pid>.<start time>-<random>-`: unique to this process, and telling a
    later process whether its author still runs (pids repeat across container restarts)."""
    pid = os.getpid()
    return f"{host_prefix}{pid}.{_start_time(pid)}-{uuid.uuid4().hex[:6]}-"


def is_stale(name: str, host_prefix: str) -> bool:
    """Whether a region name of this host belongs to a process that no longer runs."""
    if not name.startswith(host_prefix):
        return False
    pid, _, start = name[len(host_prefix):].split("-", 1)[0].partition(".")
    if not pid.isdigit():
        return False
    return _start_time(int(pid)) != start


def sweep_stale(directory: Path, host_prefix: str) -> list[str]:
    """Unlinks the region files of this host's service processes that are gone; a live
    process's are left alone, so services sharing a host and a Triton leave each other be."""
    removed = []
    for path in Path(directory).glob(f"{host_prefix}*"):
        if is_stale(path.name, host_prefix):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' when it does not run)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]
