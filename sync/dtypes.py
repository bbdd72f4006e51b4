"""Which tensor dtypes the codec handles and how it looks at their bits.

The codec never compares float values: it compares bit patterns through an unsigned integer
view of the same width, so NaN payloads, -0.0 and inf round-trip exactly. For float types the
context of an element is its exponent field (the receiver holds the old value, so it knows it);
for integer types it is the bit length of the magnitude."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from sync.errors import TensorMismatchError

# torch is imported on first use, not here: checking a payload's headers (decoder.plan_payload)
# needs only names and widths, and the CLI rejects a bad file without paying torch's start-up.


@dataclass(frozen=True)
class DtypeInfo:
    name: str  # wire name, e.g. "bfloat16" (also the torch attribute name)
    width: int  # bits per element
    uint: type  # numpy unsigned type of the same width
    ctx_kind: int  # 0: float exponent field, 1: integer magnitude bit length
    mant_bits: int  # float: mantissa bits below the exponent
    exp_mask: int  # float: exponent field mask (after shifting out the mantissa)
    exp_drop: int  # float: low exponent bits dropped so at most 256 contexts remain

    @cached_property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.name)

    @cached_property
    def int_view(self):
        """torch integer dtype of the same width (for .view)."""
        import torch

        return {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[self.width]


_UINT = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def _f(name, width, mant, exp_bits):
    return DtypeInfo(name, width, _UINT[width], 0, mant, (1 << exp_bits) - 1, max(0, exp_bits - 8))


def _i(name, width):
    return DtypeInfo(name, width, _UINT[width], 1, 0, 0, 0)


_TABLE = [
    _f("bfloat16", 16, 7, 8),
    _f("float16", 16, 10, 5),
    _f("float32", 32, 23, 8),
    _f("float64", 64, 52, 11),
    _i("int8", 8),
    _i("uint8", 8),
    _i("bool", 8),
    _i("int16", 16),
    _i("int32", 32),
    _i("int64", 64),
    _i("float8_e4m3fn", 8),  # coded as integers: their bit patterns, no exponent contexts
    _i("float8_e5m2", 8),
]

BY_NAME: dict[str, DtypeInfo] = {d.name: d for d in _TABLE}


@lru_cache(maxsize=1)
def _by_torch() -> dict:
    import torch

    return {getattr(torch, d.name): d for d in _TABLE if hasattr(torch, d.name)}


def info_for(dtype, what: str = "tensor") -> DtypeInfo:
    try:
        return _by_torch()[dtype]
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


def bits_of(t) -> np.ndarray:
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


def tensor_from_bits(arr: np.ndarray, info: DtypeInfo, shape):
    """A torch tensor (sharing memory) holding the given bit patterns."""
    import torch

    t = torch.from_numpy(arr.view(_INT_NUMPY[info.width]))
    return t.view(info.torch_dtype).reshape(shape)
