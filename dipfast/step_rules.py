"""The rules of one DIP iteration that act after the backward, written once for every step.

engine.ReferenceStep (one network) and fast_step.FastStep (N networks) both run them, in one
order, through AfterBackward.after_backward on per-network (N,)-shaped state; the reference is the
case N = 1. Every function here is tensor ops on the device with no host sync, so a step that
calls them can be captured in a CUDA graph (`apply_backtracking`'s `graph_safe=False` branch is
the one exception, for the CPU, and says so). On CUDA the fast step runs their twins in a few
Triton launches instead (dipfast.kernels.fused_rules, tested against these).

    EMA           ema = out at the first iteration, then ema * w + out * (1 - w)
    backtracking  on a checked iteration (Backtracking's period rule, counting accepted
                  iterations), loss > factor * last accepted loss restores the last accepted
                  parameters; an accepted checked iteration saves them
    metrics       one row per iteration: N x METRICS, float64, NaN where there is no target
                  (psnr, ema_psnr) or no criterion (criterion)
    freeze        with early stopping (dipfast.early_stop), a stopped network's parameters, Adam
                  moments and EMA no longer change: Freeze.save before the optimizer step,
                  Freeze.restore after it, and ema_update's `frozen` mask
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from dipfast.metrics import psnr
from dipfast.nvtx_ranges import phase
from dipfast.presets import Backtracking

# a metrics row's columns, in order; criterion: the early-stop VAR (NaN without one or before it is
# defined), stopped: 1 from the iteration the network stopped at (0 without early stopping)
METRICS = ("loss", "psnr", "ema_psnr", "fell_back", "criterion", "stopped")
COLUMN = {name: k for k, name in enumerate(METRICS)}


class Step(Protocol):
    """What engine.fit drives: one call is one iteration of N fits (ReferenceStep: N = 1)."""

    metrics: torch.Tensor  # (K, N, len(METRICS)) float64 ring buffer; iteration i writes row i % K
    out: torch.Tensor  # (N, C, H, W): the latest raw outputs
    ema: torch.Tensor  # (N, C, H, W)
    warmup_seconds: float  # the eager iterations before a CUDA graph's capture (0 where there is none)
    capture_seconds: float  # time spent capturing a CUDA graph (0 where there is none)

    def __call__(self) -> None: ...

    def final_output(self) -> torch.Tensor:
        """(N, C, H, W): one more forward with the last perturbed input, as the notebooks."""
        ...


class AfterBackward:
    """The rules after the backward, in their order, for a step that holds the state they act on.

    ReferenceStep and FastStep inherit this: out, ema, iteration, metrics, target, preset, optimizer,
    backtracking, early_stop with freeze (else no_criterion), and the step's own _held() (what Freeze
    holds) and _backtrack(losses) (apply_backtracking on its parameters).
    """

    def after_backward(self, out: torch.Tensor, losses: torch.Tensor) -> None:
        """out: (N, C, H, W) this iteration's outputs; losses: (N,) their data terms, detached."""
        stopped = None
        with phase("backtracking"), torch.no_grad():
            self.out.copy_(out)
            if self.early_stop is not None:
                self.early_stop.update(self.out, self.iteration, losses)
                stopped = self.early_stop.stopped
                self.freeze.save(self._held(), stopped)
            ema_update(self.ema, self.out, self.iteration == 0, self.preset.ema, stopped)
            if self.backtracking is not None:
                fell_back = self._backtrack(losses)
            else:
                fell_back = torch.zeros_like(losses, dtype=torch.bool)
        with phase("optimizer"):
            self.optimizer.step()
        with torch.no_grad():
            if stopped is not None:
                self.freeze.restore(self._held(), stopped)
                criterion = (self.early_stop.criterion, stopped)
            else:
                criterion = self.no_criterion
            row = metrics_row(losses, self.out, self.ema, self.target, fell_back, *criterion)
            self.metrics.index_copy_(0, (self.iteration % self.metrics.shape[0]).view(1), row[None])
            self.iteration += 1


def metrics_buffer(rows: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.full((rows, n, len(METRICS)), math.nan, dtype=torch.float64, device=device)


def metrics_row(
    losses: torch.Tensor,
    out: torch.Tensor,
    ema: torch.Tensor,
    target: torch.Tensor | None,
    fell_back: torch.Tensor,
    criterion: torch.Tensor,
    stopped: torch.Tensor,
) -> torch.Tensor:
    """(N, len(METRICS)) float64: losses (N,), out/ema/target (N, C, H, W), fell_back (N,) bool,
    criterion (N,) fp32 (NaN: none), stopped (N,) bool."""
    if target is not None:
        quality = [psnr(out, target, dim=(1, 2, 3)), psnr(ema, target, dim=(1, 2, 3))]
    else:  # NaN marks "no target"
        quality = [torch.full_like(losses, math.nan, dtype=torch.float64)] * 2
    columns = [losses.double(), *quality, fell_back.double(), criterion.double(), stopped.double()]
    return torch.stack(columns, dim=1)


def no_criterion(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """metrics_row's criterion and stopped columns for a step without early stopping: (N,) NaN, (N,) False."""
    return torch.full((n,), math.nan, device=device), torch.zeros(n, dtype=torch.bool, device=device)


def ema_update(
    ema: torch.Tensor, out: torch.Tensor, first: torch.Tensor, weight: float, frozen: torch.Tensor | None = None
) -> None:
    """ema <- out where `first` (a 0-dim bool: the first iteration), else ema * weight + out * (1 - weight);
    frozen: (N,) bool, the networks whose EMA keeps its value (stopped ones), or None."""
    new = torch.where(first, out, ema * weight + out * (1 - weight))
    if frozen is not None:
        new = torch.where(_per_network(frozen, ema), ema, new)
    ema.copy_(new)


@dataclass
class BacktrackingState:
    """Per network: the last accepted loss and the number of accepted iterations."""

    last_loss: torch.Tensor  # (N,) fp32, inf before the first accepted check
    accepted: torch.Tensor  # (N,) int64

    @classmethod
    def start(cls, n: int, device: torch.device) -> BacktrackingState:
        return cls(torch.full((n,), math.inf, device=device), torch.zeros(n, dtype=torch.int64, device=device))

    def decide(self, losses: torch.Tensor, rule: Backtracking) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep, bad), each (N,) bool, for this iteration's losses (N,); advances the state in place.

        keep: a checked iteration whose loss is accepted (save the parameters); bad: a checked
        iteration whose loss rose past factor x the last accepted one (restore them)."""
        checked = (self.accepted % rule.period == 0) == rule.on_period
        bad = checked & (losses > rule.factor * self.last_loss)
        keep = checked & ~bad
        self.last_loss.copy_(torch.where(keep, losses, self.last_loss))
        self.accepted += (~bad).long()
        return keep, bad


def apply_backtracking(
    params: list[torch.Tensor],
    saved: list[torch.Tensor],
    keep: torch.Tensor,
    bad: torch.Tensor,
    graph_safe: bool,
    copy_rows: Callable | None = None,
) -> None:
    """Save (keep) or restore (bad) each network's parameters, in place.

    params, saved: matching lists of (N, ...) tensors (a network's parameters are row n of each);
    keep, bad: (N,) bool. graph_safe: masked torch.where over every element (no host sync, what a
    CUDA graph needs); otherwise the masks are read on the host and only the rows that change are
    copied (the CPU's way: no graph to keep whole, and most iterations change nothing). copy_rows:
    a masked row copy on the device (dipfast.kernels.fused_rules.copy_rows: no host sync, and only the
    rows that change move), taken over either branch where given.
    """
    with torch.no_grad():
        if copy_rows is not None:  # one launch: keep and bad never both hold for a network
            pairs = list(zip(params, saved))
            copy_rows([(s, p, keep) for p, s in pairs] + [(p, s, bad) for p, s in pairs])
            return
        if graph_safe:
            for p, s in zip(params, saved):
                torch.where(_per_network(keep, p), p, s, out=s)  # elementwise: in place is safe
                torch.where(_per_network(bad, p), s, p, out=p)
            return
        kept, fell_back = keep.nonzero().flatten().tolist(), bad.nonzero().flatten().tolist()
        for p, s in zip(params, saved):
            for i in kept:
                s[i].copy_(p[i])
            for i in fell_back:
                p[i].copy_(s[i])


class Freeze:
    """Holds the stopped networks still: their parameters and Adam moments do not change any more.

    tensors: matching lists of (N, ...) tensors each call (the parameters, then Adam's exp_avg and
    exp_avg_sq where they exist: Adam makes them at its first step); stopped: (N,) bool.
    save(tensors, stopped) before the optimizer step (and before backtracking: it reads the values the
    last restore left), restore(tensors, stopped) after it: a stopped network's rows come back to what
    they were, so from the iteration it stops at, nothing of it changes. Adam's step count is one per
    stacked tensor, shared by the N networks; it only scales updates that a stopped network discards.
    graph_safe: masked torch.where over every element (no host sync, for a CUDA graph); otherwise the
    mask is read once in save and only the stopped networks' rows are copied (the CPU's way, as
    apply_backtracking). copy_rows: as apply_backtracking's, taken over either branch where given (none
    of a running network's rows move).
    """

    def __init__(self, graph_safe: bool, copy_rows: Callable | None = None):
        self.graph_safe = graph_safe
        self.copy_rows = copy_rows
        self.held: list[torch.Tensor] = []
        self._rows: list[int] = []

    @torch.no_grad()
    def save(self, tensors: list[torch.Tensor], stopped: torch.Tensor) -> None:
        for t in tensors[len(self.held) :]:  # the first call, and Adam's moments once they exist
            self.held.append(t.detach().clone())
        if self.copy_rows is not None:
            self.copy_rows([(h, t, stopped) for t, h in zip(tensors, self.held)])
            return
        if self.graph_safe:
            for t, h in zip(tensors, self.held):
                torch.where(_per_network(stopped, t), t, h, out=h)
            return
        self._rows = stopped.nonzero().flatten().tolist()
        for t, h in zip(tensors, self.held):
            for i in self._rows:
                h[i].copy_(t[i])

    @torch.no_grad()
    def restore(self, tensors: list[torch.Tensor], stopped: torch.Tensor) -> None:
        if self.copy_rows is not None:
            self.copy_rows([(t, h, stopped) for t, h in zip(tensors, self.held)])
            return
        if self.graph_safe:
            for t, h in zip(tensors, self.held):
                torch.where(_per_network(stopped, t), h, t, out=t)
            return
        for t, h in zip(tensors, self.held):
            for i in self._rows:
                t[i].copy_(h[i])


def adam_moments(optimizer: torch.optim.Adam, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Adam's exp_avg and exp_avg_sq of each of `params` (none before its first step), in order."""
    state = [optimizer.state.get(p, {}) for p in params]
    return [s[k] for k in ("exp_avg", "exp_avg_sq") for s in state if k in s]


def _per_network(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An (N,) mask viewed to broadcast over a stacked (N, ...) tensor."""
    return mask.view(-1, *([1] * (like.dim() - 1)))
