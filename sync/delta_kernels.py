"""Numba kernels that turn (old bits, new bits) of one chunk into a range-coded stream and back.

Two encodings (see FORMAT.md):
- "gap" (level fast): only the changed positions are coded. Each change costs its gap to the
  previous change (bit length k in a 5-bit tree whose context is the previous gap's k, the top
  two bits below the leading one adaptive, the rest uniform) and, in a second stream, its value.
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

import functools

import numba as nb
import numpy as np

from sync.range_coder import (
    ST_SIZE,
    dec_bit,
    dec_bit_s,
    dec_direct,
    dec_init,
    enc_bit,
    enc_bit_s,
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
MAX_OVERRUN = 8
# Context of a gap's bit length: the previous gap's bit length, coarsened (fewer contexts to
# learn per chunk; small tensors pay for every context they visit).
GAP_CTX = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7] + [8] * 16, dtype=np.int64)  # a valid stream is read at most a few bytes past its end (flush bytes)


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
    # branch-free: the sign of a change is a coin flip, a branch on it mispredicts half the time
    d = (x - o) & mask
    s = (d >> np.uint64(w - 1)) & np.uint64(1)
    return ((d << np.uint64(1)) & mask) ^ (mask * s)


@nb.njit(**_leaf)
def unzigzag_apply(o, u, mask):
    d = ((u >> np.uint64(1)) ^ (mask * (u & np.uint64(1)))) & mask
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
def _enc_value_s(st, out, VP, VN, MP, MN, e, u, w):
    """_enc_value with shift-adapted models (fast level)."""
    k = bit_length(u) - 1
    base = e * VCTX_STRIDE
    j = 0
    while j < w - 1:
        bit = 1 if k > j else 0
        enc_bit_s(st, out, VP, VN, base + j, bit)
        if bit == 0:
            break
        j += 1
    if k >= 1:
        enc_bit_s(st, out, MP, MN, base + k, np.int64((u >> np.uint64(k - 1)) & np.uint64(1)))
        if k >= 2:
            enc_direct(st, out, u, k - 1)


@nb.njit(**_leaf)
def _dec_value_s(st, buf, VP, VN, MP, MN, e, w):
    base = e * VCTX_STRIDE
    k = 0
    while k < w - 1:
        if dec_bit_s(st, buf, VP, VN, base + k) == 0:
            break
        k += 1
    u = np.uint64(1) << np.uint64(k)
    if k >= 1:
        top = dec_bit_s(st, buf, MP, MN, base + k)
        u |= np.uint64(top) << np.uint64(k - 1)
        if k >= 2:
            u |= dec_direct(st, buf, k - 1)
    return u


def _shift_models(rows: int):
    return np.full(rows, 32768, np.uint64), np.zeros(rows, np.uint8)


@nb.njit(**_leaf)
def _enc_gap(st, out, GP, GN, MP, MN, gs, p):
    """Code the gap to change position p; gs = [previous position, previous gap's bit length]."""
    g = np.uint64(p - gs[0])
    gs[0] = p
    k = bit_length(g) - 1
    pk = GAP_CTX[gs[1]]
    node = 1
    for b in range(4, -1, -1):
        bit = (k >> b) & 1
        enc_bit_s(st, out, GP, GN, pk * 32 + node, bit)
        node = node * 2 + bit
    if k >= 1:
        ntop = k if k < 2 else 2
        pre = 1
        for b in range(ntop):
            bit = np.int64((g >> np.uint64(k - 1 - b)) & np.uint64(1))
            enc_bit_s(st, out, MP, MN, k * 4 + pre, bit)
            pre = pre * 2 + bit
        if k > ntop:
            enc_direct(st, out, g, k - ntop)
    gs[1] = k


@nb.njit(**_jit)
def encode_gap(old, new, old64, new64, per, kind, mant, emask, edrop, w, mask, out_pos, out_val, u_buf, e_buf, gprior):
    """Two range-coded streams: the gaps between changes (written while scanning old/new by
    8-byte words, so unchanged stretches cost one compare per word), then the values in the
    context of the old element's exponent class (collected during the scan, while the cache
    lines are hot). Separate streams let the decoder get all positions first and gather the old
    values' contexts in one pass whose loads overlap, instead of waiting on a cache miss per
    change inside its serial loop. `u_buf`/`e_buf` hold up to one entry per element.
    Returns (bytes of stream 1, bytes of stream 2, changes); -1 sizes when `out_*` overflowed."""
    st = np.zeros(ST_SIZE, np.uint64)
    enc_init(st)
    GP = np.empty(32 * 32, np.uint64)
    for i in range(32):
        GP[i * 32 : i * 32 + 32] = gprior
    GN = np.full(32 * 32, 2, np.uint8)
    MP = np.full(32 * 4, 32768, np.uint64)
    MN = np.zeros(32 * 4, np.uint8)
    gs = np.zeros(2, np.int64)
    gs[0] = -1
    c = 0
    nw = old64.shape[0]
    for wi in range(nw):
        if old64[wi] != new64[wi]:
            base = wi * per
            for lane in range(per):
                i = base + lane
                if old[i] != new[i]:
                    _enc_gap(st, out_pos, GP, GN, MP, MN, gs, i)
                    o = np.uint64(old[i])
                    u_buf[c] = zigzag_diff(o, np.uint64(new[i]), mask, w)
                    e_buf[c] = elem_ctx(o, kind, mant, emask, edrop, w)
                    c += 1
            if st[5]:
                return -1, -1, c
    for i in range(nw * per, old.shape[0]):
        if old[i] != new[i]:
            _enc_gap(st, out_pos, GP, GN, MP, MN, gs, i)
            o = np.uint64(old[i])
            u_buf[c] = zigzag_diff(o, np.uint64(new[i]), mask, w)
            e_buf[c] = elem_ctx(o, kind, mant, emask, edrop, w)
            c += 1
    n1 = enc_finish(st, out_pos)
    st2 = np.zeros(ST_SIZE, np.uint64)
    enc_init(st2)
    VP = np.full(N_ECTX * VCTX_STRIDE, 32768, np.uint64)
    VN = np.zeros(N_ECTX * VCTX_STRIDE, np.uint8)
    VMP = np.full(N_ECTX * VCTX_STRIDE, 32768, np.uint64)
    VMN = np.zeros(N_ECTX * VCTX_STRIDE, np.uint8)
    for t in range(c):
        _enc_value_s(st2, out_val, VP, VN, VMP, VMN, np.int64(e_buf[t]), u_buf[t], w)
        if st2[5]:
            return n1, -1, c
    return n1, enc_finish(st2, out_val), c


@nb.njit(**_jit)
def decode_gap_positions(n, buf, npos, pos_out, gprior):
    """Positions of a "gap" stream over a chunk of n elements; 0 when clean, else a problem code."""
    st = np.zeros(ST_SIZE, np.uint64)
    dec_init(st, buf)
    GP = np.empty(32 * 32, np.uint64)
    for i in range(32):
        GP[i * 32 : i * 32 + 32] = gprior
    GN = np.full(32 * 32, 2, np.uint8)
    MP = np.full(32 * 4, 32768, np.uint64)
    MN = np.zeros(32 * 4, np.uint8)
    prev = -1
    pk = 0
    for t in range(npos):
        node = 1
        for b in range(5):
            node = node * 2 + dec_bit_s(st, buf, GP, GN, GAP_CTX[pk] * 32 + node)
        k = node - 32
        g = np.uint64(1) << np.uint64(k)
        if k >= 1:
            ntop = k if k < 2 else 2
            pre = 1
            for b in range(ntop):
                bit = dec_bit_s(st, buf, MP, MN, k * 4 + pre)
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
        pos_out[t] = p
        if st[3] > MAX_OVERRUN:
            return 2
    if st[4] != 0 or st[3] > MAX_OVERRUN:
        return 2
    return 0


@nb.njit(**_jit)
def gather_ctx(old, pos, kind, mant, emask, edrop, w, e_out):
    """Context of each changed element's old value: independent loads, so they overlap."""
    for t in range(pos.shape[0]):
        e_out[t] = elem_ctx(np.uint64(old[pos[t]]), kind, mant, emask, edrop, w)


@nb.njit(**_jit)
def decode_values(buf, e, w, u_out):
    st = np.zeros(ST_SIZE, np.uint64)
    dec_init(st, buf)
    VP = np.full(N_ECTX * VCTX_STRIDE, 32768, np.uint64)
    VN = np.zeros(N_ECTX * VCTX_STRIDE, np.uint8)
    VMP = np.full(N_ECTX * VCTX_STRIDE, 32768, np.uint64)
    VMN = np.zeros(N_ECTX * VCTX_STRIDE, np.uint8)
    for t in range(e.shape[0]):
        u_out[t] = _dec_value_s(st, buf, VP, VN, VMP, VMN, np.int64(e[t]), w)
        if st[3] > MAX_OVERRUN:
            return 2
    if st[4] != 0 or st[3] > MAX_OVERRUN:
        return 2
    return 0


@nb.njit(**_jit)
def gather_apply(old, pos, u, mask, vals_out):
    """New bit patterns = old[pos] + unzigzag(u)."""
    for t in range(pos.shape[0]):
        vals_out[t] = unzigzag_apply(np.uint64(old[pos[t]]), u[t], mask)


# ---------------------------------------------------------------- "ctx" encoding (best)


@nb.njit(**_jit)
def encode_ctx(old, new, kind, mant, emask, edrop, w, mask, out, fprior):
    st = np.zeros(ST_SIZE, np.uint64)
    enc_init(st)
    fc = np.empty((N_ECTX * 4, 2), np.float64)
    for i in range(N_ECTX):
        fc[i * 4 : i * 4 + 4] = fprior
    vk = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.float64)
    vm = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.float64)
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
def decode_ctx(old, buf, npos, kind, mant, emask, edrop, w, mask, pos_out, val_out, fprior):
    st = np.zeros(ST_SIZE, np.uint64)
    dec_init(st, buf)
    fc = np.empty((N_ECTX * 4, 2), np.float64)
    for i in range(N_ECTX):
        fc[i * 4 : i * 4 + 4] = fprior
    vk = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.float64)
    vm = np.zeros((N_ECTX * VCTX_STRIDE, 2), np.float64)
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


PRIOR_WEIGHT = 2.0  # virtual observations behind a prior rate


def flag_prior(changed: int, n: int) -> np.ndarray:
    """Coarse "changed" contexts start at the chunk's change rate (both sides know it)."""
    p = changed / max(1, n)
    return np.tile(np.array([[PRIOR_WEIGHT * (1 - p), PRIOR_WEIGHT * p]]), (4, 1))


def gap_prior(changed: int, n: int) -> np.ndarray:
    """Coarse gap-length tree nodes start from a geometric gap distribution at the chunk's rate."""
    return _gap_prior(int(changed), int(n)).copy()


@functools.lru_cache(maxsize=1 << 14)
def _gap_prior(changed: int, n: int) -> np.ndarray:
    # ~0.4 ms of small-array numpy a call, paid by every small tensor's "gap" entry on both
    # sides; the same (changed, n) pairs recur publish after publish
    p = min(max(changed / max(1, n), 1e-9), 1 - 1e-9)
    k = np.arange(33, dtype=np.float64)
    # P(gap >= 2^k) = (1-p)^(2^k - 1); P(bit length k) = P(>= 2^k) - P(>= 2^(k+1))
    surv = np.exp((2.0 ** k - 1) * np.log1p(-p))
    pk = np.maximum(surv[:32] - surv[1:33], 0.0) + 1e-12
    out = np.full(32, 32768, np.uint64)
    for node in range(1, 32):
        depth = int(np.floor(np.log2(node)))
        prefix = node - (1 << depth)
        span = 1 << (5 - depth)
        lo = prefix * span
        left, right = pk[lo : lo + span // 2].sum(), pk[lo + span // 2 : lo + span].sum()
        q = right / (left + right)
        out[node] = min(65504, max(32, int(65536 * (1 - q))))
    return out


# ---------------------------------------------------------------- "mask" encoding (fast, many changes)
# Above a few percent changed, a range-coded decision per change costs more time than zstd-1
# on the dense bytes. "mask" makes the delta byte-aligned instead and lets zstd's Huffman
# stage code it: one byte per 8 elements saying which changed, one byte per change holding
# u = zigzag(new - old) (0 = escape: u >= 256, its w bits follow in byte planes after all
# value bytes). No decision per element, no data-dependent branch in the hot loops.

MASK_GROUP = 8


@nb.njit(**_jit)
def count_changes_fast(old, new):
    """Number of elements whose bit patterns differ (branch-free, vectorises)."""
    c = 0
    for i in range(old.shape[0]):
        c += np.int64(old[i] != new[i])
    return c


@nb.njit(**_jit)
def mask_nibbles(old, new, w, mask, nib):
    """nib[i] = min(zigzag(new - old), 16): 0 unchanged, 1..15 a value nibble, 16 an escape.
    Element-wise with no branch, so it runs in SIMD lanes."""
    for i in range(old.shape[0]):
        u = zigzag_diff(np.uint64(old[i]), np.uint64(new[i]), mask, w)
        nib[i] = np.uint8(min(u, np.uint64(16)))


@nb.njit(**_leaf)
def _byte_mask(W):
    """Bit l set where byte l of W is nonzero (bytes hold values <= 31)."""
    t = (W | (W >> np.uint64(1)) | (W >> np.uint64(2)) | (W >> np.uint64(3)) | (W >> np.uint64(4))) & np.uint64(0x0101010101010101)
    return np.uint8((t * np.uint64(0x0102040810204080)) >> np.uint64(56))


@nb.njit(**_jit)
def encode_mask(old, new, w, mask, buf, tmp, nval, esc, nib):
    """Fill buf = [ceil(n/8) change masks][ceil(nval/2) value nibble bytes][escape planes];
    returns the number of bytes used, or -1 when the changes found are not `nval` (the
    caller's count was wrong). `buf` needs ceil(n/8) + nval * (1 + w/8) + 1 bytes, `tmp`
    n + 2, `esc` nval + 1 and `nib` ceil(n/8) * 8 slots. Passes that each run at a few
    tenths of a ns per element: nibbles (SIMD), masks (8 bytes at a time), compaction (one
    store per element, no branch), escapes (rare branch), packing (SIMD)."""
    n = old.shape[0]
    ng = (n + 7) // 8
    nib[n:] = 0
    mask_nibbles(old, new, w, mask, nib[:n])
    nib64 = nib.view(np.uint64)
    for g in range(ng):
        buf[g] = _byte_mask(nib64[g])
    vp = 0
    for i in range(n):  # tmp has n + 1 slots: no bound check needed
        v = nib[i]
        tmp[vp] = v & np.uint8(15)
        vp += np.int64(v != np.uint8(0))
    if vp != nval:
        return -1
    tmp[vp] = 0  # the pad nibble
    ne = 0
    for g in range(ng):
        if nib64[g] & np.uint64(0x1010101010101010):  # an escape (16) among these 8 (rare)
            for i in range(g * 8, min(n, g * 8 + 8)):
                if nib[i] == np.uint8(16):
                    esc[ne] = zigzag_diff(np.uint64(old[i]), np.uint64(new[i]), mask, w)
                    ne += 1
    for j in range((nval + 1) // 2):
        buf[ng + j] = tmp[2 * j] | (tmp[2 * j + 1] << np.uint8(4))
    eb = ng + (nval + 1) // 2
    for p in range(w // 8):
        sh = np.uint64(8 * p)
        for j in range(ne):
            buf[eb + p * ne + j] = np.uint8((esc[j] >> sh) & np.uint64(0xFF))
    return eb + ne * (w // 8)


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


@nb.njit(**_jit)
def decode_mask(old, data, nval, w, mask, out, d, vals):
    """Inverse of encode_mask into `out` (may be `old` itself: each element is read before it
    is written). The caller checks that `data` holds ceil(n/8) + ceil(nval/2) bytes plus a
    whole number of w-bit escapes, nval >= 1; `d` has ceil(n/8) * 8 and `vals` nval + 1 slots.
    Returns 0, or 1 when masks, values and escapes disagree (the output is then garbage,
    never written out of bounds). Passes: count the mask bits, unpack the nibbles (16 marks
    an escape), expand them to one byte per element, apply (SIMD), patch the escapes."""
    n = old.shape[0]
    ng = (n + 7) // 8
    wb = w // 8
    eb = ng + (nval + 1) // 2
    ne = (data.shape[0] - eb) // wb
    total = 0
    for g in range(ng):
        total += _POPCOUNT8[data[g]]
    if total != nval or (np.int64(data[ng - 1]) >> (n - (ng - 1) * 8)) != 0:
        return 1
    if (nval & 1) and (data[eb - 1] >> np.uint8(4)) != 0:  # the pad nibble
        return 1
    for j in range(nval):
        v = (data[ng + (j >> 1)] >> np.uint8(4 * (j & 1))) & np.uint8(15)
        vals[j] = v if v != np.uint8(0) else np.uint8(16)
    vals[nval] = 0
    vn = 0
    for i in range(n):  # vn <= nval: the mask bits were counted above
        ch = (data[i >> 3] >> np.uint8(i & 7)) & np.uint8(1)
        d[i] = vals[vn] * ch
        vn += np.int64(ch)
    for i in range(n):
        out[i] = unzigzag_apply(np.uint64(old[i]), np.uint64(d[i] & np.uint8(15)), mask)
    d[n:] = 0
    d64 = d.view(np.uint64)
    ep = 0
    for g in range(ng):
        if d64[g] & np.uint64(0x1010101010101010) == 0:  # no escape among these 8 (usual)
            continue
        for i in range(g * 8, min(n, g * 8 + 8)):
            if d[i] == np.uint8(16):  # escape; out[i] still holds the old value
                if ep >= ne:
                    return 1
                u = np.uint64(0)
                for p in range(wb):
                    u |= np.uint64(data[eb + p * ne + ep]) << np.uint64(8 * p)
                ep += 1
                if u < np.uint64(16) or (u & mask) != u:
                    return 1
                out[i] = unzigzag_apply(np.uint64(out[i]), u, mask)
    if ep != ne:
        return 1
    return 0


# ---------------------------------------------------------------- "gap8": byte gaps and values
# Level fast's encoding at low and moderate change rates. Each change is one gap byte and one
# value byte (255 escapes to a full-width value kept apart), and zstd's entropy stage does the
# rest: within ~5 % of the range-coded "gap" size on real updates, but a single branch-light
# pass each way: the encode scan costs ~1 ns per element, the decode ~25-50 ns per change here
# (its reads of the base at the change positions), against ~100 and more for the range coder's
# serial decisions. See FORMAT.md.

GAP8_ESC = 255


@nb.njit(**_leaf)
def _gap8_emit(i, prev, j, eg, ev, o, x, w, mask, g_out, v_out, ge_out, ve_out):
    """Append the change at position i (previous change at prev) to encode_gap8's streams."""
    gap = i - prev
    if gap >= GAP8_ESC:
        g_out[j] = GAP8_ESC
        ge_out[eg] = gap
        eg += 1
    else:
        g_out[j] = gap
    u = zigzag_diff(o, x, mask, w)
    if u >= np.uint64(GAP8_ESC):
        v_out[j] = GAP8_ESC
        ve_out[ev] = u
        ev += 1
    else:
        v_out[j] = np.uint8(u)
    return eg, ev


@nb.njit(**_jit)
def encode_gap8(old, new, old64, new64, per, w, mask, g_out, v_out, ge_out, ve_out):
    """Gap bytes (gap = position - previous position, the first from -1; >= 255 escapes to
    ge_out) and value bytes (u = zigzag(new - old); >= 255 escapes to ve_out) of every change.
    `old64`/`new64` view the first elements as 64-bit words of `per` elements each, so unchanged
    words are skipped in one comparison. The output arrays' length is the most changes the
    caller accepts (the encoder codes a chunk with more as "mask"). Returns (changes, gap
    escapes, value escapes), or changes = -1 when there are more changes than that."""
    prev = -1
    j = 0
    eg = 0
    ev = 0
    cap = g_out.shape[0]
    nw = old64.shape[0]
    for wi in range(nw):
        x = old64[wi] ^ new64[wi]
        if x == 0:
            continue
        # Visit the changed lanes of the word from its lowest set bit, with no branch per
        # element: at ~1 % changed a word rarely holds two changes, and a per-element test
        # mispredicted on every changed word (2.4x slower at 1 %). Lane k is bits [k*w, k*w + w)
        # of the word: the little-endian layout of every platform torch runs on.
        while x != 0:
            low = x & (~x + np.uint64(1))
            if per == 4:  # 16-bit elements, the common case, unrolled
                lane = (np.int64(low >= np.uint64(1 << 16)) + np.int64(low >= np.uint64(1 << 32))
                        + np.int64(low >= np.uint64(1 << 48)))
            else:
                lane = 0
                for k in range(1, per):
                    lane += np.int64(low >= np.uint64(1) << np.uint64(w * k))
            x &= ~(mask << np.uint64(w * lane))
            if j >= cap:
                return -1, 0, 0
            i = wi * per + lane
            eg, ev = _gap8_emit(i, prev, j, eg, ev, np.uint64(old[i]), np.uint64(new[i]), w, mask, g_out, v_out, ge_out, ve_out)
            prev = i
            j += 1
    for i in range(nw * per, old.shape[0]):
        if old[i] != new[i]:
            if j >= cap:
                return -1, 0, 0
            eg, ev = _gap8_emit(i, prev, j, eg, ev, np.uint64(old[i]), np.uint64(new[i]), w, mask, g_out, v_out, ge_out, ve_out)
            prev = i
            j += 1
    return j, eg, ev


@nb.njit(**_jit)
def decode_gap8(old, ga, va, nval, wb, mask, pos_out, val_out):
    """Inverse of encode_gap8. `ga` = nval gap bytes then the gap escapes as 4 byte planes, `va`
    = nval value bytes then the value escapes as wb byte planes (the caller checked both lengths
    against the escape counts). Returns 0, or 1 for a stream no encoder writes (a zero gap or
    value byte, an escape below 255 or wider than the dtype, a position past the chunk)."""
    n = old.shape[0]
    neg = (ga.shape[0] - nval) // 4
    nev = (va.shape[0] - nval) // wb
    pos = -1
    eg = 0
    ev = 0
    for j in range(nval):
        g = np.int64(ga[j])
        if g == GAP8_ESC:
            if eg >= neg:
                return 1
            g = 0
            for p in range(4):
                g |= np.int64(ga[nval + p * neg + eg]) << (8 * p)
            eg += 1
            if g < GAP8_ESC:
                return 1
        elif g == 0:
            return 1
        pos += g
        if pos >= n:
            return 1
        u = np.uint64(va[j])
        if u == np.uint64(GAP8_ESC):
            if ev >= nev:
                return 1
            u = np.uint64(0)
            for p in range(wb):
                u |= np.uint64(va[nval + p * nev + ev]) << np.uint64(8 * p)
            ev += 1
            if u < np.uint64(GAP8_ESC) or (u & mask) != u:
                return 1
        elif u == np.uint64(0):
            return 1
        pos_out[j] = pos
        val_out[j] = unzigzag_apply(np.uint64(old[pos]), u, mask)
    if eg != neg or ev != nev:
        return 1
    return 0


@nb.njit(**_jit)
def scatter(dst, pos, vals, shift=0):
    """dst[pos[i] - shift] = vals[i]; positions come checked (in range) from the decoders, and
    `shift` is where `dst` starts when it is one block of the positions' range. Several times
    faster than numpy's fancy assignment for scattered positions."""
    for i in range(pos.shape[0]):
        dst[pos[i] - shift] = vals[i]
