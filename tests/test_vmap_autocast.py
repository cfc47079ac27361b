"""bf16 inside vmap: the vectorised generator (CUDA's default for N > 1 networks) computes its convolutions
in bf16, as autocast does for one network, where autocast does not reach them (dipfast.vmap_autocast)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from _helpers import TINY_NET
from torch.func import vmap

from dipfast import backends, engine, fast_step
from dipfast.presets import PRESETS
from dipfast.vmap_autocast import bf16_convolutions

CPU = torch.device("cpu")
PRESET = dataclasses.replace(PRESETS["denoise"], net=TINY_NET, input_depth=4, reg_noise_std=0.0)
BF16_FORWARD = 0.05  # bf16's rounding through the tiny net at init: ~1.3e-2 measured, against an output in (0, 1)


def test_autocast_does_not_reach_a_convolutions_batching_rule():
    """Why the module exists. Autocast acts inside vmap on the plain ops the batching rules call (a vmapped mm comes
    back bf16), but conv2d checks its bias's dtype against the input's above it, at the batched level, on every
    device: bf16 weights and bias beside an fp32 input raise there, as on the H200. (And below it, which plain
    convolution autocast casts differs by device: CUDA's list names aten::convolution, the CPU's does not.) If the
    raise stops, torch's conv2d has learnt to wait for autocast inside vmap and the mode can go."""
    x, w, b = torch.randn(2, 1, 4, 7, 9), torch.randn(2, 6, 4, 3, 3), torch.randn(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vmap(torch.mm)(torch.randn(2, 3, 4), torch.randn(2, 4, 5)).dtype == torch.bfloat16
        assert F.conv2d(x[0], w[0].bfloat16(), b[0].bfloat16()).dtype == torch.bfloat16  # one network: autocast's
        with pytest.raises(RuntimeError, match=r"Input type \(float\) and bias type \(c10::BFloat16\)"):
            vmap(F.conv2d)(x, w.bfloat16(), b.bfloat16())
    registered = torch._C._dispatch_has_kernel_for_dispatch_key
    assert registered("aten::convolution", "AutocastCUDA") and not registered("aten::convolution", "AutocastCPU")


@pytest.mark.parametrize("groups, stride", [(1, 1), (2, 2)])
def test_each_convolution_under_vmap_is_autocasts_of_its_network(rng, groups, stride):
    """Forward and both gradients against the same conv per network under autocast, bf16 weights and bias."""
    x = torch.randn(3, 2, 4, 11, 9, generator=rng, requires_grad=True)
    w = torch.randn(3, 6, 4 // groups, 3, 3, generator=rng).bfloat16().requires_grad_()
    b = torch.randn(3, 6, generator=rng).bfloat16().requires_grad_()

    def conv(x, w, b):
        return F.conv2d(x, w, b, stride=stride, groups=groups)

    with bf16_convolutions():
        y = vmap(conv)(x, w, b)
    assert y.dtype == torch.bfloat16
    grad = torch.randn(y.shape, generator=rng).bfloat16()
    dx, dw, db = torch.autograd.grad(y, (x, w, b), grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = torch.stack([conv(x[i], w[i], b[i]) for i in range(3)])
    dxs, dws, dbs = torch.autograd.grad(ys, (x, w, b), grad)
    assert dx.dtype == torch.float32 and dw.dtype == db.dtype == torch.bfloat16
    for got, want in ((y, ys), (dx, dxs), (dw, dws), (db, dbs)):
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7 * want.abs().max().item())


def test_batch_norm_normalises_in_fp32_and_other_ops_keep_their_dtypes():
    x = torch.randn(2, 3, 5, 5)
    stats = torch.zeros(2, 3), torch.ones(2, 3)
    with bf16_convolutions():
        y = vmap(lambda x, m, v: F.batch_norm(x, m, v, training=True))(x.bfloat16()[:, None], *stats)
        assert y.dtype == torch.float32  # the CPU's kernel refuses bf16 here without the cast
        assert F.leaky_relu(x.bfloat16()).dtype == torch.bfloat16
        assert F.leaky_relu(x).dtype == torch.float32
        assert F.conv2d(x.double(), torch.randn(4, 3, 1, 1).double()).dtype == torch.float64  # autocast's rule too


def test_the_vectorised_bf16_step_runs_its_convolutions_in_bf16(rng):
    """Two networks vmapped in bf16 (it raised 'Input type (float) and bias type (c10::BFloat16)' on an H200):
    every conv computes in bf16, and the first output is the fp32 step's within bf16's rounding. The blocks
    are the reference ones, as on CUDA (the CPU's native ops have no batching rules)."""
    problems = [_problem(rng), _problem(rng)]
    outputs = {}
    for precision in ("fp32", "bf16"):
        with backends.variant("native", blocks={"cpu": "reference"}):
            plan = backends.resolve("native", precision, CPU)
            built, zs = fast_step.build_nets(problems, PRESET, [0, 1])
            step = fast_step.FastStep(built, zs, problems, PRESET, CPU, [0, 1], 4, plan, vectorised=True)
        dtypes = []
        for m in step.runner.module.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
        with engine.ieee_fp32():
            outputs[precision] = step.runner(step.z).detach()
            step()
        assert dtypes and set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert torch.isfinite(step.out).all()
    assert outputs["bf16"].dtype == torch.float32
    assert (outputs["bf16"] - outputs["fp32"]).abs().max() < BF16_FORWARD


def _problem(rng: torch.Generator) -> engine.Problem:
    y = torch.rand(1, 3, 24, 20, generator=rng)
    return engine.Problem(input_shape=(4, 24, 20), z=None, out_size=(24, 20), n_channels=3, y=y, target=None)
