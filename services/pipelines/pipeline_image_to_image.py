"""Image -> image graphs of any kind: super-resolution (scale s > 1) and translators
(Pix2Pix, CycleGAN, style transfer: scale 1), on images of any size, in overlapping tiles.

Served: every model with `genserve.pipeline = image_to_image` (export/super_resolution.py,
export/translator.py); the graph takes `image` [B, C_in, H, W] and returns `output_image`
[B, C_out, sH, sW], with its facts (scale, channels, ranges, size multiple, default tile)
in the config parameters.

Tiling, and why it is shaped this way:
- Every tile of an image has the same shape (th x tw = the tile side, or the whole padded
  side where the image is smaller), the last tile of a row or column aligned to the image's
  far edge rather than padded. Equal shapes are what lets tiles batch: the tiles of one
  request, and the tiles of concurrent requests for the same model and tile size, share
  model calls (each tile is its own call to the backend; the embedded backend's adaptive
  batcher merges concurrent calls up to the model's max_batch_size, as Triton's dynamic
  batcher does server-side).
- Tiles overlap by `overlap` input pixels (or more, for the last one). A convolution near a
  tile's edge sees the tile's zero padding instead of the neighbouring pixels, so the
  output is blended with weights that ramp linearly from ~0 at an inner tile edge to 1 at
  `overlap * s` output pixels inside it (edges on the image border keep weight 1, where
  the untiled model sees the same padding). Weighted sums over the weights give the
  output; a seam is at worst a weighted mean of two nearly equal values.
- Work is done in waves of max_batch_size tiles, so the tiles in flight (and their
  activations) do not grow with the image; only the output canvas does, and its size is
  bounded by GENSERVE_MAX_UPSCALE_PIXELS.
- Sides that are not multiples of the architecture's size multiple (or below its
  minimum) are padded by reflection (replication where the side is too short to reflect),
  as spandrel pads, and the padding is cropped from the output.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import numpy as np

from services.runtime import InferenceBackend, ModelSpec

PIPELINE = "image_to_image"


def _range(text: str) -> tuple[float, float]:
    low, high = (float(v) for v in text.split(","))
    return low, high


@dataclass(frozen=True)
class ImageToImageInfo:
    """What the pipeline knows of a graph, read from its config."""

    task: str  # super_resolution, restoration or translation
    scale: int
    input_channels: int
    output_channels: int
    input_range: tuple[float, float]
    output_range: tuple[float, float]
    size_multiple: int
    size_minimum: int
    tile: int  # default tile side, input pixels
    tile_overlap: int
    architecture: str
    license: str = ""  # the weights' licence, as the export recorded it

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "ImageToImageInfo":
        p = spec.parameters
        return cls(
            task=p.get("genserve.task", "super_resolution"), scale=int(p.get("genserve.scale", "1")),
            input_channels=int(p["genserve.input_channels"]), output_channels=int(p["genserve.output_channels"]),
            input_range=_range(p.get("genserve.input_range", "0,1")),
            output_range=_range(p.get("genserve.output_range", "0,1")),
            size_multiple=int(p.get("genserve.size_multiple", "1")),
            size_minimum=max(1, int(p.get("genserve.size_minimum", "1"))),
            tile=int(p.get("genserve.tile", "128")), tile_overlap=int(p.get("genserve.tile_overlap", "16")),
            architecture=p.get("genserve.architecture", ""), license=p.get("genserve.license", ""))

    def padded(self, side: int) -> int:
        """The side the graph is run at: >= side and the minimum, a multiple of size_multiple."""
        m = self.size_multiple
        return max(math.ceil(self.size_minimum / m) * m, math.ceil(side / m) * m)

    def tile_ok(self, tile: int) -> bool:
        return tile % self.size_multiple == 0 and tile >= self.size_minimum


@dataclass
class ImageToImageOutput:
    image: np.ndarray  # [C_out, s*H, s*W] in the model's output range
    tiles: int  # model rows run for this image
    tile: tuple[int, int]  # (th, tw) input pixels
    inference_seconds: float  # from the first tile sent to the last one back


def tile_starts(side: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering [0, side), consecutive ones
    overlapping by at least `overlap`; the last one ends at `side`."""
    if side <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, side - tile, stride))
    return starts + [side - tile]


def ramp(length: int, fade: int, fade_start: bool, fade_end: bool) -> np.ndarray:
    """Blending weights along one tile axis, output pixels: 1 inside, a linear ramp over
    `fade` pixels at an edge shared with a neighbouring tile."""
    w = np.ones(length, dtype=np.float32)
    if fade > 0:
        r = (np.arange(fade, dtype=np.float32) + 0.5) / fade
        if fade_start:
            w[:fade] = np.minimum(w[:fade], r)
        if fade_end:
            w[length - fade:] = np.minimum(w[length - fade:], r[::-1])
    return w


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] -> [C, height, width], padded at the bottom and right by reflection
    (replication where a side is too short to reflect)."""
    _, h, w = image.shape
    ph, pw = height - h, width - w
    if ph == 0 and pw == 0:
        return image
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(image, ((0, 0), (0, ph), (0, pw)), mode=mode)


class ImageToImagePipeline:
    def __init__(self, backend: InferenceBackend, model: str):
        self.backend = backend
        self.model = model
        self.spec = backend.models()[model]
        self.info = ImageToImageInfo.from_spec(self.spec)

    async def __call__(self, image: np.ndarray, tile: int | None = None,
                       tile_overlap: int | None = None) -> ImageToImageOutput:
        """[C_in, H, W] float32 in the input range -> [C_out, sH, sW] in the output range."""
        info, s = self.info, self.info.scale
        tile = tile or info.tile
        overlap = info.tile_overlap if tile_overlap is None else tile_overlap
        _, h, w = image.shape
        # 1. Pad to what the architecture takes; tiles no larger than the padded image.
        ph, pw = info.padded(h), info.padded(w)
        padded = pad_to(image.astype(np.float32, copy=False), ph, pw)
        th, tw = min(tile, ph), min(tile, pw)
        ys, xs = tile_starts(ph, th, overlap), tile_starts(pw, tw, overlap)
        # 2. Blending weights per tile position (output pixels), and the canvases.
        fade = overlap * s
        wy = {i: ramp(th * s, fade, i > 0, i < len(ys) - 1) for i in range(len(ys))}
        wx = {j: ramp(tw * s, fade, j > 0, j < len(xs) - 1) for j in range(len(xs))}
        out = np.zeros((info.output_channels, ph * s, pw * s), dtype=np.float32)
        weight = np.zeros((ph * s, pw * s), dtype=np.float32)
        # 3. Tiles in waves; each tile its own backend call, so the batcher merges them
        #    (with each other and with other requests' tiles).
        positions = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
        wave = max(1, self.spec.max_batch_size)
        t0 = time.perf_counter()
        for k in range(0, len(positions), wave):
            batch = positions[k:k + wave]
            results = await asyncio.gather(*(
                self._run(padded[None, :, ys[i]:ys[i] + th, xs[j]:xs[j] + tw]) for i, j in batch))
            for (i, j), tile_out in zip(batch, results):
                y, x = ys[i] * s, xs[j] * s
                wt = np.outer(wy[i], wx[j])
                out[:, y:y + th * s, x:x + tw * s] += tile_out[0] * wt
                weight[y:y + th * s, x:x + tw * s] += wt
        elapsed = time.perf_counter() - t0
        out /= weight
        return ImageToImageOutput(out[:, :h * s, :w * s], len(positions), (th, tw), elapsed)

    async def _run(self, tile: np.ndarray) -> np.ndarray:
        feeds = {"image": np.ascontiguousarray(tile, dtype=np.float32)}
        return (await self.backend.infer(self.model, feeds))["output_image"]


def image_to_image_pipelines(backend: InferenceBackend) -> dict[str, ImageToImagePipeline]:
    return {name: ImageToImagePipeline(backend, name) for name, spec in sorted(backend.models().items())
            if spec.parameters.get("genserve.pipeline") == PIPELINE}
