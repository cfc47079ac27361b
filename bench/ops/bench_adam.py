"""One Adam step (lr 0.01, the presets' default) over the default net's 112 parameter tensors
(2,217,831 values): torch's default (foreach) implementation, and fused where torch has it."""

import pytest
import torch

from dipfast import nets


def _net_with_grads(rng):
    net = nets.skip(32)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=rng) * 1e-3
    return net


@pytest.mark.parametrize("impl", ["foreach", "for-loop"])
def test_adam_step(benchmark, impl, rng):
    net = _net_with_grads(rng)
    params = list(net.parameters())
    assert len(params) == 112 and sum(p.numel() for p in params) == 2_217_831
    opt = torch.optim.Adam(params, lr=0.01, foreach=impl == "foreach")
    before = params[0].detach().clone()
    benchmark(opt.step)
    assert not torch.equal(before, params[0])
