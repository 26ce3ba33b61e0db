"""Export a Stable-Diffusion-format diffusers folder (SD 1.x/2.x layout) into Triton models.

One folder becomes four graphs (five with DeepCache's shallow U-Net), each verified against PyTorch, plus what the torch-free
pipeline needs beside them, as plain files Triton ignores:

  <name>_text_encoder   input_ids INT64 [B, L]            -> last_hidden_state FP32 [B, L, D]
                        + tokenizer.json (the `tokenizers` library loads it without torch)
  <name>_unet           sample FP32 [B, 4, h, w], timestep FP32 [B] (per sample),
                        encoder_hidden_states FP32 [B, L, D] -> noise_pred FP32 [B, 4, h, w]
                        (and deep_features FP32 [B, C_f, h, w], for DeepCache)
                        + scheduler_config.json
  <name>_unet_shallow   the U-Net's inputs + deep_features -> noise_pred: the shallowest level
                        alone over cached deep features (export.deepcache; `deepcache=False`
                        or a U-Net it cannot split leaves both out)
  <name>_vae_decoder    latent_sample FP32 [B, 4, h, w] -> sample FP32 [B, C, H, W] in [-1, 1]
  <name>_vae_encoder    sample FP32 [B, C, H, W] -> latent_parameters FP32 [B, 8, h, w]
                        (mean and log-variance: the pipeline samples from them with the
                        request's own generator, so img2img noise stays reproducible)

Height and width are dynamic (multiples of the VAE scale factor); the per-sample timestep
lets one U-Net call advance requests that are at different steps.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from export.controlnet import (
    format_layout,
    residual_inputs,
    residual_layout,
    residual_profiles,
)
from export.deepcache import export_unet
from export.diffusers_folder import UnsupportedFolder, sample_size_hw
from export.onnx_export import export_onnx, verify_onnx
from export.staging import measured
from services.contract import TextEncoderFacts, UNetFacts, VAEFacts
from services.engine.memory import ACTIVATION_BYTES_PARAMETER
from export.triton_config import (
    DeploymentTarget,
    ModelConfigSpec,
    TensorSpec,
    build_model_config,
    default_batching,
    write_model_config,
)
from export.verification import (
    ActivationModel,
    GraphOptions,
    describe_checks,
    plan_checks,
    text_encoder_activation,
    unet_activation,
    vae_activation,
    verification_budget,
)

# Protobuf's hard limit; graphs past it keep their weights in an external file.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
EXTERNAL_DATA_FILE = "model.onnx_data"
# The denoiser's calls come from the step engine, which already batches every request of a
# shape into one call per iteration: Triton waiting for more rows only adds latency (measured:
# 1.3 ms of queue per 4.7 ms U-Net call with 1000 us). At 0 it still merges what queues up
# while an instance is busy (several service replicas sharing one Triton).
DENOISER_QUEUE_DELAY_US = 0
# fp16 graphs against the fp32 module: half precision's ~1e-3 relative rounding, compounded
# over a deep network (measured on random U-Nets: 2e-3 on outputs of magnitude ~1).
FP16_ATOL = FP16_RTOL = 3e-2


class _TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids=input_ids, return_dict=False)[0]


class _UNet(torch.nn.Module):
    """`residuals`: the ControlNet residual inputs' names (export.controlnet), down blocks' then
    the mid block's, taken after the text (positionally or by name)."""

    def __init__(self, unet, residuals: tuple[str, ...] = ()):
        super().__init__()
        self.unet, self.residuals = unet, tuple(residuals)

    def forward(self, sample, timestep, encoder_hidden_states, *residuals, **named):
        named.update(zip(self.residuals, residuals))
        if not self.residuals:
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]
        given = [named[n] for n in self.residuals]
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=tuple(given[:-1]),
                         mid_block_additional_residual=given[-1], return_dict=False)[0]


class _VAEDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VAEEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample).latent_dist.parameters


@dataclass
class ComponentReport:
    name: str
    onnx_path: Path
    max_abs_error: float
    external_data: bool
    verified: str = ""  # the checks that ran (batch, size, activation estimate), or why none did
    wall_s: float = 0.0
    peak_rss_bytes: int = 0


def save_with_external_data_if_large(path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> bool:
    """Moves weights into `model.onnx_data` beside the graph when graph and weights together
    pass `threshold` (weights an exporter already wrote elsewhere, such as torch.export's
    `model.onnx.data`, are gathered into it and their old file removed).

    Triton's ONNX Runtime backend and ONNX Runtime itself resolve the external file
    relative to the graph, so the version folder stays self-contained.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    header = onnx.load(str(path), load_external_data=False)
    written = {entry.value for t in _get_all_tensors(header) if uses_external_data(t)
               for entry in t.external_data if entry.key == "location"}
    if path.stat().st_size + sum((path.parent / f).stat().st_size for f in written) < threshold:
        return False
    if len(written) == 1:  # one file already (torch.export's): renamed, never loaded (it can be 48 GB)
        for tensor in _get_all_tensors(header):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = EXTERNAL_DATA_FILE
        (path.parent / written.pop()).rename(path.parent / EXTERNAL_DATA_FILE)
        onnx.save_model(header, str(path))
        return True
    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=1024)
    for stale in written - {EXTERNAL_DATA_FILE}:
        (path.parent / stale).unlink()
    return True


def convert_to_fp16(path: Path, external: bool) -> bool:
    """Rewrites the graph at `path` in half precision with ONNX Runtime's converter (the one its
    Stable Diffusion tools use), inputs and outputs kept fp32 so the serving contract does not
    change; `external`: the weights go to model.onnx_data (half of a graph past 4 GB). Returns
    whether they did."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path), load_external_data=True)
    stale = {e.value for t in _get_all_tensors(model) if uses_external_data(t) for e in t.external_data
             if e.key == "location"}
    for tensor in _get_all_tensors(model):  # the weights are in memory now
        if uses_external_data(tensor):
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=external)
    del model
    for name in stale:
        (path.parent / name).unlink(missing_ok=True)
    if external:
        onnx.save_model(half, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(half, str(path))
    return external


class GraphExporter:
    """Exports one pipeline's graphs into the repository, one call per component.

    Each call traces the module at batch 2 and the native size (`make_inputs(2, native)`, where
    `make_inputs(batch, grid)` builds the inputs for a grid of the component's `activation` model,
    None for a component without spatial axes), then verifies the graph in ONNX Runtime against
    PyTorch with the checks export.verification plans from the component's activation memory
    and the machine's available memory (`verify`: full | small | off; `verify_memory`: a fixed
    activation budget in bytes instead). It writes `<name>_<role>/config.pbtxt` with dynamic
    batching, a warm-up request at the native size (`make_inputs(1, native)`) and the parameters
    `genserve.pipeline`, `genserve.pipeline_name`, `genserve.component` plus `parameters` (the
    role's services.contract facts, `to_parameters()`, and any records), and copies `files`
    ((src, name) pairs) beside the config. Reports (what was verified, wall time, peak RSS)
    collect in `.reports`.
    """

    def __init__(self, repository: Path, name: str, pipeline: str, *, version: int = 1, max_batch_size: int = 16,
                 target: DeploymentTarget = DeploymentTarget(), progress: Callable[[str], None] = print,
                 external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, options: GraphOptions = GraphOptions()):
        self.repository, self.name, self.version = Path(repository), name, version
        self.max_batch_size, self.target, self.progress = max_batch_size, target, progress
        self.external_data_threshold = external_data_threshold
        self.options = options
        self.base = {"genserve.pipeline": pipeline, "genserve.pipeline_name": name}
        self.reports: list[ComponentReport] = []

    def model_dir(self, role: str) -> Path:
        return self.repository / f"{self.name}_{role}"

    def __call__(self, role, module, make_inputs, inputs, outputs, dynamic, parameters, atol, delay_us, files=(),
                 tensorrt_profile=None, tensorrt_precision: str | None = None, dynamo: bool = False,
                 dynamic_batching: bool = True, activation: ActivationModel = ActivationModel(),
                 precision: str | None = None) -> Path:
        """`precision`: this graph's dtype when it must differ from the options' (a VAE that
        overflows in fp16 stays "fp32")."""
        with measured() as cost:
            model_dir, err, external, verified = self._export(
                role, module, make_inputs, inputs, outputs, dynamic, parameters, delay_us, files, tensorrt_profile,
                tensorrt_precision, dynamo, dynamic_batching, activation, atol, precision or self.options.dtype)
        self.progress(f"[{self.name}] {role}: {verified}; {cost.wall_s:.1f} s, peak RSS "
                      f"{cost.peak_rss_bytes / 2**30:.2f} GiB{' (external data)' if external else ''}")
        self.reports.append(ComponentReport(f"{self.name}_{role}", model_dir / str(self.version) / "model.onnx", err,
                                            external, verified, cost.wall_s, cost.peak_rss_bytes))
        return model_dir

    def _export(self, role, module, make_inputs, inputs, outputs, dynamic, parameters, delay_us, files,
                tensorrt_profile, tensorrt_precision, dynamo, dynamic_batching, activation, atol, dtype):
        name, progress, grid = self.name, self.progress, activation.native
        native = {k: v.shape[1:] for k, v in make_inputs(1, grid).items()}  # warm up at the native size
        model_name = f"{name}_{role}"
        progress(f"[{name}] exporting {role} ...")
        model_dir = self.model_dir(role)
        onnx_path = model_dir / str(self.version) / "model.onnx"
        example = {k: torch.from_numpy(v) for k, v in make_inputs(2, grid).items()}
        weight_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        export_onnx(module, example, [t.name for t in outputs], onnx_path, dynamic, dynamo=dynamo,
                    large=weight_bytes >= self.external_data_threshold)
        del example
        external = save_with_external_data_if_large(onnx_path, self.external_data_threshold)
        rtol = None
        if dtype == "fp16":
            progress(f"[{name}] converting {role} to fp16 (inputs and outputs stay fp32) ...")
            external = convert_to_fp16(onnx_path, weight_bytes // 2 >= self.external_data_threshold)
            atol, rtol = max(atol, FP16_ATOL), FP16_RTOL
        err, verified = self._verify(role, module, onnx_path, make_inputs, activation, weight_bytes, atol, rtol)
        spec = ModelConfigSpec(
            name=model_name, inputs=inputs, outputs=outputs,
            batching=default_batching(self.max_batch_size, delay_us), target=self.target,
            parameters={**self.base, "genserve.component": role,
                        **parameters, **activation_parameter(activation),
                        "genserve.precision": dtype},
            warmup_dims={t.name: tuple(native[t.name]) for t in inputs if t.reshape is None},
            dynamic_batching=dynamic_batching,
        )
        if tensorrt_profile is not None:  # a plan beside the graph; the VAE stays fp32 (see export.tensorrt)
            from export.tensorrt import build_plan, precision_for, tensorrt_config

            precision = tensorrt_precision or precision_for(role)
            progress(f"[{name}] building TensorRT plan for {role} ({precision}) ...")
            shutil.copy(build_plan(onnx_path, tensorrt_profile, precision), onnx_path.with_name("model.plan"))
            spec = tensorrt_config(spec, self.target.instance_count, tensorrt_profile)
        write_model_config(build_model_config(spec), model_dir)
        for src, dst in files:
            shutil.copy(src, model_dir / dst)
        return model_dir, err, external, verified

    def _verify(self, role, module, onnx_path, make_inputs, activation, weight_bytes, atol,
                rtol=None) -> tuple[float, str]:
        """Runs the planned checks one at a time: (max abs error, what was verified)."""
        budget = self.options.verify_memory
        plan = plan_checks(activation, self.options.verify,
                           verification_budget(weight_bytes) if budget is None else budget)
        err = 0.0
        for check in plan.checks:
            self.progress(f"[{self.name}] verifying {role}: {check.describe()}")
            err = max(err, verify_onnx(module, onnx_path, make_inputs(check.batch, check.grid), atol=atol,
                                       **({"rtol": rtol} if rtol else {})))
        done = f"verified {describe_checks(plan.checks)}, max abs error {err:.2e}" if plan.checks else ""
        skipped = f"not verified: {'; '.join(plan.skipped)}" if plan.skipped else ""
        return err, "; ".join(x for x in (done, skipped) if x)


def activation_parameter(activation: ActivationModel) -> dict[str, str]:
    """The activation memory of one row at the native size, for a graph with spatial axes: the
    serving engine bounds its rows per call by it (services/engine/memory.py)."""
    if activation.native is None:
        return {}
    return {ACTIVATION_BYTES_PARAMETER: str(activation.row_bytes(activation.native))}


def load_fp32(cls, path: Path):
    """A diffusers or transformers model in float32, in eval mode, whatever dtype its weights
    were saved in: graphs are exported and verified in fp32 (reduced precision is TensorRT's
    choice, per component), and transformers 5 would otherwise keep a bf16/fp16 checkpoint's
    dtype (FLUX's text encoders ship in bf16).

    Loaded with low_cpu_mem_usage (diffusers, through accelerate; transformers 5 always): the
    module is built without weights and the checkpoint's tensors are placed into it, so a 3.4 GB
    U-Net is not held twice (random initial weights plus the state dict) while it loads."""
    if cls.__module__.startswith("transformers"):
        kwargs = {"dtype": torch.float32}
    else:
        kwargs = {"torch_dtype": torch.float32, "low_cpu_mem_usage": True}
    return cls.from_pretrained(path, local_files_only=True, **kwargs).eval()


def load_pipeline_components(folder: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return (load_fp32(CLIPTextModel, folder / "text_encoder"), load_fp32(UNet2DConditionModel, folder / "unet"),
            load_fp32(AutoencoderKL, folder / "vae"))


def vae_precision(config) -> str | None:
    """A VAE whose config asks for fp32 (`force_upcast`, diffusers' rule: SD's and SDXL's VAEs
    overflow in fp16 and diffusers upcasts them) stays fp32 whatever the export's dtype; one
    that does not (SDXL's fp16-fix VAE) follows it."""
    return "fp32" if getattr(config, "force_upcast", True) else None


def export_vae_graphs(export, vae, rng, latent_channels: int, image_channels: int, height: int, width: int,
                      scale: int, parameters: dict, extra: dict | None = None) -> None:
    """A latent pipeline's VAE decoder and encoder graphs (SD's, SDXL's, FLUX's: the same
    contract, each family's own `parameters`), traced at the native latent size. `export` is
    the family's GraphExporter (or a wrapper of it); `extra[role]`: more keyword arguments for
    that role's call (TensorRT plans)."""
    c, ic, extra = latent_channels, image_channels, extra or {}
    spatial = {0: "batch", 2: "height", 3: "width"}
    activation = vae_activation(vae.config, (height, width))  # grids in latent cells for both graphs
    precision = vae_precision(vae.config)
    export("vae_decoder", _VAEDecoder(vae),
           lambda b, grid: {"latent_sample": rng.standard_normal((b, c, *grid), dtype=np.float32)},
           [TensorSpec("latent_sample", "float32", (c, -1, -1))], [TensorSpec("sample", "float32", (ic, -1, -1))],
           {"latent_sample": spatial, "sample": spatial}, parameters, atol=1e-3, delay_us=2000,
           activation=activation, precision=precision, **extra.get("vae_decoder", {}))
    export("vae_encoder", _VAEEncoder(vae),
           lambda b, grid: {"sample": rng.uniform(-1, 1, (b, ic, grid[0] * scale, grid[1] * scale))
                            .astype(np.float32)},
           [TensorSpec("sample", "float32", (ic, -1, -1))], [TensorSpec("latent_parameters", "float32", (2 * c, -1, -1))],
           {"sample": spatial, "latent_parameters": spatial}, parameters, atol=1e-3, delay_us=2000,
           activation=activation, precision=precision, **extra.get("vae_encoder", {}))


def _fast_tokenizer_json(folder: Path, dest: Path, subfolder: str = "tokenizer") -> dict:
    """Writes tokenizer.json (the folder's, or converted from vocab.json/merges.txt) and
    returns the facts the pipeline needs (max length, pad/bos/eos ids)."""
    from transformers import CLIPTokenizerFast

    tokenizer = CLIPTokenizerFast.from_pretrained(folder / subfolder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "tokenizer.json", dest / "tokenizer.json")
    return {
        "max_length": tokenizer.model_max_length,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def export_stable_diffusion(
    folder: Path,
    repository: Path,
    name: str,
    version: int = 1,
    max_batch_size: int = 16,
    target: DeploymentTarget = DeploymentTarget(),
    progress: Callable[[str], None] = print,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    tensorrt: bool = False,
    deepcache: bool = True,
    graphs: GraphOptions = GraphOptions(),
    controlnet_inputs: bool = True,
) -> list[ComponentReport]:
    """`deepcache`: also the shallow U-Net graph and the deep-features output (export.deepcache)
    that requests' `cache_interval` uses. `graphs`: how graphs are written and checked (GraphOptions).
    `controlnet_inputs`: the U-Net takes ControlNet residuals (export.controlnet), so ControlNets
    can be added to the pipeline later."""
    folder = Path(folder)
    progress(f"[{name}] loading {folder}")
    text_encoder, unet, vae = load_pipeline_components(folder)

    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_c = unet.config.in_channels
    if latent_c != vae.config.latent_channels:
        inpainting = latent_c == 2 * vae.config.latent_channels + 1
        raise UnsupportedFolder(
            f"{folder}: the U-Net takes {latent_c} channels but the VAE's latents have {vae.config.latent_channels}"
            f"{' (an inpainting U-Net: latents, mask and masked-image latents)' if inpainting else ''}; served "
            f"U-Nets denoise the VAE's latents alone (inpainting here blends latents with a text-to-image U-Net)")
    image_c = vae.config.in_channels
    hidden = text_encoder.config.hidden_size
    rng = np.random.default_rng(0)
    export_graph = GraphExporter(repository, name, "stable_diffusion", version=version,
                                 max_batch_size=max_batch_size, target=target, progress=progress,
                                 external_data_threshold=external_data_threshold, options=graphs)

    def component(role, module, make_inputs, inputs, outputs, dynamic, parameters, atol, delay_us, files=(),
                  deep_channels=0, activation=ActivationModel(), precision=None):
        profile = None
        if tensorrt:  # a plan beside the graph; the VAE stays fp32 (see export.tensorrt)
            from export.tensorrt import stable_diffusion_profile

            profile = stable_diffusion_profile(
                role, max_rows=max_batch_size, seq_len=length, hidden=hidden, latent_channels=latent_c,
                image_channels=image_c, vae_scale=vae_scale, native_latent=(h, w),
                min_latent=size_multiple // vae_scale, max_latent=(2 * h, 2 * w), deep_channels=deep_channels)
            names = {t.name for t in inputs}  # a shallow graph may not take the text
            profile.update(residual_profiles(residuals, max_batch_size, size_multiple // vae_scale, (h, w), (2 * h, 2 * w)))
            profile = {k: v for k, v in profile.items() if k in names}
        return export_graph(role, module, make_inputs, inputs, outputs, dynamic, parameters, atol, delay_us,
                            files=files, tensorrt_profile=profile, activation=activation, precision=precision)

    h, w = sample_size_hw(unet.config.sample_size, f"{folder}/unet/config.json")  # native latent size
    residuals = residual_layout(unet) if controlnet_inputs else []
    size_multiple = vae_scale * 2 ** (len(unet.config.down_block_types) - 1)

    # 1. Text encoder (fixed sequence length: prompts are padded to the tokenizer's max).
    te_dir = repository / f"{name}_text_encoder"
    te_dir.mkdir(parents=True, exist_ok=True)
    tok = _fast_tokenizer_json(folder, te_dir)
    length = tok["max_length"]
    vocab = text_encoder.config.vocab_size
    component(
        "text_encoder", _TextEncoder(text_encoder),
        lambda b, _: {"input_ids": rng.integers(0, vocab, (b, length)).astype(np.int64)},
        [TensorSpec("input_ids", "int64", (length,))],
        [TensorSpec("last_hidden_state", "float32", (length, hidden))],
        {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}},
        TextEncoderFacts(max_length=length, hidden_size=hidden, pad_token_id=tok["pad_token_id"],
                         bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"]).to_parameters(),
        atol=1e-4, delay_us=1000,
        activation=text_encoder_activation(text_encoder.config.num_attention_heads, length, hidden,
                                           text_encoder.config.intermediate_size),
    )

    # 2. U-Net with per-sample timesteps and dynamic spatial size; with DeepCache (export.deepcache)
    #    it also returns its deep features, and a shallow graph reuses them.
    def unet_inputs(b, grid):
        return {"sample": rng.standard_normal((b, latent_c, *grid), dtype=np.float32),
                "timestep": rng.uniform(0, 999, b).astype(np.float32),
                "encoder_hidden_states": rng.standard_normal((b, length, hidden), dtype=np.float32),
                **residual_inputs(residuals, rng, b, *grid)}

    spatial = {0: "batch", 2: "height", 3: "width"}
    unet_tensors = [TensorSpec("sample", "float32", (latent_c, -1, -1)),
                    TensorSpec("timestep", "float32", (1,), reshape=()),
                    TensorSpec("encoder_hidden_states", "float32", (length, hidden)),
                    *(TensorSpec(n, "float32", (c, -1, -1)) for n, c, _ in residuals)]
    unet_axes = {"sample": spatial, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
                 "noise_pred": spatial, **{n: spatial for n, _, _ in residuals}}
    noise_pred = TensorSpec("noise_pred", "float32", (latent_c, -1, -1))
    # Latent sides must survive every down block's halving: traced graphs bake in the
    # upsampling sizes, so odd intermediate sizes cannot be served.
    unet_params = UNetFacts(in_channels=latent_c, native_height=h * vae_scale, native_width=w * vae_scale,
                            vae_scale_factor=vae_scale, size_multiple=size_multiple,
                            controlnet_residuals=format_layout(residuals) if residuals else None)
    wrapper = _UNet(unet, tuple(n for n, _, _ in residuals))
    export_unet(component, wrapper, unet, unet_inputs, unet_tensors, noise_pred, unet_axes, unet_params,
                deepcache=deepcache, rng=rng, shallow_options=lambda c: {"deep_channels": c}, atol=1e-3,
                delay_us=DENOISER_QUEUE_DELAY_US,
                activation=unet_activation(unet.config, (h, w), size_multiple // vae_scale, length),
                files=[(folder / "scheduler" / "scheduler_config.json", "scheduler_config.json")])

    # 3. VAE decoder and encoder.
    vae_params = VAEFacts(vae_scale_factor=vae_scale, scaling_factor=vae.config.scaling_factor,
                          image_channels=image_c, latent_channels=latent_c).to_parameters()
    export_vae_graphs(component, vae, rng, latent_c, image_c, h, w, vae_scale, vae_params)
    return export_graph.reports
