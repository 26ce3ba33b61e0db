"""Export a FLUX-format diffusers folder (FluxPipeline: FLUX.1-dev/schnell and their kin) into
Triton models.

The contract with the serving side (services/pipelines/pipeline_flux.py reads exactly this):
every config carries genserve.pipeline = "flux", genserve.pipeline_name = NAME and
genserve.component = the role below. B is the batch axis (dynamic, up to max_batch_size).

  <NAME>_text_encoder    (CLIPTextModel)
      input   input_ids   INT64 [B, L1]
      output  pooled      FP32  [B, P]     pooler_output: the transformer's pooled_projections
      files   tokenizer.json   params genserve.max_length (L1), genserve.pad_token_id
      Prompts longer than L1 CLIP tokens are truncated for this encoder only, as FluxPipeline
      does (the T5 encoder below carries the long prompt and refuses past its length).
  <NAME>_text_encoder_2  (T5EncoderModel)
      input   input_ids      INT64 [B, L2]   ids, </s>, then <pad> to L2 (no attention mask:
                                             FLUX attends to the padding, so L2 is fixed)
      output  hidden_states  FP32  [B, L2, D]
      files   tokenizer.json   params genserve.max_length (L2 = max_sequence_length),
              genserve.pad_token_id, genserve.hidden_size (D)
  <NAME>_transformer     (FluxTransformer2DModel)
      inputs  hidden_states          FP32 [B, S, 4C]  latents packed in 2x2 patches (S = h/2 * w/2)
              img_ids                FP32 [B, S, 3]   (0, row, column) of each patch
              txt_ids                FP32 [B, L2, 3]  zeros
              timestep               FP32 [B]         sigma (FluxPipeline's t / 1000), per sample
              guidance               FP32 [B]         guidance-distilled models only
              encoder_hidden_states  FP32 [B, L2, D]
              pooled_projections     FP32 [B, P]
      output  noise_pred             FP32 [B, S, 4C]  the velocity, packed
      The ids are per sample for the batch axis; rows of one call share them (one size per
      call), and the graph uses row 0's, as diffusers' transformer does with 3-D ids.
      files   scheduler_config.json
      params  genserve.in_channels (4C), genserve.guidance_embeds (1/0), genserve.native_height,
              genserve.native_width (pixels; FluxPipeline's default_sample_size x the VAE
              factor unless --native-size), genserve.vae_scale_factor, genserve.size_multiple
              (2 x the VAE factor: a latent side must split into 2x2 patches)
  <NAME>_vae_decoder / <NAME>_vae_encoder  as SD's, with genserve.shift_factor: latents =
      (z - shift_factor) * scaling_factor.

Graphs past 2 GB (a real T5-XXL, a 12B transformer) keep their weights in model.onnx_data
beside model.onnx (export.stable_diffusion.save_with_external_data_if_large).

Memory: the transformer's activations grow with (patches + L2)^2 x heads, so its checks are
sized by export.verification (flux_activation). The trace and conversion themselves stay small
(a tiny FLUX folder with L2 = 512: 0.8 GiB at 128 px, 1.9 GiB at FluxPipeline's default size,
its checks included); what once took such a folder past 23 GB was the check at batch 3 and twice
the native size: 16,384 patches + 512 tokens, 4 heads, 13.7 GB per score matrix in fp32.
bench/results/real_scale.md states what a real FLUX.1-dev export needs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from export.core import DENOISER_QUEUE_DELAY_US, ComponentReport, ExportOptions, GraphExporter, load_fp32
from export.errors import UnsupportedFolder
from export.stable_diffusion import TextEncoderGraph, fast_tokenizer_json
from export.triton_config import TensorSpec
from export.vae import export_vae_graphs
from export.verification import flux_activation, text_encoder_activation
from services.contract import TextEncoderFacts, TransformerFacts, VAEFacts
from services.pipelines.pipeline_flux import image_ids  # the serving side's ids, verified here
from services.schedulers import is_flow_matching

PIPELINE = "flux"
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 pixels with FLUX's VAE
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's max_sequence_length default and bound (schnell: 256)


class _ClipPooled(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids=input_ids, output_hidden_states=False).pooler_output


class _FluxTransformer(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, img_ids, txt_ids, timestep, encoder_hidden_states, pooled_projections,
                guidance=None):
        return self.transformer(hidden_states=hidden_states, timestep=timestep, guidance=guidance,
                                pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                                txt_ids=txt_ids[0], img_ids=img_ids[0], return_dict=False)[0]


def _t5_tokenizer_json(folder: Path, dest: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer_2")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if not (Path(tmp) / "tokenizer.json").exists():
            raise UnsupportedFolder(f"{folder}/tokenizer_2 cannot be written as a fast tokenizer.json")
        shutil.copy(Path(tmp) / "tokenizer.json", dest / "tokenizer.json")
    return {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "model_max_length": tokenizer.model_max_length}


def export_flux(
    folder: Path,
    repository: Path,
    name: str,
    options: ExportOptions | None = None,
    *,
    max_sequence_length: int | None = None,
    native_size: int | None = None,
    **shared,
) -> list[ComponentReport]:
    """`options`: the shared arguments (export.core.ExportOptions), or any of them as keywords."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    folder, repository, options = Path(folder), Path(repository), ExportOptions.given(options, **shared)
    missing = [c for c in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae",
                           "scheduler") if not (folder / c).is_dir()]
    if missing:
        raise UnsupportedFolder(f"{folder}: a FluxPipeline folder needs the subfolders {', '.join(missing)}")
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if not is_flow_matching(scheduler_config):
        raise UnsupportedFolder(f"{folder}: FLUX is a flow-matching model but its scheduler is "
                                f"{scheduler_config.get('_class_name')!r}; a FlowMatch* scheduler config is needed")
    options.progress(f"[{name}] loading {folder}")
    clip, t5 = load_fp32(CLIPTextModel, folder / "text_encoder"), load_fp32(T5EncoderModel, folder / "text_encoder_2")
    transformer = load_fp32(FluxTransformer2DModel, folder / "transformer")
    vae = load_fp32(AutoencoderKL, folder / "vae")
    cfg = transformer.config
    if cfg.patch_size != 1:
        raise UnsupportedFolder(f"{folder}: transformer patch_size {cfg.patch_size}; FluxPipeline's 2x2 packing "
                                f"assumes 1")
    latent_c = cfg.in_channels // 4
    if latent_c * 4 != cfg.in_channels or latent_c != vae.config.latent_channels:
        raise UnsupportedFolder(f"{folder}: the transformer takes {cfg.in_channels} packed channels but the VAE has "
                                f"{vae.config.latent_channels} latent channels (4 x latent channels expected)")
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    multiple = 2 * vae_scale
    native = native_size or DEFAULT_SAMPLE_SIZE * vae_scale
    if native % multiple:
        raise UnsupportedFolder(f"native size {native} is not a multiple of {multiple} (2 x the VAE factor)")
    h = w = native // vae_scale  # latent side

    rng = np.random.default_rng(0)
    export_graph = GraphExporter(repository, name, PIPELINE, options)
    if options.tensorrt:
        from export.tensorrt import FLUX_PRECISION, flux_profile, require_tensorrt

        require_tensorrt()  # before minutes of export, not after

    def plan(role: str, **shape) -> dict:
        """The TensorRT profile and precision of a graph (nothing without --tensorrt)."""
        if not options.tensorrt:
            return {}
        return {"tensorrt_profile": flux_profile(role, options.max_batch_size, **shape),
                "tensorrt_precision": FLUX_PRECISION.get(role)}

    # 1. CLIP: pooled output only.
    clip_dir = export_graph.model_dir("text_encoder")
    clip_dir.mkdir(parents=True, exist_ok=True)
    tok = fast_tokenizer_json(folder, clip_dir, "tokenizer")
    length1, pooled_dim = tok["max_length"], clip.config.hidden_size
    if pooled_dim != cfg.pooled_projection_dim:
        raise UnsupportedFolder(f"{folder}: CLIP gives {pooled_dim} pooled features, the transformer takes "
                                f"{cfg.pooled_projection_dim}")

    def clip_ids(b, _k):
        ids = np.full((b, length1), tok["pad_token_id"], np.int64)
        for row in range(b):
            n = int(rng.integers(1, length1 - 1))
            ids[row, 0] = tok["bos_token_id"]
            ids[row, 1:n + 1] = rng.integers(0, clip.config.vocab_size - 2, n)
            ids[row, n + 1] = tok["eos_token_id"]
        return {"input_ids": ids}

    export_graph("text_encoder", _ClipPooled(clip), clip_ids, [TensorSpec("input_ids", "int64", (length1,))],
                 [TensorSpec("pooled", "float32", (pooled_dim,))],
                 {"input_ids": {0: "batch"}, "pooled": {0: "batch"}},
                 TextEncoderFacts(max_length=length1, pad_token_id=tok["pad_token_id"], pooled_dim=pooled_dim,
                                  truncate=True).to_parameters(), atol=1e-4, delay_us=1000,
                 activation=text_encoder_activation(clip.config.num_attention_heads, length1, pooled_dim,
                                                    clip.config.intermediate_size),
                 **plan("text_encoder", length=length1))

    # 2. T5: hidden states at a fixed sequence length.
    t5_dir = export_graph.model_dir("text_encoder_2")
    t5_dir.mkdir(parents=True, exist_ok=True)
    tok2 = _t5_tokenizer_json(folder, t5_dir)
    length2 = max_sequence_length or min(DEFAULT_MAX_SEQUENCE_LENGTH, tok2["model_max_length"])
    if not 1 <= length2 <= DEFAULT_MAX_SEQUENCE_LENGTH:  # FluxPipeline's own bound
        raise UnsupportedFolder(f"--max-sequence-length must be 1 ... {DEFAULT_MAX_SEQUENCE_LENGTH}, got {length2}")
    hidden = t5.config.d_model
    if hidden != cfg.joint_attention_dim:
        raise UnsupportedFolder(f"{folder}: T5 gives {hidden} features, the transformer attends to "
                                f"{cfg.joint_attention_dim}")

    def t5_ids(b, _k):
        ids = np.full((b, length2), tok2["pad_token_id"], np.int64)
        for row in range(b):
            n = int(rng.integers(1, length2))
            ids[row, :n - 1] = rng.integers(3, t5.config.vocab_size, n - 1)
            ids[row, n - 1] = tok2["eos_token_id"]
        return {"input_ids": ids}

    export_graph("text_encoder_2", TextEncoderGraph(t5), t5_ids, [TensorSpec("input_ids", "int64", (length2,))],
                 [TensorSpec("hidden_states", "float32", (length2, hidden))],
                 {"input_ids": {0: "batch"}, "hidden_states": {0: "batch"}},
                 TextEncoderFacts(max_length=length2, pad_token_id=tok2["pad_token_id"],
                                  hidden_size=hidden).to_parameters(),
                 atol=1e-4, delay_us=1000, **plan("text_encoder_2", length=length2),
                 precision="fp32",  # T5 overflows in fp16 (its feed-forward activations pass 65,504)
                 activation=text_encoder_activation(t5.config.num_heads, length2, hidden, t5.config.d_ff))

    # 3. The transformer over packed latents, per-sample timestep (and guidance).
    guided = bool(cfg.guidance_embeds)

    def transformer_inputs(b, grid):
        ph, pw = grid[0] // 2, grid[1] // 2
        inputs = {"hidden_states": rng.standard_normal((b, ph * pw, cfg.in_channels), dtype=np.float32),
                  "img_ids": image_ids(b, ph, pw), "txt_ids": np.zeros((b, length2, 3), np.float32),
                  "timestep": rng.uniform(0.05, 1.0, b).astype(np.float32),
                  "encoder_hidden_states": rng.standard_normal((b, length2, hidden), dtype=np.float32),
                  "pooled_projections": rng.standard_normal((b, pooled_dim), dtype=np.float32)}
        if guided:
            inputs["guidance"] = rng.uniform(1.0, 5.0, b).astype(np.float32)
        return inputs

    inputs = [TensorSpec("hidden_states", "float32", (-1, cfg.in_channels)),
              TensorSpec("img_ids", "float32", (-1, 3)),
              TensorSpec("txt_ids", "float32", (length2, 3)),
              TensorSpec("timestep", "float32", (1,), reshape=()),
              TensorSpec("encoder_hidden_states", "float32", (length2, hidden)),
              TensorSpec("pooled_projections", "float32", (pooled_dim,))]
    dynamic = {"hidden_states": {0: "batch", 1: "patches"}, "img_ids": {0: "batch", 1: "patches"},
               "txt_ids": {0: "batch"}, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
               "pooled_projections": {0: "batch"}, "noise_pred": {0: "batch", 1: "patches"}}
    if guided:
        inputs.append(TensorSpec("guidance", "float32", (1,), reshape=()))
        dynamic["guidance"] = {0: "batch"}
    export_graph(
        "transformer", _FluxTransformer(transformer), transformer_inputs, inputs,
        [TensorSpec("noise_pred", "float32", (-1, cfg.in_channels))], dynamic,
        TransformerFacts(in_channels=cfg.in_channels, guidance_embeds=guided, native_height=native,
                         native_width=native, vae_scale_factor=vae_scale, size_multiple=multiple).to_parameters(),
        atol=1e-3, delay_us=DENOISER_QUEUE_DELAY_US,
        files=[(folder / "scheduler" / "scheduler_config.json", "scheduler_config.json")],
        dynamo=True,  # the tracer freezes the rotary embedding's reshapes to the traced sequence length
        # The graph takes row 0's position ids for the whole call: Triton must not merge calls of
        # equal patch counts but other layouts (1024x1024 and 512x2048). The step engine batches.
        dynamic_batching=False,
        activation=flux_activation(cfg, (h, w), length2),
        **plan("transformer", length=length2, hidden=hidden, pooled=pooled_dim, channels=cfg.in_channels,
               native=native // multiple, guided=guided))

    # 4. VAE with FLUX's shift.
    image_c = vae.config.in_channels
    vae_params = VAEFacts(vae_scale_factor=vae_scale, scaling_factor=vae.config.scaling_factor,
                          shift_factor=getattr(vae.config, "shift_factor", None) or 0.0,
                          image_channels=image_c, latent_channels=latent_c).to_parameters()
    export_vae_graphs(export_graph, vae, rng, latent_c, image_c, h, w, vae_scale, vae_params,
                      extra={"vae_decoder": plan("vae_decoder", channels=latent_c, native=h),
                             "vae_encoder": plan("vae_encoder", channels=image_c, native=native, smallest=multiple)})
    return export_graph.reports
