"""Weight files as their authors publish them -> one flat state dict of CPU tensors.

Every exporter's `--weights` goes through read_state_dict:

* The format is read from the content, never from the extension (`.tar`, `.ckpt`, `.bin`,
  `.pt`, `.pth` and `.safetensors` are all seen in the wild, often for the same format):
  safetensors, a torch zip (torch.save since 1.6) or a legacy torch pickle/tar.
* Torch files are read with `weights_only=True` (no code of the file runs) and
  `map_location="cpu"` (tensors saved on CUDA load on machines without one).
* Training scripts nest the weights: `{"netG_state_dict": ...}`, Lightning's `state_dict`,
  BasicSR's `params_ema`, rosinality's `g_ema`, `model`, ... The state dict is the one dict
  of tensors in the file; where there are several, `--state-dict-key` picks one (the error
  lists them). A key path goes down nested dicts (`model/state_dict`); what is left once a
  dict of tensors is reached selects the tensors under that prefix (`state_dict/generator`
  takes `generator.*` of a Lightning module, without the prefix).
* `module.` (DataParallel, DistributedDataParallel) and `_orig_mod.` (torch.compile) prefixes
  shared by every key are stripped.
"""

from __future__ import annotations

import logging
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from export.errors import WeightsError

log = logging.getLogger(__name__)

# Prefixes that wrappers add to every key of the module they wrap.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# torch.save's legacy format starts with this number, pickled at protocol 2.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_FOREIGN_MAGIC = {b"GGUF": "gguf", b"\x89HDF\r\n\x1a\n": "hdf5", b"7767517": "ncnn"}

CONVERT_HINT = (
    "Convert it once, in a trusted environment (full unpickling runs the file's code), to a state dict:\n"
    "    torch.save(torch.load(p, weights_only=False).state_dict(), 'weights.pt')\n"
    "or to safetensors:\n"
    "    from safetensors.torch import save_file\n"
    "    state = torch.load(p, weights_only=False).state_dict()\n"
    "    save_file({k: v.contiguous() for k, v in state.items()}, 'weights.safetensors')"
)

# What each refused kind of file is, and what to do with it.
REFUSED = {
    "torchscript": "a TorchScript archive (torch.jit.save), a compiled program rather than a state dict; save its "
                   "weights once with torch.save(torch.jit.load(p).state_dict(), 'weights.pt')",
    "pickle": "a plain Python pickle, not written by torch.save (NVIDIA's StyleGAN .pkl files are such pickles); "
              "unpickling runs its code, so it is not read here.\n" + CONVERT_HINT,
    "zip": "a zip archive without data.pkl, so not written by torch.save (a NumPy .npz?)",
    "damaged zip": "a damaged zip archive (a torch.save file cut short? download it again)",
    "gguf": "a GGUF file (llama.cpp / ggml), not PyTorch weights",
    "hdf5": "an HDF5 file (Keras .h5?), not PyTorch weights",
    "ncnn": "an ncnn .param file (super-resolution models: python -m export sr --ncnn FILE.param)",
}


def read_state_dict(path: str | Path, state_dict_key: str | None = None,
                    flag: str = "--weights") -> dict[str, torch.Tensor]:
    """The state dict in `path` (see the module docstring); `flag` names the option in errors."""
    where = f"{flag} {str(path)!r}"
    state, found = select_state_dict(load_weight_file(path, flag), state_dict_key, where)
    state, stripped = strip_wrapper_prefixes(state)
    log.info("%s: %d tensors%s%s", where, len(state), f" under {found!r}" if found else "",
             f", {'+'.join(stripped)} stripped" if stripped else "")
    return state


def load_weight_file(path: str | Path, flag: str = "--weights") -> Any:
    """What the file holds, as loaded (a state dict, or a checkpoint dict that holds one), its
    format read from the content; never unpickles code."""
    path = Path(path)
    where = f"{flag} {str(path)!r}"
    if path.is_dir():
        raise WeightsError(f"{where} is a folder: give the weight file inside it")
    if not path.is_file():
        raise WeightsError(f"{where}: no such file")
    kind = sniff_format(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            content: Any = load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"{where} is not a readable safetensors file: {exc}") from exc
    elif kind in ("torch zip", "legacy torch"):
        content = _torch_load(path, where)
    else:
        with path.open("rb") as f:
            what = REFUSED.get(kind) or f"of no format read here (its first bytes: {f.read(8).hex()})"
        raise WeightsError(f"{where} is {what}.\nGive a safetensors file or "
                           "a file written by torch.save holding a state dict (or a dict that holds one).")
    log.info("%s: %s", where, kind)
    return content


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch zip' or 'legacy torch' (read here), else a key of REFUSED or 'unknown'."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(512)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return "damaged zip"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "torch zip" if any(n.endswith("data.pkl") for n in names) else "zip"
    if head.startswith(_LEGACY_TORCH_MAGIC) or head[257:262] == b"ustar":
        return "legacy torch"
    if head[:1] == b"\x80":
        return "pickle"
    return next((kind for magic, kind in _FOREIGN_MAGIC.items() if head.startswith(magic)), "unknown")


def _torch_load(path: Path, where: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own advice on weights_only; the refusal is explained below
            with path.open("rb") as f:  # a file object: torch.load dispatches some paths on their extension
                return torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise WeightsError(
            f"{where} is not a plain state dict: torch.load(weights_only=True) refused it "
            f"({_torch_load_reason(exc)}). A file holding a pickled module or other objects runs code when "
            f"loaded, so it is not read here.\n{CONVERT_HINT}") from exc
    except Exception as exc:
        raise WeightsError(f"{where} could not be read by torch.load: {type(exc).__name__}: {exc}") from exc


def _torch_load_reason(exc: Exception) -> str:
    """The line of torch.load's long refusal that says what it met (e.g. 'Unsupported global: ...')."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line or "TorchScript" in line:
            return line.removeprefix("WeightsUnpickler error:").strip().split(". ")[0][:200]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _is_tensor_dict(value: Any) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def tensor_dicts(content: Any, path: tuple[str, ...] = ()) -> dict[str, Mapping[str, torch.Tensor]]:
    """Every dict of tensors in `content`, by key path ('a/b'; '' for the top level). Only dicts
    with string keys are entered: an optimizer's per-parameter state (integer keys) is no candidate."""
    if _is_tensor_dict(content):
        return {"/".join(path): content}
    found: dict[str, Mapping[str, torch.Tensor]] = {}
    if isinstance(content, Mapping) and all(isinstance(k, str) for k in content):
        for key, value in content.items():
            found.update(tensor_dicts(value, (*path, key)))
    return found


def describe(candidates: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    parts = []
    for key, state in candidates.items():
        count = sum(v.numel() for v in state.values())
        size = f"{count / 1e6:.3g}M" if count >= 1e6 else f"{count / 1e3:.3g}k" if count >= 1e3 else str(count)
        parts.append(f"{key!r} ({len(state)} tensor{'s' * (len(state) > 1)}, {size} values)")
    return ", ".join(parts)


def select_state_dict(content: Any, key: str | None, where: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a loaded file and the key path it was found under ('' for the top level)."""
    if not isinstance(content, Mapping):
        raise WeightsError(f"{where} holds a {type(content).__name__}, not a state dict.\n{CONVERT_HINT}")
    if key is not None:
        return _follow_key(content, key, where), key
    candidates = tensor_dicts(content)
    if len(candidates) == 1:
        (found, state), = candidates.items()
        return dict(state), found
    if candidates:
        raise WeightsError(f"{where} holds {len(candidates)} dicts of tensors: {describe(candidates)}; choose the "
                           f"model's with --state-dict-key KEY")
    not_tensors = sorted(str(k) for k, v in content.items() if not isinstance(v, torch.Tensor))
    raise WeightsError(f"{where} holds no dict of tensors: {few_keys(not_tensors)} "
                       f"{'is not a tensor' if len(not_tensors) == 1 else 'are not tensors'} (top-level keys: "
                       f"{few_keys(str(k) for k in content)})")


def _follow_key(content: Mapping, key: str, where: str) -> dict[str, torch.Tensor]:
    node: Any = content
    parts = key.split("/")
    walked: list[str] = []
    while parts and not _is_tensor_dict(node):
        # A key may itself hold '/': the longest run of parts that is a key at this level wins.
        for n in range(len(parts), 0, -1):
            if isinstance(node, Mapping) and "/".join(parts[:n]) in node:
                walked.append("/".join(parts[:n]))
                node, parts = node["/".join(parts[:n])], parts[n:]
                break
        else:
            here = list(node) if isinstance(node, Mapping) else []
            candidates = tensor_dicts(content)
            raise WeightsError(
                f"{where}: --state-dict-key {key!r}: no key {parts[0]!r}"
                f"{' under ' + repr('/'.join(walked)) if walked else ''} (keys there: {few_keys(map(str, here))}); "
                f"dicts of tensors in the file: {describe(candidates) or 'none'}")
    if not _is_tensor_dict(node):
        raise WeightsError(f"{where}: --state-dict-key {key!r} leads to a {type(node).__name__} that is not a dict "
                           f"of tensors; dicts of tensors in the file: {describe(tensor_dicts(content)) or 'none'}")
    if not parts:
        return dict(node)
    prefix = "/".join(parts) + "."
    selected = {k[len(prefix):]: v for k, v in node.items() if k.startswith(prefix)}
    if not selected:
        heads = sorted({k.split(".", 1)[0] for k in node})
        raise WeightsError(f"{where}: --state-dict-key {key!r}: no tensor key starts with {prefix!r} (the first "
                           f"parts of its keys: {few_keys(heads)})")
    return selected


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strips `module.`/`_orig_mod.` while every key carries one; returns what was stripped."""
    stripped = []
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
        stripped.append(prefix)
    return state, stripped


def few_keys(keys, n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")
