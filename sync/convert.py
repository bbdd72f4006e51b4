"""Conversion of a rank's weights into the published dtype, fused with the counts a publish needs.

torch's CPU fp32 -> bf16 cast runs at ~7 ns per element here and torch.count_nonzero at ~3 ns
more: for a rank's slice of a billion-parameter model that is seconds per publish, longer than
encoding the delta. This kernel does both in one pass at memory speed, with exactly torch's
rounding (round to nearest even; every NaN becomes 0xFFFF, as torch's vectorised CPU cast
makes it), which the tests check bit for bit against torch.

It writes into a caller's buffer when given one: a fresh 100 MB tensor costs more in page faults
(~90 ms here) than the conversion itself (~45 ms), so a publisher converts each publish into the
buffers of the copy it no longer needs (sync/publisher.py).
"""
from __future__ import annotations

import numba as nb
import numpy as np
import torch


@nb.njit(nogil=True, cache=True)
def _f32_to_bf16(src, dst):
    """dst[i] = bf16 bits of src[i] (fp32 bits); returns the number of nonzero results."""
    nonzero = 0
    for i in range(src.shape[0]):
        u = np.uint32(src[i])
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN
            b = np.uint16(0xFFFF)
        else:
            b = np.uint16((u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16))
        dst[i] = b
        nonzero += np.int64((b & np.uint16(0x7FFF)) != np.uint16(0))  # -0.0 counts as zero, as in torch
    return nonzero


@nb.njit(nogil=True, cache=True)
def _f32_to_bf16_masked(src, keep, dst):
    """_f32_to_bf16 of src[i] * keep[i] (keep: 0 or 1 bytes), with fp32 multiplication's result
    for a dropped element: a zero of src[i]'s sign, NaN (0xFFFF) for a NaN or infinite one."""
    nonzero = 0
    for i in range(src.shape[0]):
        u = np.uint32(src[i])
        if keep[i]:
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                b = np.uint16(0xFFFF)
            else:
                b = np.uint16((u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16))
        elif (u & np.uint32(0x7FFFFFFF)) >= np.uint32(0x7F800000):  # inf * 0 and NaN * 0 are NaN
            b = np.uint16(0xFFFF)
        else:
            b = np.uint16((u >> np.uint32(16)) & np.uint32(0x8000))
        dst[i] = b
        nonzero += np.int64((b & np.uint16(0x7FFF)) != np.uint16(0))
    return nonzero


def published_copy(t: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """An owned, contiguous CPU copy in the published dtype (floating tensors converted) and
    its number of nonzero elements. `out` (optional): a contiguous CPU tensor that becomes the
    copy when its dtype and shape fit; otherwise a new tensor is allocated. `mask` (optional,
    bool, as many elements as `t`): the copy is of `t * mask` (a sparsifier's pruned entries
    zero, bit for bit what multiplying by the mask in fp32 gives), without a masked copy of `t`:
    it is applied while converting."""
    src = t.detach()
    if mask is not None:
        if mask.numel() != src.numel() or mask.dtype != torch.bool:
            raise ValueError(f"a publish mask must be bool with the tensor's {src.numel()} elements, got "
                             f"{mask.dtype} with {mask.numel()}")
        if not src.is_floating_point():
            raise ValueError(f"only floating tensors are masked, got {src.dtype}")
    target = dtype if src.is_floating_point() else src.dtype
    if out is not None and not (out.dtype == target and out.shape == src.shape and out.device.type == "cpu"
                                and out.is_contiguous() and out.data_ptr() != src.data_ptr()):
        out = None
    if src.dtype == torch.float32 and dtype == torch.bfloat16 and src.device.type == "cpu" and src.numel() > 0:
        flat = src.reshape(-1).contiguous()
        out = torch.empty(src.shape, dtype=torch.bfloat16) if out is None else out
        bits = flat.view(torch.int32).numpy().view(np.uint32)
        dst = out.view(-1).view(torch.int16).numpy().view(np.uint16)
        if mask is None:
            nonzero = _f32_to_bf16(bits, dst)
        else:
            keep = mask.reshape(-1).cpu().contiguous().view(torch.uint8).numpy()
            nonzero = _f32_to_bf16_masked(bits, keep, dst)
        return out, int(nonzero)
    if out is None:
        out = torch.empty(src.shape, dtype=target)
    out.copy_(src)
    if mask is not None:  # in the published dtype, in place: (x * 0) rounds as (bf16(x) * 0)
        out.mul_(mask.reshape(src.shape).to(out.device))
    return out, int(torch.count_nonzero(out))
