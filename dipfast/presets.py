"""Per-task recipes: the original notebooks' settings (notes/reference_dip.md, section 5).

Which presets belong to which task, and the default of each, is the task table's (tasks.TASKS).

A preset is a frozen dataclass; ``restore(..., **overrides)`` replaces fields with
``dataclasses.replace`` after checking their names. Values marked "ours" are not in the notes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dipfast.errors import InputError
from dipfast.nets import INPUT_KINDS, NetSpec, SkipSpec

SR_SCALES = (2, 4, 8)


@dataclass(frozen=True)
class Backtracking:
    """The notebooks' fallback: when loss > sqrt(10) x the last accepted loss (the PSNR falls by
    more than 5 dB), the last accepted parameters come back.

    It is checked on iterations i with (i % period == 0) == on_period, i counting accepted
    iterations: denoising checks when i % 100 != 0, restoration when i % 50 == 0.
    """

    period: int = 100
    on_period: bool = False
    factor: float = 10**0.5


@dataclass(frozen=True)
class TaskPreset:
    task: str
    net: NetSpec = SkipSpec()
    input: str = "noise"  # 'noise' (U[0, 0.1)), 'meshgrid' or 'guide' (the guide image is z)
    input_depth: int = 32
    reg_noise_std: float = 1.0 / 30.0  # sigma_p of the per-iteration input perturbation
    lr: float = 0.01
    iterations: int = 3000
    backtracking: Backtracking | None = None
    ema: float = 0.99
    scale: int | None = None  # SR factor

    def __post_init__(self):
        if self.input not in INPUT_KINDS:
            raise InputError(f"unknown input {self.input!r}; valid: {list(INPUT_KINDS)}")
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations <= 0:
            raise InputError(f"iterations must be a positive integer; got {self.iterations!r}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive; got {self.lr!r}")
        if not self.reg_noise_std >= 0:
            raise InputError(f"reg_noise_std must be >= 0; got {self.reg_noise_std!r}")
        if not 0 <= self.ema < 1:
            raise InputError(f"ema must be in [0, 1); got {self.ema!r}")
        if self.input_depth <= 0:
            raise InputError(f"input_depth must be positive; got {self.input_depth!r}")


DEFAULT_NET = SkipSpec()  # get_net(32, 'skip', 'reflection', 'bilinear', 128, 128, 4, 5): 2,217,831 params
NOTEBOOK_BACKTRACKING = Backtracking(period=100, on_period=False)

PRESETS: dict[str, TaskPreset] = {
    # denoising.ipynb, F16, sigma = 25 (the notebook's comment: reg_noise_std 1/20 for sigma = 50)
    "denoise": TaskPreset("denoise", backtracking=NOTEBOOK_BACKTRACKING),
    # denoising.ipynb on snail.jpg: blind JPEG-artifact removal
    "jpeg": TaskPreset(
        "jpeg",
        net=SkipSpec(
            channels_down=(8, 16, 32, 64, 128), channels_up=(8, 16, 32, 64, 128), channels_skip=(0, 0, 0, 4, 4)
        ),
        input_depth=3,
        iterations=2400,
        backtracking=NOTEBOOK_BACKTRACKING,
    ),
    # super-resolution.ipynb; x2 is ours (x4's settings)
    "sr2": TaskPreset("sr", reg_noise_std=0.03, iterations=2000, scale=2),
    "sr4": TaskPreset("sr", reg_noise_std=0.03, iterations=2000, scale=4),
    "sr8": TaskPreset("sr", reg_noise_std=0.05, iterations=4000, scale=8),
    # inpainting.ipynb, kate (Fig. 7 top)
    "inpaint": TaskPreset(
        "inpaint",
        net=SkipSpec(channels_skip=(128,) * 5, upsample_mode="nearest"),
        reg_noise_std=0.03,
        iterations=6001,
    ),
    # inpainting.ipynb, vase (Fig. 6): large holes, meshgrid input, no skips
    "inpaint-meshgrid": TaskPreset(
        "inpaint",
        net=SkipSpec(channels_skip=(0,) * 5, upsample_mode="nearest"),
        input="meshgrid",
        input_depth=2,
        reg_noise_std=0.03,
        iterations=5001,
    ),
    # inpainting.ipynb, library (Fig. 8): 'skip_depth6'
    "inpaint-deep": TaskPreset(
        "inpaint",
        net=SkipSpec(
            channels_down=(16, 32, 64, 128, 128, 128),
            channels_up=(16, 32, 64, 128, 128, 128),
            channels_skip=(0,) * 6,
            filter_size_down=5,
            upsample_mode="nearest",
            need1x1_up=False,
        ),
        input_depth=1,
        reg_noise_std=0.0,
        iterations=3001,
    ),
    # restoration.ipynb, barbara (Fig. 7 bottom): 50% of the pixels kept
    "restore": TaskPreset(
        "restore",
        reg_noise_std=0.03,
        lr=0.001,
        iterations=11000,
        backtracking=Backtracking(period=50, on_period=True),
    ),
    # restoration.ipynb, kate (supp. Fig. 14): 2% of the pixels kept
    "restore-sparse": TaskPreset(
        "restore",
        net=SkipSpec(
            channels_down=(16, 32, 64, 128, 128),
            channels_up=(16, 32, 64, 128, 128),
            channels_skip=(0,) * 5,
            downsample_mode="avg",
        ),
        reg_noise_std=0.0,
        iterations=1000,
    ),
    # enhancement: x0 + (x0 - coarse), coarse an early-stopped denoising fit; the iteration count is ours
    "enhance": TaskPreset("enhance", iterations=500, backtracking=NOTEBOOK_BACKTRACKING),
    # flash-no-flash.ipynb: the flash image is z, the no-flash image the target
    "flash": TaskPreset(
        "flash",
        net=SkipSpec(
            channels_skip=(4,) * 5,
            upsample_mode=("nearest", "nearest", "bilinear", "bilinear", "bilinear"),
        ),
        input="guide",
        input_depth=3,
        reg_noise_std=0.0,
        lr=0.1,
        iterations=601,
    ),
    # a user-given operator= or loss= with the default net and denoising's regularisation
    "custom": TaskPreset("custom"),
}


def apply_overrides(preset: TaskPreset, overrides: dict) -> TaskPreset:
    """dataclasses.replace with the field names checked: a typo is an error, never ignored."""
    valid = [f.name for f in dataclasses.fields(TaskPreset) if f.name != "task"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise InputError(f"unknown setting {unknown[0]!r}; valid: {valid}")
    return dataclasses.replace(preset, **overrides)
