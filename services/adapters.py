"""LoRA adapters on the serving side (no torch): read what `python -m export lora` stored and
build the slot inputs of a graph written by `python -m export lora-slots`.

A call's adapters sit side by side in slots (S = the distinct adapters of the call's rows);
for each slotted node the caller feeds `lora_down:<node>` / `lora_up:<node>` with the slots'
factors padded to the layer's largest rank among them, and `lora_scale` [rows, S] with each
row's scale per slot (0 where the row does not use it). A layer none of the call's adapters
targets gets factors with no columns, and its If skips the low-rank sum (S = 0 for a call
without adapters). See export/lora.py for the graph side.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ADAPTERS_FOLDER = "adapters"
MANIFEST = "adapter.json"
WEIGHTS = "weights.safetensors"
SCALE_INPUT = "lora_scale"


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
