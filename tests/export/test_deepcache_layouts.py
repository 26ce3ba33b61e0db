"""The shallow U-Net step (export/deepcache.py) reproduces diffusers' full step on that step's
own deep features, for the U-Net layouts users bring: SD 1.x/2.x-style (two layers per block,
linear projections, per-level heads), SDXL-style added conditioning, shallowest levels with and
without cross attention, non-square sizes whose upsampling needs explicit sizes. PyTorch only."""

import pytest
import torch

from export.deepcache import FeatureCapturingUNet, ShallowUNet, check_shallow, supports_deepcache

BASE = dict(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=24)
LAYOUTS = {
    "sd15-like": dict(block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=4,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sd21-like": dict(block_out_channels=(16, 32), layers_per_block=2, attention_head_dim=(2, 4),
                      use_linear_projection=True, upcast_attention=True,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "uneven-layers": dict(block_out_channels=(16, 32, 32), layers_per_block=(2, 1, 3), attention_head_dim=4,
                          center_input_sample=True, resnet_time_scale_shift="scale_shift",
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    "sdxl-like": dict(block_out_channels=(16, 32), layers_per_block=2, attention_head_dim=(2, 4),
                      transformer_layers_per_block=(1, 2), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=12 + 6 * 4,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}


class _Wrapper(torch.nn.Module):
    def __init__(self, unet, added: bool):
        super().__init__()
        self.unet, self.added = unet, added

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        cond = {"text_embeds": text_embeds, "time_ids": time_ids} if self.added else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]


@pytest.mark.parametrize("size", [(8, 8), (12, 20)])  # 12 x 20: odd sizes deeper down
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_shallow_step_reproduces_the_full_step(layout, size):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**BASE, **LAYOUTS[layout]).eval()
    assert supports_deepcache(unet)
    added = unet.config.addition_embed_type == "text_time"
    example = {"sample": torch.randn(3, 4, *size), "timestep": torch.tensor([999.0, 500.0, 3.0]),
               "encoder_hidden_states": torch.randn(3, 7, 24)}
    if added:
        example.update(text_embeds=torch.randn(3, 12), time_ids=torch.rand(3, 6) * 64)
    full = FeatureCapturingUNet(_Wrapper(unet, added), unet)
    shallow = ShallowUNet(unet, ("text_embeds", "time_ids") if added else ())
    assert check_shallow(full, shallow, example) < 1e-5
    # and it is not the full step by accident: other features give another prediction
    with torch.no_grad():
        noise_pred, features = full(**example)
        other = shallow(**{k: v for k, v in example.items() if k in shallow.input_names},
                        deep_features=features + 1.0)
    assert (other - noise_pred).abs().max() > 1e-3


def test_layouts_it_cannot_split_are_exported_without_it():
    from diffusers import UNet2DConditionModel

    one_level = UNet2DConditionModel(**BASE, block_out_channels=(16,), layers_per_block=1, attention_head_dim=4,
                                     down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    assert not supports_deepcache(one_level)
