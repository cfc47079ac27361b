"""The original notebooks' loop, re-implemented as the baseline that every speed-up is measured against.

notes/reference_dip.md, sections 5 and 6: utils.optimize('adam') runs ``zero_grad(); closure();
step()`` and the closure does, every iteration, in eager fp32 with cudnn.benchmark on:

    denoising    z + sigma_p eps -> net -> EMA -> MSE -> backward; three `.cpu().numpy()` copies
                 and three float64 PSNRs on the CPU (noisy, GT, EMA vs GT); `loss.item()` in a
                 print; backtracking on 99 of 100 iterations: a fall-back (PSNR vs the noisy image
                 more than 5 dB below the last accepted one) copies the 112 saved CPU tensors back,
                 otherwise the 112 parameters are copied to the CPU (`last_net`)
    SR           Lanczos2 downsampler (the original's dense 3 -> 3 conv, trainable but outside the
                 optimizer, so its grads accumulate); two copies, PSNR_LR and PSNR_HR on the CPU
    restoration  `loss.item()`, two copies, masked and GT PSNRs on the CPU; backtracking on the
                 masked PSNR every 50 accepted iterations (when i % 50 == 0), 112 copies there
    inpainting   `loss.item()` in a print; the notebook has no PSNR (see `track_target`)

The network, z, the noise generator and the seeds are made exactly as dipfast.engine.fit does,
from dipfast.nets, so the same seed gives the reference engine's trajectory (the same maths;
tests/bench/test_original_loop.py checks it): on the CPU the same outputs bit for bit for denoising,
restoration and inpainting (the PSNRs differ below 1e-6 dB: skimage subtracts in float32, the
engine in float64). For SR the notebook's dense Lanczos conv sums in another order than the
reference's depthwise one, and Adam's nearly sign-like first steps amplify that rounding: the
trajectories part by up to about 1 dB within 20 iterations on the default net
(sr_downsampler='depthwise' gives the reference's trajectory). On CUDA, cudnn.benchmark (on
here, off in the reference) may pick other convolution algorithms, with the same effect on
every task.

Differences from the notebooks, none of which changes the maths: the plots every 100 iterations
are left out (they time matplotlib, not the loop); prints go to os.devnull instead of a notebook
cell; the input-noise draw uses a seeded generator on the device instead of the unseeded global
CUDA RNG; the output is centre-cropped when the net's working size exceeds the image (the notebooks
crop their images to sizes that fit).

Convolutions are IEEE fp32 (TF32 off), as pytorch 0.4 ran them: the paper's loop. With tf32=True
they run as today's PyTorch runs the same notebook code by default (torch.backends.cudnn.allow_tf32
is True, so cuDNN convolutions round their inputs to TF32 on Ampere and later; a CPU has no TF32 and
computes IEEE fp32): the baseline a user of the original code sees now. cudnn.benchmark is on in
both, as every notebook sets it.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio

from dipfast import nets
from dipfast.backends import conv_precision
from dipfast.engine import HistoryRow
from dipfast.nets.layers import LanczosDownsampler
from dipfast.nvtx_ranges import phase
from dipfast.operators import Lanczos2Decimation
from dipfast.presets import TaskPreset

TASKS = ("denoise", "jpeg", "enhance", "sr", "restore", "inpaint")
PRINTS = {  # what each notebook prints every iteration (formatted even though it goes to os.devnull)
    "denoise": "Iteration %05d    Loss %f   PSNR_noisy: %f   PSRN_gt: %f PSNR_gt_sm: %f",
    "sr": "Iteration %05d    PSNR_LR %.3f   PSNR_HR %.3f",
    "restore": "Iteration %05d    Loss %f PSNR_masked %f PSNR %f",
    "inpaint": "Iteration %05d    Loss %f",
}


def compare_psnr(true: np.ndarray, test: np.ndarray) -> float:
    """skimage.measure.compare_psnr as the notebooks call it: float images, data range 1."""
    return float(peak_signal_noise_ratio(true, test, data_range=1))


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _chw(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) -> the notebooks' (C, H, W) float32 (pil_to_np)."""
    return np.ascontiguousarray(np.asarray(arr, dtype=np.float32).transpose(2, 0, 1))


class OriginalLoop:
    """One fit of the notebooks' loop. step() is one iteration of utils.optimize; rows holds the history.

    observed, target: (h, w, C) and (H, W, C) float32 arrays in [0, 1]; mask: (h, w) {0, 1} for
    'restore' and 'inpaint'; scale: the SR factor. track_target: also compute the GT PSNR on the
    CPU where the notebook computes none (inpainting), so that time-to-PSNR is defined.
    sr_downsampler: 'dense' (the notebook's trainable 3 -> 3 conv) or 'depthwise' (the reference
    engine's Lanczos2Decimation: the same sums in another order, for parity checks). tf32: TF32
    convolutions, today's PyTorch default (the module docstring).
    """

    def __init__(
        self,
        task: str,
        preset: TaskPreset,
        observed: np.ndarray,
        target: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        scale: int | None = None,
        *,
        device="cpu",
        seed: int = 0,
        track_target: bool = True,
        sr_downsampler: str = "dense",
        log=None,
        t0: float | None = None,
        tf32: bool = False,
    ):
        if task not in TASKS:
            raise ValueError(f"the original loop covers tasks {list(TASKS)}; got {task!r}")
        if preset.input == "guide":
            raise ValueError("the original loop here has no guide (flash) input")
        self.t0 = time.perf_counter() if t0 is None else t0
        self.kind = "denoise" if task in ("denoise", "jpeg", "enhance") else task
        self.preset, self.device, self.tf32 = preset, torch.device(device), tf32
        self.log = log if log is not None else open(os.devnull, "w")  # noqa: SIM115 (closed in close())
        self.own_log = log is None
        y = _chw(observed)
        c, h, w = y.shape
        factor = scale if self.kind == "sr" else 1
        self.out_size = (h * factor, w * factor)
        depth = preset.input_depth
        work = nets.working_size(preset.net, depth, *self.out_size)
        with torch.random.fork_rng(devices=[]):  # as engine.fit: the net, then z, from the seeded CPU RNG
            torch.manual_seed(seed)
            self.net = nets.build(preset.net, depth, c).to(self.device)
            z = nets.meshgrid_input(*work) if preset.input == "meshgrid" else nets.noise_input(depth, *work)
        self.net_input_saved = z.to(self.device).detach().clone()
        self.noise = self.net_input_saved.detach().clone()
        self.net_input = self.net_input_saved
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=preset.lr)
        self.mse = torch.nn.MSELoss()

        self.y = torch.from_numpy(y)[None].to(self.device)  # img_noisy_torch / img_LR_var / img_var
        self.y_np = y
        self.target_np = _chw(target) if target is not None else None
        self.mask = self.mask_np = None
        if self.kind in ("restore", "inpaint"):
            if mask is None:
                raise ValueError(f"task {task!r} needs a mask")
            self.mask_np = np.broadcast_to(np.asarray(mask, dtype=np.float32)[None], y.shape).copy()
            self.mask = torch.from_numpy(self.mask_np)[None].to(self.device)
        self.downsampler = None
        if self.kind == "sr":
            if sr_downsampler == "dense":
                with torch.random.fork_rng(devices=[]):  # its Conv2d init draws, then is overwritten
                    self.downsampler = LanczosDownsampler(c, factor, "lanczos2").to(self.device)
            elif sr_downsampler == "depthwise":
                self.downsampler = Lanczos2Decimation(factor).A
            else:
                raise ValueError(f"sr_downsampler must be 'dense' or 'depthwise'; got {sr_downsampler!r}")
        self.track_target = track_target and self.target_np is not None

        self.out = self.out_avg = None
        self.ema_on = self.kind == "denoise"  # only the denoising notebook keeps an EMA
        self.backtracking = preset.backtracking if self.kind in ("denoise", "restore") else None
        self.drop_db = 10 * math.log10(preset.backtracking.factor) if self.backtracking else None
        self.psnr_last = 0.0  # psrn_noisy_last / last_psnr_masked
        self.last_net = None
        self.i = 0  # the notebooks' global i: counts accepted iterations (not incremented on a fall-back)
        self.iterations = 0
        self.rows: list[HistoryRow] = []

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.out_size
        dh, dw = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
        return x[:, :, dh : dh + h, dw : dw + w]

    def _host(self, t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()[0]  # torch_to_np: one device-to-host copy

    def _closure(self) -> bool:
        """The notebook's closure; returns whether it fell back."""
        p = self.preset
        if p.reg_noise_std > 0:
            with phase("noise"):
                self.net_input = self.net_input_saved + (self.noise.normal_(generator=self.generator) * p.reg_noise_std)
        with phase("forward"):
            out = self._crop(self.net(self.net_input))
        if self.ema_on:
            w = p.ema
            self.out_avg = out.detach() if self.out_avg is None else self.out_avg * w + out.detach() * (1 - w)
        with phase("loss"):
            if self.kind == "sr":
                out_lr = self.downsampler(out)
                total_loss = self.mse(out_lr, self.y)
            elif self.mask is not None:
                total_loss = self.mse(out * self.mask, self.y * self.mask)
            else:
                total_loss = self.mse(out, self.y)
        with phase("backward"):
            total_loss.backward()
        self.out = out.detach()

        loss = psnr = ema_psnr = data_psnr = None
        with phase("read-back"):
            if self.kind == "denoise":
                data_psnr = compare_psnr(self.y_np, self._host(out))
                if self.target_np is not None:
                    psnr = compare_psnr(self.target_np, self._host(out))
                    ema_psnr = compare_psnr(self.target_np, self._host(self.out_avg))
                loss = total_loss.item()
                print(
                    PRINTS["denoise"] % (self.i, loss, data_psnr, _nan(psnr), _nan(ema_psnr)),
                    "\r",
                    end="",
                    file=self.log,
                )
            elif self.kind == "sr":
                psnr_lr = compare_psnr(self.y_np, self._host(out_lr))
                if self.target_np is not None:
                    psnr = compare_psnr(self.target_np, self._host(out))
                print(PRINTS["sr"] % (self.i, psnr_lr, _nan(psnr)), "\r", end="", file=self.log)
            elif self.kind == "restore":
                data_psnr = compare_psnr(self.y_np * self.mask_np, self._host(out) * self.mask_np)
                if self.target_np is not None:
                    psnr = compare_psnr(self.target_np, self._host(out))
                loss = total_loss.item()
                print(PRINTS["restore"] % (self.i, loss, data_psnr, _nan(psnr)), "\r", end="", file=self.log)
            else:  # inpainting
                loss = total_loss.item()
                print(PRINTS["inpaint"] % (self.i, loss), "\r", end="", file=self.log)
                if self.track_target:  # the harness's addition: the notebook computes no PSNR
                    psnr = compare_psnr(self.target_np, self._host(out))

        fell_back = False
        bt = self.backtracking
        if bt is not None and (self.i % bt.period == 0) == bt.on_period:
            with phase("backtracking"):
                if data_psnr - self.psnr_last < -self.drop_db:
                    print("Falling back to previous checkpoint.", file=self.log)
                    for new_param, net_param in zip(self.last_net, self.net.parameters()):
                        net_param.data.copy_(new_param.to(self.device))
                    fell_back = True
                else:
                    # last_net = [x.detach().cpu() for x in net.parameters()]; copy=True so that
                    # on a CPU device it is a copy too, not an alias of the live parameters
                    self.last_net = [x.detach().to("cpu", copy=True) for x in self.net.parameters()]
                    self.psnr_last = data_psnr
        if not fell_back:
            self.i += 1
        self.rows.append(
            HistoryRow(
                self.iterations + 1,
                math.nan if loss is None else loss,
                psnr,
                ema_psnr,
                fell_back,
                time.perf_counter() - self.t0,
            )
        )
        return fell_back

    def step(self) -> None:
        """One iteration of utils.optimize('adam'): zero_grad(); closure(); step()."""
        self.optimizer.zero_grad()
        self._closure()
        with phase("optimizer"):
            self.optimizer.step()
        self.iterations += 1

    def run(self, iterations: int, on_step=None) -> None:
        """`iterations` steps; on_step(done) after each, returning True stops early."""
        with conv_precision(tf32=self.tf32, cudnn_benchmark=True):  # cudnn.benchmark on, as every notebook
            for _ in range(iterations):
                self.step()
                if on_step is not None and on_step(self.iterations):
                    break

    @torch.no_grad()
    def final_output(self) -> torch.Tensor:
        """The notebooks' result: one more forward with the last perturbed input, BN in train mode."""
        with conv_precision(tf32=self.tf32, cudnn_benchmark=True):
            return self._crop(self.net(self.net_input))

    def close(self) -> None:
        if self.own_log:
            self.log.close()
