"""The fast backends' step: N independent DIPs in one step, mixed precision, compiled, graph-replayed.

The iteration is the reference's (engine.py's docstring), for N networks at once; its parts:

- generator_runner.GeneratorRunner: the N networks' forward from flat stacked parameters,
  vectorised (grouped convs, the GPU's way) or one network at a time (the CPU's), compiled or not;
- input_noise.InputNoise: each network's per-iteration input perturbation;
- step_rules: the EMA, the backtracking rule and the metrics row, shared with the reference step;
- cuda_graph.GraphedStep: on CUDA, a few eager warm-up iterations, then one capture, then replays.

The loss is the sum of the N per-network losses, so each network's gradient is its own. Adam, the
EMA and the backtracking rule are elementwise or per network (a mask over the leading axis), so
they also act as N separate runs. Everything stays on the device: the iteration counter, the
metrics ring buffer, the EMA and the backtracking state. Nothing in the step reads a value back,
which is what lets CUDA replay it as one graph (on a CPU, where there is no graph, backtracking
reads its two masks to copy only the networks that change: step_rules.apply_backtracking).
precision='bf16' runs the generator under autocast; the loss, the metrics, Adam and the master
weights stay fp32.

With early stopping (early_stop.EarlyStop, stop='auto'), the criterion reads each iteration's outputs
inside the step, and a network that has stopped is held still (step_rules.Freeze and the EMA's mask):
each network stops on its own, and the others run on.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn

from dipfast import nets, step_rules
from dipfast.backends import Plan
from dipfast.cuda_graph import GraphedStep
from dipfast.early_stop import EarlyStop, EarlyStopSpec, gate_variance
from dipfast.errors import InputError
from dipfast.generator_runner import GeneratorRunner
from dipfast.input_noise import InputNoise
from dipfast.nvtx_ranges import phase
from dipfast.operators import Lanczos2Decimation
from dipfast.presets import TaskPreset


class FastStep(step_rules.AfterBackward):
    """N fits of one preset on same-size problems, as one step (step_rules.Step).

    vectorised: run the N networks with vmap when N > 1 (default: where the plan says, CUDA). graph_safe:
    backtracking and the freeze of stopped networks without host reads (default: where the step is graph-captured).
    fused_rules: the rules after the backward, early stopping's update included where it is ES-WMV on
    full-size outputs (the calibrated rules), in 3 to 7 Triton launches (dipfast.kernels.fused_rules;
    default: where the plan says, CUDA). All three are parameters so the CPU can test the GPU's branches.
    early_stop: the rule of stop='auto' (None: the preset's fixed count, and nothing of early stopping in
    the step).
    """

    def __init__(
        self,
        networks: list[nn.Module],
        zs: list[torch.Tensor],
        problems,
        preset: TaskPreset,
        device: torch.device,
        seeds: list[int],
        report_every: int,
        plan: Plan,
        vectorised: bool | None = None,
        graph_safe: bool | None = None,
        fused_rules: bool | None = None,
        early_stop: EarlyStopSpec | None = None,
    ):
        self.n = len(networks)
        self.problems, self.preset, self.plan, self.device = problems, preset, plan, device
        if any(p.loss is not None for p in problems) and self.n > 1:
            raise InputError("a custom loss= runs one image at a time; give one image, or an operator= instead")
        if vectorised is None:
            vectorised = plan.vectorised(device)
        self.runner = GeneratorRunner(networks, problems[0].out_size, plan, device, vectorised and self.n > 1)
        self.flat = self.runner.flat
        self.graph_safe = plan.cuda_graph if graph_safe is None else graph_safe

        self.z = self.runner.layout(torch.stack([z.to(device) for z in zs]))  # (N, 1, D, H', W')
        self.noise = torch.empty_like(self.z)  # z's layout: z + noise is one vectorised pass
        # the generator's input in the dtype its convs read it in: under bf16 autocast each conv that reads it casts
        # it (the default net's skip and down convs of level 0: two full-size casts an iteration); cast once here
        # instead, into the sum z + noise itself: the same bf16 values (the sum rounds to fp32, then to bf16)
        convolved = plan.precision == "bf16" and nets.input_only_convolved(preset.net)
        self.net_input = self.z.to(torch.bfloat16 if convolved else self.z.dtype, copy=True)
        self.input_noise = InputNoise(plan.noise(device), seeds, device)
        self.y = [p.y.to(device) if p.y is not None else None for p in problems]
        self.lanczos2_mse = None  # the fused decimation + MSE, where the plan runs the Triton kernels
        if plan.fused_loss(device):
            from dipfast.kernels import lanczos2_mse

            self.lanczos2_mse = lanczos2_mse
        targets = [p.target for p in problems]
        # in float64 once: the metrics' PSNRs (metrics.psnr) would cast it twice every iteration
        self.target = torch.cat(targets).to(device, torch.float64) if all(t is not None for t in targets) else None

        kind = {"fused": True} if plan.fused_adam else {"foreach": True}
        self.optimizer = torch.optim.Adam(self.flat.buffers, lr=preset.lr, capturable=plan.cuda_graph, **kind)
        self.iteration = torch.zeros((), dtype=torch.int64, device=device)
        n_out = (self.n, problems[0].n_channels, *problems[0].out_size)
        self.out = torch.zeros(n_out, device=device)
        self.ema = torch.zeros(n_out, device=device)
        self.metrics = step_rules.metrics_buffer(report_every, self.n, device)
        self.backtracking = preset.backtracking
        if self.backtracking is not None:
            self.saved = [b.detach().clone() for b in self.flat.buffers]
            self.backtracking_state = step_rules.BacktrackingState.start(self.n, device)
        self.early_stop = None
        if early_stop is not None:
            noise = gate_variance(problems, device) if early_stop.noise_gate > 0 else None
            self.early_stop = EarlyStop(early_stop, self.n, n_out[1:], device, noise_variance=noise)
        else:
            self.no_criterion = step_rules.no_criterion(self.n, device)
        self.fused = None
        if plan.fused_rules(device) if fused_rules is None else fused_rules:
            from dipfast.kernels import fused_rules as rules

            if self.early_stop is None or rules.takes(self.early_stop):
                self.fused = rules.FusedRules(self.n, self.out[0].numel(), device)
        # how the step's Triton kernels launch, where the plan says: as programmatic dependent launches, the BatchNorm
        # finalize folded into the last program (eager calls, the warm-up and the capture alike; the backward's kernels
        # too, launched while step() waits in backward())
        self.launch_switches = []
        if plan.dependent_launch(device):
            from dipfast.kernels.dependent_launch import dependent_launches

            self.launch_switches.append(dependent_launches)
        if plan.folded_finalize(device):
            from dipfast.kernels.channel_sums import folded_finalize

            self.launch_switches.append(folded_finalize)
        # the fused step's masked copies move only the rows that change, without a host read
        self.copy_rows = self.fused.copy_rows if self.fused is not None else None
        if self.early_stop is not None:
            self.freeze = step_rules.Freeze(self.graph_safe, self.copy_rows)
        # a cold process compiles the step's Triton kernels side by side before its first call, where the plan says
        self.compile_first = self._compile_kernels if plan.parallel_compile(device) else None
        self.graphed = None
        if plan.cuda_graph:
            # The graph calls back into this step through weak references: strong ones would make the step and its
            # graph a reference cycle, which outlives the fit (and with it the graph's memory pool, a whole step's
            # activations, and every state tensor) until a full garbage collection: a tiled restore, which sizes
            # its chunks of tiles to the free memory, would find it taken by the chunks before.
            zero_grad = functools.partial(self.optimizer.zero_grad, set_to_none=True)  # grads from the graph's pool
            first = _weakly(self.compile_first) if self.compile_first is not None else None
            self.graphed = GraphedStep(_weakly(self._step), device, self.input_noise.generators, zero_grad, first)
            self.compile_first = None  # the graph's first warm-up call runs it (its time is the warm-up's)

    @property
    def warmup_seconds(self) -> float:
        return self.graphed.warmup_seconds if self.graphed is not None else 0.0

    @property
    def capture_seconds(self) -> float:
        return self.graphed.capture_seconds if self.graphed is not None else 0.0

    def __call__(self) -> None:
        if self.compile_first is not None:
            compile_first, self.compile_first = self.compile_first, None
            compile_first()
        if self.graphed is not None:
            self.graphed()
        else:
            self._step()

    def _launch_switches(self) -> contextlib.ExitStack:
        """How the step's Triton kernels launch (self.launch_switches), entered."""
        switches = contextlib.ExitStack()
        for switch in self.launch_switches:
            switches.enter_context(switch(True))
        return switches

    def _compile_kernels(self) -> None:
        """The generator's forward and backward once, each Triton launch compiling its kernel side by side with the
        others instead of running (dipfast.kernels.parallel_compile), with the step's launch switches: the first
        step's launches find them compiled. Their outputs are never written, so nothing of this call is kept: no
        noise is drawn, no parameter moves, the gradients are dropped and the buffers (the reference blocks'
        BatchNorm running statistics) put back. The rules after the backward compile at their first launch."""
        from dipfast.kernels.parallel_compile import compiling_in_parallel

        buffers = {name: b.clone() for name, b in self.runner.buffers.items()}
        with self._launch_switches(), compiling_in_parallel(), self.plan.step_math():
            self._losses(self.runner(self.net_input)).sum().backward()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in self.runner.buffers.items():
                b.copy_(buffers[name])

    def _losses(self, out: torch.Tensor) -> torch.Tensor:
        """(N,): each network's data term (engine.Problem.data_term: the custom loss of a single problem,
        or the MSE of the operator's output against the observation; the SR one fused where the plan says)."""
        # each network's (1, C, H, W): split's backward is one cat, where out[i : i + 1]'s zero-filled all of out for
        # each network; one network takes out itself
        pieces = (out,) if self.n == 1 else out.split(1)
        losses = [self._data_term(p, piece, y) for p, piece, y in zip(self.problems, pieces, self.y)]
        return losses[0][None] if self.n == 1 else torch.stack(losses)

    def _data_term(self, problem, out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.lanczos2_mse is not None and isinstance(problem.operator, Lanczos2Decimation):
            return self.lanczos2_mse(out, y, problem.operator.factor)
        return problem.data_term(out, y)

    def _step(self) -> None:
        with self._launch_switches():
            if self.preset.reg_noise_std > 0:
                self.input_noise.draw_(self.noise, self.iteration, self.preset.reg_noise_std)
                torch.add(self.z, self.noise, out=self.net_input)  # z + (n * std), the reference's rounding
            with self.plan.step_math():
                out = self.runner(self.net_input)
                losses = self._losses(out)
                self.optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()
            self.after_backward(out, losses.detach())

    def after_backward(self, out: torch.Tensor, losses: torch.Tensor) -> None:
        """step_rules.AfterBackward's rules, fused where self.fused is set: out's copy, the early-stop window, the EMA
        and the PSNRs' sums in passes over the outputs, the criterion's decisions, then backtracking's, the metrics
        row and the iteration count in one program each; the row before the optimizer step (it reads nothing the
        step changes)."""
        if self.fused is None:
            return super().after_backward(out, losses)
        es = self.early_stop
        with phase("backtracking"), torch.no_grad():
            self.fused.outputs(out, self.out, self.ema, self.target, self.iteration, self.preset.ema, es, losses)
            if es is not None:
                self.freeze.save(self._held(), es.stopped)
            criterion = (es.criterion, es.stopped) if es is not None else self.no_criterion
            state = self.backtracking_state if self.backtracking is not None else None
            has_target = self.target is not None
            decision = self.fused.record(
                losses, has_target, state, self.backtracking, *criterion, self.metrics, self.iteration
            )  # fmt: skip
            if decision is not None:
                step_rules.apply_backtracking(self.flat.buffers, self.saved, *decision, self.graph_safe, self.copy_rows)
        with phase("optimizer"):
            self.optimizer.step()
        if es is not None:
            self.freeze.restore(self._held(), es.stopped)

    def _held(self) -> list[torch.Tensor]:
        """What a stopped network keeps still: its parameters and Adam moments, (N, ...) each."""
        return [*self.flat.buffers, *step_rules.adam_moments(self.optimizer, self.flat.buffers)]

    def _backtrack(self, losses: torch.Tensor) -> torch.Tensor:
        """The notebook's rule for each network (step_rules); returns `bad`, (N,) bool."""
        keep, bad = self.backtracking_state.decide(losses, self.backtracking)
        step_rules.apply_backtracking(self.flat.buffers, self.saved, keep, bad, self.graph_safe, self.copy_rows)
        return bad

    def final_output(self) -> torch.Tensor:
        """The generator's output once the loop is over. The CUDA graph goes first: its pool would stay beside this
        forward's memory, which the memory estimate does not count twice. A compiled generator runs with grad mode on,
        as in the step (grad mode is one of its guards: no_grad would compile one more variant); an eager one saves
        nothing for a backward that never comes."""
        if self.graphed is not None:
            self.graphed.release()
        grad_mode = torch.enable_grad() if self.plan.compile else torch.no_grad()
        with grad_mode, self.plan.step_math():
            return self.runner(self.net_input).detach()


def _weakly(method) -> Callable[[], None]:
    """A call of `method` through a weak reference to its object (which owns whatever holds the call)."""
    ref = weakref.WeakMethod(method)
    return lambda: ref()()


def build_nets(problems, preset: TaskPreset, seeds) -> tuple[list[nn.Module], list[torch.Tensor]]:
    """Each fit's network and z from its own seed, exactly as engine.fit makes them for one fit."""
    built, zs = [], []
    for problem, seed in zip(problems, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built.append(nets.build(preset.net, problem.input_shape[0], problem.n_channels))
            zs.append(problem.z if problem.z is not None else nets.noise_input(*problem.input_shape))
    return built, zs
