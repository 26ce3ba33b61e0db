"""StyleGAN-style generators: a mapping network (z[, c] -> w) and a synthesis network
(ws [num_ws, w_dim] -> image), served as two graphs, with the W space as an API:
truncation toward w_avg, style mixing, interpolation in Z (slerp) or W (lerp), latents
out and in, and edits along directions stored with the repository.

Determinism (the GAN rule): image i of seed s uses rng = default_rng(s + i):
    z = rng.standard_normal(z_dim, float32); label = class_label or rng.integers(c_dim)
    w = mapping(z, one_hot(label)); w' = w_avg + psi * (w - w_avg); ws = [w'] * num_ws
so `/v1/gan/generate` with num_images 1 and seed s + i reproduces image i, and every W-space
endpoint starts from exactly these w.
Graphs and files: export/stylegan.py.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

import numpy as np

from services.contract import StyleGANFacts
from services.runtime import InferenceBackend, ModelSpec


@dataclass(frozen=True, kw_only=True)
class StyleGANInfo(StyleGANFacts):
    """The generator's facts (the contract's, as the exporter wrote them) and what the service
    adds: its graphs, version, mean w and directions."""

    name: str
    version: str
    mapping: str
    synthesis: str
    w_avg: np.ndarray = field(repr=False)  # [w_dim]
    directions: dict = field(repr=False)  # name -> [w_dim]: strength 1 moves the mean w to the named mean


def discover(models: dict[str, ModelSpec]) -> dict[str, StyleGANInfo]:
    groups: dict[str, dict[str, ModelSpec]] = {}
    for spec in models.values():
        p = spec.parameters
        if p.get("genserve.pipeline") == "stylegan":
            groups.setdefault(p["genserve.pipeline_name"], {})[p["genserve.component"]] = spec
    found = {}
    for name, parts in sorted(groups.items()):
        if {"mapping", "synthesis"} - set(parts):
            raise ValueError(f"StyleGAN model {name!r} lacks {sorted({'mapping', 'synthesis'} - set(parts))}")
        mapping = parts["mapping"]
        w_avg = np.asarray(json.loads(mapping.file("w_avg.json").read_text())["w_avg"], np.float32)
        directions_file = mapping.file("directions.json")
        directions = {k: np.asarray(v, np.float32) for k, v in
                      json.loads(directions_file.read_text())["directions"].items()} if directions_file.exists() else {}
        found[name] = StyleGANInfo(
            **vars(StyleGANFacts.from_spec(mapping)), name=name, version=mapping.version, mapping=mapping.name,
            synthesis=parts["synthesis"].name, w_avg=w_avg, directions=directions)
    return found


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation between two z (rows of t); the ends are a and b exactly."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = np.dot(a64, b64) / (np.linalg.norm(a64) * np.linalg.norm(b64))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    t = t.astype(np.float64)[:, None]
    if omega < 1e-6:
        out = (1 - t) * a64 + t * b64
    else:
        out = (np.sin((1 - t) * omega) * a64 + np.sin(t * omega) * b64) / np.sin(omega)
    out = out.astype(np.float32)
    out[0], out[-1] = a, b  # exact ends: frames equal the /generate images
    return out


class StyleGANPipeline:
    def __init__(self, backend: InferenceBackend, info: StyleGANInfo):
        self.backend = backend
        self.info = info

    # -- latents ---------------------------------------------------------------------
    def seed_latents(self, seed: int, class_label: int | None = None) -> tuple[np.ndarray, int | None]:
        """(z, label) of one seed, by the GAN rule."""
        rng = np.random.default_rng(seed)
        z = rng.standard_normal(self.info.z_dim, dtype=np.float32)
        if not self.info.c_dim:
            return z, None
        return z, int(class_label if class_label is not None else rng.integers(self.info.c_dim))

    def one_hot(self, labels: list[int | None]) -> np.ndarray:
        c = np.zeros((len(labels), self.info.c_dim), np.float32)
        for i, label in enumerate(labels):
            c[i, label] = 1.0
        return c

    async def mapping(self, z: np.ndarray, c: np.ndarray | None) -> np.ndarray:
        """z [N, z_dim] (and c [N, c_dim]) -> w [N, w_dim], untruncated."""
        feeds = {"z": z.astype(np.float32)}
        if self.info.c_dim:
            if c is None:
                raise ValueError(f"{self.info.mapping} is conditional: its mapping needs c [N, {self.info.c_dim}]")
            feeds["c"] = c.astype(np.float32)
        return (await self.backend.infer(self.info.mapping, feeds))["w"]

    def truncate(self, w: np.ndarray, psi: float) -> np.ndarray:
        return (self.info.w_avg + np.float32(psi) * (w - self.info.w_avg)).astype(np.float32)

    def broadcast(self, w: np.ndarray) -> np.ndarray:
        """w [N, w_dim] -> ws [N, num_ws, w_dim]."""
        return np.repeat(w[:, None, :], self.info.num_ws, axis=1).astype(np.float32)

    async def seeds_to_w(self, seeds: list[int], labels: list[int | None], psi: float) -> tuple[np.ndarray, list]:
        """Truncated w of each seed (one mapping call for all), and the labels used."""
        pairs = [self.seed_latents(s, label) for s, label in zip(seeds, labels)]
        z = np.stack([p[0] for p in pairs])
        used = [p[1] for p in pairs]
        w = await self.mapping(z, self.one_hot(used) if self.info.c_dim else None)
        return self.truncate(w, psi), used

    async def synthesis(self, ws: np.ndarray) -> np.ndarray:
        """ws [N, num_ws, w_dim] -> images [N, C, H, W] in the model's output range."""
        return (await self.backend.infer(self.info.synthesis, {"ws": ws.astype(np.float32)}))["image"]

    # -- operations ------------------------------------------------------------------
    def mix(self, ws_coarse: np.ndarray, ws_fine: np.ndarray, crossover: int) -> np.ndarray:
        """Layers [0, crossover) from the coarse source, [crossover, num_ws) from the fine one."""
        return np.concatenate([ws_coarse[:, :crossover], ws_fine[:, crossover:]], axis=1)

    async def z_line(self, seeds: list[int], labels: list[int | None], frames: int, psi: float) -> np.ndarray:
        """ws along slerp(z) segments between consecutive seeds (labels move linearly in c)."""
        pairs = [self.seed_latents(s, label) for s, label in zip(seeds, labels)]
        t = np.linspace(0.0, 1.0, frames)
        zs, cs = [], []
        for i, ((za, la), (zb, lb)) in enumerate(itertools.pairwise(pairs)):
            keep = slice(None) if i == 0 else slice(1, None)  # segments share their ends
            zs.append(slerp(za, zb, t)[keep])
            if self.info.c_dim:
                ca, cb = self.one_hot([la])[0], self.one_hot([lb])[0]
                cs.append(((1 - t)[:, None] * ca + t[:, None] * cb).astype(np.float32)[keep])
        w = await self.mapping(np.concatenate(zs), np.concatenate(cs) if cs else None)
        return self.broadcast(self.truncate(w, psi))

    @staticmethod
    def w_line(w: np.ndarray, frames: int) -> np.ndarray:
        """w [K, w_dim] -> lerp segments between consecutive rows, ends shared: [(K-1)(frames-1)+1, w_dim]."""
        t = np.linspace(0.0, 1.0, frames, dtype=np.float32)[:, None]
        parts = [((1 - t) * a + t * b)[slice(None) if i == 0 else slice(1, None)]
                 for i, (a, b) in enumerate(itertools.pairwise(w))]
        out = np.concatenate(parts).astype(np.float32)
        return out


def stylegan_pipelines(backend: InferenceBackend) -> dict[str, StyleGANPipeline]:
    return {name: StyleGANPipeline(backend, info) for name, info in discover(backend.models()).items()}
