"""Which tensor dtypes the codec handles and how it looks at their bits.

The codec never compares float values: it compares bit patterns through an unsigned integer
view of the same width, so NaN payloads, -0.0 and inf round-trip exactly. For float types the
context of an element is its exponent field (the receiver holds the old value, so it knows it);
for integer types it is the bit length of the magnitude."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sync.errors import TensorMismatchError


@dataclass(frozen=True)
class DtypeInfo:
    name: str  # wire name, e.g. "bfloat16"
    torch_dtype: torch.dtype
    width: int  # bits per element
    uint: type  # numpy unsigned type of the same width
    int_view: torch.dtype  # torch integer dtype of the same width (for .view)
    ctx_kind: int  # 0: float exponent field, 1: integer magnitude bit length
    mant_bits: int  # float: mantissa bits below the exponent
    exp_mask: int  # float: exponent field mask (after shifting out the mantissa)
    exp_drop: int  # float: low exponent bits dropped so at most 256 contexts remain


def _f(name, td, width, mant, exp_bits):
    uint = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
    iv = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    return DtypeInfo(name, td, width, uint, iv, 0, mant, (1 << exp_bits) - 1, max(0, exp_bits - 8))


def _i(name, td, width):
    uint = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
    iv = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    return DtypeInfo(name, td, width, uint, iv, 1, 0, 0, 0)


_TABLE = [
    _f("bfloat16", torch.bfloat16, 16, 7, 8),
    _f("float16", torch.float16, 16, 10, 5),
    _f("float32", torch.float32, 32, 23, 8),
    _f("float64", torch.float64, 64, 52, 11),
    _i("int8", torch.int8, 8),
    _i("uint8", torch.uint8, 8),
    _i("bool", torch.bool, 8),
    _i("int16", torch.int16, 16),
    _i("int32", torch.int32, 32),
    _i("int64", torch.int64, 64),
]
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _TABLE.append(_i(_name, getattr(torch, _name), 8))

BY_NAME: dict[str, DtypeInfo] = {d.name: d for d in _TABLE}
BY_TORCH: dict[torch.dtype, DtypeInfo] = {d.torch_dtype: d for d in _TABLE}


def info_for(dtype: torch.dtype, what: str = "tensor") -> DtypeInfo:
    try:
        return BY_TORCH[dtype]
    except KeyError:
        raise TensorMismatchError(
            f"{what}: dtype {dtype} is not supported by the sync codec "
            f"(supported: {', '.join(BY_NAME)})"
        ) from None


def info_by_name(name: str, what: str = "tensor") -> DtypeInfo:
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise TensorMismatchError(f"{what}: unknown dtype {name!r} in payload") from None


def bits_of(t: torch.Tensor) -> np.ndarray:
    """Flat unsigned-integer numpy view of a tensor's bits (CPU, contiguous, 8-byte aligned)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    info = info_for(t.dtype)
    arr = t.view(info.int_view).numpy().view(info.uint)
    if arr.ctypes.data % 8:
        arr = arr.copy()
    return arr


_INT_NUMPY = {8: np.uint8, 16: np.int16, 32: np.int32, 64: np.int64}


def kernel_params(info: DtypeInfo) -> tuple:
    """The dtype's parameters as delta_kernels.py's functions take them (last: the width mask)."""
    mask = np.uint64((1 << info.width) - 1)
    return (info.ctx_kind, info.mant_bits, info.exp_mask, info.exp_drop, info.width, mask)


def tensor_from_bits(arr: np.ndarray, info: DtypeInfo, shape) -> torch.Tensor:
    """A torch tensor (sharing memory) holding the given bit patterns."""
    t = torch.from_numpy(arr.view(_INT_NUMPY[info.width]))
    return t.view(info.torch_dtype).reshape(shape)
