"""Numba kernels that turn (old bits, new bits) of one chunk into a range-coded stream and back.

Two encodings (see FORMAT.md):
- "gap" (level fast): only the changed positions are visited. Each change costs its gap to the
  previous change (bit length k in a 5-bit tree whose context is the previous gap's k, the top
  two bits below the leading one adaptive, the rest uniform) and its value.
- "ctx" (level best): every element codes a changed/unchanged bit in the context (old value's
  exponent, whether the two previous elements changed), then the value when changed.
Values are the same in both: u = zigzag((new - old) mod 2^w), coded as the unary bit length of
u (context: old value's exponent class), the bit below the leading one (context: length), and
the remaining low bits uniform. Most real changes are +-1 ulp, i.e. u in {1, 2}: two or three
binary decisions in a context that has learned their odds.

Decoders return positions and new bit patterns (they never write into a tensor) and report
any impossibility (position past the chunk, too many changes, reading past the stream) so the
caller can raise CorruptBucketError.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from sync.range_coder import (
    ST_SIZE,
    dec_bit,
    dec_direct,
    dec_init,
    enc_bit,
    enc_direct,
    enc_finish,
    enc_init,
)

_jit = dict(nogil=True, cache=True)
# Helpers that allocate nothing skip numba's reference counting: with it, every call that
# passes arrays costs atomic increments (~25 ns), which dominated the coder.
_leaf = dict(nogil=True, cache=True, _nrt=False)

N_ECTX = 256  # element contexts (float exponent field / integer bit length), see elem_ctx
VCTX_STRIDE = 64  # per element context: one slot per bit length of u
MAX_OVERRUN = 8  # a valid stream is read at most a few bytes past its end (flush bytes)


@nb.njit(**_leaf)
def bit_length(x):
    k = 0
    while x:
        x >>= np.uint64(1)
        k += 1
    return k


@nb.njit(**_leaf)
def elem_ctx(o, kind, mant, emask, edrop, w):
    """Context of an old bit pattern: float exponent field (<= 8 bits), or for integers the
    bit length of the magnitude and the sign."""
    if kind == 0:
        return np.int64(((o >> np.uint64(mant)) & np.uint64(emask)) >> np.uint64(edrop))
    sign = (o >> np.uint64(w - 1)) & np.uint64(1)
    if sign:
        m = (~o) & ((np.uint64(1) << np.uint64(w - 1)) - np.uint64(1))
        return np.int64(bit_length(m) * 2 + 1)
    return np.int64(bit_length(o) * 2)


@nb.njit(**_leaf)
def zigzag_diff(o, x, mask, w):
    d = (x - o) & mask
    if (d >> np.uint64(w - 1)) & np.uint64(1):
        return (((~d) & mask) << np.uint64(1)) | np.uint64(1)
    return d << np.uint64(1)


@nb.njit(**_leaf)
def unzigzag_apply(o, u, mask):
    if u & np.uint64(1):
        d = (~(u >> np.uint64(1))) & mask
    else:
        d = u >> np.uint64(1)
    return (o + d) & mask


@nb.njit(**_leaf)
def _enc_value(st, out, vk, vm, e, u, w):
    k = bit_length(u) - 1
    base = e * VCTX_STRIDE
    j = 0
    while j < w - 1:
        bit = 1 if k > j else 0
        enc_bit(st, out, vk, base + j, bit)
        if bit == 0:
            break
        j += 1
    if k >= 1:
        enc_bit(st, out, vm, base + k, np.int64((u >> np.uint64(k - 1)) & np.uint64(1)))
        if k >= 2:
            enc_direct(st, out, u, k - 1)


@nb.njit(**_leaf)
def _dec_value(st, buf, vk, vm, e, w):
    base = e * VCTX_STRIDE
    k = 0
    while k < w - 1:
        if dec_bit(st, buf, vk, base + k) == 0:
            break
        k += 1
    u = np.uint64(1) << np.uint64(k)
    if k >= 1:
        top = dec_bit(st, buf, vm, base + k)
        u |= np.uint64(top) << np.uint64(k - 1)
        if k >= 2:
            u |= dec_direct(st, buf, k - 1)
    return u


# ---------------------------------------------------------------- "gap" encoding (fast)


@nb.njit(**_leaf)
def _enc_change(st, out, gk, gm, vk, vm, gs, p, o, x, kind, mant, emask, edrop, w, mask):
    """Code one change at position p; gs = [previous position, previous gap's bit length,
    previous value's bit length]. The value's context is the previous value's length, not the
    old element's exponent, so the decoder never waits on a cache miss into the old tensor
    inside its serial loop (it gathers old values afterwards in one vectorizable pass)."""
    g = np.uint64(p - gs[0])
    gs[0] = p
    k = bit_length(g) - 1
    pk = gs[1]
    node = 1
    for b in range(4, -1, -1):
        bit = (k >> b) & 1
        enc_bit(st, out, gk, pk * 32 + node, bit)
        node = node * 2 + bit
    if k >= 1:
        ntop = k if k < 2 else 2
        pre = 1
        for b in range(ntop):
            bit = np.int64((g >> np.uint64(k - 1 - b)) & np.uint64(1))
            enc_bit(st, out, gm, k * 4 + pre, bit)
            pre = pre * 2 + bit
        if k > ntop:
            enc_direct(st, out, g, k - ntop)
    gs[1] = k
    u = zigzag_diff(o, x, mask, w)
    _enc_value(st, out, vk, vm, gs[2], u, w)
    gs[2] = bit_length(u) - 1


@nb.njit(**_jit)
def encode_gap(old, new, old64, new64, per, kind, mant, emask, edrop, w, mask, out):
    """Scan old/new (8-byte words first, so unchanged stretches cost one compare per word)
    and code each change while its cache line is hot. Returns (bytes written or -1, changes)."""
    st = np.zeros(ST_SIZE, np.uint64)
    enc_init(st)
    gk = np.zeros((32 * 32, 2), np.uint32)
    gm = np.zeros((32 * 4, 2), np.uint32)
    vk = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.uint32)
    vm = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.uint32)
    gs = np.zeros(3, np.int64)
    gs[0] = -1
    changes = 0
    nw = old64.shape[0]
    for wi in range(nw):
        if old64[wi] != new64[wi]:
            base = wi * per
            for lane in range(per):
                i = base + lane
                if old[i] != new[i]:
                    _enc_change(st, out, gk, gm, vk, vm, gs, i, np.uint64(old[i]), np.uint64(new[i]),
                                kind, mant, emask, edrop, w, mask)
                    changes += 1
            if st[5]:
                return -1, changes
    for i in range(nw * per, old.shape[0]):
        if old[i] != new[i]:
            _enc_change(st, out, gk, gm, vk, vm, gs, i, np.uint64(old[i]), np.uint64(new[i]),
                        kind, mant, emask, edrop, w, mask)
            changes += 1
    return enc_finish(st, out), changes


@nb.njit(**_jit)
def decode_gap(n, buf, npos, w, pos_out, u_out):
    """Decode positions and zigzag value codes of a "gap" stream over a chunk of n elements.
    Returns 0 when the stream decoded cleanly, else a nonzero problem code."""
    st = np.zeros(ST_SIZE, np.uint64)
    dec_init(st, buf)
    gk = np.zeros((32 * 32, 2), np.uint32)
    gm = np.zeros((32 * 4, 2), np.uint32)
    vk = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.uint32)
    vm = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.uint32)
    prev = -1
    pk = 0
    vkprev = 0
    for t in range(npos):
        node = 1
        for b in range(5):
            node = node * 2 + dec_bit(st, buf, gk, pk * 32 + node)
        k = node - 32
        g = np.uint64(1) << np.uint64(k)
        if k >= 1:
            ntop = k if k < 2 else 2
            pre = 1
            for b in range(ntop):
                bit = dec_bit(st, buf, gm, k * 4 + pre)
                g |= np.uint64(bit) << np.uint64(k - 1 - b)
                pre = pre * 2 + bit
            if k > ntop:
                g |= dec_direct(st, buf, k - ntop)
        pk = k
        if g > np.uint64(n):
            return 1
        p = prev + np.int64(g)
        if p >= n:
            return 1
        prev = p
        u = _dec_value(st, buf, vk, vm, vkprev, w)
        vkprev = bit_length(u) - 1
        pos_out[t] = p
        u_out[t] = u
        if st[3] > MAX_OVERRUN:
            return 2
    if st[4] != 0 or st[3] > MAX_OVERRUN:
        return 2
    return 0


@nb.njit(**_jit)
def gather_apply(old, pos, u, mask, vals_out):
    """New bit patterns = old[pos] + unzigzag(u): independent loads, so they overlap."""
    for t in range(pos.shape[0]):
        vals_out[t] = unzigzag_apply(np.uint64(old[pos[t]]), u[t], mask)


# ---------------------------------------------------------------- "ctx" encoding (best)


@nb.njit(**_jit)
def encode_ctx(old, new, kind, mant, emask, edrop, w, mask, out):
    st = np.zeros(ST_SIZE, np.uint64)
    enc_init(st)
    fc = np.zeros((N_ECTX * 4, 2), np.uint32)
    vk = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.uint32)
    vm = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.uint32)
    h = 0
    changes = 0
    for i in range(old.shape[0]):
        o = np.uint64(old[i])
        x = np.uint64(new[i])
        e = elem_ctx(o, kind, mant, emask, edrop, w)
        if o != x:
            enc_bit(st, out, fc, e * 4 + h, 1)
            _enc_value(st, out, vk, vm, e, zigzag_diff(o, x, mask, w), w)
            h = ((h << 1) | 1) & 3
            changes += 1
            if st[5]:
                return -1, changes
        else:
            enc_bit(st, out, fc, e * 4 + h, 0)
            h = (h << 1) & 3
    return enc_finish(st, out), changes


@nb.njit(**_jit)
def decode_ctx(old, buf, npos, kind, mant, emask, edrop, w, mask, pos_out, val_out):
    st = np.zeros(ST_SIZE, np.uint64)
    dec_init(st, buf)
    fc = np.zeros((N_ECTX * 4, 2), np.uint32)
    vk = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.uint32)
    vm = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.uint32)
    h = 0
    c = 0
    for i in range(old.shape[0]):
        o = np.uint64(old[i])
        e = elem_ctx(o, kind, mant, emask, edrop, w)
        bit = dec_bit(st, buf, fc, e * 4 + h)
        if bit:
            if c >= npos:
                return 1
            u = _dec_value(st, buf, vk, vm, e, w)
            pos_out[c] = i
            val_out[c] = unzigzag_apply(o, u, mask)
            c += 1
        h = ((h << 1) | bit) & 3
        if st[3] > MAX_OVERRUN:
            return 2
    if c != npos:
        return 1
    if st[4] != 0 or st[3] > MAX_OVERRUN:
        return 2
    return 0
