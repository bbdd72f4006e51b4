"""Test helpers for sync: bit-exact comparison done with plain torch views (not the codec's)."""
from __future__ import annotations

import torch

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(_INT[t.element_size()])


def assert_same_state(got: dict, want: dict) -> None:
    assert list(sorted(got)) == list(sorted(want))
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert tuple(got[k].shape) == tuple(want[k].shape), k
        assert torch.equal(bits(got[k]), bits(want[k])), f"tensor {k} differs"


def clone_state(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def perturb_bf16(t: torch.Tensor, frac: float, gen: torch.Generator) -> torch.Tensor:
    """Change about `frac` of the elements by +-1..3 ulp (bit pattern steps), like real updates."""
    out = t.clone()
    flat = bits(out)
    n = flat.numel()
    k = int(round(n * frac))
    idx = torch.randperm(n, generator=gen)[:k]
    steps = torch.tensor([-3, -2, -1, 1, 2, 3], dtype=torch.int16)[torch.randint(0, 6, (k,), generator=gen)]
    flat[idx] = flat[idx] + steps
    return out


def encode_fast_trying_gap(old, new) -> list[bytes]:
    """A fast-level delta whose small chunks also try the range-coded "gap" (kept where smaller)."""
    from sync import codec, encoder

    saved = encoder.GAP_ALSO_MAX_ELEMS
    encoder.GAP_ALSO_MAX_ELEMS = 1 << 18
    try:
        return codec.encode(old, new, base_version=1, target_version=2, level="fast", bucket_bytes=4096)
    finally:
        encoder.GAP_ALSO_MAX_ELEMS = saved
