"""Super-resolution models published as ncnn files (`.param` + `.bin`) -> spandrel state dicts.

  python -m export sr --ncnn realesrgan-x4plus.param --name realesrgan_x4plus

Many upscalers reach users only in ncnn's format (Real-ESRGAN-ncnn-vulkan and the packages
built on it). ncnn stores no names, only a graph (`.param`, text) and the weights of its
layers one after another (`.bin`). This module reads both, recognises the architectures
spandrel knows from the graph's shape, names every weight as the PyTorch original did, and
hands the state dict to spandrel; the export then goes on exactly as for a `.pth`.

Read here (what the converters onnx2ncnn and pnnx write for these networks):
  - ESRGAN / Real-ESRGAN x4plus (RRDBNet): convolutions with LeakyReLU(0.2) fused or as
    separate ReLU layers, dense blocks of Concat + Eltwise(0.2, 1), nearest x2 Interp upsampling;
  - Real-ESRGAN Compact (SRVGGNetCompact): Convolution + PReLU pairs, PixelShuffle(r), and the
    nearest-upsampled input added back.
Anything else (other layer types, int8-quantised weights, Real-ESRGAN's pixel-unshuffle x1/x2
variants, a resize appended after the network) is refused with the reason.

The `.bin` layout (ncnn src/modelbin.cpp): each weighted layer reads its arrays in order.
A convolution's weights begin with a 4-byte tag: 0x01306B47 = float16 (padded to 4 bytes),
0 = raw float32, 0x0002C056 = float32 with scales kept elsewhere, 0x000D4B38 = int8, other
non-zero = a 256-entry float table + uint8 indices. Biases and PReLU slopes are raw float32
with no tag.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.errors import ImageExportError

PARAM_MAGIC = 7767517
FP16_TAG = 0x01306B47
INT8_TAG = 0x000D4B38
FP32_SCALED_TAG = 0x0002C056
ARRAY_KEY_BASE = -23300  # an array parameter `id` is written with key -23300 - id
# Layer types that read nothing from the .bin and that the recognised graphs use.
WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle", "ReLU", "Noop"}
LEAKY_SLOPE = 0.2  # RRDBNet's LeakyReLU
NEAREST = 1  # ncnn Interp resize_type


class NcnnError(ImageExportError):
    """The ncnn files cannot be read, or hold no architecture read here (a user error)."""


@dataclass
class Layer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, object]
    weights: list[np.ndarray] = field(default_factory=list)

    def param(self, key: int, default=0):
        return self.params.get(key, default)


@dataclass
class NcnnGraph:
    layers: list[Layer]
    param_path: Path
    bin_path: Path

    def of_type(self, kind: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.type == kind]

    def consumers(self, blob: str) -> list[Layer]:
        return [layer for layer in self.layers if blob in layer.inputs]


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_param(path: Path) -> list[Layer]:
    """The layers of a text `.param` file (the binary `.param.bin` form is not read)."""
    try:
        lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise NcnnError(f"{path}: not a text .param file (a binary .param.bin is not read)") from exc
    if not lines or lines[0] != [str(PARAM_MAGIC)]:
        raise NcnnError(f"{path}: not an ncnn .param file (the first line must be the magic {PARAM_MAGIC})")
    if len(lines) < 2 or len(lines[1]) != 2:
        raise NcnnError(f"{path}: the second line must give the layer and blob counts")
    layer_count = int(lines[1][0])
    layers = []
    for number, fields in enumerate(lines[2:], start=3):
        try:
            kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
            inputs, outputs = fields[4:4 + n_in], fields[4 + n_in:4 + n_in + n_out]
            params: dict[int, object] = {}
            for item in fields[4 + n_in + n_out:]:
                key_text, value = item.split("=", 1)
                key = int(key_text)
                if key <= ARRAY_KEY_BASE:
                    count, *values = value.split(",")
                    params[ARRAY_KEY_BASE - key] = [_number(v) for v in values[:int(count)]]
                else:
                    params[key] = _number(value)
        except (IndexError, ValueError) as exc:
            raise NcnnError(f"{path}:{number}: cannot read this layer line ({exc})") from exc
        layers.append(Layer(kind, name, inputs, outputs, params))
    if len(layers) != layer_count:
        raise NcnnError(f"{path}: the header says {layer_count} layers, the file has {len(layers)}")
    return layers


class _BinReader:
    """ncnn's ModelBin over one .bin file: tagged arrays (type 0) and raw float32 (type 1)."""

    def __init__(self, path: Path):
        self.path, self.data, self.offset = path, Path(path).read_bytes(), 0

    def _take(self, size: int, what: str) -> bytes:
        if self.offset + size > len(self.data):
            raise NcnnError(f"{self.path} ends at byte {len(self.data)} while reading {what}: the .bin does not "
                            f"belong to this .param")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def raw_float32(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self._take(4 * count, what), dtype="<f4").copy()

    def tagged(self, count: int, what: str) -> np.ndarray:
        tag = int.from_bytes(self._take(4, what), "little")
        if tag == FP16_TAG:
            size = 2 * count
            values = np.frombuffer(self._take(size + (-size % 4), what)[:size], dtype="<f2")
            return values.astype(np.float32)
        if tag in (0, FP32_SCALED_TAG):
            return self.raw_float32(count, what)
        if tag == INT8_TAG:
            raise NcnnError(f"{what}: int8-quantised weights (ncnn2int8) are not read; convert the model's "
                            f"float16/float32 files")
        raise NcnnError(f"{what}: table-quantised weights (tag {tag:#010x}) are not read; convert the model's "
                        f"float16/float32 files")

    def left(self) -> int:
        return len(self.data) - self.offset


def _load_convolution(layer: Layer, reader: _BinReader) -> None:
    out_ch, kernel_w = int(layer.param(0)), int(layer.param(1))
    kernel_h = int(layer.param(11, kernel_w))
    size = int(layer.param(6))
    if layer.param(8):
        raise NcnnError(f"layer {layer.name}: int8 convolution (int8_scale_term) is not read")
    if layer.param(19):
        raise NcnnError(f"layer {layer.name}: weights given as an input blob (dynamic_weight) are not read")
    if not out_ch or size % (out_ch * kernel_h * kernel_w):
        raise NcnnError(f"layer {layer.name}: weight_data_size {size} does not divide into {out_ch} outputs of "
                        f"{kernel_h}x{kernel_w}")
    for key, what in ((2, "dilation"), (3, "stride")):  # the _h values (key + 10) default to the _w ones
        if {int(layer.param(key, 1)), int(layer.param(key + 10, layer.param(key, 1)))} != {1}:
            raise NcnnError(f"layer {layer.name}: {what} other than 1 is not in the architectures read here")
    left = layer.param(4, 0)
    top = layer.param(14, left)
    pads = {left, top, layer.param(15, left), layer.param(16, top)}
    if kernel_h != kernel_w or not (pads <= {kernel_w // 2, -233, -234}):  # -233/-234: "same" padding
        raise NcnnError(f"layer {layer.name}: {kernel_h}x{kernel_w} kernel with padding {sorted(pads)}: only "
                        f"square kernels padded to keep the size are in the architectures read here")
    weight = reader.tagged(size, f"layer {layer.name} weights")
    layer.weights.append(weight.reshape(out_ch, size // (out_ch * kernel_h * kernel_w), kernel_h, kernel_w))
    if layer.param(5):
        layer.weights.append(reader.raw_float32(out_ch, f"layer {layer.name} bias"))


def read_ncnn(param_path: str | Path, bin_path: str | Path | None = None) -> NcnnGraph:
    """The graph of `param_path` with every layer's weights from `bin_path` (default: beside it, .bin)."""
    param_path = Path(param_path)
    bin_flag = "--ncnn-bin" if bin_path else "the .bin beside it"
    bin_path = Path(bin_path) if bin_path else param_path.with_suffix(".bin")
    for path, flag in ((param_path, "--ncnn"), (bin_path, bin_flag)):
        if not path.is_file():
            raise NcnnError(f"{flag} {str(path)!r}: no such file")
    layers = parse_param(param_path)
    reader = _BinReader(bin_path)
    for layer in layers:
        if layer.type == "Convolution":
            _load_convolution(layer, reader)
        elif layer.type == "PReLU":
            layer.weights.append(reader.raw_float32(int(layer.param(0, 1)), f"layer {layer.name} slopes"))
        elif layer.type not in WEIGHTLESS:
            raise NcnnError(f"{param_path}: layer type {layer.type} ({layer.name}) is not in the architectures read "
                            f"here (ESRGAN/RRDBNet, Real-ESRGAN Compact)")
    if reader.left():
        raise NcnnError(f"{bin_path}: {reader.left()} bytes are left after the last layer's weights: the .bin does "
                        f"not belong to this .param")
    return NcnnGraph(layers, param_path, bin_path)


# --- recognising the architecture ----------------------------------------------------------


def _activation(graph: NcnnGraph, conv: Layer) -> tuple[str, float | Layer | None]:
    """How a convolution's output is activated: fused into it, or by the one layer after it."""
    fused = int(conv.param(9))
    if fused == 1:
        return "relu", None
    if fused == 2:
        return "leaky", float((conv.param(10, [0.0]) or [0.0])[0])
    if fused:
        return f"activation {fused}", None
    after = graph.consumers(conv.outputs[0])
    if len(after) == 1 and after[0].type == "ReLU":
        slope = float(after[0].param(0, 0.0))
        return ("leaky", slope) if slope else ("relu", None)
    if len(after) == 1 and after[0].type == "PReLU":
        return "prelu", after[0]
    return "none", None


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _compact_state_dict(graph: NcnnGraph) -> dict[str, torch.Tensor]:
    """SRVGGNetCompact: body = [conv, PReLU] * (num_conv + 1) + [conv], PixelShuffle(r), + nearest(x)."""
    convs = graph.of_type("Convolution")
    (shuffle,) = graph.of_type("PixelShuffle")
    scale = int(shuffle.param(0, 1))
    interps = graph.of_type("Interp")
    nearest = [i for i in interps
               if int(i.param(0)) == NEAREST and float(i.param(1, 1)) == float(i.param(2, 1)) == scale]
    if len(nearest) != 1 or not graph.of_type("BinaryOp"):
        raise NcnnError(f"{graph.param_path}: a Compact network adds the input upsampled x{scale} (nearest) to its "
                        f"output; this graph does not")
    extra = [i for i in interps if i is not nearest[0]]
    if extra:
        factor = float(extra[0].param(1, 1))
        raise NcnnError(f"{graph.param_path}: the network is followed by a resize by {factor:g} ({extra[0].name}); "
                        f"export the model without it (for realesr-animevideov3 the -x4 files hold the same weights) "
                        f"and ask for the size you want")
    state = {}
    for i, conv in enumerate(convs):
        kind, prelu = _activation(graph, conv)
        last = i == len(convs) - 1
        if (kind != "prelu") != last:
            raise NcnnError(f"{graph.param_path}: convolution {conv.name} is {'followed by ' + kind if last else kind}"
                            f"; Compact has a PReLU after every convolution but the last")
        state[f"body.{2 * i}.weight"] = _tensor(conv.weights[0])
        state[f"body.{2 * i}.bias"] = _tensor(conv.weights[1] if len(conv.weights) > 1 else np.zeros(conv.param(0)))
        if isinstance(prelu, Layer):  # every convolution but the last (checked above)
            state[f"body.{2 * i + 1}.weight"] = _tensor(prelu.weights[0])
    return state


def _rrdb_state_dict(graph: NcnnGraph) -> dict[str, torch.Tensor]:
    """RRDBNet (BasicSR names): conv_first, body.N.rdbR.convC (5 per dense block, 3 blocks per RRDB),
    conv_body, conv_upK (one per nearest x2), conv_hr, conv_last."""
    convs = graph.of_type("Convolution")
    ups = graph.of_type("Interp")
    if any(int(u.param(0)) != NEAREST or float(u.param(1, 1)) != 2 or float(u.param(2, 1)) != 2 for u in ups):
        raise NcnnError(f"{graph.param_path}: RRDBNet upsamples by nearest x2 steps; this graph resizes otherwise")
    num_blocks, rest = divmod(len(convs) - 4 - len(ups), 15)
    if rest or num_blocks < 1:
        raise NcnnError(f"{graph.param_path}: {len(convs)} convolutions and {len(ups)} upsamplings do not make an "
                        f"RRDBNet (1 + 15 per block + 1 + one per x2 + 2)")
    residuals = graph.of_type("Eltwise")
    coefficients = {tuple(float(c) for c in e.param(1, [])) for e in residuals}
    if len(residuals) != 4 * num_blocks or coefficients != {(LEAKY_SLOPE, 1.0)}:
        raise NcnnError(f"{graph.param_path}: RRDBNet's {4 * num_blocks} residual sums scaled 0.2 are not all here "
                        f"({len(residuals)} Eltwise layers with coefficients {sorted(coefficients)})")
    in_ch, out_ch = convs[0].weights[0].shape[1], convs[-1].weights[0].shape[0]
    if in_ch in (4 * out_ch, 16 * out_ch):
        raise NcnnError(f"{graph.param_path}: {in_ch} input channels for {out_ch} output ones is Real-ESRGAN's "
                        f"pixel-unshuffle (x1/x2) variant, which is not read from ncnn files")
    names = ["conv_first"]
    names += [f"body.{b}.rdb{r}.conv{c}" for b in range(num_blocks) for r in (1, 2, 3) for c in range(1, 6)]
    names += ["conv_body"] + [f"conv_up{k}" for k in range(1, len(ups) + 1)] + ["conv_hr", "conv_last"]
    state = {}
    for name, conv in zip(names, convs):
        leaky = name.startswith(("conv_up", "conv_hr")) or (".conv" in name and not name.endswith("conv5"))
        kind, slope = _activation(graph, conv)
        if (kind, slope) != (("leaky", LEAKY_SLOPE) if leaky else ("none", None)):
            want = f"LeakyReLU({LEAKY_SLOPE})" if leaky else "no activation"
            raise NcnnError(f"{graph.param_path}: convolution {conv.name} (RRDBNet's {name}) has {kind} where "
                            f"RRDBNet has {want}")
        state[f"{name}.weight"] = _tensor(conv.weights[0])
        state[f"{name}.bias"] = _tensor(conv.weights[1] if len(conv.weights) > 1 else np.zeros(conv.param(0)))
    return state


def ncnn_state_dict(graph: NcnnGraph) -> tuple[str, dict[str, torch.Tensor]]:
    """(architecture, state dict with the PyTorch original's names) for a graph read by read_ncnn."""
    types = Counter(layer.type for layer in graph.layers)
    if not types["Convolution"]:
        raise NcnnError(f"{graph.param_path}: no convolution in the graph")
    if types["PReLU"] and types["PixelShuffle"] == 1 and not types["Concat"]:
        return "Compact", _compact_state_dict(graph)
    if types["Concat"] and types["Eltwise"] and not types["PReLU"] and not types["PixelShuffle"]:
        return "ESRGAN", _rrdb_state_dict(graph)
    found = ", ".join(f"{kind} x{n}" for kind, n in sorted(types.items()))
    raise NcnnError(f"{graph.param_path}: no architecture read here matches this graph ({found}); read: "
                    f"ESRGAN/RRDBNet and Real-ESRGAN Compact")


def sha256_of(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()
