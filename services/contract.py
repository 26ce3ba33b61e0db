"""The typed contract between export/ and services/: the `genserve.*` parameters of config.pbtxt.

One frozen dataclass per component role. Exporters write a role's parameters with
`to_parameters()`, pipelines read them with `from_parameters(params, model_name)`, which
converts and checks every value once: a missing key or a value of the wrong type is refused
with the model's name and the exporter command that writes it again, never guessed at.

Every config carries `genserve.contract_version` (written by export/triton_config.py).
Version 1 is the wire format exporters wrote before the key existed, so a config without it
is read as version 1; a newer version is refused the same way as a malformed key.

Sizes are spelled one way here: `native_height` / `native_width`, in image pixels. The wire
keeps version 1's spellings, which `to_parameters`/`from_parameters` translate: U-Nets write
`sample_height`/`sample_width` in latent cells (and `sample_size` when square; older
repositories have it alone), FLUX's transformer `native_height`/`native_width`, standalone
VAEs `sample_size` (the height, as AutoencoderKL's tiling reads it) with both sides.

Parameters no pipeline reads (provenance such as `source_sha256`, `license` for weights,
`precision`, `force_upcast`) stay plain strings the exporters write beside these.

Torch-free: services/ imports it, and so does export/.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar, Self

PREFIX = "genserve."
VERSION_KEY = "genserve.contract_version"
CONTRACT_VERSION = 1


class ContractError(ValueError):
    """A config's genserve.* parameters are not the contract this code reads."""


def exporter_command(params: Mapping[str, str], model_name: str) -> str:
    """The `python -m export` command that writes the model's config again."""
    p = params
    pipeline, name = p.get("genserve.pipeline", ""), p.get("genserve.pipeline_name", model_name)
    if "genserve.controlnet" in p:
        return f"python -m export controlnet --pipeline {name} --folder CONTROLNET_FOLDER"
    if pipeline in ("stable_diffusion", "stable_diffusion_xl", "flux"):
        return f"python -m export diffusers --folder FOLDER --name {name}"
    if pipeline in ("ddpm", "vae"):
        return f"python -m export {pipeline} --folder FOLDER --name {name}"
    if pipeline == "stylegan":
        return f"python -m export stylegan --module FILE.py:NAME --weights WEIGHTS --name {name}"
    if pipeline == "image_to_image":
        if p.get("genserve.task") == "translation":
            return f"python -m export translator --module FILE.py:NAME --weights WEIGHTS --name {model_name}"
        return f"python -m export sr --weights WEIGHTS --name {model_name}"
    if pipeline == "gan":
        return f"python -m export gan --checkpoint CHECKPOINT --name {model_name}"
    return "python -m export demo (or the exporter that wrote it)"


def refuse(params: Mapping[str, str], model_name: str, problem: str) -> ContractError:
    return ContractError(f"model {model_name!r}: {problem}; export it again with "
                         f"`{exporter_command(params, model_name)}`")


def contract_version(params: Mapping[str, str], model_name: str) -> int:
    """The config's contract version (1 without the key); a newer or unreadable one is refused."""
    text = params.get(VERSION_KEY)
    if text is None:
        return 1
    if not text.isdigit() or not 1 <= int(text) <= CONTRACT_VERSION:
        raise refuse(params, model_name, f"its config says contract version {text!r}, this service reads "
                                         f"versions 1 to {CONTRACT_VERSION} (a newer service may read it)")
    return int(text)


@dataclass(frozen=True)
class Codec:
    """How one kind of value is spelled on the wire."""

    kind: str  # named in refusals
    parse: Callable[[str], Any]
    format: Callable[[Any], str]


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


def _pair(text: str) -> tuple[float, float]:
    low, high = (float(v) for v in text.split(","))
    return low, high


INT = Codec("an integer", int, str)
FLOAT = Codec("a number", float, str)
FLAG = Codec('"1" or "0"', _flag, lambda v: "1" if v else "0")
TEXT = Codec("text", str, str)
RANGE = Codec('"low,high"', _pair, lambda r: f"{r[0]:g},{r[1]:g}")
INTS = Codec("comma-separated integers", lambda t: tuple(int(v) for v in t.split(",")), lambda v: ",".join(map(str, v)))
FLOATS = Codec("comma-separated numbers", lambda t: tuple(float(v) for v in t.split(",")),
               lambda v: ",".join(repr(float(x)) for x in v))


def param(codec: Codec, default: Any = MISSING, key: str | None = None, absent: Any = MISSING):
    """A field written as `genserve.<key or field name>` (not at all when None). `absent`: its value
    in a config without the key (default: `default`); a field with neither is required."""
    return field(default=default, metadata={"codec": codec, "key": key,
                                            "absent": default if absent is MISSING else absent})


def sized(default: Any = MISSING):
    """A field the role translates itself (`_size_parameters` / `_read_size`)."""
    return field(default=default, metadata={"sized": True})


class Reader:
    """Reads one config's parameters for one role, refusing what it cannot convert."""

    def __init__(self, params: Mapping[str, str], model_name: str):
        self.params, self.model_name = params, model_name

    def get(self, key: str, codec: Codec, default: Any = MISSING) -> Any:
        text = self.params.get(PREFIX + key)
        if text is None or text == "":
            if default is MISSING:
                raise refuse(self.params, self.model_name, f"its config lacks genserve.{key}")
            return default
        try:
            return codec.parse(text)
        except ValueError:
            raise refuse(self.params, self.model_name,
                         f"genserve.{key} is {text!r}, not {codec.kind}") from None


class Role:
    """to_parameters / from_parameters for the dataclasses below, from their fields' codecs."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # every subclass is a dataclass

    def to_parameters(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if "codec" in f.metadata and value is not None and value != "":
                out[PREFIX + (f.metadata["key"] or f.name)] = f.metadata["codec"].format(value)
        return out | {PREFIX + k: str(v) for k, v in self._size_parameters().items()}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], model_name: str) -> Self:
        contract_version(params, model_name)
        read = Reader(params, model_name)
        values = {f.name: read.get(f.metadata["key"] or f.name, f.metadata["codec"], f.metadata["absent"])
                  for f in fields(cls) if "codec" in f.metadata}
        return cls(**values, **cls._read_size(read))

    @classmethod
    def from_spec(cls, spec) -> Self:
        """From a ModelSpec (or anything with `parameters` and, for messages, `name`)."""
        return cls.from_parameters(spec.parameters, getattr(spec, "name", cls.__name__))

    def _size_parameters(self) -> dict[str, int]:
        return {}

    @classmethod
    def _read_size(cls, read: Reader) -> dict[str, Any]:
        return {}


def _latent_side(read: Reader, axis: str) -> int:
    """A U-Net's native latent side: sample_<axis>, or sample_size alone (older repositories)."""
    return read.get(f"sample_{axis}", INT, None) or read.get("sample_size", INT)


@dataclass(frozen=True)
class TextEncoderFacts(Role):
    """A text encoder: the tokenizer's padding (tokenizer.json lies beside the config)."""

    max_length: int = param(INT)  # tokens per prompt, padded to it
    pad_token_id: int = param(INT)
    hidden_size: int | None = param(INT, None)
    bos_token_id: int | None = param(INT, None)
    eos_token_id: int | None = param(INT, None)
    pooled: bool | None = param(FLAG, None)  # SDXL: the encoder whose first output is pooled
    pooled_dim: int | None = param(INT, None)
    truncate: bool | None = param(FLAG, None)  # FLUX's CLIP: longer prompts are cut, not refused


@dataclass(frozen=True)
class UNetFacts(Role):
    """A U-Net denoiser: SD's and SDXL's over latents, DDPM's over pixels (no VAE factor),
    and DeepCache's shallow U-Net (with `deep_channels`)."""

    in_channels: int = param(INT)
    size_multiple: int = param(INT)  # pixels: image sides must be multiples of it
    native_height: int = sized()  # pixels
    native_width: int = sized()
    vae_scale_factor: int | None = param(INT, None)  # None: pixel space
    out_channels: int | None = param(INT, None)
    num_classes: int | None = param(INT, None)  # DDPM: class labels, 0 unconditional
    output_range: tuple[float, float] | None = param(RANGE, None)
    controlnet_residuals: str | None = param(TEXT, None)  # "C/f,...": services.pipelines.controlnet
    deep_channels: int | None = param(INT, None)  # DeepCache's shallow graph
    # SDXL's added conditioning and model_index.json flags
    num_time_ids: int | None = param(INT, None)
    text_embeds_dim: int | None = param(INT, None)
    cross_attention_dim: int | None = param(INT, None)
    force_zeros_for_empty_prompt: bool | None = param(FLAG, None)
    requires_aesthetics_score: bool | None = param(FLAG, None)

    def _size_parameters(self) -> dict[str, int]:
        scale = self.vae_scale_factor or 1
        h, w = self.native_height // scale, self.native_width // scale
        return {"sample_height": h, "sample_width": w, **({"sample_size": h} if h == w else {})}

    @classmethod
    def _read_size(cls, read: Reader) -> dict[str, Any]:
        scale = read.get("vae_scale_factor", INT, None) or 1
        return {"native_height": _latent_side(read, "height") * scale,
                "native_width": _latent_side(read, "width") * scale}


@dataclass(frozen=True)
class TransformerFacts(Role):
    """FLUX's transformer over packed latents (2x2 patches, so 4x the latent channels)."""

    in_channels: int = param(INT)
    guidance_embeds: bool = param(FLAG)  # guidance is an input, not two passes
    native_height: int = param(INT)  # pixels
    native_width: int = param(INT)
    vae_scale_factor: int = param(INT)
    size_multiple: int = param(INT)


@dataclass(frozen=True)
class VAEFacts(Role):
    """A VAE decoder or encoder (both graphs carry the same facts)."""

    vae_scale_factor: int = param(INT)
    scaling_factor: float = param(FLOAT)
    image_channels: int = param(INT)
    latent_channels: int = param(INT)
    shift_factor: float | None = param(FLOAT, None)  # latents = (z - shift) * scaling
    size_multiple: int | None = param(INT, None)
    # SDXL: latents * std / scaling_factor + mean, one value per latent channel
    latents_mean: tuple[float, ...] | None = param(FLOATS, None)
    latents_std: tuple[float, ...] | None = param(FLOATS, None)
    native_height: int | None = sized(None)  # standalone VAEs only; a pipeline's is its denoiser's
    native_width: int | None = sized(None)

    def _size_parameters(self) -> dict[str, int]:
        if self.native_height is None or self.native_width is None:
            return {}
        return {"sample_size": self.native_height, "sample_height": self.native_height,
                "sample_width": self.native_width}

    @classmethod
    def _read_size(cls, read: Reader) -> dict[str, Any]:
        side = read.get("sample_size", INT, None)
        return {"native_height": read.get("sample_height", INT, side),
                "native_width": read.get("sample_width", INT, side)}


@dataclass(frozen=True)
class ControlNetFacts(Role):
    """A ControlNet graph exported for one SD pipeline."""

    name: str = param(TEXT, key="controlnet")  # what requests call it
    controlnet_residuals: str | None = param(TEXT, None)
    conditioning_channels: int = param(INT, 3)
    global_pool_conditions: bool = param(FLAG, False)
    vae_scale_factor: int | None = param(INT, None)


@dataclass(frozen=True)
class GeneratorFacts(Role):
    """A GAN generator: z (and a class label) -> image. `image_size` on the wire is the height,
    for readers that know one side only; `latent_dim` the number of z's values."""

    latent_shape: tuple[int, ...] = sized()  # z per image: (N,) or e.g. (100, 1, 1) for a DCGAN map
    num_classes: int = param(INT, absent=0)  # 0 = unconditional
    image_channels: int = param(INT)
    image_height: int = sized()
    image_width: int = sized()
    output_range: tuple[float, float] = param(RANGE, (-1.0, 1.0))

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def latent_dim(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def image_size(self) -> int:
        return self.image_height

    def _size_parameters(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim, "latent_shape": INTS.format(self.latent_shape),
                "image_size": self.image_height, "image_height": self.image_height, "image_width": self.image_width}

    @classmethod
    def _read_size(cls, read: Reader) -> dict[str, Any]:
        side = read.get("image_size", INT, None)  # older configs have it alone
        return {"latent_shape": read.get("latent_shape", INTS, None) or (read.get("latent_dim", INT),),
                "image_height": read.get("image_height", INT, MISSING if side is None else side),
                "image_width": read.get("image_width", INT, MISSING if side is None else side)}


@dataclass(frozen=True)
class StyleGANFacts(Role):
    """A StyleGAN generator (NVIDIA's interface); mapping and synthesis carry the same facts."""

    z_dim: int = param(INT)
    c_dim: int = param(INT)
    w_dim: int = param(INT)
    num_ws: int = param(INT)
    image_channels: int = param(INT)
    image_height: int = param(INT)
    image_width: int = param(INT)
    output_range: tuple[float, float] = param(RANGE, (-1.0, 1.0))


@dataclass(frozen=True)
class ImageToImageFacts(Role):
    """An image -> image graph: super-resolution, restoration or translation."""

    input_channels: int = param(INT)
    output_channels: int = param(INT)
    task: str = param(TEXT, "super_resolution")  # super_resolution, restoration or translation
    scale: int = param(INT, 1)
    input_range: tuple[float, float] = param(RANGE, (0.0, 1.0))
    output_range: tuple[float, float] = param(RANGE, (0.0, 1.0))
    size_multiple: int = param(INT, 1)
    size_minimum: int = param(INT, 1)  # smallest side the architecture takes (below 1 reads as 1)
    tile: int = param(INT, 128)  # default tile side, input pixels
    tile_overlap: int = param(INT, 16)
    architecture: str = param(TEXT, "")
    license: str = param(TEXT, "")  # the weights' licence, as the export recorded it

    def __post_init__(self) -> None:
        object.__setattr__(self, "size_minimum", max(1, self.size_minimum))

    def padded(self, side: int) -> int:
        """The side the graph is run at: >= side and the minimum, a multiple of size_multiple."""
        m = self.size_multiple
        return max(math.ceil(self.size_minimum / m) * m, math.ceil(side / m) * m)

    def tile_ok(self, tile: int) -> bool:
        return tile % self.size_multiple == 0 and tile >= self.size_minimum


ROLES: tuple[type[Role], ...] = (TextEncoderFacts, UNetFacts, TransformerFacts, VAEFacts, ControlNetFacts,
                                 GeneratorFacts, StyleGANFacts, ImageToImageFacts)
