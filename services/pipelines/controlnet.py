"""ControlNet on the step engine (graphs: export/controlnet.py).

A request's `controlnet` units (model, control image, conditioning scale, start/end window)
ride on its trajectory as per-row inputs beside the U-Net's:

  controlnet:<slot>:<model>:cond   [R, C, H, W] the control image in [0, 1], at the output size
  controlnet:<slot>:<model>:scale  [R] this step's conditioning scale (0: off for that row)
  controlnet:guess                 [R] 1 for rows in guess mode

Rows of requests without those keys get zeros when the engine merges a step's rows
(`diffusion.merge_rows`), so one U-Net call serves requests with and without control. Before that call,
`ControlNets.unet_inputs` runs each ControlNet once for the rows whose scale is not zero,
scales its residuals per row (guess mode's 0.1..1 ramp over the down residuals, as diffusers'
ControlNetModel), sums them over units (diffusers' MultiControlNetModel) into zero residuals
and hands the U-Net those: a row without control adds zeros, which is exact.

As diffusers' StableDiffusionControlNetPipeline: step i of n runs a unit when neither
i/n < guidance_start nor (i+1)/n > guidance_end; with classifier-free guidance and guess mode
only the conditional half gets control.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

from services.contract import ControlNetFacts

CONTROL_PREFIX = "controlnet:"
GUESS = "controlnet:guess"
MID_RESIDUAL = "mid_block_res"
RESIDUALS_PARAMETER = "genserve.controlnet_residuals"
PREPROCESSORS = ("canny",)


def down_residual(i: int) -> str:
    return f"down_block_res_{i}"


def parse_layout(text: str) -> list[tuple[str, int, int]]:
    """genserve.controlnet_residuals ("C/f,...": channels and downsampling of each residual,
    down blocks' then the mid block's) -> (input name, channels, factor)."""
    pairs = [tuple(int(v) for v in item.split("/")) for item in text.split(",")]
    names = [down_residual(i) for i in range(len(pairs) - 1)] + [MID_RESIDUAL]
    return [(n, c, f) for n, (c, f) in zip(names, pairs)]


def zero_residuals(unet_spec, rows: int, height: int, width: int) -> dict[str, np.ndarray]:
    """The residual inputs of a U-Net exported with them, zero (no control) for `rows` latents of
    height x width; {} for one exported without. For callers feeding the U-Net graph directly."""
    if RESIDUALS_PARAMETER not in unet_spec.parameters:
        return {}
    return {n: np.zeros((rows, c, height // f, width // f), np.float32)
            for n, c, f in parse_layout(unet_spec.parameters[RESIDUALS_PARAMETER])}


@dataclass(frozen=True)
class ControlNetModel:
    """One exported ControlNet of a pipeline."""

    name: str  # what requests call it
    graph: str  # <pipeline>_controlnet_<name>
    conditioning_channels: int
    global_pool_conditions: bool


@dataclass
class ControlUnit:
    """One entry of a request's `controlnet` list, its image ready for the graph."""

    model: str
    image: np.ndarray  # [C, H, W] float32 in [0, 1] at the output size
    conditioning_scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    def keep(self, step: int, steps: int) -> bool:
        """Whether this unit acts on step `step` of `steps` (diffusers' controlnet_keep)."""
        return not (step / steps < self.guidance_start or (step + 1) / steps > self.guidance_end)


def control_rows(units: list[ControlUnit], guess_mode: bool, step: int, steps: int, images: int,
                 guided: bool) -> dict[str, np.ndarray]:
    """A trajectory's control inputs for one step: `images` rows, twice that with guidance
    (negative half first, which guess mode leaves without control)."""
    rows = images * (2 if guided else 1)
    out: dict[str, np.ndarray] = {}
    for slot, unit in enumerate(units):
        key = f"{CONTROL_PREFIX}{slot}:{unit.model}"
        scale = np.full(rows, unit.conditioning_scale if unit.keep(step, steps) else 0.0, np.float32)
        if guided and guess_mode:
            scale[:images] = 0.0
        out[f"{key}:cond"] = np.broadcast_to(unit.image[None], (rows, *unit.image.shape))
        out[f"{key}:scale"] = scale
    out[GUESS] = np.full(rows, 1.0 if guess_mode else 0.0, np.float32)
    return out


def discover(models: dict, pipeline: str) -> dict[str, ControlNetModel]:
    """The ControlNets exported for `pipeline` (genserve.controlnet on its models)."""
    found = {}
    for spec in models.values():
        p = spec.parameters
        if p.get("genserve.pipeline_name") == pipeline and "genserve.controlnet" in p:
            facts = ControlNetFacts.from_spec(spec)
            found[facts.name] = ControlNetModel(facts.name, spec.name, facts.conditioning_channels,
                                                facts.global_pool_conditions)
    return found


def owners(models: dict) -> dict[str, list[str]]:
    """ControlNet name -> the pipelines it was exported for (to name the right base in a refusal)."""
    out: dict[str, list[str]] = {}
    for spec in models.values():
        p = spec.parameters
        if "genserve.controlnet" in p:
            out.setdefault(p["genserve.controlnet"], []).append(p["genserve.pipeline_name"])
    return out


class ControlNets:
    """A pipeline's ControlNets and its U-Net's residual inputs."""

    def __init__(self, backend, unet_spec, models: dict[str, ControlNetModel]):
        self.backend, self.unet_spec = backend, unet_spec
        self.layout = parse_layout(unet_spec.parameters[RESIDUALS_PARAMETER])
        self.models = models
        n = len(self.layout) - 1
        # ControlNetModel's guess-mode weights: logspace(-1, 0) over the down residuals, 1 for the mid one.
        self.guess_weights = np.logspace(-1, 0, n + 1).astype(np.float32)

    @staticmethod
    def accepts(unet_spec) -> bool:
        """Whether the U-Net graph takes ControlNet residuals (repositories exported before them,
        or with --no-controlnet-inputs, do not)."""
        return RESIDUALS_PARAMETER in unet_spec.parameters

    def global_pool(self, units: list[ControlUnit]) -> bool:
        """Whether the request's first ControlNet pools its conditions (diffusers then turns guess
        mode on for every unit)."""
        return self.models[units[0].model].global_pool_conditions

    async def unet_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows' U-Net inputs: the control keys replaced by the summed, scaled residuals."""
        sample = inputs["sample"]
        residuals = zero_residuals(self.unet_spec, len(sample), *sample.shape[2:])
        plain = {k: v for k, v in inputs.items() if not k.startswith(CONTROL_PREFIX)}
        guess = inputs.get(GUESS)
        by_model: dict[str, list[str]] = {}
        for key in inputs:
            if key.startswith(CONTROL_PREFIX) and key.endswith(":scale"):
                by_model.setdefault(key.split(":")[2], []).append(key[:-len(":scale")])
        for model, slots in by_model.items():
            picks = [(slot, np.flatnonzero(inputs[f"{slot}:scale"])) for slot in slots]
            picks = [(slot, rows) for slot, rows in picks if len(rows)]
            if not picks:
                continue
            rows = np.concatenate([r for _, r in picks])
            graph = self.models[model].graph
            # The U-Net's inputs the ControlNet reads (SDXL's: its added conditioning too).
            feed = {t.name: plain[t.name][rows] for t in self.backend.models()[graph].inputs
                    if t.name != "controlnet_cond"}
            feed["controlnet_cond"] = np.concatenate([inputs[f"{slot}:cond"][r] for slot, r in picks])
            out = await self.backend.infer(graph, feed, [n for n, _, _ in self.layout])
            offset = 0
            for slot, r in picks:
                part = slice(offset, offset + len(r))
                scale = inputs[f"{slot}:scale"][r]
                guessing = (guess[r] > 0) if guess is not None else np.zeros(len(r), bool)
                weighted = not self.models[model].global_pool_conditions
                for j, (name, _, _) in enumerate(self.layout):
                    w = scale * np.where(guessing & weighted, self.guess_weights[j], np.float32(1.0))
                    residuals[name][r] += out[name][part] * w.astype(np.float32)[:, None, None, None]
                offset += len(r)
        return {**plain, **residuals}


# -- control images ----------------------------------------------------------------------

def image_digest(data: bytes) -> str:
    """What the response echoes instead of a control image."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canny(image, low: int, high: int):
    """OpenCV's Canny edges of a PIL image (grey), as white lines on black, three channels:
    what canny ControlNets are trained on."""
    import cv2
    from PIL import Image

    edges = cv2.Canny(np.asarray(image.convert("L")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def prepare_control_image(data: bytes, height: int, width: int, channels: int, preprocess: str | None = None,
                          thresholds: tuple[int, int] = (100, 200), max_side: int = 4096) -> np.ndarray:
    """Image bytes -> [C, height, width] float32 in [0, 1], as diffusers' control image processor
    makes it (RGB, Lanczos resize to the output size, /255, not normalised), after the optional
    preprocessor. Raises ValueError naming what is wrong."""
    from PIL import Image

    try:
        image: Image.Image = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise ValueError(f"not a decodable PNG/JPEG/WebP image ({type(exc).__name__})") from None
    if max(image.size) > max_side:
        raise ValueError(f"is {image.size[0]}x{image.size[1]}; the largest side allowed is {max_side}")
    try:
        image.load()
    except Exception as exc:
        raise ValueError(f"not a decodable PNG/JPEG/WebP image ({type(exc).__name__})") from None
    if preprocess == "canny":
        image = canny(image, *thresholds)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy()
