"""Early stopping without ground truth, on the device, for N networks at once.

DIP's output first improves, then fits the noise. Without the clean image, the point to stop is
read from the outputs themselves: while the fit is still learning the image, successive outputs
settle, and once it starts fitting noise they begin to wander again, so their variance over time
has a minimum near the best output (Wang, Li, Zhuang, Chen, Sun, "Early stopping for deep image
prior", arXiv 2112.06074; code sun-umn/Early_Stopping_for_DIP).

Two criteria, per network k, on its outputs x_t (C, H, W), t = 1, 2, ... (the step's count):

    'wmv'  VAR(t) = mean over pixels of (1/W) sum_{s=t-W+1..t} (x_s - m_t)^2,  m_t the window's mean
           (ES-WMV: the last W outputs in a ring buffer; defined once the window is full, t >= W)
    'emv'  d = x_t - e;  e <- clip(e + a d, 0, 1);  v <- (1 - a) (v + a mean(d^2))     (ES-EMV: no buffer)
           VAR(t) = v, defined from t >= start

Both: the lowest VAR so far (lower than the minimum by a relative `threshold`) is a new minimum at t,
and the output then kept (x_t, or for 'wmv' with returns='window-mean' the window's mean m_t) is
the result; a network whose VAR has gone `patience` iterations without a new minimum is stopped,
and nothing of its state changes after that. With a `tolerance` > 0, the output kept is also
replaced at every t whose VAR is within (1 + tolerance) x the minimum so far: the latest output of
the minimum's basin, not its first. The patience still counts from the minimum itself, so the stop
does not move. Why: the fit often keeps improving for a while after VAR's lowest point (a shallow,
early minimum followed by a slow rise), and an output kept later in that basin is closer to the
best one; once VAR has left the basin, the output fits noise.

With a `noise_gate` k > 0 (denoising), no minimum counts until the fit's loss ||x_t - y||^2 / n, as a
moving average L_t = L + GATE_SMOOTHING (loss_t - L), has come down to k x sigma^2, sigma the noise
level estimated from the observation itself (dipfast.noise_level). Why: a fit cannot be fitting the
noise while it is still further from the observation than the noise is (Morozov's discrepancy
principle); DIP's best output sits at a loss of about sigma^2. On some images (a dark, smooth photo)
VAR has its lowest point early and rises slowly while the PSNR climbs for hundreds of iterations more;
the gate keeps the rule from stopping there. A network whose gate never opens runs to the bound. Only
where the data term is ||x - y||^2 itself (gate_variance: elsewhere the gate is open from the start).

The update is pure tensor ops with fixed shapes: no host sync, no branch on a value, so it runs
inside the step's CUDA graph (on CUDA the fast step runs ES-WMV's at full size as Triton kernels,
dipfast.kernels.fused_rules: the same values, three launches for some 60 small ones). The window
sums are kept in float64, so the variance Q/W - (S/W)^2 of values in [0, 1] keeps its precision
over any number of iterations (the buffer holds exactly what was added, so removing it subtracts
the same value).

Calibrated per task on the paper's images: CALIBRATED (the rule) and DEFAULT_STOP ('auto' or
'iterations', the preset's fixed count); the numbers are in bench/results/2026-12-02-cpu-early-stop/,
bench/results/2026-12-03-cpu-early-stop-robust/ and, for the noise gate with today's noise estimate,
bench/results/2026-12-03-cpu-noise-estimate/.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dipfast.errors import InputError
from dipfast.noise_level import estimate_sigma, patch_size

STOPS = ("auto", "iterations")  # restore(stop=): the criterion, or the preset's fixed count
METHODS = ("wmv", "emv")
RETURNS = ("output", "window-mean")
GATE_SMOOTHING = 0.1  # the noise gate's moving average of the loss: about the last 20 iterations


@dataclass(frozen=True)
class EarlyStopSpec:
    """The rule's settings. window: W of 'wmv'; alpha: the decay of 'emv'; patience: P; threshold: a new
    minimum must be below the old one by this fraction; start: no minimum counts before this iteration;
    downsample: the buffer holds the outputs average-pooled by this factor (memory: 1/factor^2);
    tolerance: the output kept moves on to every later one whose VAR is within (1 + tolerance) x the
    minimum (0: the minimum's own output); noise_gate: no minimum counts before the loss's moving average
    is within noise_gate x the observation's estimated noise variance (0: off)."""

    method: str = "wmv"
    window: int = 100
    patience: int = 1000
    alpha: float = 0.1
    threshold: float = 0.0
    start: int = 0
    downsample: int = 1
    returns: str = "output"
    tolerance: float = 0.0
    noise_gate: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"unknown early-stop method {self.method!r}; valid: {list(METHODS)}")
        if self.returns not in RETURNS:
            raise InputError(f"unknown early-stop returns {self.returns!r}; valid: {list(RETURNS)}")
        if self.returns == "window-mean" and self.method != "wmv":
            raise InputError("returns='window-mean' needs method='wmv' (the window); use returns='output'")
        if self.returns == "window-mean" and self.downsample != 1:
            raise InputError("returns='window-mean' needs downsample=1 (a full-size window); use returns='output'")
        for name in ("window", "patience", "downsample"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"early-stop {name} must be a positive integer; got {value!r}")
        if not isinstance(self.start, int) or isinstance(self.start, bool) or self.start < 0:
            raise InputError(f"early-stop start must be a non-negative integer; got {self.start!r}")
        if not 0 < self.alpha < 1:
            raise InputError(f"early-stop alpha must be in (0, 1); got {self.alpha!r}")
        if not 0 <= self.threshold < 1:
            raise InputError(f"early-stop threshold must be in [0, 1); got {self.threshold!r}")
        for name in ("tolerance", "noise_gate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise InputError(f"early-stop {name} must be a finite number >= 0 (0: off); got {value!r}")

    def first_valid(self) -> int:
        """The first iteration (1-based) whose VAR is defined."""
        return max(self.window if self.method == "wmv" else 1, self.start, 1)

    def validate(self, iterations: int, out_size: tuple[int, int] | None = None) -> None:
        """Raise InputError when the rule cannot act within `iterations` (the run's upper bound) or on an
        output of `out_size` (H, W)."""
        if self.method == "wmv" and self.window > iterations:
            raise InputError(
                f"the early-stop window ({self.window}) is larger than iters ({iterations}); "
                "give more iterations or a smaller window"
            )
        if self.start >= iterations:
            raise InputError(f"early-stop start ({self.start}) is not below iters ({iterations}); lower it")
        if out_size is not None and min(out_size) < self.downsample:
            raise InputError(
                f"the early-stop downsample factor {self.downsample} exceeds the output's {out_size[0]} x "
                f"{out_size[1]}; use downsample=1"
            )


# Per task, calibrated on the paper's images (the preset's net): the rule, and the task's default stop,
# 'auto' only where the rule met issue 14's quality targets. One rule serves both tasks: the mean of the
# last 100 outputs (a single output is 0.8 dB worse: the input perturbation makes each output noisy), kept
# at the latest iteration whose variance is within 1.4 x its minimum, 100 iterations of patience after the
# minimum. It meets the denoising targets on 32 x 32 crops (800 iterations) and on 64 x 64 crops (1000),
# where the minimum alone missed one image whose fit peaks long after a shallow early minimum; tolerances
# from 0.1 to 0.8 and patiences from 50 to 150 pass too (bench/results/2026-12-03-cpu-early-stop-robust/).
# Denoising adds the noise gate at 1.05 x sigma^2. Without it, one image (a dark, smooth photo) missed the 1.5 dB
# bound at 96 x 96 (1.71 dB; VAR's lowest point at iteration ~160, the PSNR's peak at 781) and another at 128 x 128
# (1.64 dB), and at sigma 15 F16 missed by 3.19 dB. With it every image is within 0.97 dB at 32, 64, 96 and
# 128 px (sigma 25) and within 1.08 dB at 64 px with sigma 50 and 15, for every patience 50-150 and tolerance
# 0-0.6. The band that holds everywhere is narrow: 1.0 misses at sigma 50, 1.1 and above at 128 px.
# JPEG runs the rule without the gate when asked (its artifacts are not white noise, the estimate finds almost
# none and the gate would never open), but its default is the fixed count: the rule met the targets on 32 x 32
# crops and missed them on 64 x 64 (worst 2.40 dB, 0.59 dB under the fixed count on average), where the fits
# still rise at 1000 iterations (bench/results/2026-12-03-cpu-early-stop-noise-gate/).
CALIBRATED_RULE = EarlyStopSpec("wmv", window=100, patience=100, returns="window-mean", tolerance=0.4)
DENOISING_RULE = dataclasses.replace(CALIBRATED_RULE, noise_gate=1.05)
CALIBRATED: dict[str, EarlyStopSpec] = {"denoise": DENOISING_RULE, "jpeg": CALIBRATED_RULE}
DEFAULT_STOP: dict[str, str] = {"denoise": "auto"}


def calibrated(task: str) -> EarlyStopSpec:
    """The task's calibrated rule (the common rule, without the noise gate, where the task has none of its own)."""
    return CALIBRATED.get(task, CALIBRATED_RULE)


def gate_variance(problems, device) -> torch.Tensor:
    """(N,) the noise gate's sigma^2 for each engine.Problem: estimated from its observation where the data term
    is ||x - y||^2 itself (Problem.observes_output) and the image has the pixels to estimate it from (RGB: 11 x 11),
    else inf (the gate open from the start)."""

    def variance(p) -> torch.Tensor:
        if p.observes_output and patch_size(*p.y.shape[-3:]) is not None:
            return estimate_sigma(p.y.to(device)).square()[0]
        return torch.tensor(math.inf, device=device)

    return torch.stack([variance(p) for p in problems]).float()


def default_stop(task: str) -> str:
    """'auto' or 'iterations' (STOPS): what restore(stop=None) means for `task`."""
    return DEFAULT_STOP.get(task, "iterations")


class EarlyStop:
    """The criterion's state for N networks whose outputs are (N, C, H, W), on `device`.

    noise_variance: (N,) each network's sigma^2 for the noise gate (gate_variance); needed when the spec has one.
    update(out, iteration, loss) once per iteration, in place; then:
        criterion       (N,) fp32: VAR of the last update, NaN before it is defined
        best_output     (N, C, H, W) fp32: the output kept at each network's minimum, or with a tolerance
                        the latest within it (zeros before one)
        best_iteration  (N,) int64: the iteration of that output (0: none yet)
        minimum_iteration (N,) int64: the iteration of the minimum, which the patience counts from
        stopped         (N,) bool: patience exceeded; the step freezes these networks
        stop_iteration  (N,) int64: the iteration at which it stopped (0: running)
        gate_open       (N,) bool: the noise gate has opened (always True without one)
    Iterations are 1-based, as the engine's history: iteration t is the output of the t-th step.
    """

    def __init__(
        self,
        spec: EarlyStopSpec,
        n: int,
        out_shape,
        device,
        dtype: torch.dtype = torch.bfloat16,
        noise_variance: torch.Tensor | None = None,
    ):
        c, h, w = out_shape
        self.spec = spec
        self.dtype = dtype
        r = spec.downsample
        small = (n, c, h // r, w // r)
        kw = {"device": device}
        self.minimum = torch.full((n,), math.inf, **kw)
        self.criterion = torch.full((n,), math.nan, **kw)
        self.best_iteration = torch.zeros(n, dtype=torch.int64, **kw)
        self.minimum_iteration = torch.zeros(n, dtype=torch.int64, **kw)
        self.best_output = torch.zeros((n, c, h, w), **kw)
        self.stopped = torch.zeros(n, dtype=torch.bool, **kw)
        self.stop_iteration = torch.zeros(n, dtype=torch.int64, **kw)
        self.gate_open = torch.full((n,), spec.noise_gate == 0, dtype=torch.bool, **kw)
        if spec.noise_gate > 0:
            if noise_variance is None or noise_variance.shape != (n,):
                raise ValueError(f"a noise-gated rule needs noise_variance of shape ({n},) (gate_variance)")
            self.noise_variance = noise_variance.to(device=device, dtype=torch.float32)
            self.gate_level = spec.noise_gate * self.noise_variance
            self.loss_average = torch.zeros(n, **kw)
        if spec.method == "wmv":
            self.buffer = torch.zeros((spec.window, *small), dtype=dtype, **kw)
            self.sum = torch.zeros(small, dtype=torch.float64, **kw)
            self.sum_squares = torch.zeros(small, dtype=torch.float64, **kw)
        else:
            self.ema = torch.zeros(small, **kw)
            self.emv = torch.zeros(n, **kw)

    @staticmethod
    def estimate_bytes(spec: EarlyStopSpec, n: int, out_shape, dtype: torch.dtype = torch.bfloat16) -> int:
        """The device memory of EarlyStop(spec, n, out_shape, ..., dtype), before it is built."""
        c, h, w = out_shape
        small = n * c * (h // spec.downsample) * (w // spec.downsample)
        full = 4 * n * c * h * w  # best_output
        if spec.method == "wmv":
            state = spec.window * small * dtype.itemsize + 2 * 8 * small
        else:
            state = 4 * small
        return full + state + 64 * n  # the (N,) vectors: at most 50 bytes per network

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    @torch.no_grad()
    def update(self, out: torch.Tensor, iteration: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        """out: (N, C, H, W) fp32, the outputs of this iteration; iteration: 0-dim int64, the number of
        steps done before this one (FastStep.iteration), so this is iteration + 1; loss: (N,) each network's
        data term of these outputs (read by the noise gate only). No host sync."""
        spec = self.spec
        t = iteration + 1
        if spec.noise_gate > 0:
            if loss is None:
                raise ValueError("a noise-gated rule reads each network's loss: update(out, iteration, loss)")
            self._gate(loss.detach().float(), t)
        small = F.avg_pool2d(out, spec.downsample) if spec.downsample > 1 else out
        if spec.method == "wmv":
            crit, kept = self._window(small, iteration)
            if spec.returns == "output":
                kept = out
        else:
            crit = self._exponential(small, t)
            kept = out
        valid = (t >= spec.first_valid()) & self.gate_open
        crit = torch.where(valid, crit, torch.full_like(crit, math.nan))
        running = ~self.stopped
        new_min = running & (crit < self.minimum * (1 - spec.threshold))  # NaN compares False
        keep = new_min
        if spec.tolerance > 0:  # a setting of the rule, not a value on the device: no sync
            keep = new_min | (running & (crit <= self.minimum * (1 + spec.tolerance)))
        self.criterion.copy_(torch.where(running, crit, self.criterion))
        self.minimum.copy_(torch.where(new_min, crit, self.minimum))
        self.minimum_iteration.copy_(torch.where(new_min, t, self.minimum_iteration))
        self.best_iteration.copy_(torch.where(keep, t, self.best_iteration))
        self.best_output.copy_(torch.where(keep.view(-1, 1, 1, 1), kept, self.best_output))
        stop = running & valid & (self.minimum_iteration > 0) & (t - self.minimum_iteration >= spec.patience)
        self.stop_iteration.copy_(torch.where(stop, t, self.stop_iteration))
        self.stopped.logical_or_(stop)

    def _gate(self, loss: torch.Tensor, t: torch.Tensor) -> None:
        """The loss's moving average, and the gate opened (for good) once it is within the gate level."""
        running = ~self.stopped
        average = torch.where(t == 1, loss, self.loss_average + GATE_SMOOTHING * (loss - self.loss_average))
        self.loss_average.copy_(torch.where(running, average, self.loss_average))
        self.gate_open.logical_or_(running & (self.loss_average <= self.gate_level))

    def _window(self, x: torch.Tensor, iteration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) VAR and (N, C, h, w) the window's mean, with x entering the ring buffer."""
        w = self.spec.window
        slot = (iteration % w).view(1)
        new = x.to(self.dtype)
        old = self.buffer.index_select(0, slot)[0].double()  # zeros until the window is full
        self.buffer.index_copy_(0, slot, new[None])
        new = new.double()
        self.sum.add_(new - old)
        self.sum_squares.add_(new.square() - old.square())
        mean = self.sum / w
        var = (self.sum_squares / w - mean.square()).clamp_min(0)
        return var.mean(dim=(1, 2, 3)).float(), mean.float()

    def _exponential(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.spec.alpha
        first = t == 1
        delta = torch.where(first, torch.zeros_like(x), x - self.ema)
        self.ema.copy_(torch.where(first, x, (self.ema + a * delta).clamp(0, 1)))
        self.emv.copy_((1 - a) * (self.emv + a * delta.square().mean(dim=(1, 2, 3))))
        return self.emv.clone()
