"""The tasks restore() knows, one entry each: presets, inputs, forward operator, post-processing.

A task adds one entry to TASKS (and its recipe to presets.PRESETS): restore() validates the inputs
the entry names, fits ||A(x) - y||^2 with the entry's operator and observation, and hands back the
entry's post-processed outputs. The generator input kind (noise, meshgrid, the guide image) is the
preset's; a task whose presets take the guide as z names 'guide' among its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dipfast.errors import InputError, InputTypeError
from dipfast.operators import Identity, Lanczos2Decimation, Mask
from dipfast.presets import PRESETS, SR_SCALES, TaskPreset

IMAGE_INPUTS = ("mask", "guide")  # the image-like inputs a task can need besides the image


@dataclass(frozen=True)
class Observation:
    """What the operator is built from: the image (C, h, w) in [0, 1], the loaded inputs, the scale."""

    image: torch.Tensor
    mask: torch.Tensor | None  # (1 or C, h, w) {0, 1}: nonzero = known pixel
    scale: int  # output size / image size
    device: torch.device


Operator = Callable[[torch.Tensor], torch.Tensor]
# finish(out, ema, image) -> (out, ema, extras): outputs (C, H, W) on the CPU, extras' tensors are images
Finish = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]


def _identity(obs: Observation) -> tuple[Operator, torch.Tensor]:
    return Identity().A, obs.image


def _masked(obs: Observation) -> tuple[Operator, torch.Tensor]:
    # the notebooks' MSE(out * m, img * m): the holes add nothing to the loss
    return Mask(obs.mask.to(obs.device)).A, obs.image * obs.mask


def _decimated(obs: Observation) -> tuple[Operator, torch.Tensor]:
    # the operator object itself, so that a step with the fused kernels recognises it (fast_step.FastStep)
    return Lanczos2Decimation(obs.scale), obs.image


def _enhance(out: torch.Tensor, ema: torch.Tensor, image: torch.Tensor):
    """x0 + (x0 - coarse): the early-stopped fit is the coarse layer."""
    return (2 * image - out).clamp(0, 1), (2 * image - ema).clamp(0, 1), {"coarse": out}


@dataclass(frozen=True)
class Task:
    name: str
    presets: tuple[str, ...]  # the presets made for it, the default first ('sr': the one for the scale)
    observe: Callable[[Observation], tuple[Operator, torch.Tensor]]  # (A, y): the operator and what it fits
    inputs: tuple[str, ...] = ()  # of IMAGE_INPUTS, each required
    scale: str = "none"  # 'none'; 'preset': the preset's SR factor (scale= picks it); 'any': an operator's
    finish: Finish | None = None  # post-processing of the fitted outputs

    def factor(self, preset: TaskPreset, scale: int | None = None) -> int:
        """The output's side over the image's: the preset's SR factor, a custom operator's scale=, else 1."""
        return preset.scale if self.scale == "preset" else scale if self.scale == "any" and scale else 1


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("denoise", ("denoise",), _identity),
        Task("jpeg", ("jpeg",), _identity),
        Task("sr", tuple(f"sr{s}" for s in SR_SCALES), _decimated, scale="preset"),
        Task("inpaint", ("inpaint", "inpaint-meshgrid", "inpaint-deep"), _masked, inputs=("mask",)),
        Task("restore", ("restore", "restore-sparse"), _masked, inputs=("mask",)),
        Task("enhance", ("enhance",), _identity, finish=_enhance),
        Task("flash", ("flash",), _identity, inputs=("guide",)),
        # a user-given operator= or loss= (restore() substitutes it for the identity)
        Task("custom", ("custom",), _identity, scale="any"),
    )
}


def task_named(name) -> Task:
    if not isinstance(name, str):
        raise InputTypeError(f"task must be a string; got {type(name).__name__}")
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; valid: {list(TASKS)}")
    return TASKS[name]


def preset_for(task: str, preset: str | None = None, scale: int | None = None) -> TaskPreset:
    """The preset named `preset`, or the task's default one (for 'sr', the one for `scale`)."""
    entry = task_named(task)
    if preset is None:
        if entry.scale == "preset":
            if scale not in SR_SCALES or isinstance(scale, bool):
                raise InputError(
                    f"task {task!r} needs scale= one of {list(SR_SCALES)} (--scale on the command); got {scale!r}"
                )
            preset = f"{task}{scale}"
        else:
            preset = entry.presets[0]
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; valid: {sorted(PRESETS)}")
    chosen = PRESETS[preset]
    if chosen.task != task and task != "custom":
        raise InputError(f"preset {preset!r} is for task {chosen.task!r}, not {task!r}")
    return chosen


def tasks_taking(input_name: str) -> list[str]:
    return [t.name for t in TASKS.values() if input_name in t.inputs]
