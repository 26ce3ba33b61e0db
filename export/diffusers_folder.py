"""One entry for every diffusers folder: the family is read from `model_index.json`
(`_class_name`), or from the folder's own config for single-model folders, and the
folder goes to that family's exporter. Anything else is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

from export.errors import UnsupportedFolder
from export.triton_config import DeploymentTarget
from services.families import BY_NAME, FAMILIES, load

# model_index.json `_class_name` -> family, and a folder holding one model (config.json
# `_class_name`) -> family: each family's descriptor says which it exports (services.families)
PIPELINE_FAMILIES = {name: family.name for family in FAMILIES for name in family.diffusers_pipelines}
MODEL_FAMILIES = {name: family.name for family in FAMILIES for name in family.diffusers_models}


def detect_family(folder: Path) -> str:
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.exists():
        name = json.loads(index.read_text()).get("_class_name")
        if name in PIPELINE_FAMILIES:
            return PIPELINE_FAMILIES[name]
        raise UnsupportedFolder(
            f"{folder}: model_index.json names {name!r}, which is not served here; supported pipelines: "
            f"{', '.join(sorted(PIPELINE_FAMILIES))} (and single {' / '.join(MODEL_FAMILIES)} folders)")
    for config in (folder / "config.json", folder / "unet" / "config.json", folder / "vae" / "config.json"):
        if config.exists():
            name = json.loads(config.read_text()).get("_class_name")
            if name in MODEL_FAMILIES:
                return MODEL_FAMILIES[name]
            raise UnsupportedFolder(f"{config}: a {name!r} is not a model family served here "
                                    f"(single-model folders: {', '.join(sorted(MODEL_FAMILIES))})")
    raise UnsupportedFolder(f"{folder}: no model_index.json or config.json: not a diffusers folder")


def export_folder(folder: Path, repository: Path, name: str, version: int = 1, max_batch_size: int = 16,
                  target: DeploymentTarget = DeploymentTarget(), family: str | None = None,
                  tensorrt: bool = False, progress=print, max_sequence_length: int | None = None,
                  native_size: int | None = None, deepcache: bool = True, graphs=None,
                  controlnet_inputs: bool = True):
    """Exports the folder with its family's exporter: (family, reports). `max_sequence_length`
    and `native_size` are FLUX's options (the T5 length prompts are padded to; the default
    size), refused for families that have no such choice. `deepcache=False` leaves out the
    U-Net families' shallow graph and deep-features output (export/deepcache.py);
    `controlnet_inputs=False` SD's U-Net's ControlNet residual inputs (export/controlnet.py). `graphs`:
    how graphs are written and checked (export.verification.GraphOptions; default: fp32, full).

    The graphs are written into a staging folder and moved into the repository only when every
    one exported and verified (export.staging): a failure leaves the repository as it was. What
    was verified, wall time and peak RSS per component go into its export_report.json."""
    from export.staging import format_report, measured, staged_repository, write_export_report

    detected = detect_family(folder)
    if family == "vae" and (Path(folder) / "vae" / "config.json").exists():
        detected = "vae"  # a pipeline folder: its VAE alone, served as a standalone VAE
    if family is not None and detected != family:
        raise UnsupportedFolder(f"{folder} holds a {detected} model, not a {family} one")
    taken = BY_NAME[detected].export_options  # the family-specific options its exporter takes
    for option, value in (("max_sequence_length", max_sequence_length), ("native_size", native_size)):
        if value is not None and option not in taken:
            takers = "/".join(f.name.upper() for f in FAMILIES if option in f.export_options)
            raise UnsupportedFolder(f"--{option.replace('_', '-')} applies to {takers} folders; {folder} is {detected}")
    from export.core import ExportOptions
    from export.verification import GraphOptions

    options = ExportOptions(version=version, max_batch_size=max_batch_size, target=target, progress=progress,
                            graphs=graphs or GraphOptions(), tensorrt=tensorrt and "tensorrt" in taken)
    family_options = dict(deepcache=deepcache, max_sequence_length=max_sequence_length, native_size=native_size,
                          controlnet_inputs=controlnet_inputs)
    kwargs = dict(options=options, **{k: v for k, v in family_options.items() if k in taken})
    with measured() as cost, staged_repository(repository, name) as staging:
        reports = load(BY_NAME[detected].export)(folder, staging, name, **kwargs)
    for report in reports:  # the graphs now live in the repository
        report.onnx_path = Path(repository) / report.onnx_path.relative_to(staging)
    write_export_report(repository, name, detected, reports, cost.wall_s, cost.peak_rss_bytes)
    progress(format_report(reports))
    return detected, reports

