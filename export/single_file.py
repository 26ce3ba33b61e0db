"""Single-file Stable Diffusion checkpoints (SD 1.x, 2.x, SDXL base and refiner) as model hubs
publish them: the original LDM / A1111 / ComfyUI layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*` or `conditioner.embedders.*`), `.safetensors` or
`.ckpt`.

  python -m export sd --checkpoint FILE --name NAME [--config sd15|sd21|sd21-base|sdxl-base|sdxl-refiner|FOLDER]

The file is read as every weight file is (export/weights.py: content, not extension; no code
unpickled). Each component is converted by diffusers' single-file loader
(`load_single_file_sub_model`: `from_single_file` for the U-Net and the VAE, its LDM CLIP /
OpenCLIP conversion for the text encoders) against a diffusers configuration, fully offline:

* the architecture is detected as diffusers detects it (`infer_diffusers_model_type`, from the
  checkpoint's keys and shapes), and its configuration is one shipped in
  export/single_file_configs/ (configs and tokenizer settings only, no weights: SD 1.5, SD 2.1
  768-v, SD 2.1-base, SDXL base and refiner). SD 2.x checkpoints are v-prediction (2.1 at 768)
  unless their `global_step` is 875000 (2.x-base, epsilon), diffusers' own rule;
* `--config` names one of them, or a diffusers folder (configs, tokenizer and scheduler of the
  same architecture) for anything else, e.g. a fine-tune at another size;
* the CLIP BPE vocabulary and merges come from open_clip's `bpe_simple_vocab_16e6.txt.gz`
  (the same byte-pair table as openai/clip-vit-large-patch14's tokenizer files);
* the VAE must be in the file (every full SD checkpoint embeds one); a checkpoint without one
  is refused, naming the missing keys.

The components are written as a diffusers folder in a temporary directory, which then goes
through `export diffusers` unchanged.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from export.core import ExportOptions
from export.diffusers_folder import export_folder
from export.errors import UnsupportedFolder
from export.weights import load_weight_file, select_state_dict

CONFIGS = Path(__file__).resolve().parent / "single_file_configs"
# diffusers' model type (infer_diffusers_model_type) -> the configuration shipped for it
CONFIG_FOR_TYPE = {"v1": "sd15", "v2": "sd21", "xl_base": "sdxl-base", "xl_refiner": "sdxl-refiner"}
SD2_BASE_GLOBAL_STEP = 875000  # diffusers: a v2 checkpoint saved at this step is 2.x-base (epsilon)
# What each layout's text encoder keys start with, to check a detection against the file.
TEXT_PREFIXES = {"sd15": "cond_stage_model.transformer.", "sd21": "cond_stage_model.model.",
                 "sd21-base": "cond_stage_model.model.", "sdxl-base": "conditioner.embedders.1.model.",
                 "sdxl-refiner": "conditioner.embedders.0.model."}
UNET_PREFIX, VAE_PREFIXES = "model.diffusion_model.", ("first_stage_model.", "vae.")
# The components whose weights the file holds; tokenizers and the scheduler are configuration
# (copied), and what the exporter does not serve (safety checker, feature extractor) is left out.
CONVERTED = ("unet", "vae", "text_encoder", "text_encoder_2")


class SingleFileError(UnsupportedFolder):
    """The checkpoint cannot be converted as given; the message says why and what to pass."""


def read_checkpoint(path: str | Path) -> tuple[dict, int | None]:
    """(state dict, global_step or None) of a single-file checkpoint."""
    content = load_weight_file(path, "--checkpoint")
    nested = isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping)
    step = content.get("global_step") if isinstance(content, Mapping) else None
    state, _ = select_state_dict(content, "state_dict" if nested else None, f"--checkpoint {str(path)!r}")
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise SingleFileError(f"--checkpoint {str(path)!r} holds no {UNET_PREFIX}* keys: not a single-file Stable "
                              f"Diffusion checkpoint (a diffusers folder goes to --folder; a U-Net or LoRA file "
                              f"alone is not a pipeline)")
    if not any(k.startswith(VAE_PREFIXES) for k in state):
        raise SingleFileError(f"--checkpoint {str(path)!r} embeds no VAE ({' or '.join(VAE_PREFIXES)}* keys): "
                              f"export needs the whole pipeline in the file")
    return state, None if step is None else int(step)


def detect_config(state: Mapping[str, Any], global_step: int | None = None) -> str:
    """The shipped configuration for the checkpoint's architecture, detected as diffusers does."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    kind = infer_diffusers_model_type(state)
    if kind not in CONFIG_FOR_TYPE:
        raise SingleFileError(f"the checkpoint is a {kind!r} model (as diffusers detects it): only SD 1.x, 2.x and "
                              f"SDXL base/refiner text-to-image checkpoints are converted here; for another "
                              f"architecture of these families give --config FOLDER")
    name = CONFIG_FOR_TYPE[kind]
    if kind == "v2" and global_step == SD2_BASE_GLOBAL_STEP:
        name = "sd21-base"
    if not any(k.startswith(TEXT_PREFIXES[name]) for k in state):
        raise SingleFileError(f"the checkpoint looks like {name} by its U-Net but has no {TEXT_PREFIXES[name]}* "
                              f"text encoder keys: its architecture is not one shipped here; give --config FOLDER "
                              f"(a diffusers folder of the same architecture)")
    return name


def config_folder(config: str | Path | None, state: Mapping[str, Any], global_step: int | None) -> tuple[Path, str]:
    """(the diffusers configuration folder, how it was chosen)."""
    if config is None:
        name = detect_config(state, global_step)
        return CONFIGS / name, f"{name} (detected)"
    if (CONFIGS / str(config)).is_dir() and not Path(config).is_dir():
        return CONFIGS / str(config), str(config)
    folder = Path(config)
    if not (folder / "model_index.json").is_file():
        shipped = ", ".join(sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()))
        raise SingleFileError(f"--config {str(config)!r} is neither a shipped configuration ({shipped}) nor a "
                              f"diffusers folder with a model_index.json")
    return folder, str(folder)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in CLIP's (and GPT-2's) order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_bpe_files() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges, built from open_clip's BPE table the way CLIP builds them
    (open_clip is located, not imported: its import pulls torch and timm)."""
    spec = importlib.util.find_spec("open_clip")
    locations = spec.submodule_search_locations if spec else None
    table = Path(next(iter(locations))) / "bpe_simple_vocab_16e6.txt.gz" if locations else None
    if table is None or not table.is_file():
        raise SingleFileError("the CLIP tokenizer's vocabulary comes from open_clip_torch's "
                              "bpe_simple_vocab_16e6.txt.gz (requirements-pretrained.txt; make install installs it)")
    merges = gzip.open(table).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _complete_tokenizers(folder: Path) -> None:
    """Writes vocab.json and merges.txt into each tokenizer folder that lacks them."""
    bpe: tuple[dict[str, int], list[str]] | None = None  # built once, for the first folder that needs it
    for tokenizer in sorted(folder.glob("tokenizer*")):
        if (tokenizer / "tokenizer.json").exists() or (tokenizer / "vocab.json").exists():
            continue
        bpe = bpe or clip_bpe_files()
        vocab, merges = bpe
        (tokenizer / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (tokenizer / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def convert_to_folder(checkpoint: str | Path, dest: Path, config: str | Path | None = None,
                      progress=print) -> Path:
    """The single-file checkpoint -> a diffusers folder at `dest` (configs, tokenizers, weights)."""
    from diffusers import pipelines
    from diffusers.loaders.single_file import load_single_file_sub_model

    import export.torchvision_compat  # noqa: F401  (before diffusers/transformers)

    state, step = read_checkpoint(checkpoint)
    source, how = config_folder(config, state, step)
    progress(f"converting {checkpoint} with the {how} configuration")
    dest = Path(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt", "*.pt"),
                    dirs_exist_ok=True)
    _complete_tokenizers(dest)
    index = json.loads((dest / "model_index.json").read_text())
    for name in CONVERTED:
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None:
            continue
        library, class_name = entry
        try:
            model = load_single_file_sub_model(
                library_name=library, class_name=class_name, name=name, checkpoint=state, pipelines=pipelines,
                is_pipeline_module=hasattr(pipelines, library), cached_model_config_path=str(dest),
                local_files_only=True)
        except Exception as exc:
            raise SingleFileError(f"converting the checkpoint's {name} with the {how} configuration failed "
                                  f"({type(exc).__name__}: {str(exc)[:300]}); is it that architecture? "
                                  f"(--config names another)") from exc
        model.save_pretrained(dest / name, safe_serialization=True)
    return dest


def export_checkpoint(checkpoint: str | Path, repository: Path, name: str, config: str | Path | None = None,
                      options: ExportOptions | None = None, *, deepcache: bool = True,
                      controlnet_inputs: bool = True, **shared):
    """A single-file checkpoint -> the family's graphs in `repository`: (family, reports).
    `options`: the shared arguments (export.core.ExportOptions), or any of them as keywords."""
    options = ExportOptions.given(options, **shared)
    with tempfile.TemporaryDirectory(prefix="genserve-single-file-") as tmp:
        folder = convert_to_folder(checkpoint, Path(tmp) / "pipeline", config, options.progress)
        return export_folder(folder, repository, name, options.version, options.max_batch_size, options.target,
                             tensorrt=options.tensorrt, progress=options.progress, deepcache=deepcache,
                             graphs=options.graphs, controlnet_inputs=controlnet_inputs)
