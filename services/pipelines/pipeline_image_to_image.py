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
- Work is done in waves of as many tiles as one call's activation memory allows
  (GENSERVE_IMAGE_CALL_MB over the measured bytes per tile output pixel, at most
  max_batch_size), so the tiles in flight do not grow with the image; only the output
  canvas does (4 x (channels + 1) bytes per output pixel: canvas_bytes), bounded by
  GENSERVE_MAX_UPSCALE_PIXELS. On the embedded backend the graphs run without ONNX
  Runtime's arena (services.runtime.onnxruntime_backend), so a call's activations are freed
  after it, and the service holds one call slot for all image work, so diffusion steps run
  between its calls.
- Sides that are not multiples of the architecture's size multiple (or below its
  minimum) are padded by reflection (replication where the side is too short to reflect),
  as spandrel pads, and the padding is cropped from the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.contract import ImageToImageFacts
from services.runtime import InferenceBackend

PIPELINE = "image_to_image"


# What the pipeline knows of a graph: the contract's type, which the exporter writes.
ImageToImageInfo = ImageToImageFacts


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
    return [*starts, side - tile]


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
    mode: Literal["reflect", "edge"] = "reflect" if ph < h and pw < w else "edge"
    return np.pad(image, ((0, 0), (0, ph), (0, pw)), mode=mode)


@dataclass(frozen=True)
class TileLayout:
    """Where an image's tiles go: the padded size, the tile shape, the tile offsets."""

    height: int  # padded, input pixels
    width: int
    th: int
    tw: int
    ys: list[int]
    xs: list[int]
    scale: int

    @property
    def tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def tile_output_pixels(self) -> int:
        return self.th * self.tw * self.scale * self.scale

    @property
    def computed_pixels(self) -> int:
        """Output pixels the model computes, overlaps included: the request's work."""
        return self.tiles * self.tile_output_pixels


COST_SMOOTHING = 0.2  # moving average of the measured seconds per computed pixel


class ImageToImagePipeline:
    def __init__(self, backend: InferenceBackend, model: str, call_slot: asyncio.Semaphore | None = None,
                 call_budget_bytes: int = 0):
        """`call_slot`: held for each model call, shared by every image-to-image pipeline of the
        service, so image work takes one call's share of the CPU at a time and diffusion steps
        run between its calls. `call_budget_bytes` (0: none): the activation memory one call
        may take; rows per call are sized to fit once `bytes_per_pixel` is measured."""
        self.backend = backend
        self.model = model
        self.spec = backend.models()[model]
        self.info = ImageToImageInfo.from_spec(self.spec)
        self.call_slot = call_slot
        self.call_budget_bytes = call_budget_bytes
        # Measured (calibrate(), then every call): activation bytes per tile output pixel of one
        # row in this process (0 on a remote backend), and model seconds per computed pixel.
        self.bytes_per_pixel: float | None = None
        self.seconds_per_pixel: float | None = None

    def layout(self, height: int, width: int, tile: int | None = None, overlap: int | None = None) -> TileLayout:
        info = self.info
        tile = tile or info.tile
        overlap = info.tile_overlap if overlap is None else overlap
        ph, pw = info.padded(height), info.padded(width)
        th, tw = min(tile, ph), min(tile, pw)
        return TileLayout(ph, pw, th, tw, tile_starts(ph, th, overlap), tile_starts(pw, tw, overlap), info.scale)

    def canvas_bytes(self, layout: TileLayout) -> int:
        """The request's float32 output canvas and blending weights: 4 x (C_out + 1) bytes per
        (padded) output pixel, its memory besides the calls."""
        return 4 * (self.info.output_channels + 1) * layout.height * layout.width * layout.scale ** 2

    def call_bytes(self, layout: TileLayout) -> int | None:
        """One row's activation memory at this layout's tile (None before a measure)."""
        if self.bytes_per_pixel is None:
            return None
        return int(self.bytes_per_pixel * layout.tile_output_pixels)

    def rows_per_call(self, layout: TileLayout) -> int:
        most = max(1, self.spec.max_batch_size)
        row = self.call_bytes(layout)
        if not row or self.call_budget_bytes <= 0:
            return most
        return max(1, min(most, self.call_budget_bytes // row))

    def work_seconds(self, layout: TileLayout) -> float | None:
        """The request's model time by the measured cost (None before a measure)."""
        if self.seconds_per_pixel is None:
            return None
        return layout.computed_pixels * self.seconds_per_pixel

    async def calibrate(self) -> tuple[float, float]:
        """One row of the default tile, with this process's RSS sampled while it runs: the
        activation bytes and seconds per output pixel that size calls and bound requests (kept,
        and returned)."""
        import threading

        from services.memory import rss_bytes, trim

        info = self.info
        side = info.padded(info.tile)
        tile = np.zeros((1, info.input_channels, side, side), dtype=np.float32)
        await self._run(tile)  # a shape's first call initialises; not measured
        trim()
        before, peak, done = rss_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                done.wait(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        try:
            await self._run(tile)
        finally:
            seconds = time.perf_counter() - t0
            done.set()
            sampler.join()
        pixels = side * side * info.scale * info.scale
        self.bytes_per_pixel = bytes_per_pixel = max(0, peak[0] - before) / pixels
        self.seconds_per_pixel = seconds_per_pixel = seconds / pixels
        trim()
        return bytes_per_pixel, seconds_per_pixel

    async def __call__(self, image: np.ndarray, tile: int | None = None,
                       tile_overlap: int | None = None) -> ImageToImageOutput:
        """[C_in, H, W] float32 in the input range -> [C_out, sH, sW] in the output range."""
        info, s = self.info, self.info.scale
        overlap = info.tile_overlap if tile_overlap is None else tile_overlap
        _, h, w = image.shape
        # 1. Pad to what the architecture takes; tiles no larger than the padded image.
        lay = self.layout(h, w, tile, overlap)
        th, tw, ys, xs = lay.th, lay.tw, lay.ys, lay.xs
        padded = pad_to(image.astype(np.float32, copy=False), lay.height, lay.width)
        # 2. Blending weights per tile position (output pixels), and the canvases.
        fade = overlap * s
        wy = {i: ramp(th * s, fade, i > 0, i < len(ys) - 1) for i in range(len(ys))}
        wx = {j: ramp(tw * s, fade, j > 0, j < len(xs) - 1) for j in range(len(xs))}
        out = np.zeros((info.output_channels, lay.height * s, lay.width * s), dtype=np.float32)
        weight = np.zeros((lay.height * s, lay.width * s), dtype=np.float32)
        # 3. Tiles in waves of as many rows as one call's memory allows; each tile its own
        #    backend call, so the batcher merges them (with each other and, without a call
        #    slot, with other requests' tiles).
        positions = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
        wave = self.rows_per_call(lay)
        t0 = time.perf_counter()
        for k in range(0, len(positions), wave):
            batch = positions[k:k + wave]
            results = await self._wave([padded[None, :, ys[i]:ys[i] + th, xs[j]:xs[j] + tw] for i, j in batch],
                                       lay.tile_output_pixels)
            for (i, j), tile_out in zip(batch, results):
                y, x = ys[i] * s, xs[j] * s
                wt = np.outer(wy[i], wx[j])
                out[:, y:y + th * s, x:x + tw * s] += tile_out[0] * wt
                weight[y:y + th * s, x:x + tw * s] += wt
            del results
        elapsed = time.perf_counter() - t0
        out /= weight
        del weight
        return ImageToImageOutput(out[:, :h * s, :w * s], len(positions), (th, tw), elapsed)

    async def _wave(self, tiles: list[np.ndarray], tile_pixels: int) -> list[np.ndarray]:
        """One wave's tiles, under the call slot; refreshes the measured cost."""
        async with self.call_slot or contextlib.nullcontext():
            t0 = time.perf_counter()
            results = await asyncio.gather(*(self._run(t) for t in tiles))
            per_pixel = (time.perf_counter() - t0) / (len(tiles) * tile_pixels)
        old = self.seconds_per_pixel
        self.seconds_per_pixel = per_pixel if old is None else old + COST_SMOOTHING * (per_pixel - old)
        return results

    async def _run(self, tile: np.ndarray) -> np.ndarray:
        feeds = {"image": np.ascontiguousarray(tile, dtype=np.float32)}
        return (await self.backend.infer(self.model, feeds))["output_image"]


def image_to_image_pipelines(backend: InferenceBackend, call_budget_bytes: int = 0,
                             one_call_at_a_time: bool = False) -> dict[str, ImageToImagePipeline]:
    """`one_call_at_a_time`: every pipeline shares one call slot (the service on the embedded
    backend, where image work and diffusion steps share the CPU)."""
    slot = asyncio.Semaphore(1) if one_call_at_a_time else None
    return {name: ImageToImagePipeline(backend, name, slot, call_budget_bytes)
            for name, spec in sorted(backend.models().items()) if spec.parameters.get("genserve.pipeline") == PIPELINE}
