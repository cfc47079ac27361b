"""The fast backends' step: N independent DIPs in one step, mixed precision, compiled, graph-replayed.

The iteration is the reference's (engine.py's docstring), for N networks at once:

- The N networks' parameters are stacked (torch.func.stack_module_state: every tensor gets a
  leading axis of N) and held in one or two flat (N, P) buffers (flat_parameters.FlatParameters:
  Adam, backtracking and the bf16 cast are one op each, not one per tensor). On CUDA the
  generator runs as vmap(functional_call) over views of them: the conv batching rule makes each
  conv a grouped conv (the Triton kernels' vmap rules fold the networks into groups the same way)
  and each BatchNorm keeps per-network statistics, so the N fits are exactly N separate DIPs
  (DESIGN.md, principle 4). On a CPU, where grouped convs are slower than separate ones, the step
  runs the module once per network instead, its tensors loaded into the module's slots
  (flat_parameters.ModuleSlots; functional_call where the step is compiled).
- The loss is the sum of the N per-network losses, so each network's gradient is its own.
  Adam, the EMA and the backtracking rule are elementwise or per network (a mask over the leading
  axis), so they also act as N separate runs.
- Everything stays on the device: the iteration counter, the metrics ring buffer (K rows of
  N x [loss, psnr, ema psnr, fell back]), the EMA and the backtracking state. Nothing in the step
  reads a value back, which is what lets CUDA replay the whole step as one graph (on a CPU, where
  there is no graph, backtracking reads its two masks to copy only the networks that change).
- precision='bf16' runs the generator under autocast, the conv weights cast to bf16 once per
  step; the loss, the metrics, Adam and the master weights stay fp32.
- On CUDA, the first WARMUP iterations run eagerly on a side stream (lazy initialisation,
  compilation, cuDNN's choices), the next one is captured as one CUDA graph, and every later
  iteration replays it (PyTorch's "whole-network capture" recipe). The noise generators are
  registered with the graph, so each replay draws fresh noise.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from dipfast import native, nets
from dipfast.backends import Plan
from dipfast.errors import InputError
from dipfast.flat_parameters import FlatParameters, ModuleSlots
from dipfast.metrics import psnr
from dipfast.native import philox
from dipfast.nets.blocks import use_block_ops
from dipfast.nets.layers import centre_crop
from dipfast.presets import TaskPreset

WARMUP = 3  # eager iterations before a CUDA graph capture
RECOMPILE_LIMIT = 64
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dipfast" / "inductor"


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """A stacked (N, A, C, H, W) tensor whose (A, C, H, W) slices are channels_last; others as they are."""
    if t.dim() != 5:
        return t
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor viewed with its dimensions in memory order: a contiguous view of its storage."""
    return t.permute(*sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def _per_network(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An (N,) mask viewed to broadcast over a stacked (N, ...) tensor."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


class FastStep:
    """N fits of one preset on same-size problems, as one step; the interface of engine.ReferenceStep."""

    def __init__(
        self, nets_, zs, problems, preset: TaskPreset, device, seeds, report_every: int, plan: Plan, vectorised=None
    ):
        self.n = len(nets_)
        self.problems, self.preset, self.plan, self.device = problems, preset, plan, device
        self.out_size = problems[0].out_size
        if any(p.loss is not None for p in problems) and self.n > 1:
            raise InputError("a custom loss= runs one image at a time; give one image, or an operator= instead")

        params, buffers = stack_module_state(list(nets_))
        # vmap turns the N networks' convs into grouped convs: one launch each on a GPU, but slower
        # than N separate convs on a CPU (measured 0.34x at 128 px), where the step loops instead
        self.vectorised = self.n > 1 and (device.type == "cuda" if vectorised is None else vectorised)
        self.channels_last = plan.channels_last and not self.vectorised  # grouped convs stay NCHW
        layout = _channels_last if self.channels_last else lambda t: t
        cast = torch.bfloat16 if plan.precision == "bf16" else None  # autocast's, done once per step
        self.flat = FlatParameters(params, nets_[0], device, cast, self.channels_last)
        self.params = self.flat.params  # {name: (N, ...)} fp32 views of the buffers Adam updates
        self.buffers = {k: v.to(device) for k, v in buffers.items()}
        self.module = use_block_ops(nets_[0].to(device), plan.block_ops(device))  # the structure; weights come in
        # eager: the module's own tensor slots take each step's parameters (it is this step's alone)
        self.slots = None if plan.compile else ModuleSlots(self.module)
        generate = self._generate_many if self.vectorised else self._generate_each
        if plan.compile:
            # Dynamo keys its cache on the code object, so every fit of a process (a benchmark runs
            # dozens, with other precisions and sizes) adds variants of these two functions.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            # Inductor's artifacts outlive the process (and /tmp, its default) so a second run starts warm
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR))
            generate = torch.compile(generate, dynamic=False)
        self.generate = generate

        self.z = layout(torch.stack([z.to(device) for z in zs]))  # (N, 1, D, H', W')
        self.noise = torch.empty_like(self.z)  # z's layout: z + noise is one vectorised pass (mixed: 15x slower)
        self.net_input = self.z.clone()
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.seeds = list(seeds)
        self.philox = plan.backend == "native" and device.type == "cpu" and native.enabled()
        self.y = [p.y.to(device) if p.y is not None else None for p in problems]
        targets = [p.target for p in problems]
        self.target = torch.cat(targets).to(device) if all(t is not None for t in targets) else None

        kind = {"fused": True} if plan.fused_adam else {"foreach": True}
        self.optimizer = torch.optim.Adam(self.flat.buffers, lr=preset.lr, capturable=plan.cuda_graph, **kind)
        self.iteration = torch.zeros((), dtype=torch.int64, device=device)
        n_out = (self.n, problems[0].n_channels, *self.out_size)
        self.out = torch.zeros(n_out, device=device)
        self.ema = torch.zeros(n_out, device=device)
        self.metrics = torch.full((report_every, self.n, 4), math.nan, dtype=torch.float64, device=device)
        self.backtracking = preset.backtracking
        if self.backtracking is not None:
            self.saved = [b.detach().clone() for b in self.flat.buffers]
            self.last_loss = torch.full((self.n,), math.inf, device=device)
            self.accepted = torch.zeros(self.n, dtype=torch.int64, device=device)
        self.calls = 0
        self.capture_seconds = 0.0
        self.graph = None
        self.captures = 0  # CUDA graph captures: one per fit, or something re-records

    # -- the generator ---------------------------------------------------------------------------
    def _generate_each(self, flat, buffers, z):
        outs = []
        for i, params in enumerate(self.flat.per_network(flat)):
            one = params, {k: v[i] for k, v in buffers.items()}
            if self.slots is None:
                outs.append(functional_call(self.module, one, (z[i],)))
            else:
                self.slots.load(*one)
                outs.append(self.module(z[i]))
        return torch.stack(outs)

    def _generate_many(self, flat, buffers, z):
        params = self.flat.stacked(flat)
        return vmap(lambda p, b, x: functional_call(self.module, (p, b), (x,)))(params, buffers, z)

    def _forward(self) -> torch.Tensor:
        """(N, C, H, W) fp32: the cropped outputs for the current net_input."""
        with self.plan.autocast(self.device):
            out = self.generate(self.flat.buffers, self.buffers, self.net_input)
        return centre_crop(out[:, 0].float(), self.out_size)

    # -- one iteration ---------------------------------------------------------------------------
    def _losses(self, out: torch.Tensor) -> torch.Tensor:
        """(N,): each network's data term (engine.Problem.data_term: the custom loss of a single problem,
        or the MSE of the operator's output against the observation)."""
        terms = [p.data_term(out[i : i + 1], y) for i, (p, y) in enumerate(zip(self.problems, self.y))]
        return torch.stack(terms)

    def _step(self) -> None:
        if self.preset.reg_noise_std > 0:
            self._draw_noise()
            torch.add(self.z, self.noise, out=self.net_input)  # z + (n * std), the reference's rounding
        out = self._forward()
        losses = self._losses(out)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        with torch.no_grad():
            out = out.detach()
            self.out.copy_(out)
            w = self.preset.ema
            self.ema.copy_(torch.where(self.iteration == 0, out, self.ema * w + out * (1 - w)))
            fell_back = self._backtrack(losses.detach()) if self.backtracking is not None else None
        self.optimizer.step()
        with torch.no_grad():
            self._record(losses.detach(), fell_back)
            self.iteration += 1

    def _draw_noise(self) -> None:
        """Each network's N(0, 1) draw times reg_noise_std: its own seeded generator, or on the native
        backend's CPU path the counter-based Philox draw keyed by (seed, iteration), 3-4x faster."""
        std = self.preset.reg_noise_std
        if self.philox:
            for noise, seed in zip(self.noise, self.seeds):
                # drawn in memory order (i.i.d. values in any order), so Philox fills the buffer in place
                philox.normal_(_memory_order(noise), seed, self.iteration, std=std)  # 0 + std * n rounds as n * std
            return
        for noise, generator in zip(self.noise, self.generators):
            noise.normal_(generator=generator).mul_(std)

    def _backtrack(self, losses: torch.Tensor) -> torch.Tensor:
        """engine.ReferenceStep._backtrack for each network: a mask over the stacked axis."""
        bt = self.backtracking
        checked = (self.accepted % bt.period == 0) == bt.on_period
        bad = checked & (losses > bt.factor * self.last_loss)
        keep = checked & ~bad
        if self.device.type == "cpu":  # no graph to keep whole: read the masks, copy only what changes
            kept, fell_back = keep.nonzero().flatten().tolist(), bad.nonzero().flatten().tolist()
            for p, saved in zip(self.flat.buffers, self.saved):
                for i in kept:
                    saved[i].copy_(p[i])
                for i in fell_back:
                    p[i].copy_(saved[i])
        else:
            for p, saved in zip(self.flat.buffers, self.saved):
                torch.where(_per_network(keep, p), p, saved, out=saved)  # elementwise: in place is safe
                torch.where(_per_network(bad, p), saved, p, out=p)
        self.last_loss.copy_(torch.where(keep, losses, self.last_loss))
        self.accepted += (~bad).long()
        return bad

    def _record(self, losses: torch.Tensor, fell_back: torch.Tensor | None) -> None:
        nan = torch.full_like(losses, math.nan, dtype=torch.float64)
        if self.target is not None:
            quality = [psnr(self.out, self.target, dim=(1, 2, 3)), psnr(self.ema, self.target, dim=(1, 2, 3))]
        else:  # NaN marks "no target" in the buffer
            quality = [nan, nan]
        flags = fell_back.double() if fell_back is not None else torch.zeros_like(nan)
        row = torch.stack([losses.double(), *quality, flags], dim=1)  # (N, 4)
        self.metrics.index_copy_(0, (self.iteration % self.metrics.shape[0]).view(1), row[None])

    def __call__(self, row: int) -> None:
        """One iteration (`row` is implied by the device counter; kept for engine.fit's loop)."""
        self.calls += 1
        if not self.plan.cuda_graph:
            self._step()
        elif self.calls <= WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        self.graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            self.graph.register_generator_state(generator)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self._step()
        self.captures += 1
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start

    def final_output(self) -> torch.Tensor:
        # with grad mode on, as in the step: a no_grad call would be one more compiled variant
        return self._forward().detach()


def build_nets(problems, preset: TaskPreset, seeds) -> tuple[list[nn.Module], list[torch.Tensor]]:
    """Each fit's network and z from its own seed, exactly as engine.fit makes them for one fit."""
    built, zs = [], []
    for problem, seed in zip(problems, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built.append(nets.build(preset.net, problem.input_shape[0], problem.n_channels))
            zs.append(problem.z if problem.z is not None else nets.noise_input(*problem.input_shape))
    return built, zs
