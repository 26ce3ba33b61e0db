"""LoRA adapters as users publish them, stored in the model repository for the torch-free side.

`read_lora` reads a LoRA file in the formats people download, through diffusers' own loaders
(`StableDiffusionPipeline.lora_state_dict` converts kohya-ss / A1111 keys, `FluxPipeline`'s the
FLUX formats; PEFT's `LoraConfig` and pattern lookup give each layer the rank and alpha diffusers
would give it):

  diffusers / PEFT   `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>...`,
                     `text_encoder_2.` (SDXL), `transformer.` (FLUX); alpha and ranks from the
                     `lora_adapter_metadata` header when present
  kohya-ss / A1111   `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
                     `lora_te_...` (`lora_te1_` / `lora_te2_` for SDXL); conv (LoCon) layers included
  FLUX               kohya's and XLabs' FLUX keys, converted by diffusers (fused qkv split as
                     diffusers splits it)

Each layer becomes `delta(x) = scale * up(down(x))` with `scale = alpha / rank` (PEFT's
scaling; rsLoRA's `alpha / sqrt(rank)` when its config says so). What the low-rank product
cannot express (DoRA, LoHa, LoKr, biases on lora_B, ...) is refused naming the key.

`store_adapter` places an adapter beside the pipeline's denoiser (`<pipeline>_unet`, or FLUX's
`<pipeline>_transformer`):

  <repository>/<denoiser>/adapters/<adapter>/adapter.json   base pipeline, layers (graph,
        ONNX node, module, kind, rank, alpha, scale, shapes), bytes: what the service lists
  <repository>/<denoiser>/adapters/<adapter>/weights.safetensors
        `<graph>:<node>:down` / `:up` in the file's own dtype (fp16 files stay fp16),
        read with `safetensors.numpy`; Triton ignores a model folder's non-numeric folders.

The targets are named by the exported graph's own nodes, found by module path: the TorchScript
exporter's scope names (`/wrapper/unet/down_blocks.1/attentions.0/.../attn1/to_q/MatMul`), or the
dynamo exporter's `pkg.torch.onnx.name_scopes` metadata (FLUX's transformer); each layer's shapes
are checked against the node's weight: an adapter for another base model is refused.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import UnsupportedAdapter
from services.adapters import (  # the stored layout and the slotted graph's names, read by the service
    ADAPTER_NAME,
    ADAPTERS_FOLDER,
    MANIFEST,
    SCALE_INPUT,
    SLOTTED_GRAPH,
    WEIGHTS,
)

# Components of an SD 1.x/2.x, SDXL or FLUX pipeline an adapter may target: the prefix in
# diffusers' keys and the graph role the exporter writes (<pipeline>_<role>).
COMPONENTS = {"unet": "unet", "transformer": "transformer", "text_encoder": "text_encoder",
              "text_encoder_2": "text_encoder_2"}
DENOISERS = ("unet", "transformer")
# A text-encoder layer past the deepest the graph holds: the exported encoders end at the
# penultimate hidden states (SDXL's), so the last layer's LoRA cannot change what they output.
ENCODER_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")

# Key fragments of adapter kinds that are not a plain low-rank product.
UNSUPPORTED_KEYS = {
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
    "oft_": "OFT", "lora_mid": "LoCon with a Tucker middle factor", ".diff": "a full weight difference",
    "diff_b": "a bias difference", ".w_norm": "a norm-layer weight", ".b_norm": "a norm-layer bias",
}


@dataclass
class LoraLayer:
    component: str          # "unet" or "text_encoder"
    module: str             # diffusers' module path inside the component (no `text_model.`)
    down: np.ndarray        # [r, in] or [r, in, kh, kw]
    up: np.ndarray          # [out, r] or [out, r, 1, 1]
    alpha: float
    scale: float            # alpha / rank (PEFT's scaling)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class Adapter:
    layers: list[LoraLayer]
    source_format: str      # "peft" or "kohya"
    metadata: dict = field(default_factory=dict)


def _raw_keys(path: Path) -> list[str]:
    from export.weights import read_state_dict

    return list(read_state_dict(path))


def _refuse_unsupported(keys) -> None:
    for key in keys:
        for fragment, kind in UNSUPPORTED_KEYS.items():
            if fragment in key:
                raise UnsupportedAdapter(f"{key}: {kind} adapters are not supported (only low-rank LoRA / LoCon)")


def _component_config(prefix: str, state_dict: dict, network_alphas: dict | None, metadata: dict | None):
    """(peft state dict of one component, LoraConfig) as diffusers' loaders build them."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from diffusers.utils.peft_utils import _create_lora_config

    if metadata is not None:
        metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")} or None
    if network_alphas:
        network_alphas = {k.removeprefix(f"{prefix}."): v for k, v in network_alphas.items()
                          if k.split(".")[0] == prefix}
    if prefix in DENOISERS:
        if "lora_A" not in next(iter(state_dict)):
            state_dict = convert_unet_state_dict_to_peft(state_dict)
        rank = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
        is_unet = True
    else:
        state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
        rank = {k: v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
        is_unet = False
    state_dict = {k.replace("text_model.", ""): v for k, v in state_dict.items()}
    rank = {k.replace("text_model.", ""): v for k, v in rank.items()}
    config = _create_lora_config(state_dict, network_alphas or None, metadata, rank, is_unet=is_unet)
    return state_dict, config


def read_lora(path: Path, flux: bool = False) -> Adapter:
    """The adapter's layers with diffusers' rank/alpha semantics; refuses what it cannot serve.
    `flux`: read as diffusers' FluxPipeline does (for a FLUX pipeline), else as its SD/SDXL ones."""
    from peft.utils.other import get_pattern_key

    import export.torchvision_compat  # noqa: F401  (before diffusers)

    path = Path(path)
    raw = _raw_keys(path)
    _refuse_unsupported(raw)
    source_format = "kohya" if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in raw) else "peft"
    if flux:
        from diffusers import FluxPipeline

        state_dict, network_alphas, metadata = FluxPipeline.lora_state_dict(
            str(path), return_alphas=True, return_lora_metadata=True)
    else:
        from diffusers import StableDiffusionPipeline

        state_dict, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(path), return_lora_metadata=True)
    _refuse_unsupported(state_dict)
    allowed = ("transformer", "text_encoder") if flux else ("unet", "text_encoder", "text_encoder_2")
    for key in state_dict:
        prefix = key.split(".")[0]
        if prefix not in allowed:
            kind = "FLUX" if flux else "Stable Diffusion 1.x/2.x or SDXL"
            raise UnsupportedAdapter(f"{key}: targets '{prefix}', which a {kind} pipeline does not have "
                                     f"(components: {', '.join(allowed)})")
    layers = []
    for prefix in COMPONENTS:
        part = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        if not part:
            continue
        part, config = _component_config(prefix, part, network_alphas, metadata)
        if config.use_dora:
            raise UnsupportedAdapter(f"{prefix}: DoRA adapters are not supported")
        for key in part:
            if not re.search(r"\.lora_[AB]\.weight$", key):
                raise UnsupportedAdapter(f"{prefix}.{key}: not a LoRA down/up weight (only lora_A/lora_B "
                                         f"or lora_down/lora_up weights are served)")
        for key in sorted(k for k in part if k.endswith(".lora_A.weight")):
            module = key.removesuffix(".lora_A.weight")
            up_key = f"{module}.lora_B.weight"
            if up_key not in part:
                raise UnsupportedAdapter(f"{prefix}.{key}: no matching {up_key}")
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
            scale = alpha / (r ** 0.5 if config.use_rslora else r)
            down, up = _numpy(part[key]), _numpy(part[up_key])
            if down.shape[0] != up.shape[1]:
                raise UnsupportedAdapter(f"{prefix}.{key}: rank {down.shape[0]} but {up_key} has {up.shape[1]}")
            layers.append(LoraLayer(prefix, module, down, up, float(alpha), float(scale)))
    if not layers:
        raise UnsupportedAdapter(f"{path}: no LoRA layers found")
    return Adapter(layers, source_format, metadata or {})


def _numpy(t):
    """A torch tensor as numpy in a dtype numpy has (bf16 -> fp32)."""
    import torch

    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


@dataclass
class GraphTarget:
    graph: str              # model name: <pipeline>_unet
    node: str               # the weight-bearing node
    weight: str             # its weight initializer
    kind: str               # "linear" (MatMul / Gemm) or "conv"
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()


def _module_path(node) -> str:
    """The module a node belongs to, without `text_model.`: from the dynamo exporter's name
    scopes (`[..., 'transformer.transformer_blocks.0.attn.to_q', 'linear_10']`), else from the
    TorchScript exporter's node name (`/wrapper/unet/down_blocks.1/attn1/to_q/MatMul`)."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if scopes:
        import ast

        names = ast.literal_eval(scopes)
        path = names[-2] if len(names) >= 2 else ""
    else:
        path = ".".join(node.name.strip("/").split("/")[:-1])
    return path.replace("text_model.", "")


def graph_targets(onnx_path: Path, graph: str) -> dict[str, GraphTarget]:
    """Every node of the graph a LoRA layer can target (MatMul / Gemm / Conv with a weight
    initializer), keyed by its module path."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    targets = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = inits[node.input[1]]
        if node.op_type == "MatMul" and len(dims) == 2:
            target = GraphTarget(graph, node.name, node.input[1], "linear", dims[0], dims[1])
        elif node.op_type == "Gemm" and len(dims) == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            out_f, in_f = dims if trans_b else dims[::-1]
            target = GraphTarget(graph, node.name, node.input[1], "linear", in_f, out_f)
        elif node.op_type == "Conv" and len(dims) == 4:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group != 1:
                continue
            target = GraphTarget(graph, node.name, node.input[1], "conv", dims[1], dims[0], tuple(dims[2:]))
        else:
            continue
        targets[_module_path(node)] = target
    return targets


@dataclass
class ComponentGraph:
    """One component's exported graph, as store_adapter matches layers to it: its targets by
    module path, the module path they all start with (the exporter's wrapper and the component's
    attribute: `wrapper.unet`, `transformer`), and its deepest text-encoder layer, if any."""

    graph: str
    targets: dict[str, GraphTarget]
    root: str
    depth: int | None

    @classmethod
    def read(cls, onnx_path: Path, graph: str) -> ComponentGraph:
        targets = graph_targets(onnx_path, graph)
        modules = [path.split(".")[:-1] for path in targets]  # each target's enclosing modules
        root = [names[0] for names in itertools.takewhile(lambda names: len(set(names)) == 1, zip(*modules))]
        depths = [int(m.group(1)) for path in targets if (m := ENCODER_LAYER.search(path))]
        return cls(graph, targets, ".".join(root), max(depths, default=None))

    def beyond(self, layer: LoraLayer) -> bool:
        """A text-encoder layer deeper than any the graph holds (see ENCODER_LAYER)."""
        own = ENCODER_LAYER.search(layer.module)
        return own is not None and self.depth is not None and int(own.group(1)) > self.depth


def _match(layer: LoraLayer, component: ComponentGraph) -> GraphTarget:
    """The node of the component's own graph that `layer` adapts, by its module path."""
    suffix, targets, graph = layer.module, component.targets, component.graph
    exact = targets.get(f"{component.root}.{suffix}" if component.root else suffix)  # not `blocks.0.proj_out`
    found = [exact] if exact else [t for path, t in targets.items() if path == suffix or path.endswith("." + suffix)]
    if len(found) != 1:
        raise UnsupportedAdapter(
            f"{layer.component}.{layer.module}: {'no' if not found else 'more than one'} layer of {graph} "
            f"matches it (an adapter for another base model?)")
    target = found[0]
    want_kind = "conv" if layer.down.ndim == 4 else "linear"
    in_f, out_f = layer.down.shape[1], layer.up.shape[0]
    kernel = tuple(layer.down.shape[2:]) if want_kind == "conv" else ()
    if want_kind == "conv" and target.kind == "linear" and kernel == (1, 1):
        want_kind, kernel = "linear", ()  # a 1x1 conv LoRA on a layer exported as a linear
    if target.kind == "conv" and want_kind == "linear":
        want_kind, kernel = "conv", (1, 1)  # a linear LoRA on a 1x1 conv (proj_in / proj_out)
    if (target.kind, target.in_features, target.out_features) != (want_kind, in_f, out_f) or (
            target.kind == "conv" and kernel != target.kernel and layer.up.shape[2:] not in ((1, 1), ())):
        raise UnsupportedAdapter(
            f"{layer.component}.{layer.module}: a {want_kind} LoRA {in_f}->{out_f} (kernel {kernel or '-'}) does not "
            f"fit {graph}'s {target.kind} {target.in_features}->{target.out_features} "
            f"(kernel {target.kernel or '-'}): an adapter for another base model?")
    return target


def denoiser_folder(repository: Path, pipeline: str) -> Path:
    """The pipeline's U-Net or transformer model folder, where its adapters are stored."""
    for role in DENOISERS:
        folder = Path(repository) / f"{pipeline}_{role}"
        if folder.is_dir():
            return folder
    raise UnsupportedAdapter(f"{repository}: no pipeline {pipeline!r} (neither {pipeline}_unet nor "
                             f"{pipeline}_transformer is there)")


def store_adapter(adapter: Adapter, repository: Path, pipeline: str, name: str, source: str = "",
                  out: Path | None = None) -> Path:
    """Writes the adapter beside `<pipeline>_unet` (see the module docstring), or in `out/<name>`
    (a directory the service loads adapters from at run time); returns its folder."""
    from safetensors.numpy import save_file

    if not ADAPTER_NAME.fullmatch(name):
        raise UnsupportedAdapter(f"adapter name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
    repository = Path(repository)
    denoiser_dir = denoiser_folder(repository, pipeline)
    components = {}
    for component, role in COMPONENTS.items():
        graph = f"{pipeline}_{role}"
        onnx_path = repository / graph / "1" / "model.onnx"
        if onnx_path.exists():
            components[component] = ComponentGraph.read(onnx_path, graph)
    tensors: dict[str, np.ndarray] = {}
    entries: list[dict[str, Any]] = []  # the manifest's, as JSON
    for layer in adapter.layers:
        if layer.component not in components:
            raise UnsupportedAdapter(
                f"{layer.component}.{layer.module}: pipeline {pipeline!r} has no {layer.component} graph")
        part = components[layer.component]
        graph = part.graph
        if layer.component != "unet" and part.beyond(layer):
            continue
        target = _match(layer, part)
        key = f"{graph}:{target.node}"
        down, up = layer.down, layer.up
        if target.kind == "conv" and down.ndim == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]
        elif target.kind == "linear" and down.ndim == 4:
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        tensors[f"{key}:down"] = np.ascontiguousarray(down)
        tensors[f"{key}:up"] = np.ascontiguousarray(up)
        entries.append({"graph": graph, "node": target.node, "weight": target.weight,
                        "module": f"{layer.component}.{layer.module}", "kind": target.kind, "rank": layer.rank,
                        "alpha": layer.alpha, "scale": layer.scale,
                        "in_features": target.in_features, "out_features": target.out_features,
                        "kernel": list(down.shape[2:])})
    folder = (Path(out) if out is not None else denoiser_dir / ADAPTERS_FOLDER) / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS))
    ranks = sorted({e["rank"] for e in entries})
    manifest = {
        "name": name, "pipeline": pipeline, "source": source, "format": adapter.source_format,
        "graphs": sorted({e["graph"] for e in entries}), "ranks": ranks,
        "dtype": str(next(iter(tensors.values())).dtype),
        "bytes": int(sum(t.nbytes for t in tensors.values())), "layers": entries,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def export_lora(weights: Path, repository: Path, pipeline: str, name: str, progress=print,
                out: Path | None = None) -> Path:
    flux = denoiser_folder(repository, pipeline).name.endswith("_transformer")
    adapter = read_lora(weights, flux=flux)
    folder = store_adapter(adapter, repository, pipeline, name, source=Path(weights).name, out=out)
    manifest = json.loads((folder / MANIFEST).read_text())
    progress(f"[{pipeline}] adapter {name}: {len(manifest['layers'])} layers ({adapter.source_format} format, "
             f"ranks {manifest['ranks']}, {manifest['bytes'] / 1e6:.1f} MB {manifest['dtype']}) -> {folder}")
    return folder


def add_parsers(sub) -> None:
    """`python -m export lora` (store an adapter) and `python -m export lora-slots` (graphs that
    serve adapters, see add_adapter_slots)."""
    lora = sub.add_parser("lora", help="store a LoRA adapter (diffusers/PEFT or kohya-ss format) for a pipeline")
    lora.add_argument("--pipeline", required=True,
                      help="the exported pipeline's name (<pipeline>_unet in the repository)")
    lora.add_argument("--weights", type=Path, required=True,
                      help="the LoRA file as published (.safetensors or torch file)")
    lora.add_argument("--name", required=True, help="the adapter's name in requests")
    lora.add_argument("--repository", type=Path, default=Path("model_repository"),
                      help="the repository holding the pipeline (its graphs name the adapter's targets)")
    lora.add_argument("--out", type=Path, default=None,
                      help="write the adapter to OUT/<name> instead of beside the pipeline's U-Net: a directory "
                           "of GENSERVE_ADAPTER_DIRS, loaded at run time")
    slots = sub.add_parser("lora-slots", help="write the pipeline's U-Net and text encoder with adapter slots")
    slots.add_argument("--pipeline", required=True)
    slots.add_argument("--repository", type=Path, default=Path("model_repository"))


def run(args) -> int:
    if args.command == "lora":
        export_lora(args.weights, args.repository, args.pipeline, args.name, out=args.out)
        return 0
    for graph in COMPONENTS.values():
        path = Path(args.repository) / f"{args.pipeline}_{graph}" / "1" / "model.onnx"
        if path.exists():
            out = add_adapter_slots(path)
            triton = write_slotted_model(path.parent.parent, out)
            print(f"[{args.pipeline}] {graph}: {out} (for Triton: model {triton.name})")
    return 0


def write_slotted_model(model_dir: Path, slotted: Path) -> Path:
    """The slotted graph as Triton serves it: model `<model>_lora` beside `model_dir`, whose
    config says `genserve.adapter_slots_of` (services.runtime.repository) and whose version
    folder hard-links the slotted graph and its external data (a copy where links cannot be
    made). max_batch_size 0, every shape stated whole: the factor inputs have no batch axis,
    so Triton's batcher could not merge such calls (the step engine batches rows itself).
    Written beside the repository and moved into place whole."""
    import onnx
    from tritonclient.grpc import model_config_pb2 as mc

    from export.staging import staged_repository
    from export.triton_config import write_model_config
    from services.adapters import SLOTTED_MODEL_SUFFIX, is_slot_input
    from services.runtime.repository import SLOTS_OF_KEY, parse_model_config

    model_dir, slotted = Path(model_dir), Path(slotted)
    config = parse_model_config((model_dir / "config.pbtxt").read_text())
    name = f"{model_dir.name}{SLOTTED_MODEL_SUFFIX}"
    triton = mc.ModelConfig()
    triton.CopyFrom(config)
    triton.name = name
    for unused in ("dynamic_batching", "model_warmup", "default_model_filename"):
        triton.ClearField(unused)
    batched = config.max_batch_size > 0
    triton.max_batch_size = 0
    for t in (*triton.input, *triton.output):
        shape = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        t.ClearField("reshape")
        del t.dims[:]
        t.dims.extend([-1, *shape] if batched else shape)
    graph = onnx.load(str(slotted), load_external_data=False)
    for value in graph.graph.input:
        if is_slot_input(value.name):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            triton.input.add(name=value.name, data_type=mc.TYPE_FP32, dims=dims)
    triton.parameters[SLOTS_OF_KEY].string_value = model_dir.name
    external = {entry.value for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                for entry in t.external_data if entry.key == "location"}
    repository, version = model_dir.parent, slotted.parent.name
    with staged_repository(repository, name) as staging:
        out = staging / name
        (out / version).mkdir(parents=True)
        write_model_config(triton, out)
        _link(slotted, out / version / "model.onnx")
        for location in sorted(external):
            _link(slotted.parent / location, out / version / location)
    return repository / name


def _link(src: Path, dest: Path) -> None:
    """`dest` as a hard link of `src` (same bytes, no copy), else a copy."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


# ---------------------------------------------------------------------------------------------
# Adapter slots: one graph serves rows with different adapters, and rows with none, in one call.
#
# For every weight-bearing node (MatMul / Gemm / Conv with a constant weight) the graph gains
#   lora_down:<node>  [in, S*r] (linear) or [S*r, in, kh, kw] (conv)
#   lora_up:<node>    [S*r, out] (linear) or [out, S*r, 1, 1] (conv)
# and the whole graph one `lora_scale` [batch, S]: the S adapters this call uses side by side,
# each padded to the layer's largest rank r among them (zero columns), their per-layer alpha/rank
# folded into `up` by the caller; row b's scale for adapter s multiplies its block of columns, so
#   y += ((x @ down) * scale_b) @ up
# gives each row its own adapters (several with their own scales, or none at scale 0).
# A layer whose `lora_down` has no columns (no adapter of the call targets it; S = 0 for a call
# without adapters) skips its low-rank sum through one small If (see add_adapter_slots).
# ---------------------------------------------------------------------------------------------



def slot_input_names(node: str) -> tuple[str, str]:
    return f"lora_down:{node}", f"lora_up:{node}"


def add_adapter_slots(onnx_path: Path, out_path: Path | None = None, nodes: set[str] | None = None) -> Path:
    """Writes `onnx_path`'s graph with adapter slots on `nodes` (default: every target of
    graph_targets) as `out_path` (default: model_lora.onnx beside it; external weights stay
    shared with the plain graph). The plain graph is left as it is.

    Each slotted node keeps its place in the main graph (what ONNX Runtime optimises best:
    conv layouts, fusions) and a small If adds the low-rank sum only when its `lora_down` has
    columns: a layer none of the call's adapters targets, and every layer of a call without
    adapters, costs one If. (One If around two copies of the whole graph, plain and slotted,
    measured 1.07-1.96x the plain graph without adapters against 1.04-1.15x for this:
    bench/results/lora_slots.md.) Where the If sits keeps the no-adapter path close to the plain
    graph (see slot_placement): an If that passes its input through copies it, and a node's
    input or output the If reads cannot be fused away."""
    import onnx
    from onnx import TensorProto, helper

    onnx_path = Path(onnx_path)
    out_path = Path(out_path) if out_path else onnx_path.with_name(SLOTTED_GRAPH)
    model = onnx.load(str(onnx_path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.graph.value_info, *inferred.graph.input) if v.type.tensor_type.HasField("shape")}
    dims.update({t.name: [1, *t.dims] for t in model.graph.initializer})  # a constant broadcasts like one row
    value_types = {v.name: v for v in inferred.graph.value_info}
    graph = model.graph
    targets = {t.node: t for t in graph_targets(onnx_path, "").values()}
    chosen = {n.name for n in graph.node if n.name in targets and (nodes is None or n.name in nodes)}
    users: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    producers = {out: n for n in graph.node for out in n.output}
    graph_outputs = {o.name for o in graph.output}
    new_inputs = []

    def delta_nodes(node, x: str) -> list:
        """Nodes computing f"lora/{node.name}/delta" = ((x @ down) * row scales) @ up."""
        target = targets[node.name]
        down, up = slot_input_names(node.name)
        p = f"lora/{node.name}/"
        conv = target.kind == "conv"
        new_inputs.append(helper.make_tensor_value_info(
            down, TensorProto.FLOAT, [target.in_features, f"{p}cols"] if not conv
            else [f"{p}cols", target.in_features, *target.kernel]))
        new_inputs.append(helper.make_tensor_value_info(
            up, TensorProto.FLOAT, [f"{p}cols", target.out_features] if not conv
            else [target.out_features, f"{p}cols", 1, 1]))
        out = [  # f"{p}cols" comes from the main graph (the If's condition)
            helper.make_node("Div", [f"{p}cols", "lora/slots"], [f"{p}rank"]),
            helper.make_node("Concat", ["lora/ones2", f"{p}rank"], [f"{p}expand"], axis=0),
            helper.make_node("Expand", ["lora/scale3", f"{p}expand"], [f"{p}scale_bsr"]),
            helper.make_node("Reshape", [f"{p}scale_bsr", "lora/batch_flat"], [f"{p}scale_rows"]),
        ]
        if conv:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"}
            out += [
                helper.make_node("Conv", [x, down], [f"{p}t"], **attrs),
                helper.make_node("Unsqueeze", [f"{p}scale_rows", "lora/axes_23"], [f"{p}scale_k"]),
                helper.make_node("Mul", [f"{p}t", f"{p}scale_k"], [f"{p}ts"]),
                helper.make_node("Conv", [f"{p}ts", up], [f"{p}delta"]),
            ]
        else:
            dim = dims.get(node.input[0])
            k = 2 if node.op_type == "Gemm" else len(dim) if dim else 3
            scale_k = f"{p}scale_rows"
            if k > 2:
                out.append(helper.make_node("Unsqueeze", [scale_k, f"lora/axes_mid{k}"], [f"{p}scale_k"]))
                scale_k = f"{p}scale_k"
            out += [
                helper.make_node("MatMul", [x, down], [f"{p}t"]),
                helper.make_node("Mul", [f"{p}t", scale_k], [f"{p}ts"]),
                helper.make_node("MatMul", [f"{p}ts", up], [f"{p}delta"]),
            ]
        return out

    def per_row_values(name: str) -> int | None:
        shape = dims.get(name)
        if not shape or not all(shape[1:]):
            return None
        values = 1
        for d in shape[1:]:
            values *= int(d or 0)
        return values

    def sole_user(value: str):
        """The one node reading `value` besides Shape nodes (which read the same shape either way)."""
        readers = [n for n in users.get(value, []) if n.op_type != "Shape"]
        return readers[0] if len(readers) == 1 and value not in graph_outputs else None

    claimed = set()  # nodes an If already sits after or feeds (one If each keeps the order simple)

    def slot_placement(node):
        """(anchor, transposes, add, operand): where the low-rank sum of `node` joins the graph.

        From the node's output, the sum follows Transposes (applied to it, so ONNX Runtime can
        still fold a Conv's Transpose into its layout change) to the anchor, whose output the If
        replaces; when instead it reaches an Add of a bias or per-channel shift (at most
        out_features values per row), the If replaces that small operand (plain: the operand
        itself, no copy of the activation): `add` is that Add and `operand` the small operand's
        position in it."""
        value, transposes, anchor = node.output[0], [], node
        while (user := sole_user(value)) is not None and id(user) not in claimed:
            if user.op_type == "Add" and len(set(user.input)) == 2:
                other = user.input[1] if user.input[0] == value else user.input[0]
                size = per_row_values(other)
                if size is not None and size <= targets[node.name].out_features:
                    return anchor, transposes, user, list(user.input).index(other)
            if user.op_type != "Transpose":
                break
            transposes.append(user)
            value, anchor = user.output[0], user
        return anchor, transposes, None, None

    def delta_input(node) -> tuple[str, list]:
        """The node's input for the low-rank sum, and nodes recomputing it inside the If: a
        Transpose read only by the node is redone there, so ONNX Runtime can still fold it into
        the node's layout change (Transpose + Conv)."""
        x = node.input[0]
        source = producers.get(x)
        if source is None or source.op_type != "Transpose" or sole_user(x) is not node or id(source) in claimed:
            return x, []
        redo = onnx.NodeProto()
        redo.CopyFrom(source)
        del redo.output[:]
        redo.output.append(f"lora/{node.name}/x")
        redo.name = f"lora/{node.name}/x"
        return redo.output[0], [redo]

    before: dict[int, list[Any]] = {}  # id(node) -> the If nodes emitted just before / after it
    after: dict[int, list[Any]] = {}
    known_shapes = []  # values whose shapes the plain graph's inference knew, restated
    for node in graph.node:
        if node.name not in chosen:
            continue
        p = f"lora/{node.name}/"
        anchor, transposes, add, operand = slot_placement(node)
        x, redo = delta_input(node)
        branch = [*redo, *delta_nodes(node, x)]
        delta = f"{p}delta"
        for i, t in enumerate(transposes):
            attrs = {a.name: helper.get_attribute_value(a) for a in t.attribute}
            branch.append(helper.make_node("Transpose", [delta], [f"{p}delta_t{i}"], **attrs))
            delta = f"{p}delta_t{i}"
        if add is not None:  # the If stands for the Add's small operand
            passed, result = add.input[operand], f"{p}shift"
            add.input[operand] = result
            claimed.add(id(add))
            where = before
            # The If's branches differ in shape (the operand, or the activation's), so the Add's
            # output shape is not inferred: stated, it lets ONNX Runtime remove a following
            # x / 1 as in the plain graph.
            known_shapes.append(add.output[0])
        else:  # the If stands for the anchor's output
            result = anchor.output[0]
            passed = anchor.output[0] = f"{result}/lora_base"
            claimed.add(id(anchor))
            where = after
            known_shapes.append(result)
        branch.append(helper.make_node("Add", [passed, delta], [f"{p}sum"]))
        with_adapters = helper.make_graph(branch, "adapters", [],
                                          [helper.make_tensor_value_info(f"{p}sum", TensorProto.FLOAT, None)])
        without = helper.make_graph([helper.make_node("Identity", [passed], [f"{p}plain"])], "plain", [],
                                    [helper.make_tensor_value_info(f"{p}plain", TensorProto.FLOAT, None)])
        conv = targets[node.name].kind == "conv"
        where.setdefault(id(add if add is not None else anchor), []).extend([
            helper.make_node("Shape", [slot_input_names(node.name)[0]], [f"{p}down_shape"]),
            helper.make_node("Gather", [f"{p}down_shape", f"lora/axis_{0 if conv else 1}"], [f"{p}cols"], axis=0),
            helper.make_node("Greater", [f"{p}cols", "lora/zero"], [f"{p}any"]),  # one element: If's condition
            helper.make_node("If", [f"{p}any"], [result], name=f"{p}if", then_branch=with_adapters,
                             else_branch=without),
        ])
    body = [n for node in graph.node for n in (*before.get(id(node), ()), node, *after.get(id(node), ()))]

    def const(name, values):
        return helper.make_node("Constant", [], [name],
                                value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    prelude = [
        const("lora/axis_0", [0]), const("lora/axis_1", [1]), const("lora/ones2", [1, 1]),
        const("lora/batch_flat", [0, -1]), const("lora/axes_23", [2, 3]), const("lora/axes_mid3", [1]),
        const("lora/axes_mid4", [1, 2]), const("lora/axes_2", [2]), const("lora/zero", [0]),
        helper.make_node("Shape", [SCALE_INPUT], ["lora/scale_shape"]),
        helper.make_node("Gather", ["lora/scale_shape", "lora/axis_1"], ["lora/slots"], axis=0),
        helper.make_node("Unsqueeze", [SCALE_INPUT, "lora/axes_2"], ["lora/scale3"]),
    ]
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    scale_input = helper.make_tensor_value_info(SCALE_INPUT, TensorProto.FLOAT,
                                                [batch_dim.dim_param or "batch", "lora_slots"])
    del graph.node[:]
    graph.node.extend([*prelude, *body])
    graph.input.extend([scale_input, *new_inputs])
    graph.value_info.extend(value_types[name] for name in known_shapes
                            if name in value_types and name not in {v.name for v in graph.value_info})
    onnx.save_model(model, str(out_path))
    onnx.checker.check_model(str(out_path))
    return out_path
