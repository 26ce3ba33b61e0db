"""LoRA adapters on the serving side (no torch): read what `python -m export lora` stored and
build the slot inputs of a graph written by `python -m export lora-slots`.

A call's adapters sit side by side in slots (S = the distinct adapters of the call's rows);
for each slotted node the caller feeds `lora_down:<node>` / `lora_up:<node>` with the slots'
factors padded to the layer's largest rank among them, and `lora_scale` [rows, S] with each
row's scale per slot (0 where the row does not use it). A layer none of the call's adapters
targets gets factors with no columns, and its If skips the low-rank sum (S = 0 for a call
without adapters). See export/lora.py for the graph side.

Serving (`PipelineAdapters`): which adapters are loaded is services.adapter_library's business;
a request admitted with `lora` holds its adapters' loads (ids unique in the process) until it
ends. Its `lora` becomes one per-row scale input per adapter (`lora:<load id>` [rows], beside its
conditioning rows), so the engine's merge of several requests' rows (merge_rows: zeros where a
request lacks the key) holds the union of their adapters with each row's own scales; at the
graph call those keys become the slot inputs above. The text encoders' part changes a prompt's
encoding, so it is part of the prompt's key (`text_key`), and the prompt cache tells them apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from services.errors import InvalidRequest

ADAPTERS_FOLDER = "adapters"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # what requests, folders and files may be named
MANIFEST = "adapter.json"
WEIGHTS = "weights.safetensors"
SCALE_INPUT = "lora_scale"
SLOTTED_GRAPH = "model_lora.onnx"  # export/lora.py writes it beside model.onnx
SLOTTED_MODEL_SUFFIX = "_lora"  # and, for Triton, model <model>_lora serving it (services.runtime.repository)
ROW_PREFIX = "lora:"  # a denoiser row input: one adapter's scale per row (0: the row does not use it)


def is_slot_input(name: str) -> bool:
    """An input only the slotted graph has (not in the model's config)."""
    return name == SCALE_INPUT or is_slot_weight(name)


def is_slot_weight(name: str) -> bool:
    """A slot input without a batch axis: the call's adapter factors."""
    return name.startswith(("lora_down:", "lora_up:"))


@dataclass(frozen=True)
class LayerFactors:
    kind: str               # "linear" or "conv"
    down: np.ndarray        # [r, in] or [r, in, kh, kw]
    up: np.ndarray          # [out, r] or [out, r, 1, 1], alpha/rank folded in (fp32)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    pipeline: str
    manifest: dict
    layers: Mapping[tuple[str, str], LayerFactors]   # (graph, node) -> factors

    @property
    def nbytes(self) -> int:
        return sum(f.down.nbytes + f.up.nbytes for f in self.layers.values())

    def graphs(self) -> set[str]:
        return {graph for graph, _ in self.layers}


def load_adapter(folder: Path) -> StoredAdapter:
    from safetensors.numpy import load_file

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    tensors = load_file(str(folder / WEIGHTS))
    layers = {}
    for layer in manifest["layers"]:
        key = f"{layer['graph']}:{layer['node']}"
        down = tensors[f"{key}:down"].astype(np.float32)
        up = tensors[f"{key}:up"].astype(np.float32) * np.float32(layer["scale"])
        layers[(layer["graph"], layer["node"])] = LayerFactors(layer["kind"], down, up)
    return StoredAdapter(manifest["name"], manifest["pipeline"], manifest, layers)


def stored_adapters(denoiser_dir: Path) -> dict[str, Path]:
    """Adapter name -> folder, for what `python -m export lora` stored beside a pipeline's
    denoiser (its model folder: `<pipeline>_unet`, `<pipeline>_transformer`)."""
    root = Path(denoiser_dir) / ADAPTERS_FOLDER
    return {p.name: p for p in sorted(root.iterdir()) if (p / MANIFEST).exists()} if root.is_dir() else {}


def slot_inputs(graph: str, input_shapes: Mapping[str, Sequence], adapters: Sequence[StoredAdapter],
                row_scales: np.ndarray) -> dict[str, np.ndarray]:
    """The slot inputs of one call of `graph`. `input_shapes`: the slotted graph's inputs
    (name -> shape, as the runtime reports them); `adapters`: the call's slots in order;
    `row_scales` [rows, len(adapters)]."""
    _, slots = row_scales.shape
    if slots != len(adapters):
        raise ValueError(f"row_scales has {slots} slots for {len(adapters)} adapters")
    return {SCALE_INPUT: np.ascontiguousarray(row_scales, dtype=np.float32),
            **slot_factors(graph, input_shapes, adapters)}


def slot_factors(graph: str, input_shapes: Mapping[str, Sequence],
                 adapters: Sequence[StoredAdapter]) -> dict[str, np.ndarray]:
    """The `lora_down:` / `lora_up:` inputs of a call of `graph` whose slots are `adapters`."""
    slots = len(adapters)
    feeds = {}
    for name, shape in input_shapes.items():
        if not name.startswith("lora_down:"):
            continue
        node = name.removeprefix("lora_down:")
        factors = [a.layers.get((graph, node)) for a in adapters]
        conv = len(shape) == 4
        in_f = shape[1] if conv else shape[0]
        out_f = input_shapes[f"lora_up:{node}"][0 if conv else 1]
        kernel = tuple(shape[2:]) if conv else ()
        rank = max([f.rank for f in factors if f is not None], default=0)  # 0: the layer's If skips it
        down = np.zeros((slots, rank, in_f, *kernel), np.float32)
        up = np.zeros((out_f, slots, rank), np.float32)
        for s, f in enumerate(factors):
            if f is None:
                continue
            fd = f.down if conv or f.down.ndim == 2 else f.down[:, :, 0, 0]
            if conv and fd.ndim == 2:
                fd = fd[:, :, None, None]
            down[s, :f.rank] = fd
            up[:, s, :f.rank] = f.up.reshape(f.up.shape[0], f.rank)
        if conv:
            feeds[name] = down.reshape(slots * rank, in_f, *kernel)
            feeds[f"lora_up:{node}"] = up.reshape(out_f, slots * rank, 1, 1)
        else:
            feeds[name] = np.ascontiguousarray(down.reshape(slots * rank, in_f).T)
            feeds[f"lora_up:{node}"] = np.ascontiguousarray(up.reshape(out_f, slots * rank).T)
    return feeds


class Library(Protocol):
    """Where a pipeline's adapters are loaded (services.adapter_library.AdapterLibrary)."""

    def attach(self, adapters: PipelineAdapters) -> None: ...
    def available(self, adapters: PipelineAdapters) -> list[str]: ...
    def knows(self, adapters: PipelineAdapters, name: str) -> bool: ...
    async def ensure(self, adapters: PipelineAdapters, names: Sequence[tuple[str, str]], field: str) -> None: ...
    def use(self, adapters: PipelineAdapters, name: str, field: str = "name") -> int: ...


class PipelineAdapters:
    """The adapters one pipeline serves, and the slot inputs of its graphs' calls.

    `slots`: graph -> its slot inputs' shapes, for the graphs the backend serves with adapter
    slots (InferenceBackend.adapter_slots); without slots on the denoiser it serves none.
    Which adapters are loaded is the library's business (services.adapter_library: memory cap,
    LRU, allowed directories, loading on first use); here each load has an id, unique in the
    process, that a request holds from admission (`resolve`) to its end: its rows' inputs
    (`lora:<id>`) and its texts' keys name that load, so an adapter unloaded or replaced
    meanwhile neither changes a running request nor answers from the prompt cache for the new one.
    """

    def __init__(self, pipeline: str, denoiser: str, stored: Mapping[str, Path],
                 slots: Mapping[str, Mapping[str, Sequence]], library: Library):
        self.pipeline = pipeline
        self.denoiser = denoiser
        self.slots = dict(slots)
        self.stored = dict(stored)  # the repository's adapters: name -> folder
        self.live: dict[int, StoredAdapter] = {}  # by load id: the loaded ones, and unloaded ones still in use
        self.in_use: Callable[[], set[int]] = set  # the engine's: load ids its unfinished requests hold
        # Per graph, the last call's slot factors and their load ids: built once while a batch's
        # adapters stay the same (padding and copying every slotted layer's factors each step
        # would cost about as much as reading the adapters).
        self._factors: dict[str, tuple[tuple[int, ...], dict[str, np.ndarray]]] = {}
        self.library = library
        library.attach(self)

    @property
    def serves(self) -> bool:
        return self.denoiser in self.slots

    @property
    def names(self) -> list[str]:
        """Every adapter a request may name: loaded, or loadable (repository, allowed directories)."""
        return self.library.available(self) if self.serves else []

    def check(self, lora: Sequence[tuple[str, float]], cache_interval: int = 1, limit: int | None = None) -> None:
        """Refuses (InvalidRequest, 422) adapters the pipeline cannot serve for this request;
        `limit`: the most per request (GENSERVE_MAX_ADAPTERS_PER_REQUEST)."""
        if not lora:
            return
        if not self.serves:
            raise InvalidRequest(
                f"model {self.pipeline!r} serves no LoRA adapters: its denoiser graph has no adapter slots here; "
                f"run `python -m export lora-slots --pipeline {self.pipeline}`", field="lora")
        if limit is not None and len(lora) > limit:
            raise InvalidRequest(f"lora names {len(lora)} adapters; at most {limit} per request",
                                 field="lora", limit=limit)
        seen = set()
        for i, (name, _) in enumerate(lora):
            if not self.library.knows(self, name):
                names = self.names
                known = ", ".join(names) or "none (store one with `python -m export lora`)"
                raise InvalidRequest(f"no adapter {name!r} for model {self.pipeline!r}; its adapters: {known}",
                                     field=f"lora[{i}].name", allowed=names)
            if name in seen:
                raise InvalidRequest(f"adapter {name!r} is named twice in lora: give it once, with one scale",
                                     field=f"lora[{i}].name")
            seen.add(name)
        if cache_interval > 1:
            raise InvalidRequest("cache_interval must be 1 with lora: DeepCache's shallow U-Net has no adapter slots",
                                 field="cache_interval", limit=1)

    def fits(self, adapter: StoredAdapter, field: str) -> None:
        """Refuses an adapter whose layers this pipeline's slotted graphs do not have, with
        their shapes (one exported for another base model, or before a re-export)."""
        if adapter.pipeline != self.pipeline:
            raise InvalidRequest(f"adapter {adapter.name!r} was stored for pipeline {adapter.pipeline!r}, "
                                 f"not {self.pipeline!r}", field=field)
        for (graph, node), f in adapter.layers.items():
            shapes = self.slots.get(graph)
            if shapes is None:
                raise InvalidRequest(f"adapter {adapter.name!r} acts on {graph}, served without adapter slots: "
                                     f"run `python -m export lora-slots --pipeline {self.pipeline}`", field=field)
            down = shapes.get(f"lora_down:{node}")
            conv = f.kind == "conv"
            in_f = f.down.shape[1]
            if down is None or (down[1] if conv else down[0]) != in_f or \
                    shapes[f"lora_up:{node}"][0 if conv else 1] != f.up.shape[0]:
                raise InvalidRequest(f"adapter {adapter.name!r}: {graph} has no layer {node} of its shape "
                                     f"(stored for another export of {self.pipeline!r}?)", field=field)

    async def ensure(self, lora: Sequence[tuple[str, float]]) -> None:
        """Loads the adapters of `lora` not loaded yet (first use pays; off the event loop).
        On return all of them are loaded at once: the caller submits before its next await."""
        names = [(name, f"lora[{i}].name") for i, (name, _) in enumerate(lora)]
        await self.library.ensure(self, names, field="lora")

    def resolve(self, lora: Sequence[tuple[str, float]]) -> tuple[int, ...]:
        """The load ids a request holds until it ends (its adapters must be loaded: `ensure`)."""
        return tuple(self.library.use(self, name, field=f"lora[{i}].name") for i, (name, _) in enumerate(lora))

    def rows(self, lora: Sequence[tuple[str, float]], ids: Sequence[int], rows: int) -> dict[str, np.ndarray]:
        """A request's per-row adapter inputs (all its rows take its scales)."""
        return {f"{ROW_PREFIX}{i}": np.full(rows, scale, np.float32) for i, (_, scale) in zip(ids, lora)}

    def call_inputs(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`inputs` of one call of `graph` with the rows' adapter inputs replaced by the slot
        inputs of the adapters that act on it; none: no slot input (the backend feeds empty slots)."""
        plain = {k: v for k, v in inputs.items() if not k.startswith(ROW_PREFIX)}
        ids = sorted(int(k.removeprefix(ROW_PREFIX)) for k in inputs if k.startswith(ROW_PREFIX))
        ids = [i for i in ids if graph in self.live[i].graphs()]
        if not ids:
            return plain
        scales = np.stack([inputs[f"{ROW_PREFIX}{i}"] for i in ids], axis=1).astype(np.float32)
        key = tuple(ids)
        cached = self._factors.get(graph)
        if cached is None or cached[0] != key:  # a batch's adapters mostly stay the same from step to step
            cached = self._factors[graph] = (key, slot_factors(graph, self.slots[graph], [self.live[i] for i in ids]))
        return {**plain, SCALE_INPUT: scales, **cached[1]}

    def text_key(self, ids: np.ndarray, lora: Sequence[tuple[str, float]], loads: Sequence[int],
                 graphs: Sequence[str]) -> np.ndarray:
        """A text's key: its token ids, then (load id, the scale's float32 bits) for each adapter
        of the request acting on one of the text encoders `graphs`, so that encodings under
        different adapters or scales are told apart (and cached apart)."""
        tail = [v for load, (_, scale) in sorted(zip(loads, lora)) if self.live[load].graphs() & set(graphs)
                for v in (load, int(np.float32(scale).view(np.int32)))]
        return np.concatenate([ids, np.asarray(tail, np.int64)]) if tail else ids

    def text_rows(self, keys: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Keys made by text_key -> (token ids [T, length], each adapter's per-row scales as
        `lora:<id>` inputs, for call_inputs)."""
        scales: dict[str, np.ndarray] = {}
        for row, key in enumerate(keys):
            for load, bits in key[length:].reshape(-1, 2):
                scales.setdefault(f"{ROW_PREFIX}{int(load)}", np.zeros(len(keys), np.float32))[row] = \
                    np.int32(bits).view(np.float32)
        return np.stack([k[:length] for k in keys]), scales

