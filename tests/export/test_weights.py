"""export/weights.py: weight files as their authors publish them -> one flat CPU state dict.

Formats are read from the content (files here carry the wrong extension on purpose), torch files
with weights_only=True and map_location='cpu', nested state dicts found or chosen, wrapper
prefixes stripped, and everything else refused with the reason and the fix."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from export.weights import WeightsError, read_state_dict, sniff_format
from tests.fixtures.checkpoints_as_published import save_as_if_on_cuda


def _model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].device.type == "cpu" for k in a)


# --- formats from the content ----------------------------------------------------------------


@pytest.mark.parametrize("writer,name,kind", [
    ("torch", "weights.tar", "torch zip"),
    ("torch", "weights.bin", "torch zip"),
    ("torch", "weights.safetensors", "torch zip"),
    ("legacy", "model.ckpt", "legacy torch"),
    ("legacy", "model.pth", "legacy torch"),
    ("safetensors", "model.pt", "safetensors"),
    ("safetensors", "model.bin", "safetensors"),
])
def test_the_format_is_read_from_the_content_not_the_extension(tmp_path, writer, name, kind):
    state, path = _model_state(), tmp_path / name
    if writer == "torch":
        torch.save(state, path)
    elif writer == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        save_file(state, str(path))
    assert sniff_format(path) == kind
    assert _equal(read_state_dict(path), state)


def test_tensors_saved_on_cuda_load_on_the_cpu(tmp_path):
    state, path = _model_state(), tmp_path / "weights.tar"
    save_as_if_on_cuda({"netG_state_dict": state}, path)
    if not torch.cuda.is_available():  # the file really says cuda: torch.load alone refuses it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    assert _equal(read_state_dict(path), state)


# --- the state dict inside a training checkpoint ----------------------------------------------


def test_the_only_dict_of_tensors_is_found_however_deep(tmp_path):
    state = _model_state()
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(2))])
    optimizer.step()  # its state: per-parameter dicts of tensors under integer keys, no candidates
    checkpoints = {
        "dcgan.tar": {"epoch": 5, "netG_state_dict": state, "optimizerG_state_dict": optimizer.state_dict(),
                      "losses": [0.5, 0.4]},
        "lightning.ckpt": {"global_step": 100, "state_dict": OrderedDict(state), "hyper_parameters": {"lr": 1e-3}},
        "basicsr.pth": {"params_ema": state},
        "nested.pt": {"model": {"ema": {"weights": state}}, "step": 3},
    }
    for name, content in checkpoints.items():
        torch.save(content, tmp_path / name)
        assert _equal(read_state_dict(tmp_path / name), state), name


def test_several_dicts_of_tensors_are_listed_and_one_is_chosen_by_key(tmp_path):
    g, d = _model_state(), {"conv.weight": torch.ones(2, 3, 4, 4)}
    path = tmp_path / "stylegan2.pt"  # as rosinality's train.py saves it
    torch.save({"g": d, "d": d, "g_ema": g, "args": {"size": 256}}, path)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "3 dicts of tensors" in message and "--state-dict-key" in message
    assert "'g_ema' (7 tensors, 28 values)" in message and "'g' (1 tensor, 96 values)" in message
    assert "'d' (1 tensor" in message and "'args'" not in message
    assert _equal(read_state_dict(path, "g_ema"), g)


def test_a_key_path_goes_down_nested_dicts_then_selects_a_prefix(tmp_path):
    state = _model_state()
    lightning = {f"generator.{k}": v for k, v in state.items()} | {"discriminator.fc.weight": torch.ones(1, 3)}
    path = tmp_path / "gan.ckpt"
    torch.save({"state_dict": lightning, "epoch": 1}, path)
    assert _equal(read_state_dict(path, "state_dict/generator"), state)
    save_file(lightning, str(tmp_path / "flat.safetensors"))
    assert _equal(read_state_dict(tmp_path / "flat.safetensors", "generator"), state)
    with pytest.raises(WeightsError, match=r"no tensor key starts with 'encoder\.'.*'discriminator', 'generator'"):
        read_state_dict(path, "state_dict/encoder")
    with pytest.raises(WeightsError, match=r"no key 'model' \(keys there: 'epoch', 'state_dict'\).*'state_dict' \("):
        read_state_dict(path, "model")
    with pytest.raises(WeightsError, match="'epoch' leads to a int that is not a dict of tensors"):
        read_state_dict(path, "epoch")


def test_wrapper_prefixes_are_stripped(tmp_path):
    state = _model_state()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        torch.save({"model": {prefix + k: v for k, v in state.items()}}, tmp_path / "w.pth")
        assert _equal(read_state_dict(tmp_path / "w.pth"), state), prefix
    partly = {"module.a": torch.ones(1), "b": torch.ones(1)}  # not every key: a real name, kept
    torch.save(partly, tmp_path / "p.pth")
    assert set(read_state_dict(tmp_path / "p.pth")) == {"module.a", "b"}


# --- refusals name the reason and the fix ----------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x)


def _refusal(path, key=None) -> str:
    with pytest.raises(WeightsError) as info:
        read_state_dict(path, key)
    return str(info.value)


def test_files_that_would_run_code_are_refused_with_how_to_convert_them(tmp_path):
    torch.save(_Net(), tmp_path / "whole.pth")  # the module object itself
    message = _refusal(tmp_path / "whole.pth")
    assert "weights_only=True" in message and "Unsupported global" in message
    assert "torch.save(torch.load(p, weights_only=False).state_dict()" in message and "save_file" in message

    with open(tmp_path / "network.pkl", "wb") as f:  # NVIDIA's StyleGAN files are plain pickles
        pickle.dump({"G_ema": [1, 2, 3]}, f)
    message = _refusal(tmp_path / "network.pkl")
    assert "plain Python pickle" in message and "StyleGAN" in message and "weights_only=False" in message

    torch.jit.save(torch.jit.script(_Net()), tmp_path / "scripted.pt")
    message = _refusal(tmp_path / "scripted.pt")
    assert "TorchScript" in message and "torch.jit.load(p).state_dict()" in message


def test_files_of_other_kinds_are_named(tmp_path):
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    assert "without data.pkl" in _refusal(tmp_path / "arrays.npz")
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    assert "GGUF" in _refusal(tmp_path / "model.gguf")
    (tmp_path / "x.pth").write_bytes(b"\x00\x01hello world")
    message = _refusal(tmp_path / "x.pth")
    assert "no format read here (its first bytes: 000168656c6c6f20)" in message and "safetensors" in message
    assert "is a folder" in _refusal(tmp_path)
    assert "no such file" in _refusal(tmp_path / "missing.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "arrays.npz").read_bytes()[:40])
    assert "damaged zip" in _refusal(tmp_path / "cut.pt")


def test_contents_without_a_state_dict_are_refused(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    assert "holds a list, not a state dict" in _refusal(tmp_path / "list.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    message = _refusal(tmp_path / "meta.pt")
    assert "holds no dict of tensors" in message and "'epoch', 'lr' are not tensors" in message


@pytest.mark.parametrize("command", ["gan", "stylegan", "sr", "translator"])
def test_every_exporter_reads_its_weights_here_and_takes_the_key(tmp_path, capsys, command):
    """The key reaches the loader of each command (weights are read before any module is built)."""
    from pathlib import Path

    from export.__main__ import main

    torch.save({"g": _model_state(), "g_ema": _model_state()}, tmp_path / "train.pt")
    module = str(Path(__file__).resolve().parents[1] / "fixtures" / "generators" / "dcgan.py") + ":DCGAN"
    args = {"gan": ["--module", module, "--latent-dim", "16"], "stylegan": ["--module", module],
            "sr": [], "translator": ["--module", module]}[command]
    common = [command, *args, "--weights", str(tmp_path / "train.pt"), "--name", "x",
              "--repository", str(tmp_path / "repo")]
    assert main(common) == 2
    assert "2 dicts of tensors: 'g' (7 tensors" in capsys.readouterr().err
    assert main([*common, "--state-dict-key", "g_emma"]) == 2
    assert "--state-dict-key 'g_emma': no key 'g_emma'" in capsys.readouterr().err
