"""TensorRT plans for GPU targets: optimization profiles, precision per component, an
engine cache, and the `platform: "tensorrt_plan"` configs that serve them.

A plan is specific to the GPU's compute capability, the TensorRT version, the profile
and the precision; the cache key covers all four (and the ONNX graph), so a plan is
rebuilt exactly when one of them changes. Building needs an NVIDIA GPU and the
`tensorrt` package; without them `require_tensorrt()` stops with a message that says so.
Profiles and configs are plain data, computed (and tested) without a GPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from export.errors import TensorRTUnavailable
from export.triton_config import DeploymentTarget, ModelConfigSpec

DEFAULT_CACHE = Path.home() / ".cache" / "genserve" / "tensorrt"
# The VAE overflows in fp16 (large activations in its decoder): it stays fp32, as in
# NVIDIA's own Stable Diffusion TensorRT demo.
FP32_COMPONENTS = {"vae_decoder", "vae_encoder"}


@dataclass(frozen=True)
class ShapeRange:
    """Full shapes, batch axis included."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


Profile = dict[str, ShapeRange]  # input name -> range


def gan_profile(latent_shape: int | tuple[int, ...], conditional: bool, max_batch: int) -> Profile:
    """`latent_shape`: z per image, an int for a vector or a shape such as (100, 1, 1)."""
    opt = min(8, max_batch)
    z = (latent_shape,) if isinstance(latent_shape, int) else tuple(latent_shape)
    profile = {"z": ShapeRange((1, *z), (opt, *z), (max_batch, *z))}
    if conditional:
        profile["class_label"] = ShapeRange((1,), (opt,), (max_batch,))
    return profile


def stable_diffusion_profile(component: str, *, max_rows: int, seq_len: int, hidden: int, latent_channels: int,
                             image_channels: int, vae_scale: int, native_latent: int | tuple[int, int],
                             min_latent: int, max_latent: int | tuple[int, int], deep_channels: int = 0) -> Profile:
    """Batch and spatial ranges per component (`deep_channels`: the DeepCache features'
    channels, for the shallow U-Net; see export.deepcache). `native_latent` and `max_latent`
    are a side or (height, width).

    With classifier-free guidance every image is two U-Net (and text-encoder) rows, so
    the optimum is 2 rows (one guided image) and the maximum the model's max batch; the
    VAE sees images, not rows, so its batch tops out at half of that.
    """
    c, lo = latent_channels, min_latent
    (mh, mw), (hh, hw) = ((n, n) if isinstance(n, int) else tuple(n) for n in (native_latent, max_latent))
    images = max(1, max_rows // 2)
    if component == "text_encoder":
        return {"input_ids": ShapeRange((1, seq_len), (2, seq_len), (max_rows, seq_len))}
    if component in ("unet", "unet_shallow"):
        profile = {
            "sample": ShapeRange((1, c, lo, lo), (2, c, mh, mw), (max_rows, c, hh, hw)),
            "timestep": ShapeRange((1,), (2,), (max_rows,)),
            "encoder_hidden_states": ShapeRange((1, seq_len, hidden), (2, seq_len, hidden),
                                                (max_rows, seq_len, hidden)),
        }
        if component == "unet_shallow":
            d = deep_channels
            profile["deep_features"] = ShapeRange((1, d, lo, lo), (2, d, mh, mw), (max_rows, d, hh, hw))
        return profile
    if component == "vae_decoder":
        return {"latent_sample": ShapeRange((1, c, lo, lo), (1, c, mh, mw), (images, c, hh, hw))}
    if component == "vae_encoder":
        f, ic = vae_scale, image_channels
        return {"sample": ShapeRange((1, ic, lo * f, lo * f), (1, ic, mh * f, mw * f), (images, ic, hh * f, hw * f))}
    raise ValueError(f"unknown component {component!r}")


def flux_profile(component: str, max_batch: int, *, length: int = 0, hidden: int = 0, pooled: int = 0,
                 channels: int = 0, native: int = 0, smallest: int = 2, guided: bool = False) -> Profile:
    """FLUX's ranges. Guidance-distilled models run one row per image (no doubled batch), so
    the optimum is batch 1, and the VAE decodes as many images as the transformer has rows.
    Sides range from the smallest the API accepts (one 2x2 patch of latents) to twice the
    native one. `native` is in patches for the transformer (S = side^2 tokens of 4C features),
    in latents for the VAE decoder, in pixels for the encoder (`smallest`: its least side)."""
    if component in ("text_encoder", "text_encoder_2"):
        return {"input_ids": ShapeRange((1, length), (1, length), (max_batch, length))}
    if component == "transformer":
        lo, mid, hi = 1, native**2, (2 * native) ** 2
        rows = {"txt_ids": (length, 3), "encoder_hidden_states": (length, hidden), "pooled_projections": (pooled,),
                "timestep": (), **({"guidance": ()} if guided else {})}
        profile = {name: ShapeRange((1, *s), (1, *s), (max_batch, *s)) for name, s in rows.items()}
        profile["hidden_states"] = ShapeRange((1, lo, channels), (1, mid, channels), (max_batch, hi, channels))
        profile["img_ids"] = ShapeRange((1, lo, 3), (1, mid, 3), (max_batch, hi, 3))
        return profile
    lo, mid, hi = smallest, native, 2 * native
    name = "latent_sample" if component == "vae_decoder" else "sample"
    return {name: ShapeRange((1, channels, lo, lo), (1, channels, mid, mid), (max_batch, channels, hi, hi))}


# FLUX runs its transformer and T5 in bf16 (what it was trained in; fp16 overflows there).
FLUX_PRECISION = {"transformer": "bf16", "text_encoder_2": "bf16"}


def precision_for(component: str) -> str:
    return "fp32" if component in FP32_COMPONENTS else "fp16"


def profile_json(profile: Profile) -> str:
    return json.dumps({k: [list(r.min), list(r.opt), list(r.max)] for k, r in sorted(profile.items())})


def engine_cache_key(onnx_sha256: str, compute_capability: str, tensorrt_version: str, profile: Profile,
                     precision: str) -> str:
    text = "|".join([onnx_sha256, compute_capability, tensorrt_version, profile_json(profile), precision])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tensorrt_config(spec: ModelConfigSpec, instance_count: int = 1, profile: Profile | None = None) -> ModelConfigSpec:
    """The same model, served from model.plan by Triton's TensorRT platform on GPUs. Its
    max_batch_size is the plan's (the profile's largest batch; Triton refuses a larger one,
    and the backends split calls past it)."""
    batching = spec.batching
    if profile:
        largest = min(batching.max_batch_size, *(r.max[0] for r in profile.values()))
        batching = replace(batching, max_batch_size=largest,
                           preferred_batch_sizes=tuple(b for b in batching.preferred_batch_sizes if b <= largest))
    return replace(spec, platform="tensorrt_plan", target=DeploymentTarget("gpu", instance_count), batching=batching)


def require_tensorrt() -> tuple[str, str]:
    """(GPU compute capability, TensorRT version), or TensorRTUnavailable saying what is missing."""
    if shutil.which("nvidia-smi") is None:
        raise TensorRTUnavailable("TensorRT plans need an NVIDIA GPU: nvidia-smi is not on PATH. "
                                  "Export ONNX (without --tensorrt) here and build plans on a GPU machine.")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (subprocess.SubprocessError, OSError) as exc:
        raise TensorRTUnavailable(f"nvidia-smi found no usable GPU: {exc}") from None
    if not out:
        raise TensorRTUnavailable("nvidia-smi lists no GPU")
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable("the `tensorrt` Python package is not installed "
                                  "(pip install tensorrt, matching the Triton image's TensorRT)") from None
    return out[0], tensorrt.__version__


def graph_sha256(onnx_path: Path) -> str:
    """The graph and the weights beside it (external data): two fine-tunes of one architecture
    have the same graph file, and must not share a plan."""
    digest = hashlib.sha256(onnx_path.read_bytes())
    external = ("model.onnx_data", "model.onnx.data")
    for data in sorted(p for p in onnx_path.parent.iterdir() if p.name.startswith(external)):
        with open(data, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def build_plan(onnx_path: Path, profile: Profile, precision: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Builds (or reuses from the cache) a serialized engine for `onnx_path`."""
    capability, version = require_tensorrt()
    import tensorrt as trt

    sha = graph_sha256(onnx_path)
    cached = cache_dir / f"{engine_cache_key(sha, capability, version, profile, precision)}.plan"
    if cached.exists():
        return cached
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":  # fp16's range overflows in T5 and FLUX's transformer; bf16 keeps fp32's
        config.set_flag(trt.BuilderFlag.BF16)
    optimization = builder.create_optimization_profile()
    for name, r in profile.items():
        optimization.set_shape(name, r.min, r.opt, r.max)
    config.add_optimization_profile(optimization)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} (see the log above)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(bytes(engine))
    return cached
