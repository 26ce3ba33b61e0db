"""What the API answers, as typed objects (the raw JSON stays on `.raw`)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union


@dataclass(frozen=True)
class Image:
    index: int
    seed: Optional[int]  # reproduces this image alone with num_images=1
    media_type: str
    width: int
    height: int
    data: bytes  # the encoded image (PNG unless asked otherwise), decoded from base64
    class_label: Optional[int] = None

    @classmethod
    def from_json(cls, item: dict) -> Image:
        return cls(index=item.get("index", 0), seed=item.get("seed"), media_type=item.get("media_type", "image/png"),
                   width=item.get("width", 0), height=item.get("height", 0), data=base64.b64decode(item["data"]),
                   class_label=item.get("class_label"))

    def to_pil(self):
        """A PIL image (needs pillow: `pip install genserve-client[pil]`)."""
        from PIL import Image as PILImage

        return PILImage.open(io.BytesIO(self.data))

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_bytes(self.data)


@dataclass(frozen=True)
class Tensor:
    """A latent or W tensor as the API carries it: shape, FP32, little-endian bytes."""

    shape: list[int]
    data: bytes
    datatype: str = "FP32"

    @classmethod
    def from_json(cls, item: dict) -> Tensor:
        return cls(shape=list(item["shape"]), data=base64.b64decode(item["data"]),
                   datatype=item.get("datatype", "FP32"))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "datatype": self.datatype, "data": base64.b64encode(self.data).decode()}

    def to_numpy(self):
        import numpy as np

        return np.frombuffer(self.data, "<f4").reshape(self.shape)


@dataclass(frozen=True)
class GenerationResult:
    """Every image endpoint's answer: the images and what reproduces them."""

    request_id: str
    model: str
    backend: str
    parameters: dict  # every parameter after defaults, seed included
    images: list[Image]
    timings: dict
    raw: dict = field(repr=False)

    @classmethod
    def from_json(cls, body: dict) -> GenerationResult:
        return cls(request_id=body.get("request_id", ""), model=body.get("model", ""), backend=body.get("backend", ""),
                   parameters=body.get("parameters", {}), images=[Image.from_json(i) for i in body.get("images", [])],
                   timings=body.get("timings", {}), raw=body)


@dataclass(frozen=True)
class LatentResult:
    """/v1/vae/encode (`latent`) and /v1/gan/latents (`w`)."""

    request_id: str
    model: str
    parameters: dict
    tensor: Tensor
    raw: dict = field(repr=False)

    @classmethod
    def from_json(cls, body: dict) -> LatentResult:
        tensor = body.get("latent") or body.get("w")
        return cls(request_id=body.get("request_id", ""), model=body.get("model", ""),
                   parameters=body.get("parameters", {}), tensor=Tensor.from_json(tensor), raw=body)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    pipeline: str
    endpoint: str
    backend: str
    max_batch_size: int
    parameters: dict  # request parameters the model accepts, with their limits

    @classmethod
    def from_json(cls, item: dict) -> ModelInfo:
        return cls(**{k: item[k] for k in ("name", "version", "pipeline", "endpoint", "backend", "max_batch_size",
                                           "parameters")})


@dataclass(frozen=True)
class Models:
    default_models: dict  # family -> model name
    models: list[ModelInfo]

    def get(self, name: str) -> ModelInfo:
        return next(m for m in self.models if m.name == name)


# -- stream events ---------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    elapsed: Optional[float] = None


@dataclass(frozen=True)
class Preview:
    step: int
    images: list[Image]


@dataclass(frozen=True)
class Result:
    result: GenerationResult


Event = Union[Progress, Preview, Result]


def event_from_sse(name: str, data: Any) -> Optional[Event]:
    if name == "progress":
        return Progress(step=data["step"], total=data["total"], elapsed=data.get("elapsed"))
    if name == "preview":
        return Preview(step=data["step"], images=[Image.from_json(i) for i in data.get("images", [])])
    if name == "result":
        return Result(GenerationResult.from_json(data))
    return None  # unknown events are skipped: newer servers may send more
