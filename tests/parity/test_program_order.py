"""No launch of the fused conv blocks depends on the order its programs run in (a GPU runs them concurrently).

The interpreter runs programs serially (_program_order.py), which hides races: these tests run the forward and
backward of conv_bn_lrelu and concat_bn_conv_bn_lrelu with every launch's programs reversed and shuffled, and with
every load and store recorded, at small shapes whose forced tiles give several programs along every grid axis
(pixel tiles, channel tiles, groups, wgrad's split-K) and tiles that straddle the reflection pad's borders. They
assert that no two programs of a launch touch one address where one of them writes it, and that every order gives
the serial order's results bit for bit, which match the float64 twin. The first tests show both instruments catch
what they are for, on toy kernels built to race.
"""

import functools
import importlib

import pytest
import torch
from _kernel_checks import conv_bn_lrelu_module, leaves
from _program_order import ORDERS, memory_conflicts, programs_in_order

import dipfast.kernels
from dipfast import reference
from dipfast.kernels import configs

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(
        not conv_bn_lrelu_module._INTERPRET, reason="instruments the CPU interpreter; a GPU runs programs its own way"
    ),
]

concat_bn_conv_bn_lrelu_module = importlib.import_module("dipfast.kernels.concat_bn_conv_bn_lrelu")

# several programs along every axis of every launch at the shapes below; wgrad's reduction in 3 splits, the last
# one short
SMALL = configs.GemmTiles(16, 16, 16, 1, 4)
SMALL_TILES = {
    **{(family, "fp32"): SMALL for family in ("conv", "dgrad")},
    ("wgrad", "fp32"): configs.GemmTiles(16, 64, 16, 1, 4, split_k=3),
    ("pass", "fp32"): configs.PassTiles(32, 8, 4),
}


@functools.cache
def _toy_kernels():
    """Kernels that race on purpose (built on first use, when the parity conftest has TRITON_INTERPRET set)."""
    import triton
    import triton.language as tl

    @triton.jit
    def read_neighbour(x_ptr, out_ptr, BLOCK: tl.constexpr):
        """Each program increments its block of x, then copies the previous program's block to out."""
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)
        tl.store(out_ptr + offs, tl.load(x_ptr + tl.maximum(pid - 1, 0) * BLOCK + tl.arange(0, BLOCK)))

    @triton.jit
    def store_one(out_ptr):
        tl.store(out_ptr, tl.program_id(0).to(tl.float32))

    @triton.jit
    def count(out_ptr):
        tl.atomic_add(out_ptr, 1.0)

    @triton.jit
    def overlapping_blocks(out_ptr, programs, ACTIVE: tl.constexpr):
        """Each program stores 8 elements from pid * 4 on, its lanes from ACTIVE on masked off. The mask is a vector
        condition & a scalar one, as batch_norm_act's (w < width) & (row < n_rows), which the interpreter holds as
        int32."""
        lanes = tl.arange(0, 8)
        pid = tl.program_id(0)
        tl.store(out_ptr + pid * 4 + lanes, 1.0, mask=(lanes < ACTIVE) & (pid < programs))

    return read_neighbour, store_one, count, overlapping_blocks


def test_reordering_changes_an_order_dependent_kernel(monkeypatch):
    read_neighbour = _toy_kernels()[0]
    x = torch.arange(64, dtype=torch.float32)

    def run():
        out, xc = torch.full_like(x, float("nan")), x.clone()
        read_neighbour[(8,)](xc, out, BLOCK=8)
        return out

    serial = run()
    assert torch.equal(serial[8:], x[:-8] + 1)  # serial: block i - 1 was incremented before program i read it
    with programs_in_order(monkeypatch, "reversed"):
        assert torch.equal(run()[8:], x[:-8])  # reversed: block i - 1 not yet incremented
    with programs_in_order(monkeypatch, "shuffled"):
        assert not torch.equal(run(), serial)


def test_conflict_detector_flags_programs_that_share_memory(monkeypatch):
    read_neighbour, store_one, count, overlapping_blocks = _toy_kernels()
    with memory_conflicts(monkeypatch):
        with pytest.raises(AssertionError, match="read_neighbour: .* loads of addresses another program writes"):
            read_neighbour[(8,)](torch.zeros(64), torch.zeros(64), BLOCK=8)
        with pytest.raises(AssertionError, match="store_one: .*stored by more than one program"):
            store_one[(4,)](torch.zeros(1))
        total = torch.zeros(1)
        count[(5,)](total)  # atomics from many programs to one address: allowed
        assert total.item() == 5
        # an int32 mask reads as the lanes it enables, not as indices: all 8 lanes overlap the next program's, the first
        # 4 do not
        with pytest.raises(AssertionError, match="overlapping_blocks: .* 4 addresses stored by more than one program"):
            overlapping_blocks[(2,)](torch.zeros(12), 2, ACTIVE=8)
        overlapping_blocks[(2,)](torch.zeros(12), 2, ACTIVE=4)


def _conv_inputs(rng, n, c_in, h, w, c_out, k, groups, layout=torch.contiguous_format):
    return [
        (torch.rand(n, c_in, h, w, generator=rng) + 0.1).contiguous(memory_format=layout),
        torch.randn(c_out, c_in // groups, k, k, generator=rng) * (c_in // groups * k * k) ** -0.5,
        torch.randn(c_out, generator=rng),
        torch.rand(c_out, generator=rng) + 0.5,
        torch.randn(c_out, generator=rng),
    ]


def _merge_inputs(rng, n, cs, cd, h, w, c_out, k, groups):
    c_in = cs + cd
    return [
        torch.rand(n, groups * cs, h, w, generator=rng) + 0.1,
        torch.rand(n, groups * cd, h, w, generator=rng) * 2 - 0.5,
        torch.rand(groups * c_in, generator=rng) + 0.5,
        torch.randn(groups * c_in, generator=rng),
        torch.randn(c_out, c_in, k, k, generator=rng) * (c_in * k * k) ** -0.5,
        torch.randn(c_out, generator=rng),
        torch.rand(c_out, generator=rng) + 0.5,
        torch.randn(c_out, generator=rng),
    ]


CASES = {
    # op, twin, shape, keywords, indices of the gradients that vanish in exact arithmetic (a bias before training BN)
    # 60 pixels: 4 pixel tiles, 2 channel tiles, 2 K chunks; wgrad's 3 splits of 4 chunks: 2, 2 and an empty one
    "conv-k3-2x17x6x5-to18": (dipfast.kernels.conv_bn_lrelu, reference.conv_bn_lrelu,
                              dict(n=2, c_in=17, h=6, w=5, c_out=18, k=3, groups=1), dict(stride=1), (2,)),
    # channels_last: the dgrad stores the pixels off the frame (rows 2-3, column 2) into dx, the rest for the fold
    "conv-k3-cl-2x17x6x5-to18": (dipfast.kernels.conv_bn_lrelu, reference.conv_bn_lrelu,
                                 dict(n=2, c_in=17, h=6, w=5, c_out=18, k=3, groups=1, layout=torch.channels_last),
                                 dict(stride=1), (2,)),
    # two groups on grid axis 2 (times the splits), pads of 2 with stride 2
    "conv-k5-s2-g2-6x7x6-to4": (dipfast.kernels.conv_bn_lrelu, reference.conv_bn_lrelu,
                                dict(n=1, c_in=6, h=7, w=6, c_out=4, k=5, groups=2), dict(stride=2), (2,)),
    "merge-k3-3+14-to18": (dipfast.kernels.concat_bn_conv_bn_lrelu, reference.concat_bn_conv_bn_lrelu,
                           dict(n=1, cs=3, cd=14, h=5, w=6, c_out=18, k=3, groups=1), {}, (3, 5)),
    "merge-k3-g2-1+2-to4": (dipfast.kernels.concat_bn_conv_bn_lrelu, reference.concat_bn_conv_bn_lrelu,
                            dict(n=1, cs=1, cd=2, h=5, w=4, c_out=4, k=3, groups=2), {}, (3, 5)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_do_not_depend_on_program_order(case, rng, monkeypatch, assert_parity):
    op, twin, dims, kw, vanishing = CASES[case]
    make = _conv_inputs if "c_in" in dims else _merge_inputs
    tensors = make(rng, **dims)
    kw = dict(kw, groups=dims["groups"])
    monkeypatch.setattr(conv_bn_lrelu_module, "POISON_OUTPUTS", True)
    monkeypatch.setattr(concat_bn_conv_bn_lrelu_module, "POISON_OUTPUTS", True)

    def run(grad=None):
        ins = leaves(tensors, torch.float32)
        out = op(*ins, **kw)
        grad = torch.randn(out.shape, generator=rng) if grad is None else grad
        return grad, [out, *torch.autograd.grad(out, ins, grad)]

    with configs.forced_tiles(SMALL_TILES), memory_conflicts(monkeypatch) as launches:
        grad, serial = run()
        for order in ORDERS:
            with programs_in_order(monkeypatch, order, seed=1):
                _, results = run(grad)
            for name, a, b in zip(["out", *range(len(tensors))], results, serial, strict=True):
                assert torch.equal(a, b), f"{order} order changed {name}"
    kernels = {launch.kernel for launch in launches}
    assert {"_conv_dgrad_kernel", "_reflect_fold_kernel", "_bn_lrelu_bwd_kernel"} <= kernels
    ins64 = leaves(tensors, torch.float64)
    out64 = twin(*ins64, **kw)
    expected = [out64, *torch.autograd.grad(out64, ins64, grad.double())]
    for i, (actual, oracle) in enumerate(zip(serial, expected, strict=True)):
        if i - 1 not in vanishing:
            assert_parity(actual, oracle)
