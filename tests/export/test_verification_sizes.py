"""The verification-size rule: from a model's dimensions, the shapes its parity checks run at and
their activation memory (export.verification). Real-size configs, built on the meta device: no
weights are allocated."""

import pytest
import torch

from export.verification import (
    FEATURE_COPIES,
    SCORE_COPIES,
    Check,
    VerificationBudgetError,
    flux_activation,
    plan_checks,
    text_encoder_activation,
    unet_activation,
    vae_activation,
)

GiB = 2**30
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280))
SD21_UNET = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 block_out_channels=(320, 640, 1280, 1280), use_linear_projection=True)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, sample_size=512)


def _config(cls, **kwargs):
    with torch.device("meta"):
        return cls(**kwargs).config


@pytest.fixture(scope="module")
def sd15_unet():
    from diffusers import UNet2DConditionModel

    return unet_activation(_config(UNet2DConditionModel, **SD15_UNET), (64, 64), 8, 77)


def test_sd15_unet_row_is_its_first_level_self_attention(sd15_unet):
    # 8 heads over 64 x 64 = 4,096 tokens; the largest feature map: 640 channels (320 + skip) at 64 x 64.
    scores = 8 * 4096**2 * 4
    assert sd15_unet.row_bytes((64, 64)) == SCORE_COPIES * scores + FEATURE_COPIES * 640 * 4096 * 4
    # The check that failed: the shallow U-Net (its first level alone) at batch 3, twice the size,
    # holds one 24 GiB score matrix (ONNX Runtime asked for 25,769,803,776 bytes).
    first_level = sd15_unet.shallowest()
    assert max(a.score_bytes((128, 128)) for a in first_level.attention) * 3 == 25_769_803_776


def test_sd15_unet_checks_fit_the_budget(sd15_unet):
    plan = plan_checks(sd15_unet, "full", budget=4 * GiB)
    small, served = plan.checks
    # Dynamic axes: batch 3 (the trace's is 2) at a small non-square grid of the U-Net's multiple.
    assert (small.batch, small.grid) == (3, (16, 24))
    assert small.nbytes == 3 * sd15_unet.row_bytes((16, 24)) < 64 * 2**20
    # Twice the size at batch 3 would need ~51 GiB: the served size at batch 1 runs instead (the
    # batch axis is the first check's).
    assert sd15_unet.check_bytes(3, (128, 128)) > 48 * GiB
    assert served == Check(1, (64, 64), sd15_unet.row_bytes((64, 64)), "served size")
    assert served.nbytes <= 4 * GiB and not plan.skipped


def test_a_budget_under_one_native_row_skips_the_native_check_by_name(sd15_unet):
    plan = plan_checks(sd15_unet, "full", budget=GiB // 2)
    assert [c.grid for c in plan.checks] == [(16, 24)]
    assert "native grid 64x64" in plan.skipped[0] and "over the budget" in plan.skipped[0]


def test_modes(sd15_unet):
    assert [c.purpose for c in plan_checks(sd15_unet, "small", budget=64 * GiB).checks] == ["dynamic axes"]
    off = plan_checks(sd15_unet, "off", budget=64 * GiB)
    assert off.checks == [] and "off" in off.skipped[0]
    with pytest.raises(ValueError, match="full, small, off"):
        plan_checks(sd15_unet, "fast", budget=GiB)
    with pytest.raises(VerificationBudgetError, match="--verify off"):
        plan_checks(sd15_unet, "small", budget=1024)


def test_small_models_keep_the_old_check_at_twice_the_size():
    from diffusers import UNet2DConditionModel

    config = _config(UNet2DConditionModel, sample_size=8, block_out_channels=(16, 32), cross_attention_dim=48,
                     attention_head_dim=4, norm_num_groups=8, layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    tiny = unet_activation(config, (8, 8), 2, 12)
    assert [(c.batch, c.grid) for c in plan_checks(tiny, "full", budget=GiB).checks] == [(3, (4, 6)), (3, (16, 16))]


def test_sd21_heads_per_level_and_a_non_square_native_grid():
    from diffusers import UNet2DConditionModel

    unet = unet_activation(_config(UNet2DConditionModel, **SD21_UNET), (96, 96), 8, 77)
    assert [a.heads for a in unet.attention] == [5, 10, 20, 20]  # three attending levels and the mid block
    assert unet.row_bytes((96, 96)) == SCORE_COPIES * 5 * 9216**2 * 4 + FEATURE_COPIES * 640 * 9216 * 4
    # A grid whose small size would be native is swapped.
    assert unet_activation(_config(UNet2DConditionModel, **SD21_UNET), (16, 24), 8, 77).small_grid() == (24, 16)


def test_sd_vae_row_is_its_pixel_level_feature_maps():
    from diffusers import AutoencoderKL

    vae = vae_activation(_config(AutoencoderKL, **SD_VAE), (64, 64))
    # Decoder level 0: 256 channels upsampled to 512 x 512; the mid block: one head over 4,096 latents.
    assert vae.row_bytes((64, 64)) == SCORE_COPIES * 4096**2 * 4 + FEATURE_COPIES * 256 * 512 * 512 * 4
    plan = plan_checks(vae, "full", budget=4 * GiB)
    assert [(c.batch, c.grid) for c in plan.checks] == [(3, (2, 3)), (1, (64, 64))]


def test_flux_dev_attends_over_patches_and_text():
    from diffusers import FluxTransformer2DModel

    config = _config(FluxTransformer2DModel, num_layers=1, num_single_layers=1, guidance_embeds=True)  # dev's widths
    flux = flux_activation(config, (128, 128), 512)
    # 1024 x 1024: 64 x 64 = 4,096 patches + 512 text tokens, 24 heads.
    assert flux.attention[0].queries((128, 128)) == 4608
    assert flux.row_bytes((128, 128)) == SCORE_COPIES * 24 * 4608**2 * 4 + FEATURE_COPIES * 3072 * 5 * 4608 * 4
    plan = plan_checks(flux, "full", budget=8 * GiB)
    assert [(c.batch, c.grid) for c in plan.checks] == [(3, (4, 6)), (1, (128, 128))]  # ~5.2 GB a row
    # The small check is bounded by the text length, not the native size.
    assert plan.checks[0].nbytes == 3 * flux.row_bytes((4, 6)) < GiB


def test_text_encoders_have_no_grid():
    t5 = text_encoder_activation(64, 512, 4096, 10240)  # T5-XXL at FLUX's 512 tokens
    plan = plan_checks(t5, "full", budget=GiB)
    assert [(c.batch, c.grid) for c in plan.checks] == [(3, None)]
    assert plan.checks[0].nbytes == 3 * (SCORE_COPIES * 64 * 512**2 * 4 + FEATURE_COPIES * 10240 * 512 * 4)
