"""StyleGAN2-like generator with NVIDIA stylegan2-ada / stylegan3 attribute names.

    G.z_dim, G.c_dim, G.w_dim, G.num_ws, G.img_resolution, G.img_channels
    G.mapping(z, c, truncation_psi=1, truncation_cutoff=None) -> ws [B, num_ws, w_dim]
    G.synthesis(ws) -> img [B, img_channels, img_resolution, img_resolution] in [-1, 1]
    G(z, c) = G.synthesis(G.mapping(z, c))

`c` is a one-hot float [B, c_dim] as NVIDIA's code takes it (ignored when c_dim = 0).

Mapping (as NVIDIA's MappingNetwork): embed c with a linear layer, normalise z and the
embedding by their 2nd moment, concatenate, run an MLP with leaky ReLU, broadcast w to
num_ws; `mapping.w_avg` [w_dim] is a buffer tracking the moving average of w during
training (beta 0.995), the centre of the truncation trick.

Synthesis: a learned 4x4 constant, then one style-modulated, demodulated 3x3 conv per
layer (4x4; up to 8x8 + conv; up to 16x16 + conv; up to 32x32 + conv) and a modulated,
not demodulated, 1x1 toRGB: each consumes one ws entry, so num_ws = 2 * log2(res/4) + 2
(8 for 32x32). Deliberate simplifications against NVIDIA's: no per-pixel noise inputs
(the generator is a deterministic function of z and c, which serving relies on), bilinear
upsampling instead of FIR filtering, a single toRGB at the end instead of skip outputs,
plain (not equalised) learning rates, but initialised as NVIDIA's equalised layers start:
mapping weights N(0, 2 / (1.04 fan_in)) with zero bias (w keeps a 2nd moment ~1, so it
depends on z; PyTorch's default Linear init shrank the z-part of w ~30x over four layers,
leaving biases to dominate and G drawing one template per digit) and affine weights
N(0, 1 / w_dim) (styles 1 +- O(1) per sample). The modulated conv uses NVIDIA's non-fused path
(scale activations by the style, shared-weight conv, scale by the demodulation
coefficients), which is mathematically the fused grouped conv but keeps the ONNX graph's
batch axis dynamic (a grouped conv would fix groups = batch at trace time).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class MappingNetwork(nn.Module):
    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, num_layers: int = 4,
                 w_avg_beta: float = 0.995) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.w_avg_beta = w_avg_beta
        self.embed = nn.Linear(c_dim, w_dim) if c_dim > 0 else None
        dims = [(z_dim if z_dim > 0 else 0) + (w_dim if c_dim > 0 else 0)] + [w_dim] * num_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        for layer in self.layers:  # keeps w's 2nd moment ~1 through leaky ReLU(0.2); see the module docstring
            nn.init.normal_(layer.weight, std=math.sqrt(2 / (1 + 0.2 ** 2) / layer.in_features))
            nn.init.zeros_(layer.bias)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> torch.Tensor:
        parts = [normalize_2nd_moment(z.float())]
        if self.c_dim > 0:
            if c is None:
                raise ValueError("this generator is class-conditional: pass c, one-hot float [B, c_dim]")
            parts.append(normalize_2nd_moment(self.embed(c.float())))
        x = torch.cat(parts, dim=1)
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2)
        if update_emas:  # as NVIDIA: w_avg <- lerp(batch mean, w_avg, beta)
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cutoff] = self.w_avg.lerp(ws[:, :cutoff], truncation_psi)
        return ws


class ModulatedConv(nn.Module):
    """Style-modulated conv: styles = affine(w) (bias init 1); weight * styles, demodulated."""

    def __init__(self, w_dim: int, c_in: int, c_out: int, kernel: int = 3, demodulate: bool = True,
                 up: bool = False, activate: bool = True) -> None:
        super().__init__()
        self.affine = nn.Linear(w_dim, c_in)
        nn.init.normal_(self.affine.weight, std=1 / math.sqrt(w_dim))  # as NVIDIA's equalised affine at init
        nn.init.ones_(self.affine.bias)
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.weight_gain = 1.0 / math.sqrt(c_in * kernel * kernel)
        self.padding = kernel // 2
        self.demodulate, self.up, self.activate = demodulate, up, activate

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)  # [B, c_in]
        weight = self.weight * self.weight_gain
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = x * styles[:, :, None, None]
        x = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:  # 1 / sqrt(sum_{in,k} (w * s)^2) per sample and output channel
            dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()
            x = x * dcoefs[:, :, None, None]
        x = x + self.bias[None, :, None, None]
        return F.leaky_relu(x, 0.2) * math.sqrt(2) if self.activate else x


class SynthesisNetwork(nn.Module):
    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channels: dict[int, int]) -> None:
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        log2 = int(math.log2(img_resolution))
        if 2 ** log2 != img_resolution or img_resolution < 4:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.resolutions = [2 ** i for i in range(2, log2 + 1)]
        ch = {r: int(channels[r]) if r in channels else int(channels[str(r)]) for r in self.resolutions}
        self.const = nn.Parameter(torch.randn(ch[4], 4, 4))
        layers = [ModulatedConv(w_dim, ch[4], ch[4])]
        for prev, res in zip(self.resolutions[:-1], self.resolutions[1:]):
            layers += [ModulatedConv(w_dim, ch[prev], ch[res], up=True), ModulatedConv(w_dim, ch[res], ch[res])]
        layers.append(ModulatedConv(w_dim, ch[img_resolution], img_channels, kernel=1, demodulate=False,
                                    activate=False))
        self.layers = nn.ModuleList(layers)
        self.num_ws = len(layers)

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        for i, layer in enumerate(self.layers):
            x = layer(x, ws[:, i])
        return torch.tanh(x)


class StyleGANGenerator(nn.Module):
    """z [B, z_dim] (+ one-hot c [B, c_dim]) -> image [B, img_channels, R, R] in [-1, 1]."""

    def __init__(self, z_dim: int = 64, c_dim: int = 10, w_dim: int = 128, img_resolution: int = 32,
                 img_channels: int = 1, channels: dict | None = None, mapping_layers: int = 4,
                 class_names: list[str] | None = None) -> None:
        super().__init__()
        channels = channels or {4: 128, 8: 128, 16: 64, 32: 32}
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.class_names = list(class_names) if class_names else None
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, channels)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, mapping_layers)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws)


# --- checkpoint: <name>.safetensors (tensors only) + <name>.json (init args, provenance) ---

def save_stylegan(g: StyleGANGenerator, stem, config: dict, training: dict) -> None:
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    stem = Path(stem)
    state = {k: v.detach().contiguous().clone() for k, v in g.state_dict().items()}
    save_file(state, str(stem.with_suffix(".safetensors")), metadata={"architecture": "StyleGANGenerator"})
    meta = {"architecture": "StyleGANGenerator", "module": "zoo/stylegan/model.py:StyleGANGenerator",
            "config": config, "training": training}
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def load_stylegan(stem=None) -> StyleGANGenerator:
    """Rebuilds the generator from <stem>.json and loads <stem>.safetensors strictly (eval mode)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    stem = Path(stem) if stem is not None else DEFAULT_CHECKPOINT
    stem = stem.with_suffix("") if stem.suffix in (".json", ".safetensors") else stem
    meta = json.loads(stem.with_suffix(".json").read_text())
    g = StyleGANGenerator(**meta["config"])
    g.load_state_dict(load_file(str(stem.with_suffix(".safetensors"))), strict=True)
    return g.eval()


def _default_checkpoint():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "checkpoints" / "stylegan_digits"


DEFAULT_CHECKPOINT = _default_checkpoint()
