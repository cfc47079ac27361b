"""The native step as CUDA runs it, built on the CPU for the interpreter's instruments (_memory_bounds.py,
_program_order.py): the padded BatchNorm kernels, the upsample's gathers, the fused rules with early stopping, the
networks vmapped into groups, at odd sizes, so that the reductions' last programs have rows to spare."""

import contextlib
import dataclasses

import torch
from _helpers import TINY_PRESET

from dipfast import backends, engine, fast_step
from dipfast.early_stop import EarlyStopSpec
from dipfast.kernels import configs
from dipfast.operators import Lanczos2Decimation

CPU = torch.device("cpu")


def problems_at_odd_sizes(n: int = 2, sr: bool = False) -> list[engine.Problem]:
    """Denoising at 9 x 7: odd, so that the reductions' last programs have rows to spare. sr: super-resolution x4
    of 5 x 3 to 20 x 12 (the Lanczos2 decimation's loss)."""
    rng = torch.Generator().manual_seed(0)
    (h, w), scale = ((20, 12), 4) if sr else ((9, 7), 1)

    def problem() -> engine.Problem:
        y = torch.rand(1, 3, h // scale, w // scale, generator=rng)
        if sr:
            return engine.Problem((4, h, w), None, (h, w), 3, y=y, operator=Lanczos2Decimation(scale))
        return engine.Problem((4, h, w), None, (h, w), 3, y=y, target=torch.rand(1, 3, h, w, generator=rng))

    return [problem() for _ in range(n)]


def gpu_tiles(as_on_a_gpu: bool):
    """The tiles a GPU runs (configs.HOPPER) forced over the interpreter's, or the interpreter's."""
    return configs.forced_tiles(configs.HOPPER) if as_on_a_gpu else contextlib.nullcontext()


@contextlib.contextmanager
def native_cuda_steps(n: int, *, folded: bool = False, as_captured: bool = False):
    """Within the block, make() builds a fresh native bf16 step of n networks (seeds 1..n) with CUDA's choices (the
    padded blocks, the fused rules, vmapped networks, as the table has them) and early stopping (a window of 2);
    folded: each BatchNorm's finalize in its reduction's last program, or not, whatever the table says; as_captured:
    the tiles a GPU runs and the captured step's graph-safe branches."""
    choices = {**backends.cuda_choices_on_cpu("native"), "folded_finalize": frozenset({"cpu"} if folded else ())}
    preset = dataclasses.replace(TINY_PRESET, iterations=4)
    seeds = list(range(1, n + 1))

    def make() -> fast_step.FastStep:
        plan = backends.resolve("native", "bf16", CPU)  # CUDA's auto
        problems = problems_at_odd_sizes(n)
        built, zs = fast_step.build_nets(problems, preset, seeds)
        step = fast_step.FastStep(built, zs, problems, preset, CPU, seeds, 2, plan, graph_safe=as_captured,
                                  early_stop=EarlyStopSpec(window=2, patience=2))  # fmt: skip
        assert step.fused is not None and step.runner.vectorised
        return step

    with gpu_tiles(as_captured), backends.variant("native", **choices):
        yield make
