"""Adaptive binary range coder (numba), the entropy coder under the delta encodings.

An LZMA-style carry-less range coder (32-bit range, 64-bit low with a cache byte for carries)
with 16-bit probabilities. Probabilities come from per-context counts (a Krichevsky-Trofimov
style estimate), which suits the rare, stationary events of weight deltas far better than
LZMA's shift-based 11-bit estimate (whose floor of ~1.5 % would cost twice the entropy at a
0.1 % change rate). Counts are halved at COUNT_LIMIT so a context can follow slow drift.

State lives in small uint64 arrays so the helpers inline into the per-element kernels:
  encoder st: [low, range, cache, cache_size, out_pos, overflow]
  decoder st: [range, code, in_pos, overrun, bad]
Decoders never read or write out of bounds: reads past the end give 0 and count an overrun,
and impossible symbols set `bad`; the caller turns either into CorruptBucketError.
"""
from __future__ import annotations

import numba as nb
import numpy as np

PROB_BITS = 16
TOP = np.uint64(1 << 24)
COUNT_LIMIT = 1 << 16
U8 = np.uint64(8)
MASK32 = np.uint64(0xFFFFFFFF)
ST_SIZE = 8

_jit = dict(nogil=True, cache=True)
# Helpers that allocate nothing skip numba's reference counting: with it, every call that
# passes arrays costs atomic increments (~25 ns), which dominated the coder.
_leaf = dict(nogil=True, cache=True, _nrt=False)


@nb.njit(**_leaf)
def enc_init(st):
    st[0] = 0
    st[1] = 0xFFFFFFFF
    st[2] = 0
    st[3] = 1
    st[4] = 0
    st[5] = 0


@nb.njit(**_leaf)
def _shift_low(st, out):
    low = st[0]
    if low < np.uint64(0xFF000000) or low > MASK32:
        carry = low >> np.uint64(32)
        temp = st[2]
        while True:
            p = st[4]
            if p < out.shape[0]:
                out[p] = np.uint8((temp + carry) & np.uint64(0xFF))
                st[4] = p + np.uint64(1)
            else:
                st[5] = 1
            temp = np.uint64(0xFF)
            st[3] -= np.uint64(1)
            if st[3] == 0:
                break
        st[2] = (low >> np.uint64(24)) & np.uint64(0xFF)
    st[3] += np.uint64(1)
    st[0] = (low & np.uint64(0x00FFFFFF)) << U8


@nb.njit(**_leaf)
def _enc_normalize(st, out):
    while st[1] < TOP:
        st[1] = st[1] << U8
        _shift_low(st, out)


@nb.njit(**_leaf)
def enc_finish(st, out):
    """Flush; returns the number of bytes written, or -1 when `out` was too small."""
    for _ in range(5):
        _shift_low(st, out)
    if st[5]:
        return -1
    return np.int64(st[4])


@nb.njit(**_leaf)
def prob0(cnt, c):
    n0 = cnt[c, 0]
    n1 = cnt[c, 1]
    p = int((n0 + 0.4) / (n0 + n1 + 0.8) * 65536.0)
    if p < 1:
        p = 1
    elif p > 65535:
        p = 65535
    return np.uint64(p)


@nb.njit(**_leaf)
def update(cnt, c, bit):
    cnt[c, bit] += 1.0
    if cnt[c, 0] + cnt[c, 1] >= COUNT_LIMIT:
        cnt[c, 0] *= 0.5
        cnt[c, 1] *= 0.5


@nb.njit(**_leaf)
def enc_bit(st, out, cnt, c, bit):
    r = st[1]
    bound = (r >> np.uint64(PROB_BITS)) * prob0(cnt, c)
    if bit == 0:
        st[1] = bound
    else:
        st[0] += bound
        st[1] = r - bound
    if st[1] < TOP:
        _enc_normalize(st, out)
    update(cnt, c, bit)


@nb.njit(**_leaf)
def enc_direct(st, out, value, nbits):
    """Code the low `nbits` (<= 16 per call, any count overall) bits of `value` uniformly."""
    while nbits > 0:
        take = nbits if nbits < 16 else 16
        nbits -= take
        v = (value >> np.uint64(nbits)) & np.uint64((1 << take) - 1)
        r = st[1] >> np.uint64(take)
        st[1] = r
        st[0] += r * v
        if st[1] < TOP:
            _enc_normalize(st, out)


@nb.njit(**_leaf)
def dec_init(st, buf):
    st[0] = 0xFFFFFFFF
    st[1] = 0
    st[2] = 0
    st[3] = 0
    st[4] = 0
    for _ in range(5):
        st[1] = ((st[1] << U8) | _next_byte(st, buf)) & MASK32


@nb.njit(**_leaf)
def _next_byte(st, buf):
    p = st[2]
    if p < buf.shape[0]:
        st[2] = p + np.uint64(1)
        return np.uint64(buf[p])
    st[3] += np.uint64(1)
    return np.uint64(0)


@nb.njit(**_leaf)
def _dec_normalize(st, buf):
    while st[0] < TOP:
        st[0] = st[0] << U8
        st[1] = ((st[1] << U8) | _next_byte(st, buf)) & MASK32


@nb.njit(**_leaf)
def dec_bit(st, buf, cnt, c):
    r = st[0]
    bound = (r >> np.uint64(PROB_BITS)) * prob0(cnt, c)
    if st[1] < bound:
        st[0] = bound
        bit = 0
    else:
        st[1] -= bound
        st[0] = r - bound
        bit = 1
    if st[0] < TOP:
        _dec_normalize(st, buf)
    update(cnt, c, bit)
    return bit


@nb.njit(**_leaf)
def dec_direct(st, buf, nbits):
    value = np.uint64(0)
    while nbits > 0:
        take = nbits if nbits < 16 else 16
        nbits -= take
        r = st[0] >> np.uint64(take)
        st[0] = r
        v = st[1] // r
        lim = np.uint64((1 << take) - 1)
        if v > lim:
            v = lim
            st[4] = 1
        st[1] -= v * r
        if st[0] < TOP:
            _dec_normalize(st, buf)
        value = (value << np.uint64(take)) | v
    return value


# ---------------------------------------------------------------- shift-adapted models (fast level)
# A probability held directly (16 bits) and moved toward each outcome by 2^-shift, the shift
# growing with the context's count (about 1/(n+2), so early estimates are count-like) up to
# 2^-7. No division per decision, which the fast level's speed bar needs; rare events (best
# level's change flags) keep the count-based estimate above.
SHIFT = np.minimum(7, np.floor(np.log2(np.arange(256) + 2.0))).astype(np.uint64)


@nb.njit(**_leaf)
def _adapt(P, N, c, bit):
    p = P[c]
    n = N[c]
    sh = SHIFT[n]
    if n < 255:
        N[c] = n + 1
    if bit == 0:
        p += (np.uint64(65536) - p) >> sh
    else:
        p -= p >> sh
    if p < np.uint64(32):
        p = np.uint64(32)
    elif p > np.uint64(65504):
        p = np.uint64(65504)
    P[c] = p


@nb.njit(**_leaf)
def enc_bit_s(st, out, P, N, c, bit):
    r = st[1]
    bound = (r >> np.uint64(PROB_BITS)) * P[c]
    if bit == 0:
        st[1] = bound
    else:
        st[0] += bound
        st[1] = r - bound
    if st[1] < TOP:
        _enc_normalize(st, out)
    _adapt(P, N, c, bit)


@nb.njit(**_leaf)
def dec_bit_s(st, buf, P, N, c):
    r = st[0]
    bound = (r >> np.uint64(PROB_BITS)) * P[c]
    if st[1] < bound:
        st[0] = bound
        bit = 0
    else:
        st[1] -= bound
        st[0] = r - bound
        bit = 1
    if st[0] < TOP:
        _dec_normalize(st, buf)
    _adapt(P, N, c, bit)
    return bit
