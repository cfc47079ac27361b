"""The triton backend (the fast step, the generator compiled, its blocks on the fused kernels) against
the reference backend, on the tiny net under the interpreter (on CUDA: on the GPU, TF32 off).

Tolerance: the kernels sum convolutions and BatchNorm statistics in another order than ATen (about
1e-6 relative per op, tests/parity/test_blocks.py), so the first forward's loss agrees to 1e-6
relative. Adam's first update is about lr x sign(gradient), so a parameter whose gradient is near
zero (the conv biases before BatchNorm, exactly zero in exact arithmetic) moves by +-lr on rounding
alone: after one update the output agrees to 1e-3 (measured 8.7e-5 on the update's own input, 8.0e-5 on the
next forward's), and after four the PSNR to 0.01 dB.

Each side fits four iterations once, its metrics read back every iteration: the first row's loss is the first
forward's, the second forward's output is the net after one update (a fit of one iteration would return the same
parameters' output on the first iteration's input), and the last row's PSNR is the fourth's. One fit instead of
two per side took a quarter off this file's time in the interpreter (360 s -> 270 s), most where it compiles.
"""

import dataclasses
import importlib

import pytest
import torch

from dipfast import backends, engine
from dipfast.kernels import lanczos2 as lanczos2_module
from dipfast.nets import SkipSpec
from dipfast.nets.blocks import BlockOps
from dipfast.operators import Lanczos2Decimation
from dipfast.presets import PRESETS

pytestmark = pytest.mark.parity

TINY = SkipSpec(channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2))
PRESET = dataclasses.replace(PRESETS["denoise"], net=TINY, input_depth=4)


def _fit(problem, preset, device, seed, plan=backends.REFERENCE_PLAN):
    """Four iterations of `preset` on `problem`: the Fit, and the raw output after one Adam update."""
    after_one_update = []

    def watch(progress):
        if progress.iteration == 2:
            after_one_update.append(progress.image.clone())

    preset = dataclasses.replace(preset, iterations=4)
    fit = engine.fit(
        problem, preset, device=device, seed=seed, progress=False, callback=watch, report_every=1, plan=plan
    )
    assert len(fit.history) == 4 and len(after_one_update) == 1
    return fit, after_one_update[0]


def _unexpected(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"the reference {name} ran: a block of the tiny net was not fused")

    return fail


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_triton_backend_matches_the_reference(compiled, monkeypatch):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = torch.Generator().manual_seed(7)
    y, target = torch.rand(1, 3, 16, 12, generator=rng), torch.rand(1, 3, 16, 12, generator=rng)
    problem = engine.Problem((4, 16, 12), None, (16, 12), 3, y=y, target=target)
    plan = dataclasses.replace(backends.resolve("triton", "fp32", device), compile=compiled, cuda_graph=False)
    ref, ref_updated = _fit(problem, PRESET, device, seed=2)
    with monkeypatch.context() as m:  # every block of the tiny net is one the kernels fuse, every upsample theirs
        for name in ("conv_bn_act", "merge", "upsample"):
            m.setattr(BlockOps, name, _unexpected(name))
        fast, fast_updated = _fit(problem, PRESET, device, seed=2, plan=plan)
    assert fast.history[0].loss == pytest.approx(ref.history[0].loss, rel=1e-6)
    torch.testing.assert_close(fast_updated, ref_updated, rtol=0, atol=1e-3)
    assert fast.history[-1].psnr == pytest.approx(ref.history[-1].psnr, abs=0.01)


def test_triton_backend_fits_super_resolution_with_the_fused_loss_as_the_reference(monkeypatch):
    """restore()'s SR data term on the triton backend is the fused decimation + MSE kernel (counted), and the fit
    follows the reference's, which runs the depthwise conv: the first loss to 1e-6 relative (one reduction in
    another order), the PSNR after four iterations to 0.01 dB (the tolerance argument above)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = torch.Generator().manual_seed(11)
    y, target = torch.rand(1, 3, 5, 4, generator=rng), torch.rand(1, 3, 20, 16, generator=rng)
    problem = engine.Problem((4, 20, 16), None, (20, 16), 3, y=y, operator=Lanczos2Decimation(4), target=target)
    plan = dataclasses.replace(backends.resolve("triton", "fp32", device), compile=False, cuda_graph=False)
    fused_calls = []
    real = lanczos2_module._lanczos2_mse_fwd
    monkeypatch.setattr(lanczos2_module, "_lanczos2_mse_fwd", lambda *a: fused_calls.append(1) or real(*a))
    ref, _ = _fit(problem, PRESET, device, seed=3)
    assert not fused_calls  # the reference never takes the fused path
    fast, _ = _fit(problem, PRESET, device, seed=3, plan=plan)
    assert len(fused_calls) == 4
    assert fast.history[0].loss == pytest.approx(ref.history[0].loss, rel=1e-6)
    assert fast.history[-1].psnr == pytest.approx(ref.history[-1].psnr, abs=0.01)


def test_triton_backend_in_channels_last_fits_as_in_nchw(monkeypatch):
    """bf16 on CUDA runs the triton backend's activations and weights channels_last (Backend.channels_last_bf16):
    forced here on this device too, every fused conv block's forward takes channels_last operands, and the fit
    follows the NCHW one's (the same kernels with other strides; only the BatchNorm backward's tiles differ): the
    first loss to 1e-6 relative (measured: equal), the PSNR after four iterations to 0.1 dB. The backward's bf16
    sums in another order move near-zero gradients' signs, which Adam's first updates (about lr x sign) turn into
    lr-sized steps: over seven draws of data and seed the PSNRs after four iterations differed by 0.003 to 0.043 dB
    (0.043 here; the output up to 0.14 apart at a pixel). A layout error misplaces values, far beyond that; the ops' own
    parity tests hold each op to the bf16 bar in both layouts. Without the input perturbation: its normal_ fills
    the buffer in memory order, so the two layouts draw the same numbers into other pixels."""
    module = importlib.import_module("dipfast.kernels.conv_bn_lrelu")
    preset = dataclasses.replace(PRESET, reg_noise_std=0.0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = torch.Generator().manual_seed(5)
    y, target = torch.rand(1, 3, 16, 12, generator=rng), torch.rand(1, 3, 16, 12, generator=rng)
    problem = engine.Problem((4, 16, 12), None, (16, 12), 3, y=y, target=target)
    layouts = []
    real = module._conv_bn_lrelu_fwd

    def spy(x, *args):  # the layout each fused conv block's forward computes in
        layouts.append(module.memory_format(x))
        return real(x, *args)

    monkeypatch.setattr(module, "_conv_bn_lrelu_fwd", spy)
    fits = {}
    for name, where in (("nchw", frozenset()), ("channels_last", frozenset({device.type}))):
        with backends.variant("triton", channels_last_bf16=where):
            plan = dataclasses.replace(backends.resolve("triton", "bf16", device), compile=False, cuda_graph=False)
            assert plan.channels_last(device) == bool(where)
            fits[name], _ = _fit(problem, preset, device, seed=4, plan=plan)
        expected = torch.channels_last if where else torch.contiguous_format
        assert layouts and set(layouts) == {expected}, name
        layouts.clear()
    nchw, cl = fits["nchw"], fits["channels_last"]
    assert cl.history[0].loss == pytest.approx(nchw.history[0].loss, rel=1e-6)
    assert cl.history[-1].psnr == pytest.approx(nchw.history[-1].psnr, abs=0.1)
