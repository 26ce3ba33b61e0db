"""Tensors on the wire: KServe v2's field names (`shape`, `datatype`) with the payload as
base64 of little-endian float32, as the VAE and W-space endpoints exchange latents."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from services.errors import InvalidRequest


def encode_tensor(x: np.ndarray) -> dict:
    return {"shape": list(x.shape), "datatype": "FP32",
            "data": base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode("ascii")}


def decode_tensor(shape: list[int], data: str, field: str) -> np.ndarray:
    """The payload as float32 of `shape`: valid base64, the right byte count, finite."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field}.data is not valid base64", field=f"{field}.data") from None
    need = int(np.prod(shape)) * 4
    if len(raw) != need:
        raise InvalidRequest(f"{field}.data holds {len(raw)} bytes; shape {shape} of FP32 needs {need}",
                             field=f"{field}.data")
    x = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    if not np.isfinite(x).all():
        raise InvalidRequest(f"{field}.data holds NaN or infinite values", field=f"{field}.data")
    return x
