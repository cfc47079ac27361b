"""The parity suite's arithmetic is a GPU's (_gpu_arithmetic.py): fp32 -> bf16 in a kernel, stored through a bf16
pointer or cast with .to(), rounds to nearest even as torch's cast does, and tl.maximum / tl.minimum of a NaN and a
number return the number. On the CPU this checks the interpreter's patch; on CUDA the premise it stands on."""

import functools

import pytest
import torch

pytestmark = pytest.mark.parity


@functools.cache
def _kernels():
    """Built on first use, when the parity conftest has TRITON_INTERPRET set."""
    import triton
    import triton.language as tl

    @triton.jit
    def to_bf16(x_ptr, stored_ptr, cast_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(stored_ptr + offs, x, mask=mask)  # fp32 values through a bf16 pointer
        tl.store(cast_ptr + offs, x.to(tl.bfloat16), mask=mask)

    @triton.jit
    def max_min(a_ptr, b_ptr, max_ptr, min_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a, b = tl.load(a_ptr + offs, mask=mask), tl.load(b_ptr + offs, mask=mask)
        tl.store(max_ptr + offs, tl.maximum(a, b), mask=mask)
        tl.store(min_ptr + offs, tl.minimum(a, b), mask=mask)

    return to_bf16, max_min


def test_fp32_to_bf16_rounds_to_nearest_even_as_torch_casts(rng, device):
    """Random fp32 values, and ties (the 16 bits dropped exactly half a bf16 ulp) on both sides of even: truncation
    (the bare interpreter's) differs from torch's cast on about half of them."""
    n = 1000
    high = torch.randint(0, 0x7F00, (n,), generator=rng, dtype=torch.int32)  # finite, either sign below
    low = torch.randint(0, 1 << 16, (n,), generator=rng, dtype=torch.int32)
    low[: n // 4] = 0x8000  # ties
    bits = (high << 16) | low
    bits[n // 2 :] |= torch.tensor(-(2**31), dtype=torch.int32)  # negative half
    x = bits.view(torch.float32).to(device)
    stored, cast = (torch.empty(n, dtype=torch.bfloat16, device=device) for _ in range(2))
    _kernels()[0][(_programs(n, 256),)](x, stored, cast, n, BLOCK=256)
    expected = x.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(stored.view(torch.int16), expected)
    assert torch.equal(cast.view(torch.int16), expected)
    assert not torch.equal((bits >> 16).to(torch.int16).to(device), expected)  # the inputs do tell the two apart


def test_maximum_and_minimum_drop_a_nan(rng, device):
    n = 300
    a, b = (torch.randn(n, generator=rng) for _ in range(2))
    a[::3] = float("nan")
    b[1::3] = float("nan")
    a, b = a.to(device), b.to(device)
    largest, smallest = torch.empty_like(a), torch.empty_like(a)
    _kernels()[1][(_programs(n, 128),)](a, b, largest, smallest, n, BLOCK=128)
    torch.testing.assert_close(largest, torch.fmax(a, b), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(smallest, torch.fmin(a, b), rtol=0, atol=0, equal_nan=True)
    assert not largest.isnan().any()  # no position has both NaN


def _programs(n: int, block: int) -> int:
    return (n + block - 1) // block
