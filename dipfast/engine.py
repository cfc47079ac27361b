"""The DIP optimisation loop (fit, fit_many: set-up, the host loop, read-backs, results) and the
reference backend's step: plain eager PyTorch, fp32, IEEE convolutions. The fast backends' step
(fast_step.FastStep) runs the same iteration for N networks; this loop drives either.

One iteration, in the order of the original notebooks' closure:

    z_i   = z + sigma_p * eps_i                    (eps_i ~ N(0, 1), a fresh draw; skipped when sigma_p = 0)
    x_i   = crop(f_theta(z_i))
    loss  = mean((A(x_i) - y)^2)                   (or the user's loss(x_i))
    backward
    ema   = x_0, then 0.99 * ema + 0.01 * x_i      (before backtracking: a rejected x_i still enters)
    backtracking: on a checked iteration, loss > sqrt(10) * last accepted loss restores the
                  last accepted parameters, otherwise they are saved
    Adam step                                      (also after a fall-back, as in the notebook)

Everything stays on the device: backtracking is torch.where over the parameters, and the loss
and PSNRs go into a small metrics buffer that the host reads every `report_every` iterations
for the progress bar, the history and the callback.

Early stopping (stop='auto', dipfast.early_stop): after the backward, the criterion takes the
iteration's output; a network whose patience has run out is stopped, and from that iteration on its
parameters, Adam moments and EMA stay as they were (step_rules.Freeze). The read-back sees each
network's stopped flag in its metrics rows; once all have stopped, the loop ends ('early-stop'), and
each network's result is the output the criterion kept at its own detected point.

Where it differs from the notebook: the fall-back test compares fp32 losses on the device
instead of float64 PSNRs on the CPU (the same rule, 10 log10 of a ratio of MSEs, up to rounding).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dipfast import fast_step, step_rules
from dipfast.backends import REFERENCE_PLAN, Plan, conv_precision
from dipfast.early_stop import EarlyStop, EarlyStopSpec, gate_variance
from dipfast.errors import InputError, NumericalError
from dipfast.nets.layers import centre_crop
from dipfast.nvtx_ranges import phase
from dipfast.operators import Identity
from dipfast.presets import TaskPreset


@dataclass
class Problem:
    """One fit: minimise ||A(crop(f(z))) - y||^2, or loss(crop(f(z))) when loss is given."""

    input_shape: tuple[int, int, int]  # (D, H', W'): z's shape, H' x W' the net's working size
    z: torch.Tensor | None  # (1, D, H', W'): the fixed generator input; None draws U[0, 0.1) noise
    out_size: tuple[int, int]  # (H, W): the generator output is centre-cropped to this
    n_channels: int
    y: torch.Tensor | None = None  # (1, C, h, w): the observation
    operator: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None
    target: torch.Tensor | None = None  # (1, C, H, W): ground truth for PSNR

    @property
    def observes_output(self) -> bool:
        """The data term is ||x - y||^2 itself: y is a corrupted copy of the output (denoise, jpeg, ...)."""
        identity = isinstance(getattr(self.operator, "__self__", None), Identity)
        return self.loss is None and self.y is not None and identity

    def data_term(self, out: torch.Tensor, y: torch.Tensor | None, check: bool = True) -> torch.Tensor:
        """The 0-dim loss of the cropped output `out`, y the observation on out's device; `check` the
        user callables' results (ReferenceStep checks its first iteration, FastStep every eager call)."""
        if self.loss is not None:
            loss = self.loss(out)
            if check and (not isinstance(loss, torch.Tensor) or loss.numel() != 1):
                raise InputError("loss= must return a scalar tensor (one value) of the generated image")
            return loss.reshape(())
        pred = self.operator(out)
        if check and (not isinstance(pred, torch.Tensor) or pred.shape != y.shape):
            shape = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
            raise InputError(
                f"operator maps the {tuple(out.shape)} output to {shape}, but the observed image is "
                f"{tuple(y.shape)}; give an operator whose output has the image's shape"
            )
        return F.mse_loss(pred, y)


@dataclass(frozen=True)
class HistoryRow:
    iteration: int  # 1-based: the row after the iteration-th step
    loss: float
    psnr: float | None  # raw output vs target
    ema_psnr: float | None  # EMA output vs target
    fell_back: bool  # backtracking restored the parameters at this step
    seconds: float  # wall time from the start of the run to the read-back that brought this row
    criterion: float | None = None  # the early-stop VAR (stop='auto'; None before it is defined)


@dataclass
class Progress:
    """What a callback sees every `report_every` iterations. Return True from it to stop."""

    iteration: int
    loss: float
    psnr: float | None
    ema_psnr: float | None
    seconds: float
    image: torch.Tensor  # (1, C, H, W), the latest raw output
    ema_image: torch.Tensor  # (1, C, H, W)
    criterion: float | None = None  # the early-stop VAR (stop='auto'; None before it is defined)


@dataclass
class Fit:
    image: torch.Tensor  # (1, C, H, W): one more forward with the last perturbed input, as the notebooks
    ema_image: torch.Tensor
    history: list[HistoryRow] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0  # the whole run: set-up, loop and final forward
    loop_seconds: float = 0.0
    stop_reason: str = "iterations"  # or 'early-stop', 'callback', 'interrupted'
    # stop='auto': the detected iteration whose output is .image (None: the fixed count, or none yet)
    stop_iteration: int | None = None
    early_stopped: bool = False  # stop='auto': this network stopped; its history ends at that iteration
    # stop='auto' with a noise gate: whether the gate opened (None: no gate), and the noise sigma estimated from
    # the observation (None: no gate, or no estimate, the gate open from the start)
    gate_opened: bool | None = None
    noise_sigma: float | None = None
    first_step_seconds: float = 0.0  # set-up and the first iteration: where compilation happens
    # the start-up's parts: the networks built and the step made (on CUDA the first copies to the device), the
    # eager iterations before the CUDA graph capture (cuDNN's search, the Triton kernels' compilation), the capture
    setup_seconds: float = 0.0
    warmup_seconds: float = 0.0
    capture_seconds: float = 0.0  # the CUDA graph capture (CUDA, fast backends)


def ieee_fp32(cudnn_benchmark: bool = False):
    """TF32 off for convolutions and matmuls: "fp32" on the reference path means IEEE fp32."""
    return conv_precision(tf32=False, cudnn_benchmark=cudnn_benchmark)


class ReferenceStep(step_rules.AfterBackward):
    """The state of one fit and its step function, all on one device (step_rules.Step with N = 1)."""

    def __init__(
        self,
        net: torch.nn.Module,
        z: torch.Tensor,
        problem: Problem,
        preset: TaskPreset,
        device: torch.device,
        seed: int,
        report_every: int,
        early_stop: EarlyStopSpec | None = None,
    ):
        self.net, self.problem, self.preset = net, problem, preset
        self.z = z.to(device)
        self.y = problem.y.to(device) if problem.y is not None else None
        self.target = problem.target.to(device, torch.float64) if problem.target is not None else None  # as FastStep
        self.optimizer = torch.optim.Adam(net.parameters(), lr=preset.lr)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.noise = torch.empty_like(self.z)
        self.net_input = self.z
        out_shape = (1, problem.n_channels, *problem.out_size)
        self.out = torch.zeros(out_shape, device=device)
        self.ema = torch.zeros(out_shape, device=device)
        self.iteration = torch.zeros((), dtype=torch.int64, device=device)
        self.metrics = step_rules.metrics_buffer(report_every, 1, device)
        self.calls = 0
        self.warmup_seconds = self.capture_seconds = 0.0  # no CUDA graph
        self.backtracking = preset.backtracking
        if self.backtracking is not None:
            self.saved = [p.detach().clone() for p in net.parameters()]
            # each tensor viewed as (1, ...): the one network of step_rules' stacked (N, ...) tensors
            self._stacked = [p.detach()[None] for p in net.parameters()], [s[None] for s in self.saved]
            self.backtracking_state = step_rules.BacktrackingState.start(1, device)
        self.early_stop = None
        if early_stop is not None:
            noise = gate_variance([problem], device) if early_stop.noise_gate > 0 else None
            self.early_stop = EarlyStop(early_stop, 1, out_shape[1:], device, noise_variance=noise)
            self.freeze = step_rules.Freeze(graph_safe=device.type == "cuda")  # no host read on a GPU
        else:
            self.no_criterion = step_rules.no_criterion(1, device)

    def _loss(self, out: torch.Tensor) -> torch.Tensor:
        return self.problem.data_term(out, self.y, check=self.calls == 0)

    def __call__(self) -> None:
        if self.preset.reg_noise_std > 0:
            with phase("noise"):
                self.net_input = self.z + self.noise.normal_(generator=self.generator) * self.preset.reg_noise_std
        with phase("forward"):
            out = centre_crop(self.net(self.net_input), self.problem.out_size)
        with phase("loss"):
            loss = self._loss(out)
        with phase("backward"):
            self.optimizer.zero_grad()
            loss.backward()
        self.after_backward(out, loss.detach().reshape(1))
        self.calls += 1

    def _held(self) -> list[torch.Tensor]:
        """The parameters and Adam moments, each viewed as (1, ...): the one network of step_rules' stacks."""
        params = list(self.net.parameters())
        return [t.detach()[None] for t in (*params, *step_rules.adam_moments(self.optimizer, params))]

    def _backtrack(self, loss: torch.Tensor) -> torch.Tensor:
        """The notebook's rule for the (1,) loss, without a host sync (step_rules); returns `bad`, (1,) bool."""
        keep, bad = self.backtracking_state.decide(loss, self.backtracking)
        step_rules.apply_backtracking(*self._stacked, keep, bad, graph_safe=True)
        return bad

    @torch.no_grad()
    def final_output(self) -> torch.Tensor:
        return centre_crop(self.net(self.net_input), self.problem.out_size)


def _mean(values: list[float | None]) -> float | None:
    return None if values[0] is None else sum(values) / len(values)


def _finite(v: float) -> float | None:
    return v if v == v else None  # NaN marks "no target"


def fit(
    problem: Problem,
    preset: TaskPreset,
    *,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[Progress], bool | None] | None = None,
    report_every: int = 25,
    plan: Plan = REFERENCE_PLAN,
    early_stop: EarlyStopSpec | None = None,
) -> Fit:
    """Run the preset's iterations on `problem` with the backend of `plan` (the reference by default);
    early_stop: the rule of stop='auto' (the preset's iterations are then the upper bound)."""
    return fit_many(
        [problem],
        preset,
        device=device,
        seeds=[seed],
        progress=progress,
        callback=callback,
        report_every=report_every,
        plan=plan,
        early_stop=early_stop,
    )[0]


def fit_many(
    problems: list[Problem],
    preset: TaskPreset,
    *,
    device: torch.device,
    seeds: list[int],
    progress: bool = True,
    callback: Callable[[Progress], bool | None] | None = None,
    report_every: int = 25,
    plan: Plan = REFERENCE_PLAN,
    early_stop: EarlyStopSpec | None = None,
) -> list[Fit]:
    """Fit each problem with its own network and seed: one step for all of them on the fast backends
    (same-size problems only), one after another on the reference backend (the oracle is one DIP).

    With more than one problem the callback's Progress carries the mean loss, PSNRs and criterion and
    all N images; True from it stops every fit. With early_stop, each network stops on its own (its
    Fit: stop_reason 'early-stop', stop_iteration, the output at that point) and the step ends when all
    have stopped.
    """
    if not plan.fast:
        return [
            _run([problem], preset, device, [seed], progress, callback, report_every, plan, early_stop)[0]
            for problem, seed in zip(problems, seeds)
        ]
    return _run(problems, preset, device, seeds, progress, callback, report_every, plan, early_stop)


def _run(problems, preset, device, seeds, progress, callback, report_every, plan: Plan, early_stop) -> list[Fit]:
    start = time.perf_counter()
    # Each network's initialisation and z come from the CPU RNG, as in the original, seeded
    # without touching the caller's global RNG state.
    built, zs = fast_step.build_nets(problems, preset, seeds)
    if plan.fast:
        step = fast_step.FastStep(built, zs, problems, preset, device, seeds, report_every, plan, early_stop=early_stop)
    else:
        net = built[0].to(device)
        step = ReferenceStep(net, zs[0], problems[0], preset, device, seeds[0], report_every, early_stop)
    setup = time.perf_counter() - start
    results = [Fit(image=None, ema_image=None) for _ in problems]
    bar = tqdm(total=preset.iterations, disable=not progress, unit="it", leave=False, dynamic_ncols=True)
    loop_start = time.perf_counter()
    done = read = 0
    first_step = 0.0
    with ieee_fp32(), bar:
        try:
            for i in range(preset.iterations):
                step()
                done = i + 1
                if done == 1:  # one sync, before the loop's pace is set: the cold-start cost
                    _sync(device)
                    first_step = time.perf_counter() - start
                if done % report_every == 0 or done == preset.iterations:
                    read = done
                    if _read_back(step, results, done, start, bar, callback, plan):
                        _stopped_by(results, "callback")
                        break
                    if all(result.early_stopped for result in results):
                        break
        except KeyboardInterrupt:
            _stopped_by(results, "interrupted")
            if done > read:
                _read_back(step, results, done, start, bar, None, plan)
        loop_seconds = time.perf_counter() - loop_start
        if done == 0:
            raise KeyboardInterrupt  # interrupted before the first step finished: nothing to return
        images, detected = _outputs(step)
        for k, result in enumerate(results):
            result.first_step_seconds, result.setup_seconds = first_step, setup
            result.warmup_seconds, result.capture_seconds = step.warmup_seconds, step.capture_seconds
            result.loop_seconds = loop_seconds
            result.iterations = result.history[-1].iteration if result.early_stopped else done
            result.stop_iteration = detected[k]
            if step.early_stop is not None and step.early_stop.spec.noise_gate > 0:
                variance = float(step.early_stop.noise_variance[k])  # inf: nothing to estimate it from
                result.noise_sigma = math.sqrt(variance) if math.isfinite(variance) else None
                result.gate_opened = bool(step.early_stop.gate_open[k])
            result.image = images[k : k + 1]
            result.ema_image = step.ema[k : k + 1].clone()
    seconds = time.perf_counter() - start
    for result in results:
        result.seconds = seconds
    return results


def _stopped_by(results: list[Fit], reason: str) -> None:
    """The loop's reason for every fit still running (an early-stopped one keeps 'early-stop')."""
    for result in results:
        if not result.early_stopped:
            result.stop_reason = reason


def _outputs(step) -> tuple[torch.Tensor, list[int | None]]:
    """(N, C, H, W) each fit's result and its detected iteration: without early stopping one more
    forward with the last perturbed input (as the notebooks) and None; with it, the output the criterion
    kept at each network's detected point (the forward where it has none yet: stopped before its first
    defined value)."""
    if step.early_stop is None:
        return step.final_output(), [None] * step.out.shape[0]
    detected = step.early_stop.best_iteration.tolist()
    images = step.early_stop.best_output.clone()
    if not all(detected):
        missing = torch.tensor([t == 0 for t in detected], device=images.device).view(-1, 1, 1, 1)
        images = torch.where(missing, step.final_output(), images)
    return images, [t or None for t in detected]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_back(step, results: list[Fit], done: int, start: float, bar, callback, plan: Plan) -> bool:
    """Copy the metrics rows since the last read to the host: the loop's only sync.

    A non-finite loss stops the run here (NumericalError): no backend hands back NaN silently.
    """
    n = (done - 1) % step.metrics.shape[0] + 1
    with phase("read-back"):
        rows = step.metrics[:n].tolist()  # n x N x step_rules.METRICS
    seconds = time.perf_counter() - start
    col = step_rules.COLUMN
    for k, row in enumerate(rows):
        iteration = done - n + k + 1
        for j, values in enumerate(row):
            if results[j].early_stopped:  # frozen: its history ends at its stop
                continue
            loss = values[col["loss"]]
            if not math.isfinite(loss):
                image = f" (image {j + 1} of {len(row)})" if len(row) > 1 else ""
                raise NumericalError(
                    f"the loss became {loss} at iteration {iteration}{image} with backend={plan.backend!r}, "
                    f"precision={plan.precision!r}; rerun with precision='fp32' or backend='reference'"
                )
            psnr_, ema_psnr = _finite(values[col["psnr"]]), _finite(values[col["ema_psnr"]])
            fell_back = bool(values[col["fell_back"]])
            criterion = _finite(values[col["criterion"]])
            results[j].history.append(HistoryRow(iteration, loss, psnr_, ema_psnr, fell_back, seconds, criterion))
            if values[col["stopped"]]:
                results[j].early_stopped = True
                results[j].stop_reason = "early-stop"
    lasts = [result.history[-1] for result in results]
    loss, psnr_, ema_psnr = (_mean([getattr(r, name) for r in lasts]) for name in ("loss", "psnr", "ema_psnr"))
    criteria = [r.criterion for r in lasts if r.criterion is not None]
    criterion = sum(criteria) / len(criteria) if criteria else None
    bar.update(done - bar.n)
    postfix = {"loss": f"{loss:.3e}"}
    if psnr_ is not None:
        postfix.update(psnr=f"{psnr_:.2f}", ema=f"{ema_psnr:.2f}")
    if criterion is not None:
        postfix.update(crit=f"{criterion:.2e}")
    bar.set_postfix(postfix, refresh=False)
    if callback is None:
        return False
    info = Progress(done, loss, psnr_, ema_psnr, seconds, step.out, step.ema, criterion)
    return bool(callback(info))
