"""The native CUDA step computes the same bits whatever order a launch's programs run in.

Triton's interpreter runs a launch's programs one after another, so a kernel whose programs depend on each other's
order computes on the CPU as if the GPU had run them in that order, and every parity test passes while the GPU, which
runs them concurrently, may compute something else. tests/parity/test_program_order.py holds the triton backend's
fused conv blocks to this; here the step that CUDA's `auto` runs (the padded BatchNorm kernels, the upsample's
gathers, the fused rules with early stopping, the networks vmapped into groups) runs in a shuffled program order and
must leave every bit of its state as in order. Its launches' programs conflict in no access either
(test_memory_bounds.py runs the same step under _program_order.memory_conflicts, which also allows atomic updates of
one address by many programs: their order, which changes a float sum's bits, is what this test would see).
"""

import pytest
import torch
from _cuda_step import native_cuda_steps
from _program_order import programs_in_order

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(torch.cuda.is_available(), reason="an instrument of Triton's interpreter: the CPU"),
]


def _state(step) -> dict[str, torch.Tensor]:
    """Everything a step carries to the next: parameters, Adam's moments, the outputs, the metrics rows."""
    state = {f"parameters {i}": b for i, b in enumerate(step.flat.buffers)}
    for i, moments in enumerate(step.optimizer.state.values()):
        state.update({f"adam {i} {k}": v for k, v in moments.items() if isinstance(v, torch.Tensor)})
    state.update(out=step.out, ema=step.ema, metrics=step.metrics)
    return {k: v.detach().clone() for k, v in state.items()}


def test_the_cuda_step_is_the_same_in_a_shuffled_program_order(monkeypatch):
    with native_cuda_steps(2) as make:
        in_order, shuffled = make(), make()
        for _ in range(2):  # the early-stopping window's two slots, the EMA past its first iteration
            in_order()
        with programs_in_order(monkeypatch, "shuffled", seed=2):
            for _ in range(2):
                shuffled()
    expected, actual = _state(in_order), _state(shuffled)
    assert expected.keys() == actual.keys() and len(expected) > 5
    for name, value in expected.items():  # bit for bit (the metrics rows not yet written are NaN in both)
        torch.testing.assert_close(actual[name], value, rtol=0, atol=0, equal_nan=True, msg=f"{name} changed")
