"""How big a parity check may be: activation memory from a model's dimensions.

Every graph is verified (design principle 3), but a check at the wrong size can need more memory
than the machine has: SD 1.5's shallow U-Net at batch 3 and twice the native size holds one
self-attention score matrix of 3 x 8 x 16,384^2 x 4 B = 24 GiB. So each component describes what
its activations grow with (`ActivationModel`: its attention sites and its feature maps, each at a
scale of the component's grid), and the checks are chosen from what they would cost:

  * the dynamic axes: batch 3 (the graph was traced at 2) at a small, non-square, non-native
    grid, (2m, 3m) for a grid multiple m: catches a batch, a height or a width frozen into the
    graph, and sizes where rows and columns are swapped;
  * with `full` (the default), also the served size: batch 3 at twice the native grid when its
    activations fit the budget (small models, as before), else batch 1 at the native grid (the
    batch axis is the first check's: a second row at the native size would only double the
    check's time, which for SD 1.5's VAE decoder on 2 cores is minutes).

A check's bytes are batch x (SCORE_COPIES x the largest attention score matrix + FEATURE_COPIES x
the largest feature map) in fp32: an estimate of the peak, meant to choose sizes, not to account
for every buffer. The budget comes from the memory the machine has available when the check runs
(`verification_budget`), less the ONNX Runtime session's own copy of the weights.

The grid is the component's spatial unit (a latent cell for U-Nets, FLUX transformers and VAEs; a
VAE encoder's pixels are `vae_scale` cells per latent cell); text encoders have no grid (`None`)
and a fixed length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from export.errors import VerificationBudgetError
from services.engine.memory import available_memory

FLOAT_BYTES = 4
# ONNX Runtime runs attention as MatMul -> Softmax -> MatMul: the scores and their softmax live at once.
SCORE_COPIES = 2
# A block's input, its normalised/activated copy, the convolution's output and the residual sum.
FEATURE_COPIES = 4
# Share of the machine's available memory a check's activations may take (other work shares it).
AVAILABLE_SHARE = 0.5
VERIFY_MODES = ("full", "small", "off")
DYNAMIC_CHECK_BATCH = 3  # differs from the trace's batch 2, so a frozen batch axis fails
FULL_SIZE_LADDER = ((3, 2), (1, 1))  # (batch, multiple of the native grid), first that fits


DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class GraphOptions:
    """How a folder's graphs are written and checked: `verify` (full | small | off, see the
    module), `verify_memory` (bytes of activations a check may take; None: from the available
    memory), `dtype` (fp16: weights and arithmetic in half precision for GPUs, inputs and outputs
    still fp32; components known to overflow in fp16 stay fp32)."""

    verify: str = "full"
    verify_memory: int | None = None
    dtype: str = "fp32"

    def __post_init__(self):
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def _cells(grid: tuple[int, int] | None, scale: float) -> int:
    if grid is None or scale == 0:
        return 0
    return math.ceil(grid[0] * scale) * math.ceil(grid[1] * scale)


@dataclass(frozen=True)
class Attention:
    """An attention site: `heads` score matrices over the grid's cells at `scale` (1: a token per
    grid cell, 0.5: per 2x2 cells, 0: no spatial tokens) plus `tokens` more (FLUX's joint text, a
    text encoder's length); `context`: the key length of cross-attention, when longer."""

    heads: int
    scale: float = 1.0
    tokens: int = 0
    context: int = 0

    def queries(self, grid) -> int:
        return _cells(grid, self.scale) + self.tokens

    def score_bytes(self, grid) -> int:
        q = self.queries(grid)
        return self.heads * q * max(q, self.context) * FLOAT_BYTES


@dataclass(frozen=True)
class Features:
    """A feature map of `channels` over the grid's cells at `scale`, plus `tokens` positions."""

    channels: int
    scale: float = 1.0
    tokens: int = 0

    def nbytes(self, grid) -> int:
        return self.channels * (_cells(grid, self.scale) + self.tokens) * FLOAT_BYTES


@dataclass(frozen=True)
class ActivationModel:
    """What one component's activations grow with. `native`: its grid at the served size (None:
    no spatial axes); `multiple`: grid sides are multiples of it."""

    native: tuple[int, int] | None = None
    multiple: int = 1
    attention: tuple[Attention, ...] = ()
    features: tuple[Features, ...] = ()

    def row_bytes(self, grid) -> int:
        scores = max((a.score_bytes(grid) for a in self.attention), default=0)
        maps = max((f.nbytes(grid) for f in self.features), default=0)
        return SCORE_COPIES * scores + FEATURE_COPIES * maps

    def check_bytes(self, batch: int, grid) -> int:
        return batch * self.row_bytes(grid)

    def small_grid(self) -> tuple[int, int] | None:
        """A non-square grid other than the native one, a few multiples on a side."""
        if self.native is None:
            return None
        m = self.multiple
        grid = (2 * m, 3 * m)
        return grid if grid != tuple(self.native) else (3 * m, 2 * m)

    def shallowest(self) -> ActivationModel:
        """The sites at full grid resolution alone (DeepCache's shallow U-Net runs only them)."""
        return ActivationModel(self.native, self.multiple, tuple(a for a in self.attention if a.scale >= 1),
                               tuple(f for f in self.features if f.scale >= 1))


@dataclass(frozen=True)
class Check:
    batch: int
    grid: tuple[int, int] | None
    nbytes: int
    purpose: str  # "dynamic axes" or "served size"

    def describe(self) -> str:
        where = "fixed length" if self.grid is None else f"grid {self.grid[0]}x{self.grid[1]}"
        return f"batch {self.batch} at {where} ({self.purpose}, ~{self.nbytes / 2**20:.0f} MiB activations)"


@dataclass
class Plan:
    checks: list[Check] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what a full check left out, and why


def plan_checks(model: ActivationModel, mode: str, budget: int) -> Plan:
    """The parity checks for `model` under `mode` (full | small | off) within `budget` bytes of
    activations (see the module)."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    plan = Plan()
    if mode == "off":
        plan.skipped.append("verification off (--verify off)")
        return plan
    small = model.small_grid()
    for batch in range(DYNAMIC_CHECK_BATCH, 0, -1):
        need = model.check_bytes(batch, small)
        if need <= budget:
            plan.checks.append(Check(batch, small, need, "dynamic axes"))
            break
    else:
        raise VerificationBudgetError(
            f"even a batch-1 check at {'its fixed length' if small is None else f'grid {small}'} needs "
            f"~{model.check_bytes(1, small) / 2**30:.1f} GiB of activations, over the budget of "
            f"{budget / 2**30:.1f} GiB: free memory, raise --verify-memory, or export with --verify off")
    if mode == "full" and model.native is not None:
        for batch, times in FULL_SIZE_LADDER:
            grid = (model.native[0] * times, model.native[1] * times)
            need = model.check_bytes(batch, grid)
            if need <= budget:
                plan.checks.append(Check(batch, grid, need, "served size" if times == 1 else "twice the size"))
                break
        else:
            native = tuple(model.native)
            plan.skipped.append(f"the native grid {native[0]}x{native[1]}: ~"
                                f"{model.check_bytes(1, native) / 2**30:.1f} GiB at batch 1, over the budget "
                                f"of {budget / 2**30:.1f} GiB")
    return plan


def verification_budget(weight_bytes: int, share: float = AVAILABLE_SHARE) -> int:
    """Activation bytes a check may take now: a share of the available memory, less the copy of
    the weights the ONNX Runtime session is about to make."""
    return max(0, int(share * available_memory()) - weight_bytes)


# --- activation models of the families' components --------------------------------------------------

def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def text_encoder_activation(heads: int, length: int, hidden: int, intermediate: int | None = None) -> ActivationModel:
    """A transformer text encoder at its fixed length (CLIP, T5)."""
    return ActivationModel(None, 1, (Attention(heads, 0, length),),
                           (Features(max(hidden, intermediate or 4 * hidden), 0, length),))


def unet_activation(config, native: tuple[int, int], multiple: int, text_length: int = 0) -> ActivationModel:
    """A diffusers U-Net (UNet2DConditionModel or UNet2DModel) over a latent grid: self-attention
    at each level whose blocks attend (cross-attention keys: the text), the mid block's at the
    deepest, and the up path's feature maps (a level's channels plus its skip's)."""
    channels = list(config.block_out_channels)
    levels = len(channels)
    if getattr(config, "_class_name", "") == "UNet2DModel" or not hasattr(config, "cross_attention_dim"):
        head_dim = config.attention_head_dim or channels[0]  # UNet2DModel: channels per head
        heads = [max(1, c // head_dim) for c in channels]
        mid_attends = bool(getattr(config, "add_attention", True))
    else:  # UNet2DConditionModel reads attention_head_dim as the head count when num_attention_heads is unset
        heads = _per_level(config.num_attention_heads or config.attention_head_dim, levels)
        mid_attends = "CrossAttn" in str(config.mid_block_type or "")
    attention = [Attention(heads[i], 1 / 2**i, context=text_length)
                 for i, kind in enumerate(config.down_block_types) if "Attn" in kind]
    if mid_attends and config.mid_block_type is not None:
        attention.append(Attention(heads[-1], 1 / 2**(levels - 1), context=text_length))
    features = [Features(2 * c, 1 / 2**i) for i, c in enumerate(channels)]
    return ActivationModel(native, multiple, tuple(attention), tuple(features))


def vae_activation(config, native: tuple[int, int], multiple: int = 1) -> ActivationModel:
    """An AutoencoderKL's encoder or decoder over the latent grid: the mid block's one-head
    attention at latent resolution, feature maps up to pixel resolution (a decoder level takes
    the deeper level's channels upsampled to its own size)."""
    channels = list(config.block_out_channels)
    n, scale = len(channels), 2 ** (len(channels) - 1)
    attention = (Attention(1, 1.0),) if getattr(config, "mid_block_add_attention", True) else ()
    features = tuple(Features(max(channels[i], channels[min(i + 1, n - 1)]), scale / 2**i) for i in range(n))
    return ActivationModel(native, multiple, attention, features)


def flux_activation(config, native: tuple[int, int], text_length: int, mlp_ratio: float = 4.0) -> ActivationModel:
    """FluxTransformer2DModel over the latent grid: joint attention over the 2x2 patches and the
    text, and a single block's fused attention + MLP width."""
    inner = config.num_attention_heads * config.attention_head_dim
    return ActivationModel(native, 2, (Attention(config.num_attention_heads, 0.5, text_length),),
                           (Features(int(inner * (1 + mlp_ratio)), 0.5, text_length),))


def describe_checks(checks: Iterable[Check]) -> str:
    return "; ".join(c.describe() for c in checks) or "not verified"
