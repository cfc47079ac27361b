"""The fused ops' backward fills nothing: the outputs they return only to save for the backward (statistics, the
triton block's conv output) are non-differentiable, and autograd would otherwise hand the backward a zero-filled
gradient for each: a launch per output per block, and for the conv output a write of its whole size."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dipfast.kernels

pytestmark = pytest.mark.parity

FILLS = {torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.fill_, torch.ops.aten.zero_}


class _CountFills(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.fills = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in FILLS:
            self.fills.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _randn(rng, device, *shape, offset=0.0):
    return (torch.randn(*shape, generator=rng) + offset).to(device)


def _cases(rng, device):
    """(name, op, inputs, output shape): each op on fresh random inputs, odd sizes."""
    x, skip, deeper = (
        _randn(rng, device, 2, 3, 7, 9, offset=0.5),
        _randn(rng, device, 2, 4, 7, 9),
        _randn(rng, device, 2, 5, 7, 9, offset=1.0),
    )
    gamma3, beta3 = torch.rand(3, generator=rng).to(device) + 0.5, _randn(rng, device, 3)
    gamma9, beta9 = torch.rand(9, generator=rng).to(device) + 0.5, _randn(rng, device, 9)
    weight = _randn(rng, device, 6, 9, 3, 3) / 9
    conv_weight = _randn(rng, device, 6, 3, 3, 3) / 5
    bias6, gamma6, beta6 = _randn(rng, device, 6), torch.rand(6, generator=rng).to(device) + 0.5, _randn(rng, device, 6)
    return [
        ("batch_norm_act", lambda *t: dipfast.kernels.batch_norm_act(*t, pad=1), [x, gamma3, beta3], (2, 3, 9, 11)),
        (
            "concat_batch_norm",
            lambda *t: dipfast.kernels.concat_batch_norm(*t, pad=1),
            [skip, deeper, gamma9, beta9],
            (2, 9, 9, 11),
        ),
        ("conv_bn_lrelu", dipfast.kernels.conv_bn_lrelu, [x, conv_weight, bias6, gamma6, beta6], (2, 6, 7, 9)),
        (
            "concat_bn_conv_bn_lrelu",
            dipfast.kernels.concat_bn_conv_bn_lrelu,
            [skip, deeper, gamma9, beta9, weight, bias6, gamma6, beta6],
            (2, 6, 7, 9),
        ),
    ]


def test_backward_of_each_fused_op_fills_nothing(rng, device):
    for name, op, tensors, shape in _cases(rng, device):
        ins = [t.detach().requires_grad_() for t in tensors]
        out = op(*ins)
        assert out.shape == shape, name
        with _CountFills() as mode:
            grads = torch.autograd.grad(out, ins, torch.randn(shape, generator=rng).to(device))
        assert mode.fills == [], f"{name}: {mode.fills}"
        assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads), name
