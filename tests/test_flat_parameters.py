"""FlatParameters: the fast step's parameters as one or two flat buffers.

Everything here is exact (bit for bit): the buffers hold the same fp32 values as the stacked tensors, the
views are plain reshapes, and the bf16 cast of the conv group is the cast autocast makes per tensor, so
the forward and every gradient equal the per-tensor way's exactly.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import TINY_NET
from torch.func import functional_call, stack_module_state

from dipfast import nets
from dipfast.flat_parameters import FlatParameters, ModuleSlots

CPU = torch.device("cpu")


def _nets(n: int) -> list[torch.nn.Module]:
    return [nets.build(TINY_NET, 5, 3) for _ in range(n)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cast", [None, torch.bfloat16])
def test_buffers_hold_the_stacked_parameters_in_their_layout(cast, channels_last):
    built = _nets(3)
    stacked, _ = stack_module_state(built)
    flat = FlatParameters(stacked, built[0], CPU, cast, channels_last)
    assert [b.dtype for b in flat.buffers] == [torch.float32] * len(flat.buffers)
    assert sum(b.numel() for b in flat.buffers) == sum(t.numel() for t in stacked.values())
    assert set(flat.params) == set(stacked)
    for name, view in flat.params.items():
        assert torch.equal(view, stacked[name])
        if channels_last and view.dim() == 5:
            assert view[1].is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # the views are the storage: editing one edits the buffer
        next(iter(flat.params.values())).add_(1.0)
    assert any(not torch.equal(v, stacked[k]) for k, v in flat.params.items())


def test_only_the_convolutions_are_cast():
    built = _nets(1)
    stacked, _ = stack_module_state(built)
    flat = FlatParameters(stacked, built[0], CPU, torch.bfloat16)
    (params,) = flat.per_network(flat.buffers)
    convs = {
        f"{p}.{n}"
        for p, m in built[0].named_modules()
        if isinstance(m, torch.nn.Conv2d)
        for n, _ in m.named_parameters()
    }
    assert convs and {k for k, v in params.items() if v.dtype == torch.bfloat16} == convs
    assert all(v.dtype == torch.float32 for k, v in params.items() if k not in convs)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_and_gradients_equal_the_per_tensor_parameters(rng, precision, channels_last):
    """Two networks, each run with functional_call: once on per-tensor leaves under autocast, once
    on the flat buffers' views. Outputs and gradients must be identical."""
    built = _nets(2)
    module = built[0]
    stacked, buffers = stack_module_state(built)
    cast = torch.bfloat16 if precision == "bf16" else None
    flat = FlatParameters(stacked, module, CPU, cast, channels_last)
    # per-tensor leaves with the views' strides (a 1x1 weight's size-1 strides steer oneDNN's layout too)
    views = {k: v.detach() for k, v in flat.params.items()}
    leaves = [
        {k: torch.empty_strided(v[i].shape, v[i].stride()).copy_(v[i]).requires_grad_() for k, v in views.items()}
        for i in range(2)
    ]
    z = torch.randn(2, 1, 5, 16, 16, generator=rng)
    weights = torch.randn(2, 3, 16, 16, generator=rng)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast is not None, cache_enabled=False)

    def loss(per_network) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast:
            outs = torch.stack(
                [
                    functional_call(module, (p, {k: v[i] for k, v in buffers.items()}), (z[i],))
                    for i, p in enumerate(per_network)
                ]
            ).float()
        return outs, (outs[:, 0] * weights).sum()

    out_ref, loss_ref = loss(leaves)
    loss_ref.backward()
    out_flat, loss_flat = loss(flat.per_network(flat.buffers))
    loss_flat.backward()
    assert torch.equal(out_flat, out_ref)
    grads = FlatParameters(
        {k: torch.stack([leaf[k].grad for leaf in leaves]) for k in stacked}, module, CPU, cast, channels_last
    )
    for got, want in zip(flat.buffers, grads.buffers):
        assert got.grad is not None and torch.equal(got.grad, want.detach())


def test_module_slots_put_the_tensors_where_functional_call_would(rng):
    """The module computes with the loaded tensors, exactly as functional_call with the same ones."""
    module = _nets(1)[0]
    params = {k: torch.randn(v.shape, generator=rng) for k, v in module.named_parameters()}
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    z = torch.randn(1, 5, 16, 16, generator=rng)
    expected = functional_call(module, (params, {k: v.clone() for k, v in buffers.items()}), (z,))
    ModuleSlots(module).load(params, buffers)
    assert all(p is params[k] for k, p in module.named_parameters())
    assert torch.equal(module(z), expected)
