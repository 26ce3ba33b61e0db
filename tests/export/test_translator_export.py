"""`python -m export translator` for generator files written here: a U-Net that needs sides
that are multiples of 4 (probed), and a ResNet generator with instance norm, each
verified against PyTorch at sizes nobody traced; clear errors for what cannot be served."""

import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.super_resolution import ImageExportError
from export.translator import export_translator
from services.runtime.repository import ModelRepository

GENERATORS = textwrap.dedent('''
    import torch
    import torch.nn as nn

    class TinyUnet(nn.Module):
        """Two downsamplings: sides must be multiples of 4."""
        def __init__(self, in_ch=3, out_ch=3, ngf=8):
            super().__init__()
            self.d1 = nn.Sequential(nn.Conv2d(in_ch, ngf, 4, 2, 1), nn.LeakyReLU(0.2))
            self.d2 = nn.Sequential(nn.Conv2d(ngf, 2 * ngf, 4, 2, 1), nn.BatchNorm2d(2 * ngf), nn.LeakyReLU(0.2))
            self.u2 = nn.Sequential(nn.ConvTranspose2d(2 * ngf, ngf, 4, 2, 1), nn.BatchNorm2d(ngf), nn.ReLU())
            self.u1 = nn.ConvTranspose2d(2 * ngf, out_ch, 4, 2, 1)

        def forward(self, x):
            a = self.d1(x)
            b = self.u2(self.d2(a))
            return torch.tanh(self.u1(torch.cat([a, b], 1)))

    def resnet_generator(channels=1, ngf=8):
        """CycleGAN-style: reflection padding, instance norm, a residual block."""
        class Res(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(ngf, ngf, 3), nn.InstanceNorm2d(ngf),
                                          nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(ngf, ngf, 3),
                                          nn.InstanceNorm2d(ngf))
            def forward(self, x):
                return x + self.body(x)
        return nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(channels, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(),
                             Res(), nn.ReflectionPad2d(3), nn.Conv2d(ngf, channels, 7), nn.Tanh())
''')


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    folder = tmp_path_factory.mktemp("translators")
    (folder / "generators.py").write_text(GENERATORS)
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_generators", folder / "generators.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    unet, resnet = module.TinyUnet(), module.resnet_generator(channels=1)
    for m in unet.modules():  # non-trivial running statistics for eval mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    torch.save(unet.state_dict(), folder / "unet.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(folder / "resnet.safetensors"))
    return folder, {"unet": unet.eval(), "resnet": resnet.eval()}


@pytest.mark.parametrize("kind,ref,weights,channels,multiple", [
    ("unet", "TinyUnet", "unet.pth", 3, 4), ("resnet", "resnet_generator", "resnet.safetensors", 1, 1)])
def test_translator_parity_at_untraced_sizes(generators, tmp_path, kind, ref, weights, channels, multiple):
    folder, models = generators
    init = {"channels": 1} if kind == "resnet" else None
    report = export_translator(f"{folder / 'generators.py'}:{ref}", folder / weights, tmp_path, kind, init)
    f = report.facts
    assert (f.task, f.scale, f.input_channels, f.output_channels, f.size_multiple) == (
        "translation", 1, channels, channels, multiple)
    p = ModelRepository(tmp_path).models[kind].parameters
    assert p["genserve.task"] == "translation" and p["genserve.input_range"] == "-1,1"
    side_h, side_w = 44, 68  # multiples of 4, traced at 32x32
    x = np.random.default_rng(2).uniform(-1, 1, (2, channels, side_h, side_w)).astype(np.float32)
    got = ort.InferenceSession(str(report.onnx_path)).run(None, {"image": x})[0]
    with torch.no_grad():
        want = models[kind](torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4


def test_what_cannot_be_served_is_named(generators, tmp_path):
    folder, _ = generators
    with pytest.raises(ImageExportError, match="has no 'Missing'"):
        export_translator(f"{folder / 'generators.py'}:Missing", folder / "unet.pth", tmp_path, "x")
    with pytest.raises(ImageExportError, match="missing"):  # weights of another architecture
        export_translator(f"{folder / 'generators.py'}:TinyUnet", folder / "resnet.safetensors", tmp_path, "x")
