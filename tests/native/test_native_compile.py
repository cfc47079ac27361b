"""Every native op inside one torch.compile(fullgraph=True) graph (inductor, a tiny shape): the fake
and autograd registrations let dynamo and AOTAutograd trace through, forward and backward match eager."""

import pytest
import torch
from _native_helpers import requires_native

from dipfast import native

pytestmark = [pytest.mark.native, requires_native]


def _block(skip, x, w1, b1, w2, b2, offset):
    up = native.upsample_bilinear2x(x)
    deeper = native.batch_norm_act(up + native.normal_(torch.empty_like(up), 3, offset, std=0.1), w1, b1)
    merged = native.concat_batch_norm(skip, deeper, w2, b2)
    return native.batch_norm_act_reflect_pad(merged, w2, b2, pad=1).square().mean()


def test_all_ops_compile_fullgraph(rng):
    inputs = [
        torch.randn(2, 3, 6, 8, generator=rng),
        torch.randn(2, 4, 3, 4, generator=rng).contiguous(memory_format=torch.channels_last),
        torch.rand(4, generator=rng) + 0.5,
        torch.randn(4, generator=rng),
        torch.rand(7, generator=rng) + 0.5,
        torch.randn(7, generator=rng),
    ]
    inputs = [t.requires_grad_() for t in inputs]
    offset = torch.tensor(5)
    compiled = torch.compile(_block, fullgraph=True)
    out = compiled(*inputs, offset)
    grads = torch.autograd.grad(out, inputs)
    ref = _block(*inputs, offset)
    ref_grads = torch.autograd.grad(ref, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
