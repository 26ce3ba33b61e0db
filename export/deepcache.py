"""DeepCache graphs for U-Net denoisers (Ma et al., "DeepCache: Accelerating Diffusion
Models for Free", 2023): the high-level features a U-Net computes change slowly from one
denoising step to the next, so a full step can leave its deep features behind and the steps
after it run only the shallowest level, reusing them.

Two graphs per U-Net, for any `UNet2DConditionModel` (SD 1/2, SDXL):

  <name>_unet          the full U-Net, exported as before, with one more output:
                       deep_features [B, C_f, h, w], the input of its last up block (the
                       deep path's result at full latent resolution). The graph is the same
                       graph: noise_pred is bit-equal to a graph without the extra output
                       (tested), and callers that do not cache do not fetch it.
  <name>_unet_shallow  the same inputs plus deep_features -> noise_pred: conv_in, the time
                       embedding, the first down block (its skip outputs, not its downsampler)
                       and the last up block over the cached features. Its weights are the
                       shallow level's only.

A shallow call on the features its full call left equals the full call at the same inputs
(the exporter checks this in PyTorch before writing the graphs).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from services.contract import UNetFacts

DEEP_FEATURES = "deep_features"


def _conditioning(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs):
    """The time embedding and encoder states exactly as `UNet2DConditionModel.forward`
    computes them before conv_in (class, SDXL's added and other embeddings included)."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    class_emb = unet.get_class_embed(sample=sample, class_labels=None)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    return emb, encoder_hidden_states


def _cross(block) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def shallow_forward(unet, sample, timestep, encoder_hidden_states, deep_features, added_cond_kwargs=None):
    """noise_pred from the shallowest level of `unet` over `deep_features` (see the module)."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb, encoder_hidden_states = _conditioning(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs)
    hidden = unet.conv_in(sample)
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    if _cross(first):
        _, res = first(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
    else:
        _, res = first(hidden_states=hidden, temb=emb)
    # The last up block takes conv_in's output and the first down block's resnet outputs (its
    # downsampler output feeds the deeper levels; the exporter drops that unused branch).
    skips = (hidden, *res)[:len(last.resnets)]
    if _cross(last):
        out = last(hidden_states=deep_features, temb=emb, res_hidden_states_tuple=skips,
                   encoder_hidden_states=encoder_hidden_states)
    else:
        out = last(hidden_states=deep_features, temb=emb, res_hidden_states_tuple=skips)
    if unet.conv_norm_out is not None:
        out = unet.conv_act(unet.conv_norm_out(out))
    return unet.conv_out(out)


class FeatureCapturingUNet(torch.nn.Module):
    """A family's U-Net export wrapper with deep_features as a second output."""

    def __init__(self, wrapper: torch.nn.Module, unet):
        super().__init__()
        self.wrapper, self.unet = wrapper, unet

    def forward(self, *args, **kwargs):
        captured = {}

        def hook(_module, _args, block_kwargs):
            captured[DEEP_FEATURES] = block_kwargs["hidden_states"]

        handle = self.unet.up_blocks[-1].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            noise_pred = self.wrapper(*args, **kwargs)
        finally:
            handle.remove()
        return noise_pred, captured[DEEP_FEATURES]


class ShallowUNet(torch.nn.Module):
    """The shallow graph's module. Inputs, in order: sample, timestep, deep_features, then
    encoder_hidden_states when the shallowest level has cross attention (without, the graph
    does not read the text and has no such input: `input_names`), then `added`, the family's
    added-conditioning inputs passed on as `added_cond_kwargs` (SDXL's text_embeds, time_ids).
    Called positionally by the exporter and by name by the parity check."""

    def __init__(self, unet, added: tuple[str, ...] = ()):
        super().__init__()
        self.unet, self.added = unet, tuple(added)
        text = ("encoder_hidden_states",) if _cross(unet.down_blocks[0]) or _cross(unet.up_blocks[-1]) else ()
        self.input_names = ("sample", "timestep", DEEP_FEATURES, *text, *self.added)

    def forward(self, sample, timestep, deep_features, *rest, **named):
        named.update(zip(self.input_names[3:], rest))
        added = {k: named[k] for k in self.added} or None
        return shallow_forward(self.unet, sample, timestep, named.get("encoder_hidden_states"), deep_features, added)


def supports_deepcache(unet) -> bool:
    """A UNet2DConditionModel whose shallowest level can run alone: two levels or more, no
    input hint (ControlNet-style image hints change conv_in's input), and no time embedding
    made from the text (addition_embed_type "text"/"text_image"), which the shallow graph may
    not take as an input."""
    return (len(unet.down_blocks) >= 2 and unet.config.addition_embed_type in (None, "text_time")
            and hasattr(unet, "get_time_embed"))


@torch.no_grad()
def check_shallow(full: FeatureCapturingUNet, shallow: ShallowUNet, example: dict[str, torch.Tensor]) -> float:
    """The shallow module on the features its full step left must give that step's output:
    returns the largest difference (PyTorch, before any export) and raises past 1e-4."""
    noise_pred, features = full(**example)
    # The shallow graph's own inputs only, as the exported graph will take them.
    again = shallow(**{k: v for k, v in example.items() if k in shallow.input_names}, deep_features=features)
    err = float((noise_pred - again).abs().max())
    if err > 1e-4:
        raise RuntimeError(f"the shallow U-Net does not reproduce the full step on its own features "
                           f"(max abs error {err:.2e}): this U-Net's blocks are not laid out as "
                           f"UNet2DConditionModel's")
    return err


def export_unet(export, wrapper: torch.nn.Module, unet, make_inputs, tensors, noise_pred, axes: dict,
                parameters: UNetFacts, *, deepcache: bool, rng, added: tuple[str, ...] = (),
                shallow_options=lambda deep_channels: {}, **options) -> None:
    """A family's U-Net graph through `export` (its GraphExporter, or a wrapper of it) and, with
    `deepcache` and a U-Net that allows it, the deep-features output and the shallow graph.
    `wrapper`: the family's export module over `unet`, taking `tensors` (TensorSpecs, in order,
    as `make_inputs(batch, grid)` makes them); `parameters`: the U-Net's contract facts (the
    shallow graph's add its deep_channels); `added`: which of them are added conditioning
    (the shallow graph needs them); `options`: the U-Net call's keyword arguments (atol,
    delay_us, files, activation, ...), also the shallow call's but for files (and with the
    activation model's shallowest level alone); `shallow_options(C_f)`:
    more for the shallow call (TensorRT profiles)."""
    from export.triton_config import TensorSpec

    if not (deepcache and supports_deepcache(unet)):
        export("unet", wrapper, make_inputs, tensors, [noise_pred], axes, parameters.to_parameters(), **options)
        return
    full, shallow = FeatureCapturingUNet(wrapper, unet), ShallowUNet(unet, added)
    activation = options["activation"]
    # A PyTorch-only check, at the small grid: its cost must not grow with the native size. Inputs
    # the shallow graph does not take are zero (a ControlNet's residuals: rows that carry control
    # never take shallow steps).
    example = {k: torch.from_numpy(v if k in shallow.input_names else np.zeros_like(v))
               for k, v in make_inputs(1, activation.small_grid()).items()}
    channels = full(**example)[1].shape[1]
    check_shallow(full, shallow, example)
    deep = TensorSpec(DEEP_FEATURES, "float32", (channels, -1, -1))
    spatial = {0: "batch", 2: "height", 3: "width"}
    axes = {**axes, DEEP_FEATURES: spatial}
    export("unet", full, make_inputs, tensors, [noise_pred, deep], axes, parameters.to_parameters(), **options)

    by_name = {t.name: t for t in [*tensors, deep]}

    def shallow_inputs(b, grid):
        x = make_inputs(b, grid)
        sample = x["sample"]
        x[DEEP_FEATURES] = rng.standard_normal((b, channels, *sample.shape[2:]), dtype=np.float32)
        return {n: x[n] for n in shallow.input_names}

    options = {k: v for k, v in options.items() if k != "files"}
    options["activation"] = activation.shallowest()  # the shallow graph runs the full-resolution level alone
    export("unet_shallow", shallow, shallow_inputs, [by_name[n] for n in shallow.input_names], [noise_pred],
           {n: axes[n] for n in (*shallow.input_names, noise_pred.name) if n in axes},
           replace(parameters, deep_channels=channels).to_parameters(), **options, **shallow_options(channels))
