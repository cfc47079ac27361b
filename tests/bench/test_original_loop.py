"""dipfast.bench.original_loop: the notebooks' loop follows the reference engine, with the notebooks' costs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dipfast.bench import data, runs
from dipfast.bench.original_loop import OriginalLoop
from dipfast.operators import lanczos_kernel
from dipfast.presets import Backtracking, apply_overrides
from dipfast.tasks import preset_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_original_loop_tf32_sets_todays_default_and_is_ieee_on_a_cpu():
    """original-loop-tf32 runs the notebooks' code with TF32 convolutions and cudnn.benchmark on; a CPU has no TF32,
    so there it follows the paper's loop bit for bit."""
    case = data.throughput_case(16, 0)
    preset = apply_overrides(preset_for("denoise", "denoise"), runs.net_overrides("tiny", "denoise"))
    trajectories, flags = [], []
    for tf32 in (False, True):
        loop = OriginalLoop("denoise", preset, case.observed, case.target, seed=0, tf32=tf32)
        loop.run(4, lambda done: flags.append((tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)))
        trajectories.append([r.psnr for r in loop.rows])
        loop.close()
    assert trajectories[0] == trajectories[1] and len(trajectories[0]) == 4
    assert set(flags) == {(False, False, True), (True, True, True)}


def _both_loops(bench_task: str, n: int, seed: int, **loop_kwargs):
    from dipfast import restore

    case = data.load_cases(None, [bench_task], size=32)[0]
    overrides = runs.net_overrides("tiny", case.preset)
    preset = preset_for(case.task, case.preset, case.scale)
    if bench_task == "denoise":  # a hair-trigger rule, so that fall-backs happen and must happen alike
        overrides["backtracking"] = Backtracking(period=100, on_period=False, factor=1.1)
    ref = restore(case.observed, **case.restore_kwargs(), iters=n, seed=seed, device="cpu", backend="reference",
                  progress=False, **overrides)  # fmt: skip
    loop = OriginalLoop(case.task, apply_overrides(preset, {**overrides, "iterations": n}), case.observed,
                        case.target, case.mask, case.scale, seed=seed, **loop_kwargs)  # fmt: skip
    loop.run(n)
    loop.close()
    return ref, loop


@pytest.mark.parametrize("bench_task", ["denoise", "restore", "inpaint", "sr4", "sr8"])
def test_original_loop_follows_the_reference_trajectory(bench_task):
    """Same seed, same network (dipfast.nets), same noise draws, same ops in the same order: the same
    PSNR at every iteration. Only the PSNR arithmetic differs (skimage's float32 difference against
    the engine's float64 one: below 2e-7 dB measured), hence 1e-5 dB. SR runs here with the
    reference's depthwise Lanczos operator (the notebook's dense conv: the next test). On CUDA the
    original loop's cudnn.benchmark may pick other convolution algorithms than the reference, so
    there the trajectories part by float rounding that Adam amplifies; this test runs on the CPU."""
    ref, loop = _both_loops(bench_task, 30, 3, sr_downsampler="depthwise")
    a = np.array([h.psnr for h in ref.history])
    b = np.array([r.psnr for r in loop.rows])
    assert len(a) == len(b) == 30
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    assert [h.fell_back for h in ref.history] == [r.fell_back for r in loop.rows]
    if bench_task == "denoise":
        assert sum(r.fell_back for r in loop.rows) >= 2
        np.testing.assert_allclose([r.ema_psnr for r in loop.rows], [h.ema_psnr for h in ref.history], atol=1e-5)
    final = loop.final_output()[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(final, np.asarray(ref.image).reshape(final.shape), atol=1e-6)


def test_original_loop_sr_keeps_the_notebooks_dense_trainable_downsampler():
    """The notebook's Lanczos downsampler is a dense 3 -> 3 conv with zeros off the diagonal whose
    weight and bias get gradients (accumulated, never applied). Its sums run in another order than
    the reference's depthwise conv, and Adam's nearly sign-like first steps amplify the rounding:
    the first iteration agrees exactly (no step yet), later ones part by up to 0.07 dB on this
    tiny net over 6 seeds (about 1 dB within 20 iterations on the default net), hence 1 dB."""
    ref, loop = _both_loops("sr4", 30, 4)
    a = np.array([h.psnr for h in ref.history])
    b = np.array([r.psnr for r in loop.rows])
    assert abs(a[0] - b[0]) < 1e-5
    assert np.abs(a - b).max() < 1.0
    conv = loop.downsampler.downsampler
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    kernel = torch.from_numpy(lanczos_kernel(4).astype(np.float32))
    assert torch.equal(conv.weight[0, 0], kernel) and conv.weight[0, 1].abs().max() == 0  # never trained


def test_original_loop_makes_the_notebooks_host_copies(monkeypatch):
    """Denoising: three device-to-host copies per iteration, the loss's `.item()` printed, and the
    112 per-parameter copies of the default net on checked iterations (99 of 100)."""
    import io

    case = data.load_cases(None, ["denoise"], size=32)[0]
    preset = apply_overrides(preset_for("denoise"), {"iterations": 3})
    log = io.StringIO()
    loop = OriginalLoop("denoise", preset, case.observed, case.target, seed=0, log=log)
    copies = []
    real_host = OriginalLoop._host
    monkeypatch.setattr(OriginalLoop, "_host", lambda self, t: copies.append(1) or real_host(self, t))
    loop.run(3)
    assert len(copies) == 9
    printed = [line for line in log.getvalue().split("\r") if line.strip()]
    assert len(printed) == 3 and all(
        re.match(r"Iteration 0000\d +Loss \d\.\d{6} .*PSNR_gt_sm", line) for line in printed
    )
    assert loop.last_net is not None and len(loop.last_net) == 112  # saved at i = 1 and 2, not at i = 0
    assert all(
        s.device.type == "cpu" and s.data_ptr() != p.data_ptr() for s, p in zip(loop.last_net, loop.net.parameters())
    )
    loop.close()
