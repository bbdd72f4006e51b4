"""sync/convert.py: the published bf16 copy is bit-identical to torch's cast, and its nonzero
count to torch.count_nonzero, on every kind of fp32 value."""
from __future__ import annotations

import torch

from sync.convert import published_copy


def test_fp32_to_bf16_matches_torch_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(-2**31, 2**31 - 1, (1_000_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).clone()  # every bit pattern: NaNs of every payload, subnormals, infs
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 3.3895314e38,
                             1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20], dtype=torch.float32)
    x[: specials.numel()] = specials
    x[100:200] = 0.0
    x[200:300] = (torch.randn(100, generator=gen) * 0.02)  # typical weights
    got, nonzero = published_copy(x.reshape(1000, -1)[:, :1000], torch.bfloat16)  # a strided view too
    want = x.reshape(1000, -1)[:, :1000].to(torch.bfloat16)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert nonzero == int(torch.count_nonzero(want))


def test_other_dtypes_fall_back_to_torch():
    x = torch.tensor([1.5, 0.0, -2.0], dtype=torch.float64)
    got, nonzero = published_copy(x, torch.bfloat16)
    assert torch.equal(got, x.to(torch.bfloat16)) and nonzero == 2
    same = torch.tensor([1, 0, 3], dtype=torch.int64)
    copy, nonzero = published_copy(same, torch.bfloat16)
    assert torch.equal(copy, same) and copy.data_ptr() != same.data_ptr() and nonzero == 2
