"""Which LoRA adapters are loaded, and from where: one library per worker, over every pipeline.

Loadable adapters, by name, for a pipeline:
  - the repository's (`python -m export lora` stored them beside the pipeline's denoiser);
  - in a directory of GENSERVE_ADAPTER_DIRS: `<dir>/<name>/adapter.json` (stored there with
    `python -m export lora --out <dir>`, for the pipeline its manifest names), or a LoRA file as
    published, `<dir>/<name>.safetensors` (or .ckpt/.pt/.pth/.bin), converted on first use by
    `python -m export lora` in a child process (it needs the export extra: torch, diffusers) into
    GENSERVE_ADAPTER_CACHE_DIR, and reused from there while the file is unchanged;
  - what `POST /v1/adapters` registered under a name (a path inside those directories).

Loaded adapters are held in memory (fp32 factors) under one cap, GENSERVE_ADAPTER_MEMORY_MB:
loading one that does not fit unloads the least recently used adapters no request holds; if
the adapters requests hold leave no room, the load is refused with 503 and Retry-After (one
larger than the whole cap: 422). A request naming an adapter not loaded loads it before it is
queued (the router awaits `ensure`): the files are read in a worker thread (a conversion runs in
a child process), so the engine's steps go on meanwhile. Every mutation runs on the event
loop's thread, so `ensure` followed by the engine's `submit` (no await between) cannot lose the
adapter to an eviction.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from services.adapters import ADAPTER_NAME, MANIFEST, PipelineAdapters, StoredAdapter, load_adapter, stored_adapters
from services.errors import AdapterNotFound, AdapterUnavailable, InvalidRequest, MemoryLimited

log = logging.getLogger("genserve")

PUBLISHED_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CONVERT_TIMEOUT_S = 600
RELOAD_ATTEMPTS = 3  # a request's looks at adapters unloaded again while it waited for their loads
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class AdapterObserver(Protocol):
    def loaded(self, pipeline: str, source: str, seconds: float) -> None: ...
    def evicted(self, pipeline: str, reason: str) -> None: ...  # "memory" (LRU) or "deleted"
    def lookup(self, pipeline: str, hit: bool) -> None: ...  # a request's adapter: loaded already, or not
    def memory(self, adapters: int, nbytes: int) -> None: ...


class _NoObserver:
    def loaded(self, pipeline: str, source: str, seconds: float) -> None: ...
    def evicted(self, pipeline: str, reason: str) -> None: ...
    def lookup(self, pipeline: str, hit: bool) -> None: ...
    def memory(self, adapters: int, nbytes: int) -> None: ...


_load_ids = iter(range(1, 1 << 62))


@dataclass
class Loaded:
    """One adapter in memory."""

    id: int
    adapter: StoredAdapter
    source: str  # "repository", "directory", "converted"
    path: Path
    seconds: float  # what loading it took
    last_used: float = field(default_factory=time.monotonic)
    uses: int = 0

    def describe(self, pipeline: PipelineAdapters, in_use: set[int]) -> dict[str, Any]:
        a = self.adapter
        ranks = sorted({f.rank for f in a.layers.values()})
        return {"model": pipeline.pipeline, "name": a.name, "loaded": True, "source": self.source,
                "file": self.path.name, "format": a.manifest.get("format"), "ranks": ranks,
                "targets": {g: sum(1 for graph, _ in a.layers if graph == g) for g in sorted(a.graphs())},
                "bytes": a.nbytes, "load_seconds": round(self.seconds, 3), "uses": self.uses,
                "idle_seconds": round(time.monotonic() - self.last_used, 3), "in_use": self.id in in_use}


class AdapterLibrary:
    """The worker's loaded adapters (see the module docstring). `memory_bytes` 0: no cap."""

    def __init__(self, memory_bytes: int = 0, dirs: Sequence[Path] = (), repository: Path | None = None,
                 cache_dir: Path | None = None, observer: AdapterObserver | None = None):
        self.memory_bytes = memory_bytes
        self.dirs = tuple(Path(d).resolve() for d in dirs)
        self.repository = repository
        self._cache_dir = cache_dir
        self.observer = observer or _NoObserver()
        self.pipelines: dict[str, PipelineAdapters] = {}
        self.loaded: dict[tuple[str, str], Loaded] = {}  # (pipeline, name)
        self.registered: dict[tuple[str, str], Path] = {}  # POST /v1/adapters: (pipeline, name) -> path
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        self._reserved = 0  # bytes of loads under way

    @classmethod
    def from_settings(cls, settings, repository: Path, observer: AdapterObserver | None = None) -> AdapterLibrary:
        """`settings`: the service's AdapterSettings."""
        return cls(settings.memory_mb << 20, settings.dirs, repository, settings.cache_dir, observer)

    # -- pipelines ---------------------------------------------------------------------
    def attach(self, adapters: PipelineAdapters) -> None:
        self.pipelines[adapters.pipeline] = adapters

    def adopt(self, adapters: PipelineAdapters) -> None:
        """Serves `adapters` (a pipeline built with its own library, which loaded nothing)."""
        adapters.library = self
        self.attach(adapters)

    def preload(self) -> None:
        """At start-up: the repository's adapters of every pipeline that serves them, in name
        order, while they fit in the cap (the others load on first use)."""
        for adapters in self.pipelines.values():
            if not adapters.serves:
                continue
            for name, folder in sorted(adapters.stored.items()):
                needed = _estimate(folder)
                if self.memory_bytes and self.nbytes + needed > self.memory_bytes:
                    log.info("adapter %s/%s not preloaded: GENSERVE_ADAPTER_MEMORY_MB is full", adapters.pipeline, name)
                    continue
                start = time.perf_counter()
                try:
                    adapter = self._read(adapters, name, folder)
                except InvalidRequest as exc:  # one stale adapter must not stop the service
                    log.warning("adapter %s/%s not loaded: %s", adapters.pipeline, name, exc.message)
                    continue
                self._admit(adapters, name, adapter, "repository", folder, time.perf_counter() - start)

    # -- what a pipeline may serve -----------------------------------------------------
    def knows(self, adapters: PipelineAdapters, name: str) -> bool:
        key = (adapters.pipeline, name)
        return key in self.loaded or self._source(adapters, name) is not None

    def available(self, adapters: PipelineAdapters) -> list[str]:
        names = {n for p, n in (*self.loaded, *self.registered) if p == adapters.pipeline} | set(adapters.stored)
        for d in self.dirs:
            for entry in (d.iterdir() if d.is_dir() else ()):
                name = _name_of(entry, adapters.pipeline)
                if name is not None:
                    names.add(name)
        return sorted(names)

    def _source(self, adapters: PipelineAdapters, name: str) -> Path | None:
        """Where `name` loads from: what POST registered, the repository, an allowed directory."""
        key = (adapters.pipeline, name)
        if key in self.registered:
            return self.registered[key]
        if name in adapters.stored:
            return adapters.stored[name]
        if not ADAPTER_NAME.fullmatch(name):
            return None
        for d in self.dirs:
            candidates = [d / name, *(d / f"{name}{suffix}" for suffix in PUBLISHED_SUFFIXES)]
            for path in candidates:
                if _name_of(path, adapters.pipeline) == name:
                    return path
        return None

    def allowed(self, path: str, field: str = "path") -> Path:
        """`path` (as a client gave it) if it lies inside a directory of GENSERVE_ADAPTER_DIRS."""
        if not self.dirs:
            raise InvalidRequest("loading adapters at run time is off: GENSERVE_ADAPTER_DIRS names no directory",
                                 field=field)
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(d) for d in self.dirs):
            raise InvalidRequest(f"{path!r} is outside the adapter directories (GENSERVE_ADAPTER_DIRS)", field=field,
                                 allowed=[str(d) for d in self.dirs])
        if not resolved.exists():
            raise InvalidRequest(f"{path!r} does not exist", field=field)
        return resolved

    # -- loading -----------------------------------------------------------------------
    async def ensure(self, adapters: PipelineAdapters, names: Sequence[tuple[str, str]], field: str) -> None:
        """The adapters `names` ((name, its request field) pairs) loaded for `adapters`, those not
        loaded yet loaded now (first use pays). On return all of them are loaded at once: the
        caller submits before its next await. A load it waited for may have been replaced or
        deleted by the time this task runs again (a POST reloading the name, a DELETE): then it
        looks again, a few times; after that, 503 naming `field`."""
        for attempt in range(RELOAD_ATTEMPTS):
            for name, name_field in names:
                loaded = self.is_loaded(adapters, name)
                if attempt == 0:  # a request's lookup, for the hit rate (not its second looks)
                    self.observer.lookup(adapters.pipeline, loaded)
                if not loaded:
                    await self._load_once(adapters, name, name_field)
            if all(self.is_loaded(adapters, name) for name, _ in names):
                return
        raise AdapterUnavailable(f"{', '.join(repr(n) for n, _ in names)} unloaded or replaced while loading, "
                                 f"{RELOAD_ATTEMPTS} times: retry", retry_after_s=1, field=field)

    async def _load_once(self, adapters: PipelineAdapters, name: str, field: str) -> None:
        """Waits for `name`'s load under way, or starts one (concurrent first uses share it)."""
        key = (adapters.pipeline, name)
        pending = self._loading_now(key)
        if pending is None:
            pending = self._loading[key] = asyncio.ensure_future(self._load(adapters, name, field))
            pending.add_done_callback(lambda done: self._loading.pop(key, None) if self._loading.get(key) is done
                                      else None)
        await asyncio.shield(pending)

    def _loading_now(self, key: tuple[str, str]) -> asyncio.Future | None:
        """The load of `key` under way (a finished one whose clean-up has not run yet is not)."""
        pending = self._loading.get(key)
        return pending if pending is not None and not pending.done() else None

    def is_loaded(self, adapters: PipelineAdapters, name: str) -> bool:
        return (adapters.pipeline, name) in self.loaded

    async def register(self, adapters: PipelineAdapters, name: str, path: Path) -> Loaded:
        """POST /v1/adapters: `name` loads from `path` (an allowed one), now."""
        key = (adapters.pipeline, name)
        if not ADAPTER_NAME.fullmatch(name):
            raise InvalidRequest(f"adapter name {name!r}: letters, digits, '_', '.', '-' (at most 64)", field="name")
        if (pending := self._loading_now(key)) is not None:
            await asyncio.shield(pending)
        previous = self.registered.get(key)
        self.registered[key] = path
        if key in self.loaded:
            self._unload(key, "deleted")  # replaced: requests under way keep the old one (adapters.live)
        try:
            await self.ensure(adapters, [(name, "path")], field="path")
        except BaseException:
            if previous is None:
                self.registered.pop(key, None)
            else:
                self.registered[key] = previous
            raise
        return self.loaded[key]

    def delete(self, adapters: PipelineAdapters, name: str) -> dict[str, Any]:
        """DELETE /v1/adapters: unloads `name` and forgets what POST registered for it. A
        request still using it finishes with it; a later request naming it loads it again
        when it is still loadable (the repository, an allowed directory)."""
        key = (adapters.pipeline, name)
        if key not in self.loaded and key not in self.registered:
            raise AdapterNotFound(f"no adapter {name!r} is loaded or registered for model {adapters.pipeline!r}",
                                  field="name", allowed=sorted(n for p, n in self.loaded if p == adapters.pipeline))
        info = self.loaded[key].describe(adapters, adapters.in_use()) if key in self.loaded else \
            {"model": adapters.pipeline, "name": name, "loaded": False}
        self.registered.pop(key, None)
        if key in self.loaded:
            self._unload(key, "deleted")
        return info

    def use(self, adapters: PipelineAdapters, name: str, field: str = "name") -> int:
        """A request admitted with `name`: its load id (held until the request ends)."""
        entry = self.loaded.get((adapters.pipeline, name))
        if entry is None:
            raise InvalidRequest(f"adapter {name!r} is not loaded for model {adapters.pipeline!r} "
                                 "(load it first: PipelineAdapters.ensure)", field=field)
        entry.last_used = time.monotonic()
        entry.uses += 1
        return entry.id

    async def _load(self, adapters: PipelineAdapters, name: str, field: str) -> Loaded:
        path = self._source(adapters, name)
        if path is None:
            raise InvalidRequest(f"no adapter {name!r} for model {adapters.pipeline!r}; its adapters: "
                                 f"{', '.join(adapters.names) or 'none'}", field=field, allowed=adapters.names)
        start = time.perf_counter()
        source = "repository" if adapters.stored.get(name) == path else "directory"
        folder = path
        if path.is_file():
            folder = await convert_published(path, name, adapters.pipeline, self.repository, self.cache_dir, field)
            source = "converted"
        needed = _estimate(folder)
        self._make_room(needed, field)
        self._reserved += needed
        try:
            adapter = await asyncio.to_thread(self._read, adapters, name, folder, field)
        finally:
            self._reserved -= needed
        self._make_room(adapter.nbytes, field)
        return self._admit(adapters, name, adapter, source, path, time.perf_counter() - start)

    def _read(self, adapters: PipelineAdapters, name: str, folder: Path, field: str = "name") -> StoredAdapter:
        try:
            adapter = load_adapter(folder)
        except (OSError, KeyError, ValueError) as exc:
            raise InvalidRequest(f"adapter {name!r}: {folder.name} is not an adapter folder that `python -m export "
                                 f"lora` wrote ({type(exc).__name__}: {exc})", field=field) from None
        adapters.fits(adapter, field)
        return adapter

    def _admit(self, adapters: PipelineAdapters, name: str, adapter: StoredAdapter, source: str, path: Path,
               seconds: float) -> Loaded:
        entry = Loaded(next(_load_ids), adapter, source, path, seconds)
        self.loaded[(adapters.pipeline, name)] = entry
        adapters.live[entry.id] = adapter
        self.observer.loaded(adapters.pipeline, source, seconds)
        self._report()
        log.info("adapter %s/%s loaded from %s (%s, %.1f MB) in %.2fs", adapters.pipeline, name, path, source,
                 adapter.nbytes / 1e6, seconds)
        return entry

    @property
    def cache_dir(self) -> Path:
        if self._cache_dir is None:
            self._cache_dir = Path(tempfile.mkdtemp(prefix="genserve-adapters-"))
        return self._cache_dir

    # -- memory ------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Adapters in memory: loaded ones, unloaded ones requests still hold, loads under way."""
        self._forget_unused()
        return sum(a.nbytes for p in self.pipelines.values() for a in p.live.values()) + self._reserved

    def _make_room(self, needed: int, field: str) -> None:
        if not self.memory_bytes:
            return
        if needed > self.memory_bytes:
            raise InvalidRequest(f"the adapter needs {needed / 2**20:.0f} MB, more than GENSERVE_ADAPTER_MEMORY_MB "
                                 f"({self.memory_bytes >> 20})", field=field, limit=self.memory_bytes >> 20)
        while self.nbytes + needed > self.memory_bytes:
            in_use = {p: self.pipelines[p].in_use() for p in self.pipelines}
            idle = [(e.last_used, key) for key, e in self.loaded.items() if e.id not in in_use[key[0]]]
            if not idle:
                raise MemoryLimited(f"the adapters requests are using fill GENSERVE_ADAPTER_MEMORY_MB "
                                    f"({self.memory_bytes >> 20}); retry when they finish", retry_after_s=5)
            self._unload(min(idle)[1], "memory")

    def _unload(self, key: tuple[str, str], reason: str) -> None:
        entry = self.loaded.pop(key)
        log.info("adapter %s/%s unloaded (%s)", key[0], key[1], reason)
        self.observer.evicted(key[0], reason)
        del entry
        self._report()

    def _forget_unused(self) -> None:
        """Drops unloaded adapters no request holds any more."""
        loaded = {e.id for e in self.loaded.values()}
        for adapters in self.pipelines.values():
            gone = set(adapters.live) - loaded
            if gone:
                gone -= adapters.in_use()
                for i in gone:
                    del adapters.live[i]

    def _report(self) -> None:
        self.observer.memory(len(self.loaded), self.nbytes)

    def describe(self) -> dict[str, Any]:
        """GET /v1/adapters."""
        rows = []
        for adapters in self.pipelines.values():
            if not adapters.serves:
                continue
            in_use = adapters.in_use()
            for name in adapters.names:
                entry = self.loaded.get((adapters.pipeline, name))
                rows.append(entry.describe(adapters, in_use) if entry else
                            {"model": adapters.pipeline, "name": name, "loaded": False,
                             "source": "repository" if name in adapters.stored else "directory"})
        return {"adapters": rows, "memory": {"bytes": self.nbytes, "limit_bytes": self.memory_bytes or None},
                "directories": [str(d) for d in self.dirs]}


async def convert_published(path: Path, name: str, pipeline: str, repository: Path | None, cache_dir: Path,
                            field: str) -> Path:
    """A LoRA file as published -> an adapter folder for `pipeline` (its graphs in `repository`),
    by `python -m export lora` in a child process (torch stays out of the worker), kept in
    `cache_dir` under the file's identity (path, size, modification time)."""
    st = path.stat()
    digest = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir / pipeline / f"{name}-{digest}"
    if (folder / MANIFEST).exists():
        return folder
    if repository is None or importlib.util.find_spec("torch") is None \
            or importlib.util.find_spec("diffusers") is None:
        raise InvalidRequest(
            f"{path.name} is a LoRA file as published; converting it needs the export tools in this "
            f"worker (pip install 'genserve[export]'). Or store it beforehand with `python -m export lora "
            f"--pipeline {pipeline} --weights {path.name} --name {name} --out DIR` and put DIR in "
            "GENSERVE_ADAPTER_DIRS", field=field)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    command = [sys.executable, "-m", "export", "lora", "--pipeline", pipeline, "--weights", str(path),
               "--name", name, "--repository", str(repository), "--out", str(scratch)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                                     os.environ.get("PYTHONPATH")]))}
    process = await asyncio.create_subprocess_exec(*command, cwd=PROJECT_ROOT, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), CONVERT_TIMEOUT_S)
    except BaseException:
        process.kill()
        await process.wait()
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if process.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        lines = [line for line in output.decode(errors="replace").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {process.returncode}"
        raise InvalidRequest(f"adapter {name!r}: {path.name} could not be converted for model "
                             f"{pipeline!r}: {reason}", field=field,
                             detail=output.decode(errors="replace")[-4000:])
    try:
        (scratch / name).rename(folder)
    except OSError:
        if not (folder / MANIFEST).exists():  # else another worker converted the same file first
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _name_of(path: Path, pipeline: str) -> str | None:
    """The adapter name `path` offers to `pipeline` in an allowed directory, or None."""
    if path.is_dir():
        manifest = path / MANIFEST
        if not manifest.is_file():
            return None
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return None
        return path.name if meta.get("pipeline") == pipeline and ADAPTER_NAME.fullmatch(path.name) else None
    if path.is_file() and path.suffix in PUBLISHED_SUFFIXES and ADAPTER_NAME.fullmatch(path.stem):
        return path.stem
    return None


def _estimate(folder: Path) -> int:
    """An adapter folder's bytes in memory (fp32) from its manifest, before reading its weights."""
    try:
        meta = json.loads((folder / MANIFEST).read_text())
        itemsize = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}.get(meta.get("dtype"), 4)
        return int(meta["bytes"]) * 4 // itemsize
    except (OSError, ValueError, KeyError):
        return 0


def pipeline_adapters(backend, pipeline: str, denoiser, graphs: Sequence[str]) -> PipelineAdapters:
    """What `python -m export lora` stored for `pipeline` beside its denoiser (`denoiser`: its
    ModelSpec), with the slots the backend serves for `graphs` (the denoiser's first), in a
    library of its own until the service's adopts it (AdapterLibrary.adopt)."""
    stored = stored_adapters(denoiser.model_dir) if denoiser.model_dir is not None else {}
    slots = {g: shapes for g in graphs if (shapes := backend.adapter_slots(g)) is not None}
    return PipelineAdapters(pipeline, denoiser.name, stored, slots, AdapterLibrary())
