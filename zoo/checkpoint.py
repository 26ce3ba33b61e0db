"""Checkpoints as a safetensors weight file plus a JSON description.

`<name>.safetensors` holds only tensors (no pickle, so loading runs no code);
`<name>.json` says how to rebuild the module: {"architecture": class name,
"config": constructor kwargs, "training": provenance and metrics}. Loading looks
the class up in ARCHITECTURES, so export/ can rebuild any model by name alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_file, save_file

from zoo.classifier import DigitClassifier
from zoo.gan import DCGANGenerator

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"

# Architecture name (as stored in the JSON) -> class. Add new servable models here.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "DCGANGenerator": DCGANGenerator,
    "DigitClassifier": DigitClassifier,
}


def checkpoint_stem(name_or_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """'cgan_digits', 'x/cgan_digits', 'x/cgan_digits.json' or '.safetensors' -> path without suffix."""
    p = Path(name_or_path)
    if p.suffix in (".json", ".safetensors"):
        return p.with_suffix("")
    if out_dir is not None:
        return Path(out_dir) / p
    return p if p.parent != Path(".") else CHECKPOINT_DIR / p


def save_checkpoint(
    model: nn.Module, name: str, config: dict, training: dict, out_dir: str | Path | None = None
) -> Path:
    """Writes <out_dir>/<name>.safetensors and .json (default out_dir: zoo/checkpoints)."""
    stem = checkpoint_stem(name, out_dir if out_dir is not None else CHECKPOINT_DIR)
    stem.parent.mkdir(parents=True, exist_ok=True)
    arch = type(model).__name__
    if ARCHITECTURES.get(arch) is not type(model):
        raise ValueError(f"{arch} is not in zoo.checkpoint.ARCHITECTURES")
    # contiguous() + clone(): safetensors refuses shared or strided storage.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(stem.with_suffix(".safetensors")), metadata={"architecture": arch})
    meta = {"architecture": arch, "config": config, "training": training}
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return stem


def read_metadata(name_or_path: str | Path) -> dict:
    return json.loads(checkpoint_stem(name_or_path).with_suffix(".json").read_text())


def load_checkpoint(name_or_path: str | Path) -> nn.Module:
    """Rebuilds the module from the JSON, loads the weights strictly, returns it in eval mode."""
    stem = checkpoint_stem(name_or_path)
    meta = json.loads(stem.with_suffix(".json").read_text())
    model = ARCHITECTURES[meta["architecture"]](**meta["config"])
    model.load_state_dict(load_file(str(stem.with_suffix(".safetensors"))), strict=True)
    return model.eval()
