"""LoRA adapters on the serving side (no torch): read what `python -m export lora` stored and
build the slot inputs of a graph written by `python -m export lora-slots`.

A call's adapters sit side by side in slots (S = the distinct adapters of the call's rows);
for each slotted node the caller feeds `lora_down:<node>` / `lora_up:<node>` with the slots'
factors padded to the layer's largest rank among them, and `lora_scale` [rows, S] with each
row's scale per slot (0 where the row does not use it). A layer none of the call's adapters
targets gets factors with no columns, and its If skips the low-rank sum (S = 0 for a call
without adapters). See export/lora.py for the graph side.

Serving (`PipelineAdapters`): a pipeline loads its stored adapters once at start-up. A request's
`lora` becomes one per-row scale input per adapter (`lora:<name>` [rows], beside its
conditioning rows), so the engine's merge of several requests' rows (merge_rows: zeros where a
request lacks the key) holds the union of their adapters with each row's own scales; at the
graph call those keys become the slot inputs above. The text encoder's part changes a prompt's
encoding, so it is part of the prompt's key (`text_key`), and the prompt cache tells them apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.errors import InvalidRequest

ADAPTERS_FOLDER = "adapters"
MANIFEST = "adapter.json"
WEIGHTS = "weights.safetensors"
SCALE_INPUT = "lora_scale"
SLOTTED_GRAPH = "model_lora.onnx"  # export/lora.py writes it beside model.onnx
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


def stored_adapters(repository: Path, pipeline: str) -> dict[str, Path]:
    """Adapter name -> folder, for what `python -m export lora` stored for `pipeline`."""
    root = Path(repository) / f"{pipeline}_unet" / ADAPTERS_FOLDER
    return {p.name: p for p in sorted(root.iterdir()) if (p / MANIFEST).exists()} if root.is_dir() else {}


def slot_inputs(graph: str, input_shapes: Mapping[str, Sequence], adapters: Sequence[StoredAdapter],
                row_scales: np.ndarray) -> dict[str, np.ndarray]:
    """The slot inputs of one call of `graph`. `input_shapes`: the slotted graph's inputs
    (name -> shape, as the runtime reports them); `adapters`: the call's slots in order;
    `row_scales` [rows, len(adapters)]."""
    _, slots = row_scales.shape
    if slots != len(adapters):
        raise ValueError(f"row_scales has {slots} slots for {len(adapters)} adapters")
    feeds = {SCALE_INPUT: np.ascontiguousarray(row_scales, dtype=np.float32)}
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


class PipelineAdapters:
    """The adapters one pipeline serves, and the slot inputs of its graphs' calls.

    `slots`: graph -> its slot inputs' shapes, for the graphs the backend serves with adapter
    slots (InferenceBackend.adapter_slots); adapters are loaded only when the denoiser has them.
    """

    def __init__(self, pipeline: str, denoiser: str, stored: Mapping[str, Path],
                 slots: Mapping[str, Mapping[str, Sequence]]):
        self.pipeline = pipeline
        self.denoiser = denoiser
        self.names = sorted(stored)
        self.slots = dict(slots)
        self.adapters = {name: load_adapter(stored[name]) for name in self.names} if denoiser in slots else {}
        self.index = {name: i for i, name in enumerate(self.names)}  # an adapter's number in text keys

    def check(self, lora: Sequence[tuple[str, float]], cache_interval: int = 1, limit: int | None = None) -> None:
        """Refuses (InvalidRequest, 422) adapters the pipeline cannot serve for this request;
        `limit`: the most per request (GENSERVE_MAX_ADAPTERS_PER_REQUEST)."""
        if not lora:
            return
        if self.denoiser not in self.slots:
            raise InvalidRequest(
                f"model {self.pipeline!r} serves no LoRA adapters: its denoiser graph has no adapter slots here; "
                f"run `python -m export lora-slots --pipeline {self.pipeline}` (the embedded ONNX Runtime "
                f"backend serves them)", field="lora")
        if limit is not None and len(lora) > limit:
            raise InvalidRequest(f"lora names {len(lora)} adapters; at most {limit} per request",
                                 field="lora", limit=limit)
        seen = set()
        for i, (name, _) in enumerate(lora):
            field = f"lora[{i}].name"
            if name not in self.adapters:
                known = ", ".join(self.names) or "none (store one with `python -m export lora`)"
                raise InvalidRequest(f"no adapter {name!r} for model {self.pipeline!r}; its adapters: {known}",
                                     field=field, allowed=self.names)
            if name in seen:
                raise InvalidRequest(f"adapter {name!r} is named twice in lora: give it once, with one scale",
                                     field=field)
            seen.add(name)
            unslotted = sorted(self.adapters[name].graphs() - set(self.slots))
            if unslotted:
                raise InvalidRequest(f"adapter {name!r} acts on {', '.join(unslotted)}, served without adapter "
                                     f"slots: run `python -m export lora-slots --pipeline {self.pipeline}`",
                                     field=field)
        if cache_interval > 1:
            raise InvalidRequest("cache_interval must be 1 with lora: DeepCache's shallow U-Net has no adapter slots",
                                 field="cache_interval", limit=1)

    def rows(self, lora: Sequence[tuple[str, float]], rows: int) -> dict[str, np.ndarray]:
        """A request's per-row adapter inputs (all its rows take its scales)."""
        return {ROW_PREFIX + name: np.full(rows, scale, np.float32) for name, scale in lora}

    def call_inputs(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`inputs` of one call of `graph` with the rows' adapter inputs replaced by the slot
        inputs of the adapters that act on it; none: no slot input (the backend feeds empty slots)."""
        plain = {k: v for k, v in inputs.items() if not k.startswith(ROW_PREFIX)}
        names = sorted(k.removeprefix(ROW_PREFIX) for k in inputs if k.startswith(ROW_PREFIX))
        names = [n for n in names if graph in self.adapters[n].graphs()]
        if not names:
            return plain
        scales = np.stack([inputs[ROW_PREFIX + n] for n in names], axis=1)
        return {**plain, **slot_inputs(graph, self.slots[graph], [self.adapters[n] for n in names], scales)}

    def text_key(self, ids: np.ndarray, lora: Sequence[tuple[str, float]], graph: str) -> np.ndarray:
        """A text's key: its token ids, then (adapter number, the scale's float32 bits) for each
        adapter of `lora` acting on the text encoder `graph`, so that encodings under different
        adapters or scales are told apart (and cached apart)."""
        tail = [v for name, scale in sorted(lora) if name in self.adapters and graph in self.adapters[name].graphs()
                for v in (self.index[name], int(np.float32(scale).view(np.int32)))]
        return np.concatenate([ids, np.asarray(tail, np.int64)]) if tail else ids

    def text_rows(self, keys: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Keys made by text_key -> (token ids [T, length], each adapter's per-row scales as
        `lora:<name>` inputs, for call_inputs)."""
        scales: dict[str, np.ndarray] = {}
        for row, key in enumerate(keys):
            tail = key[length:].reshape(-1, 2)
            for index, bits in tail:
                name = self.names[int(index)]
                scales.setdefault(ROW_PREFIX + name, np.zeros(len(keys), np.float32))[row] = \
                    np.int32(bits).view(np.float32)
        return np.stack([k[:length] for k in keys]), scales


def pipeline_adapters(backend, pipeline: str, denoiser, graphs: Sequence[str]) -> PipelineAdapters:
    """What `python -m export lora` stored for `pipeline` beside its denoiser (`denoiser`: its
    ModelSpec), with the slots the backend serves for `graphs` (the denoiser's first)."""
    stored = stored_adapters(denoiser.model_dir.parent, pipeline) if denoiser.model_dir is not None else {}
    slots = {g: shapes for g in graphs if (shapes := backend.adapter_slots(g)) is not None}
    return PipelineAdapters(pipeline, denoiser.name, stored, slots)
