"""The reference engine: the notebooks' backtracking rule, the EMA and the denoising behaviour."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import FAST, TINY_NET, params_of, random_image, same_params, smooth_image
from skimage import data
from skimage.metrics import peak_signal_noise_ratio

import dipfast
from dipfast import engine, nets
from dipfast.presets import PRESETS, Backtracking

SQRT10 = 10**0.5


# Tiny nets on a shared 2-core machine: one torch thread is 10-20x faster than two competing.
pytestmark = pytest.mark.usefixtures("one_torch_thread", "auto_device_is_the_cpu")


def _reference_step(backtracking, *, size=8, loss=None, lr=0.01, seed=0, report_every=8, ema=0.99):
    """A ReferenceStep of the tiny net on a random (1, 3, size, size) observation."""
    preset = dataclasses.replace(
        PRESETS["denoise"], net=TINY_NET, input_depth=4, backtracking=backtracking, lr=lr, ema=ema
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nets.build(TINY_NET, 4, 3)
    z = nets.noise_input(4, size, size, generator=gen)
    y = torch.rand(1, 3, size, size, generator=gen)
    problem = engine.Problem(
        input_shape=(4, size, size),
        z=z,
        out_size=(size, size),
        n_channels=3,
        y=None if loss is not None else y,
        loss=loss,
    )
    return engine.ReferenceStep(net, z, problem, preset, torch.device("cpu"), seed, report_every), y


class RuleModel:
    """The rule of notes/reference_dip.md section 5, written out in plain Python."""

    def __init__(self, bt: Backtracking, params):
        self.bt, self.saved, self.accepted, self.last = bt, params, 0, math.inf

    def checked(self) -> bool:
        return (self.accepted % self.bt.period == 0) == self.bt.on_period

    def __call__(self, loss: float, params) -> bool:
        checked = self.checked()
        bad = checked and loss > self.bt.factor * self.last
        if checked and not bad:
            self.saved, self.last = params, loss
        if not bad:
            self.accepted += 1
        return bad


# ---------------------------------------------------------------------------------------------
# backtracking, one rule evaluation at a time


@pytest.mark.parametrize("period, on_period", [(1, True), (1, False), (3, False), (3, True), (4, False), (100, False)])
def test_backtrack_follows_the_rule(np_rng, period, on_period):
    bt = Backtracking(period=period, on_period=on_period)
    step, _ = _reference_step(bt)
    model = RuleModel(bt, params_of(step.net))
    assert same_params(step.saved, model.saved)  # the initial parameters are the first fall-back point
    gen = torch.Generator().manual_seed(int(np_rng.integers(1 << 30)))
    events = {"fell back": 0, "checked, kept": 0, "unchecked jump": 0}
    for _ in range(60):
        level = model.last if math.isfinite(model.last) else 1.0
        loss = float(np.float32(level * np_rng.choice([0.5, 0.9, 1.0, 1.1, 2.0, 3.0, 3.3, 10.0, 1000.0])))
        with torch.no_grad():  # stands in for an optimizer step
            for p in step.net.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        current = params_of(step.net)
        checked, jump = model.checked(), loss > SQRT10 * model.last
        expected = model(loss, current)
        if expected:
            events["fell back"] += 1
        elif checked:
            events["checked, kept"] += 1
        elif jump:
            events["unchecked jump"] += 1

        bad = step._backtrack(torch.tensor(loss, dtype=torch.float32))
        assert bad.dtype == torch.bool and bad.shape == (1,)  # one network of step_rules (N,) masks
        assert bool(bad) == expected
        assert same_params(params_of(step.net), model.saved if expected else current)
        assert same_params(step.saved, model.saved)
        assert int(step.backtracking_state.accepted) == model.accepted
        assert float(step.backtracking_state.last_loss) == model.last
    if period == 1 and not on_period:  # never checked: nothing is saved and nothing restored
        assert events["fell back"] == events["checked, kept"] == 0
    else:
        assert events["fell back"] > 0 and events["checked, kept"] > 0
    if period in (3, 4):
        assert events["unchecked jump"] > 0


def test_backtrack_threshold_is_sqrt10_and_strict():
    bt = Backtracking(period=1, on_period=True)  # every iteration checked
    step, _ = _reference_step(bt)
    losses = [1e30, 1.0, 3.16, 3.16 * 3.17, 3.16 * 3.15, 3.16 * 3.15 * 1000, 3.16 * 3.15 * 3.0]
    expected = [False, False, False, True, False, True, False]  # the first checked one always passes (last = inf)
    got = [bool(step._backtrack(torch.tensor(v, dtype=torch.float32))) for v in losses]
    assert got == expected
    assert float(step.backtracking_state.last_loss) == pytest.approx(3.16 * 3.15 * 3.0, rel=1e-6)
    assert int(step.backtracking_state.accepted) == 5


def test_notebook_parity_checks():
    """Denoising checks i % 100 != 0 (i counting accepted steps), restoration i % 50 == 0."""
    denoise, restore = PRESETS["denoise"].backtracking, PRESETS["restore"].backtracking
    assert (denoise.period, denoise.on_period, restore.period, restore.on_period) == (100, False, 50, True)
    assert denoise.factor == pytest.approx(SQRT10) and restore.factor == pytest.approx(SQRT10)
    for name in ("sr4", "inpaint", "flash"):
        assert PRESETS[name].backtracking is None


# ---------------------------------------------------------------------------------------------
# backtracking inside real steps


def test_fall_back_inside_a_step_restores_the_saved_parameters(np_rng):
    spikes = {3, 4, 9}
    calls = [0]
    y = torch.from_numpy(np_rng.random((1, 3, 8, 8))).float()

    def loss(out):
        calls[0] += 1
        return F.mse_loss(out, y) * (1000.0 if calls[0] in spikes else 1.0)

    step, _ = _reference_step(Backtracking(period=100, on_period=False), loss=loss, report_every=16)
    original = step._backtrack
    log = []

    def watched(value):
        before, saved_before = params_of(step.net), params_of_list(step.saved)
        bad = original(value)
        log.append((bool(bad), before, saved_before, params_of(step.net), params_of_list(step.saved)))
        return bad

    step._backtrack = watched
    after_steps = []
    for i in range(12):
        step()
        after_steps.append(params_of(step.net))
    fell_back = [entry[0] for entry in log]
    assert fell_back == [i + 1 in spikes for i in range(12)]
    assert step.metrics[:12, 0, 3].tolist() == [float(b) for b in fell_back]
    for k, (bad, before, saved_before, after, saved_after) in enumerate(log):
        if bad:
            assert same_params(after, saved_before) and same_params(saved_after, saved_before)
            assert not same_params(after_steps[k], saved_before)  # Adam still steps, from the restored weights
        else:
            assert same_params(after, before)
            # i = accepted count; i = 0 is unchecked, every other one saves the weights of this output
            assert same_params(saved_after, before if k > 0 else saved_before)
    # Adam's state is not rolled back: one optimizer step per call
    assert all(int(s["step"]) == 12 for s in step.optimizer.state.values())


def params_of_list(tensors):
    return [t.detach().clone() for t in tensors]


def test_fell_back_rows_through_restore(np_rng):
    """Loss spikes through the public API: every row obeys the rule, with i counting accepted steps,
    so a spike on an accepted count of 100 goes through unchecked."""
    x = random_image(np_rng, 8, 8, 3)
    target = torch.from_numpy(x.transpose(2, 0, 1)).float()[None]
    spikes = {7} | set(range(96, 124, 2))
    calls = [0]

    def loss(out):
        calls[0] += 1
        return F.mse_loss(out, target) * (1000.0 if calls[0] in spikes else 1.0)

    r = dipfast.restore(x, loss=loss, iters=125, **FAST)
    assert r.settings.backtracking == PRESETS["denoise"].backtracking
    model = RuleModel(r.settings.backtracking, None)
    spiked_outcomes = set()
    for row in r.history:
        accepted_before = model.accepted
        bad = model(row.loss, None)
        assert row.fell_back == bad, f"iteration {row.iteration}"
        if row.iteration in spikes:
            spiked_outcomes.add((bad, accepted_before % 100 == 0))
    assert r.history[6].fell_back
    assert (True, False) in spiked_outcomes and (False, True) in spiked_outcomes
    assert sum(row.fell_back for row in r.history) >= 10


def test_no_backtracking_without_the_preset(np_rng):
    x = random_image(np_rng, 8, 8, 3)
    calls = [0]

    def op(out):
        calls[0] += 1
        return out * (30.0 if calls[0] == 5 else 1.0)

    r = dipfast.restore(x, "inpaint", mask=np.ones((8, 8), bool), operator=op, iters=8, **FAST)
    assert r.settings.backtracking is None
    assert r.history[4].loss > 10 * r.history[3].loss
    assert not any(row.fell_back for row in r.history)


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_recomputed_from_the_outputs():
    step, _ = _reference_step(None, report_every=10)
    outs = []
    for i in range(10):
        step()
        outs.append(step.out.clone())
    ema = outs[0]
    for out in outs[1:]:
        ema = ema * 0.99 + out * 0.01
    assert torch.equal(step.ema, ema)
    closed = 0.99**9 * outs[0].double() + sum(0.01 * 0.99 ** (9 - j) * outs[j].double() for j in range(1, 10))
    torch.testing.assert_close(step.ema.double(), closed, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(step.ema, outs[-1], atol=1e-5)  # not simply the last output


@pytest.mark.parametrize("weight", [0.99, 0.9])
def test_ema_through_callbacks_includes_rejected_outputs(np_rng, weight):
    x = random_image(np_rng, 8, 8, 3)
    target = torch.from_numpy(x.transpose(2, 0, 1)).float()[None]
    calls = [0]

    def loss(out):
        calls[0] += 1
        return F.mse_loss(out, target) * (1000.0 if calls[0] == 4 else 1.0)

    outs, emas = [], []

    def cb(p):
        outs.append(p.image.clone())
        emas.append(p.ema_image.clone())

    r = dipfast.restore(x, loss=loss, iters=9, report_every=1, callback=cb, ema=weight, **FAST)
    assert r.history[3].fell_back  # the spiked output was rejected by backtracking, but enters the EMA
    ema = outs[0]
    assert torch.equal(emas[0], ema)
    for out, seen in zip(outs[1:], emas[1:], strict=True):
        ema = ema * weight + out * (1 - weight)
        assert torch.equal(seen, ema)
    np.testing.assert_array_equal(r.ema_image, ema[0].permute(1, 2, 0).numpy())


def test_history_psnr_is_of_each_iterations_output(np_rng):
    clean = smooth_image(np_rng, 8, 8)
    noisy = np.clip(clean + np_rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    seen = []
    r = dipfast.restore(
        noisy,
        target=clean,
        iters=4,
        report_every=1,
        callback=lambda p: seen.append((p.psnr, p.ema_psnr, p.image.clone(), p.ema_image.clone())),
        **FAST,
    )
    ref = clean.astype(np.float64)
    for row, (p, ep, out, ema) in zip(r.history, seen, strict=True):
        assert row.psnr == p and row.ema_psnr == ep
        assert p == pytest.approx(
            peak_signal_noise_ratio(ref, out[0].permute(1, 2, 0).double().numpy(), data_range=1), abs=1e-9
        )
        assert ep == pytest.approx(
            peak_signal_noise_ratio(ref, ema[0].permute(1, 2, 0).double().numpy(), data_range=1), abs=1e-9
        )


# ---------------------------------------------------------------------------------------------
# behaviour


@pytest.mark.slow
def test_denoising_raises_psnr_on_astronaut():
    """64 x 64 astronaut crop, sigma = 25 noise: the denoise preset's settings (reg_noise_std 1/30,
    lr 0.01, EMA, backtracking) with a 32-channel skip net gain about 6 dB (EMA) in 300 iterations,
    ~15 s on one busy core. The default 128-channel net gains as much but takes ~30 s on 2 idle cores."""
    clean = data.astronaut()[20:84, 190:254].astype(np.float32) / 255
    noise_rng = np.random.default_rng(2024)
    noisy = np.clip(clean + noise_rng.normal(0, 25 / 255, clean.shape), 0, 1).astype(np.float32)
    noisy_psnr = peak_signal_noise_ratio(clean.astype(np.float64), noisy.astype(np.float64), data_range=1)
    assert 20 < noisy_psnr < 21
    net = nets.SkipSpec(channels_down=(32,) * 5, channels_up=(32,) * 5, channels_skip=(4,) * 5)
    r = dipfast.restore(noisy, target=clean, iters=300, net=net, seed=0, progress=False)
    assert r.settings.reg_noise_std == PRESETS["denoise"].reg_noise_std
    assert r.ema_psnr > noisy_psnr + 4, (noisy_psnr, r.ema_psnr)
    assert r.psnr > noisy_psnr + 3, (noisy_psnr, r.psnr)
    ema_curve = [row.ema_psnr for row in r.history]
    assert ema_curve[-1] > ema_curve[99] > ema_curve[0]
