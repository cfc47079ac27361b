"""Early stopping without ground truth (dipfast.early_stop), measured: `dipfast bench early-stop`.

Per image, one long fit records every iteration's output and its PSNR against the clean image.
From that record come:
    oracle   the best PSNR of any iteration's output (needs the ground truth: the bound)
    fixed    the PSNR at the preset's fixed count (or the last recorded iteration, if shorter)
    auto     the criterion replayed on the recorded outputs (EarlyStop.update, iteration by iteration):
             the PSNR of the output it returns, the iteration it detected and the one it stopped at
A replay gives the same decision as the criterion inside the step (restore(stop='auto')), since it
sees the same outputs in the same order, and the record is needed for the oracle anyway; the record
itself runs the fixed count (stop='iterations').

Images: the 9 clean images of the paper's folder (../shared/data/dip: its 9 distinct clean
photographs; the paper's own 9-image denoising set is not shipped there), centre-cropped, with
the corruption of each task made as in dipfast.bench.data (denoise: sigma 25; sr4: PIL LANCZOS
1/4; inpaint: 2-px strokes over 5%; jpeg: PIL JPEG at quality JPEG_QUALITY; restore: 50% of the
pixels kept, Bernoulli, on the crop reflection-padded by 1 as the notebook pads barbara). Without --data,
scikit-image's bundled images.
"""

from __future__ import annotations

import io
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dipfast.bench import data
from dipfast.bench.data import Case
from dipfast.errors import InputError

TASKS = ("denoise", "sr4", "inpaint", "jpeg", "restore")
RESTORE_TASK = {"denoise": "denoise", "sr4": "sr", "inpaint": "inpaint", "jpeg": "jpeg", "restore": "restore"}
OBSERVES_OUTPUT = ("denoise", "jpeg")  # the data term is ||x - y||^2 itself: where a noise gate can be replayed
JPEG_QUALITY = 10

# bench task -> [(name, image path, mask path, preset)]
PAPER_IMAGES = {
    "denoise": [
        ("F16", "denoising/F16_GT.png", None, "denoise"),
        ("kate", "inpainting/kate.png", None, "denoise"),
        ("barbara", "restoration/barbara.png", None, "denoise"),
        ("vase", "inpainting/vase.png", None, "denoise"),
        ("library", "inpainting/library.png", None, "denoise"),
        ("zebra", "sr/zebra_GT.png", None, "denoise"),
        ("building", "feature_inversion/building.jpg", None, "denoise"),
        ("monkey", "feature_inversion/monkey.jpg", None, "denoise"),
        ("cave", "flash_no_flash/cave01_01_noflash.jpg", None, "denoise"),
    ],
}
# the paper's masks leave no hole in most small centre crops: synthetic strokes (dipfast.bench.data)
PAPER_IMAGES["inpaint"] = [(n, p, None, "inpaint") for n, p, _, _ in PAPER_IMAGES["denoise"]]
PAPER_IMAGES["sr4"] = [(n, p, None, "sr4") for n, p, _, _ in PAPER_IMAGES["denoise"]]
PAPER_IMAGES["jpeg"] = [(n, p, None, "jpeg") for n, p, _, _ in PAPER_IMAGES["denoise"]]
PAPER_IMAGES["restore"] = [(n, p, None, "restore") for n, p, _, _ in PAPER_IMAGES["denoise"]]
BUNDLED_IMAGES = ("astronaut", "coffee", "chelsea")


def jpeg_case(name: str, img: Image.Image, size: int | None, source: str, quality: int = JPEG_QUALITY) -> Case:
    """A centre crop of img and its JPEG at `quality` (4:2:0, PIL): blind JPEG-artifact removal."""
    clean = data.centre_crop_image(data.crop_image(img.convert("RGB"), 32), size)
    buf = io.BytesIO()
    clean.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    observed = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255
    target = np.asarray(clean, dtype=np.float32) / 255
    protocol = f"PIL JPEG at quality {quality} of the centre crop; target = the crop"
    return Case(name, "denoise", observed, target, preset="jpeg", source=source, protocol=protocol)


def _case(task: str, name: str, img: Image.Image, size, seed: int, source: str, preset: str, mask=None, sigma=None):
    if task == "jpeg":
        case = jpeg_case(name, img, size, source)
    else:
        img = img.convert("RGB") if mask is None else img  # one 3-channel step for the whole set
        case = data._make(task, name, img, size, seed, source, preset, mask, sigma=sigma or data.SIGMA)
    case.extras["es_task"] = task
    if task == "denoise" and sigma not in (None, data.SIGMA):
        case.extras["es_sigma"] = sigma
    return case


def task_of(case: Case) -> str:
    return case.extras["es_task"]


def key_of(case: Case) -> str:
    return f"{task_of(case)}/{case.name}"


def load_cases(
    data_dir,
    tasks=TASKS,
    size: int | None = 64,
    seed: int = 0,
    limit: int | None = None,
    sigma: float | None = None,
    images: list[str] | None = None,
) -> list[Case]:
    """The cases of `tasks` (at most `limit` images each) from data_dir, or scikit-image's images when None;
    sigma: the denoise task's noise, in [0, 1] units (None: the paper's 25/255); images: only these, by name.

    Every image's fit starts from the same seed whichever images share its step (on the CPU, the same bits:
    tests/test_group_invariance.py), so a set can be recorded in parts (images=...) into one cache and
    replayed whole.
    """
    if sigma is not None and not 0 < sigma < 1:
        raise InputError(f"the denoise noise sigma must be in (0, 255) 8-bit units; got {sigma * 255:g}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InputError(f"unknown early-stop task {unknown[0]!r}; valid: {list(TASKS)}")
    names = BUNDLED_IMAGES if data_dir is None else list(dict.fromkeys(n for t in tasks for n, *_ in PAPER_IMAGES[t]))
    unknown = [n for n in images or () if n not in names]
    if unknown:
        raise InputError(f"unknown image {unknown[0]!r} for --images; valid: {list(names)}")

    def chosen(entries: list, name=lambda e: e[0]) -> list:
        return [e for e in entries if images is None or name(e) in images][:limit]

    cases = []
    if data_dir is None:
        from skimage import data as skdata

        for task in tasks:
            for fn in chosen(BUNDLED_IMAGES, name=str):
                img = Image.fromarray(getattr(skdata, fn)())
                preset = "inpaint" if task == "inpaint" else PAPER_IMAGES[task][0][3]
                cases.append(_case(task, fn, img, size, seed, f"skimage.data.{fn}", preset, sigma=sigma))
        return cases
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"--data {str(root)!r} is not a folder; give the paper's data folder (../shared/data/dip)")
    for task in tasks:
        for name, rel, mask_rel, preset in chosen(PAPER_IMAGES[task]):
            if not (root / rel).is_file():
                continue
            mask = data._open(root / mask_rel) if mask_rel else None
            cases.append(_case(task, name, data._open(root / rel), size, seed, rel, preset, mask, sigma))
    if not cases:
        raise InputError(f"no images of tasks {list(tasks)} in {str(root)!r}; expected e.g. denoising/F16_GT.png")
    return cases


@dataclass
class Record:
    """One long fit, every iteration: what a replay of the criterion and the oracle need."""

    key: str  # task/name
    preset: str
    outputs: np.ndarray  # (T, C, H, W) float16: the output of iteration t + 1 (before its Adam step)
    psnr: np.ndarray  # (T,) float64: of the fp32 output against the target
    seconds: np.ndarray  # (T,): wall time of the read-back after iteration t + 1
    meta: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        np.savez(path, outputs=self.outputs, psnr=self.psnr, seconds=self.seconds, key=self.key, preset=self.preset)

    @classmethod
    def load(cls, path: Path) -> Record:
        with np.load(path) as z:
            return cls(str(z["key"]), str(z["preset"]), z["outputs"], z["psnr"], z["seconds"])


def record(
    cases: list[Case],
    iters: int,
    *,
    seed: int = 0,
    device="cpu",
    precision="auto",
    backend="native",
    progress=False,
    net: str | None = None,
):
    """One fit of `iters` for cases of one task and preset and size, N networks in one step: a Record each.
    net: runs.net_overrides' choice ('preset', 'default', 'tiny' or a preset's name)."""
    from dipfast import api
    from dipfast.bench.runs import net_overrides
    from dipfast.metrics import psnr

    first = cases[0]
    if any((task_of(c), c.preset, c.target.shape) != (task_of(first), first.preset, first.target.shape) for c in cases):
        raise InputError("record() takes cases of one task, preset and size; group them first")
    targets = torch.stack([torch.from_numpy(np.ascontiguousarray(c.target.transpose(2, 0, 1))) for c in cases])
    n, t = len(cases), iters
    outputs = np.empty((t, n, *targets.shape[1:]), dtype=np.float16)
    psnrs = np.empty((t, n))
    seconds = np.empty(t)

    def callback(p) -> None:
        i = p.iteration - 1
        out = p.image.float().cpu()
        outputs[i] = out.numpy()
        psnrs[i] = psnr(out, targets, dim=(1, 2, 3)).numpy()
        seconds[i] = p.seconds

    kwargs = {"task": RESTORE_TASK[task_of(first)], "preset": first.preset, **net_overrides(net, first.preset)}
    if first.scale is not None:
        kwargs["scale"] = first.scale
    if first.mask is not None:
        kwargs["mask"] = [c.mask for c in cases]
    start = time.perf_counter()
    api.restore(
        [c.observed for c in cases],
        **kwargs,
        iters=iters,
        seed=seed,
        device=device,
        precision=precision,
        backend=backend,
        progress=progress,
        callback=callback,
        report_every=1,
        stop="iterations",
    )
    wall = time.perf_counter() - start
    meta = {"iters": iters, "n_networks": n, "wall_seconds": wall, "backend": backend, "precision": precision}
    return [
        Record(key_of(c), c.preset, outputs[:, k].copy(), psnrs[:, k].copy(), seconds.copy(), dict(meta))
        for k, c in enumerate(cases)
    ]


def group(cases: list[Case]) -> list[list[Case]]:
    """Cases that can share one step: same task, preset and size."""
    groups: dict[tuple, list[Case]] = {}
    for c in cases:
        groups.setdefault((task_of(c), c.preset, c.target.shape), []).append(c)
    return list(groups.values())


def record_cached(cases: list[Case], iters: int, cache: Path | None, **kwargs) -> dict[str, Record]:
    """record() per group, each group's records read from / written to `cache` (a folder) when given
    (named by task, image, size, iterations and any net, seed or precision other than the default)."""
    out = {}
    for members in group(cases):
        paths = None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            h, w = members[0].target.shape[:2]
            named = {k: v for k, v in kwargs.items() if k in ("net", "seed") and v not in (None, 0, "preset")}
            tag = "".join(f"_{k}{v}" for k, v in sorted(named.items()))
            tag += "" if kwargs.get("precision", "auto") == "auto" else f"_{kwargs['precision']}"
            if "es_sigma" in members[0].extras:  # another noise level: other records
                tag += f"_sigma{members[0].extras['es_sigma'] * 255:g}"
            paths = [cache / f"{task_of(c)}_{c.name}_{h}x{w}_{iters}{tag}.npz".replace("/", "-") for c in members]
            if all(p.is_file() for p in paths):
                for c, p in zip(members, paths):
                    out[key_of(c)] = Record.load(p)
                continue
        for c, rec, p in zip(members, record(members, iters, **kwargs), paths or [None] * len(members)):
            out[key_of(c)] = rec
            if p is not None:
                rec.save(p)
    return out


@dataclass
class Detection:
    """The criterion's decision on one record: what restore(stop='auto') would have returned."""

    best_iteration: int  # the iteration whose output is returned (1-based; 0: none)
    stop_iteration: int  # the iteration the fit stops at: the minimum's + patience, or the record's end
    stopped: bool  # False: patience never ran out within the record (the fit ran to its bound)
    psnr: float  # of the returned output against the target
    criterion: np.ndarray  # (T,) float32, NaN where undefined or after the stop
    output: torch.Tensor  # (C, H, W) float32: the output returned (the kept one, else the record's last)


def observation_losses(rec: Record, observed: np.ndarray) -> np.ndarray:
    """(T,) float32: the data term ||x_t - y||^2 / n of each recorded output, the observation y (H, W, C) a
    corrupted copy of the output (OBSERVES_OUTPUT): what the noise gate reads in the step."""
    y = np.ascontiguousarray(observed.transpose(2, 0, 1), dtype=np.float32)
    return np.stack([((o.astype(np.float32) - y) ** 2).mean() for o in rec.outputs]).astype(np.float32)


def noise_variance(observed: np.ndarray) -> float:
    """The noise gate's sigma^2 of an observation (H, W, C), as the step estimates it."""
    from dipfast.noise_level import estimate_sigma

    y = torch.from_numpy(np.ascontiguousarray(observed.transpose(2, 0, 1), dtype=np.float32))[None]
    return float(estimate_sigma(y).square()[0])


def gate_opening(losses: np.ndarray, variance: float, gate: float) -> int:
    """The iteration (1-based) at which EarlyStop's noise gate opens on these losses, or len + 1: never."""
    from dipfast.early_stop import GATE_SMOOTHING

    if gate == 0:
        return 1
    average = losses[0]
    level = np.float32(gate * variance)
    for t, loss in enumerate(losses, start=1):
        average = loss if t == 1 else np.float32(average + np.float32(GATE_SMOOTHING) * (loss - average))
        if average <= level:
            return t
    return len(losses) + 1


def detect(
    rec: Record,
    target: np.ndarray,
    spec,
    buffer_dtype=torch.bfloat16,
    observed=None,
    gate_variance: float | None = None,
) -> Detection:
    """EarlyStop replayed on the recorded outputs, one iteration at a time, as the step calls it (with the
    observation (H, W, C), for a noise-gated rule: the losses and the noise level the step would read;
    gate_variance: another sigma^2 for the gate than the step's estimate)."""
    from dipfast.early_stop import EarlyStop
    from dipfast.metrics import psnr

    outputs = torch.from_numpy(rec.outputs).float()
    losses, variance = None, None
    if spec.noise_gate > 0:
        if observed is None:
            raise InputError(f"a noise-gated rule replays only on {list(OBSERVES_OUTPUT)}, with the observation")
        losses = torch.from_numpy(observation_losses(rec, observed))
        variance = torch.tensor([noise_variance(observed) if gate_variance is None else gate_variance])
    stopper = EarlyStop(spec, 1, outputs.shape[1:], "cpu", buffer_dtype, noise_variance=variance)
    crit = np.full(len(outputs), np.nan, dtype=np.float32)
    iteration = torch.zeros((), dtype=torch.int64)
    for t in range(len(outputs)):
        stopper.update(outputs[t : t + 1], iteration, None if losses is None else losses[t : t + 1])
        crit[t] = stopper.criterion[0]
        iteration += 1
        if stopper.stopped[0]:
            break
    best = int(stopper.best_iteration[0])
    stopped = bool(stopper.stopped[0])
    stop = int(stopper.stop_iteration[0]) if stopped else len(outputs)
    output = stopper.best_output[0] if best else outputs[-1]
    if best and spec.returns == "output":
        value = float(rec.psnr[best - 1])  # of the fp32 output, as the step keeps it
    elif best:
        value = float(psnr(output, torch.from_numpy(np.ascontiguousarray(target.transpose(2, 0, 1)))))
    else:  # nothing kept (a gate that never opened): the fit returns its last output, as the step does
        value = float(rec.psnr[-1])
    return Detection(best, stop, stopped, value, crit, output)


def evaluate(case: Case, rec: Record, spec, fixed_iterations: int, buffer_dtype=torch.bfloat16) -> dict:
    """One image's row: oracle, fixed count and auto, with iterations and wall seconds."""
    t = len(rec.psnr)
    fixed = min(fixed_iterations, t)
    oracle = int(np.argmax(rec.psnr)) + 1
    observed = case.observed if task_of(case) in OBSERVES_OUTPUT else None
    det = detect(rec, case.target, spec, buffer_dtype, observed)
    seconds = rec.seconds - rec.seconds[0]  # the loop's clock, first read-back at 0
    return {
        "key": key_of(case),
        "name": case.name,
        "task": task_of(case),
        "preset": case.preset,
        "size": list(case.target.shape),
        "input_psnr": case.input_psnr() if task_of(case) != "jpeg" else data.numpy_psnr(case.observed, case.target),
        "recorded_iterations": t,
        "oracle_psnr": float(rec.psnr[oracle - 1]),
        "oracle_iteration": oracle,
        "fixed_iteration": fixed,
        "fixed_psnr": float(rec.psnr[fixed - 1]),
        "auto_psnr": det.psnr,
        "detected_iteration": det.best_iteration,
        "stop_iteration": det.stop_iteration,
        "stopped": det.stopped,
        "iterations_saved": fixed - det.stop_iteration,
        "fixed_seconds": float(seconds[fixed - 1]),
        "auto_seconds": float(seconds[det.stop_iteration - 1]),
        "gap_to_oracle_db": float(rec.psnr[oracle - 1]) - det.psnr,
        "gain_over_fixed_db": det.psnr - float(rec.psnr[fixed - 1]),
        "psnr_curve": [round(float(v), 4) for v in rec.psnr],  # 4 decimals, 4 digits: the JSON stays small
        "criterion_curve": [float(f"{v:.4g}") for v in det.criterion],
    }


def summarise(rows: list[dict]) -> dict:
    """The targets of issue 14 on one task's rows."""
    gaps = [r["gap_to_oracle_db"] for r in rows]
    gains = [r["gain_over_fixed_db"] for r in rows]
    fixed = sum(r["fixed_iteration"] for r in rows)
    run = sum(r["stop_iteration"] for r in rows)
    return {
        "images": len(rows),
        "median_gap_db": float(np.median(gaps)),
        "max_gap_db": float(np.max(gaps)),
        "mean_gain_over_fixed_db": float(np.mean(gains)),
        "mean_stop_iteration": run / len(rows),
        "mean_fixed_iteration": fixed / len(rows),
        "iteration_ratio": fixed / run if run else math.inf,
        "all_stopped": all(r["stopped"] for r in rows),
    }


def meets_targets(s: dict, preset_iterations: int) -> dict:
    """Issue 14's denoising targets on a summary: each as a bool."""
    return {
        "median_gap_le_0.5": s["median_gap_db"] <= 0.5,
        "max_gap_le_1.5": s["max_gap_db"] <= 1.5,
        "not_worse_than_fixed_by_0.3": s["mean_gain_over_fixed_db"] >= -0.3,
        "2x_fewer_than_preset": preset_iterations >= 2 * s["mean_stop_iteration"],
    }


def run_early_stop(
    cases: list[Case],
    *,
    iters: int,
    specs: dict,
    cache: Path | None = None,
    device="cpu",
    precision="auto",
    backend="native",
    seed: int = 0,
    progress: bool = True,
    records: dict[str, Record] | None = None,
) -> dict:
    """The suite: record each case (or read its record from `cache`, or take it from `records`),
    evaluate specs[task] on it."""
    from dipfast.tasks import preset_for

    if records is None:
        records = record_cached(
            cases, iters, cache, seed=seed, device=device, precision=precision, backend=backend, progress=progress
        )
    rows, tasks = [], {}
    for case in cases:
        task = task_of(case)
        preset_iterations = preset_for(RESTORE_TASK[task], case.preset, case.scale).iterations
        rows.append(
            {
                **evaluate(case, records[key_of(case)], specs[task], preset_iterations),
                "preset_iterations": preset_iterations,
            }
        )
        tasks.setdefault(task, {"spec": _spec_dict(specs[task]), "preset_iterations": preset_iterations})
    for task, entry in tasks.items():
        entry["summary"] = summarise([r for r in rows if r["task"] == task])
        entry["targets"] = meets_targets(entry["summary"], entry["preset_iterations"])
    return {
        "suite": "early-stop",
        "settings": {
            "iters": iters,
            "sizes": sorted({tuple(c.target.shape[:2]) for c in cases}),
            "backend": backend,
            "precision": precision,
            "device": str(device),
            "seed": seed,
            "denoise_sigma_8bit": next(
                (round(c.extras.get("es_sigma", data.SIGMA) * 255, 3) for c in cases if task_of(c) == "denoise"), None
            ),
            "replay": "EarlyStop.update on the recorded outputs (float16), buffer bf16",
        },
        "tasks": tasks,
        "images": rows,
    }


def _spec_dict(spec) -> dict:
    from dataclasses import asdict

    return asdict(spec)


def markdown(rep: dict) -> str:
    from dipfast.bench import report

    s = rep["settings"]
    text = report._header(rep, "Early stopping without ground truth")
    text += (
        f"One fit of {s['iters']} iterations per image ({s['backend']}, precision {s['precision']}, "
        f"sizes {s['sizes']}{_sigma_note(s)}); the criterion replayed on the recorded outputs. "
        "PSNR in dB against the clean image; 'fixed' is the preset's count, or the last recorded "
        "iteration when the record is shorter.\n\n"
    )
    rows = []
    for task, entry in rep["tasks"].items():
        m, sp = entry["summary"], entry["spec"]
        rule = f"{sp['method']} W={sp['window']} P={sp['patience']} thr={sp['threshold']} start={sp['start']}"
        if sp["method"] == "emv":
            rule = f"emv a={sp['alpha']} P={sp['patience']} thr={sp['threshold']} start={sp['start']}"
        if sp.get("tolerance"):
            rule += f" tol={sp['tolerance']}"
        if sp.get("noise_gate"):
            rule += f" gate={sp['noise_gate']}"
        met = ", ".join(k for k, v in entry["targets"].items() if not v) or "all met"
        rows.append(
            [
                task,
                rule + (f" ({sp['returns']})" if sp["returns"] != "output" else ""),
                m["images"],
                report._f(m["median_gap_db"]),
                report._f(m["max_gap_db"]),
                report._f(m["mean_gain_over_fixed_db"], "{:+.2f}"),
                report._f(m["mean_stop_iteration"], "{:.0f}"),
                entry["preset_iterations"],
                met if met == "all met" else "missed: " + met,
            ]
        )
    text += report.table(
        ["task", "rule", "images", "median gap", "max gap", "vs fixed", "mean iters", "preset iters", "targets"], rows
    )
    text += "\n"
    rows = [
        [
            r["key"],
            report._f(r["input_psnr"]),
            f"{report._f(r['oracle_psnr'])} @{r['oracle_iteration']}",
            f"{report._f(r['fixed_psnr'])} @{r['fixed_iteration']}",
            f"{report._f(r['auto_psnr'])} @{r['detected_iteration']}",
            r["stop_iteration"] if r["stopped"] else f"{r['stop_iteration']} (bound)",
            r["iterations_saved"],
            report._f(r["auto_seconds"], "{:.0f}"),
            report._f(r["fixed_seconds"], "{:.0f}"),
        ]
        for r in rep["images"]
    ]
    text += report.table(
        ["image", "input", "oracle @it", "fixed @it", "auto @detected", "stop", "saved", "auto s", "fixed s"], rows
    )
    if "cost" in rep:
        c = rep["cost"]
        text += (
            f"\nCriterion cost at {c['size']} px ({c['device']}, {c['precision']}, default net): "
            f"a step {c['step_ms']:.1f} ms\n\n"
        )
        cost_rows = [
            [
                f"{r['spec']['method']} W={r['spec']['window']} r={r['spec']['downsample']}"
                + (" (fused)" if r.get("fused") else ""),
                report._f(r["update_ms"], "{:.3f}"),
                report._f(100 * r["fraction_of_step"], "{:.2f}%"),
                f"{r['bytes'] / 2**20:.1f}",
            ]
            for r in c["criterion"]
        ]
        text += report.table(["criterion", "update ms", "of a step", "MiB"], cost_rows)
    return text


def _sigma_note(settings: dict) -> str:
    sigma = settings.get("denoise_sigma_8bit")
    return "" if sigma in (None, 25.0) else f", denoise noise sigma {sigma:g}/255"


def plot(rep: dict, row: dict, path: Path) -> Path:
    """PSNR against iteration with the oracle, the detected point, the stop and the fixed count marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    its = np.arange(1, len(row["psnr_curve"]) + 1)
    ax.plot(its, row["psnr_curve"], lw=1, label="output PSNR")
    ax.plot([row["oracle_iteration"]], [row["oracle_psnr"]], "k*", ms=10, label="oracle best")
    if row["detected_iteration"]:
        ax.plot([row["detected_iteration"]], [row["auto_psnr"]], "ro", label="auto: returned output")
    ax.axvline(row["stop_iteration"], color="r", ls="--", lw=0.8, label="auto: stop")
    ax.axvline(row["fixed_iteration"], color="gray", ls=":", lw=0.8, label="fixed count")
    ax.set(xlabel="iteration", ylabel="PSNR vs ground truth (dB)")
    crit = np.array([np.nan if c is None else c for c in row["criterion_curve"]], dtype=float)
    if np.isfinite(crit).any():
        ax2 = ax.twinx()
        ax2.plot(its[: len(crit)], crit, color="tab:green", lw=0.8, alpha=0.7)
        ax2.set_yscale("log")
        ax2.set_ylabel("criterion (VAR)", color="tab:green")
    ax.set_title(f"{row['key']}: early stop (detected {row['detected_iteration']}, stopped {row['stop_iteration']})")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# -- calibration: the curves once per (method, window | alpha), the rule's other settings on them

WINDOWS = (5, 10, 20, 50, 100)
ALPHAS = (0.01, 0.02, 0.05, 0.1)
PATIENCES = (25, 50, 100, 150, 200, 300, 400)
THRESHOLDS = (0.0, 0.02)
STARTS = (0, 50, 100)
TOLERANCES = (0.0, 0.2, 0.4, 0.6)
NOISE_GATES = (0.0, 1.0, 1.05, 1.1, 1.2)  # tried on OBSERVES_OUTPUT's tasks


def curves(records: list[Record], method: str, window: int = 100, alpha: float = 0.1, buffer_dtype=torch.bfloat16):
    """(T, N) float32: EarlyStop's VAR on each record (same length), never stopping (NaN where undefined)."""
    from dipfast.early_stop import EarlyStop, EarlyStopSpec

    outputs = torch.from_numpy(np.stack([r.outputs for r in records], axis=1)).float()  # (T, N, C, H, W)
    spec = EarlyStopSpec(method, window=window, alpha=alpha, patience=len(outputs) + 1)
    stopper = EarlyStop(spec, outputs.shape[1], outputs.shape[2:], "cpu", buffer_dtype)
    out = np.empty(outputs.shape[:2], dtype=np.float32)
    iteration = torch.zeros((), dtype=torch.int64)
    for t in range(len(outputs)):
        stopper.update(outputs[t], iteration)
        out[t] = stopper.criterion.numpy()
        iteration += 1
    return out


def window_mean_psnr(rec: Record, target: np.ndarray, window: int) -> np.ndarray:
    """(T,) the PSNR of the mean of the last `window` outputs at each iteration (NaN before it is full)."""
    x = rec.outputs.astype(np.float64)
    c = np.cumsum(x, axis=0)
    c[window:] = c[window:] - c[:-window]
    mean = c / window
    t = np.ascontiguousarray(target.transpose(2, 0, 1))
    mse = ((mean - t) ** 2).mean(axis=(1, 2, 3))
    out = -10 * np.log10(mse)
    out[: window - 1] = np.nan
    return out


def decide(
    curve: np.ndarray, patience: int, threshold: float = 0.0, first_valid: int = 1, tolerance: float = 0.0
) -> tuple[int, int, bool]:
    """EarlyStop's rule on a VAR curve (T,): (the kept output's iteration, stop iteration or T, stopped)."""
    if threshold == 0:  # the running minimum, vectorised: the calibration's inner loop
        c = np.asarray(curve, dtype=np.float32)[first_valid - 1 :]
        c = np.where(np.isnan(c), np.float32(np.inf), c)
        before = np.concatenate([[np.float32(np.inf)], np.minimum.accumulate(c)[:-1]])
        steps = np.arange(first_valid, len(curve) + 1)
        minimum_at = np.maximum.accumulate(np.where(c < before, steps, 0))
        kept_at = minimum_at
        if tolerance > 0:  # an undefined VAR (inf here) is never kept, though inf <= inf
            within = np.isfinite(c) & (c <= before * np.float32(1 + tolerance))
            kept_at = np.maximum.accumulate(np.where(within, steps, 0))
        hit = np.flatnonzero((minimum_at > 0) & (steps - minimum_at >= patience))
        if hit.size:
            return int(kept_at[hit[0]]), int(steps[hit[0]]), True
        return (int(kept_at[-1]) if kept_at.size else 0), len(curve), False
    minimum, minimum_at, kept = np.float32(np.inf), 0, 0
    lower, within = np.float32(1 - threshold), np.float32(1 + tolerance)
    for t in range(first_valid, len(curve) + 1):
        c = curve[t - 1]
        new = c < minimum * lower
        if new or (tolerance > 0 and c <= minimum * within):
            kept = t
        if new:
            minimum, minimum_at = c, t
        if minimum_at and t - minimum_at >= patience:
            return kept, t, True
    return kept, len(curve), False


def calibrate(cases: list[Case], records: dict[str, Record], fixed_iterations: int) -> list[dict]:
    """Every candidate rule on one task's cases: its summary and targets, best first (fewest iterations
    among those that meet the quality targets, then the smallest median gap)."""
    from dipfast.early_stop import EarlyStopSpec

    recs = [records[key_of(c)] for c in cases]
    gated = all(task_of(c) in OBSERVES_OUTPUT for c in cases)
    gates = NOISE_GATES if gated else (0.0,)
    if gated:
        losses = [observation_losses(r, c.observed) for r, c in zip(recs, cases)]
        variances = [noise_variance(c.observed) for c in cases]
        opening = {g: [gate_opening(x, v, g) for x, v in zip(losses, variances)] for g in gates}
    else:
        opening = {0.0: [1] * len(recs)}
    oracle = [float(r.psnr.max()) for r in recs]
    t_len = len(recs[0].psnr)
    fixed = [float(r.psnr[min(fixed_iterations, t_len) - 1]) for r in recs]
    out = []
    families = [("wmv", w, 0.1) for w in WINDOWS if w < t_len] + [("emv", 100, a) for a in ALPHAS]
    for method, window, alpha in families:
        crit = curves(recs, method, window, alpha)
        returns = ("output", "window-mean") if method == "wmv" else ("output",)
        mean_psnr = [window_mean_psnr(r, c.target, window) for r, c in zip(recs, cases)] if method == "wmv" else None
        grid = itertools.product(returns, STARTS, THRESHOLDS, TOLERANCES, PATIENCES, gates)
        for ret, start, thr, tol, patience, gate in grid:
            spec = EarlyStopSpec(method, window, patience, alpha, thr, start, 1, ret, tol, gate)
            rows = []
            for k, r in enumerate(recs):
                first_valid = max(spec.first_valid(), opening[gate][k])  # no minimum counts before the gate
                best, stop, stopped = decide(crit[:, k], patience, thr, first_valid, tol)
                curve = r.psnr if ret == "output" else mean_psnr[k]
                value = float(curve[best - 1]) if best else float(r.psnr[-1])  # nothing kept: the last output
                rows.append(
                    {
                        "gap_to_oracle_db": oracle[k] - value,
                        "gain_over_fixed_db": value - fixed[k],
                        "stop_iteration": stop,
                        "fixed_iteration": min(fixed_iterations, t_len),
                        "stopped": stopped,
                    }
                )
            s = summarise(rows)
            quality = s["median_gap_db"] <= 0.5 and s["max_gap_db"] <= 1.5 and s["mean_gain_over_fixed_db"] >= -0.3
            out.append({"spec": _spec_dict(spec), "summary": s, "meets_quality": bool(quality)})
    out.sort(key=lambda e: (not e["meets_quality"], e["summary"]["mean_stop_iteration"], e["summary"]["median_gap_db"]))
    return out


def _per_call_ms(call, iteration: torch.Tensor, calls: int, sync) -> float:
    """Milliseconds per call(), after one warm-up call, the iteration advanced before each."""
    call()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        iteration += 1
        call()
    sync()
    return 1e3 * (time.perf_counter() - start) / calls


def criterion_cost(
    size: int,
    specs,
    *,
    device="cpu",
    precision="auto",
    backend="native",
    steps: int = 6,
    updates: int = 50,
    **overrides,
) -> dict:
    """The criterion's time per update against the fit's time per step, default net, one size x size image.

    The step: the loop time of restore() over `steps` iterations less that of one iteration (its set-up and
    first step, which compiles or captures). The update: what the step runs, the mean of `updates` calls after
    one warm-up call, synchronised on CUDA: EarlyStop.update on the step's output shape, or where the backend's
    plan fuses its rules and the rule is the fused kind (dipfast.kernels.fused_rules, CUDA), the fused pass with
    the update less the same pass without it (row "fused": True). overrides: restore()'s (net=...).
    """
    from dipfast import api, backends
    from dipfast.early_stop import EarlyStop

    dev = api.resolve_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    x = np.random.default_rng(0).random((size, size, 3)).astype(np.float32)
    kwargs = {"device": dev, "precision": precision, "backend": backend, "progress": False, "report_every": steps}
    kwargs["stop"] = "iterations"
    kwargs.update(overrides)
    loops = []
    for n in (1, steps):
        loops.append(api.restore(x, iters=n, **kwargs))
    step_ms = 1e3 * (loops[1].iterations / loops[1].its - loops[0].iterations / loops[0].its) / (steps - 1)
    out = torch.rand(1, 3, size, size, device=dev)
    loss = torch.rand(1, device=dev)  # the noise gate's input: the step has it anyway
    variance = torch.full((1,), 0.01, device=dev)
    fused_plan = backends.resolve(backend, loops[1].precision, dev).fused_rules(dev)
    rows = []
    for spec in specs:
        stopper = EarlyStop(spec, 1, (3, size, size), dev, noise_variance=variance)
        iteration = torch.zeros((), dtype=torch.int64, device=dev)
        update, alone = lambda: stopper.update(out, iteration, loss), None
        if fused_plan:
            from dipfast.kernels import fused_rules

            if fused_rules.takes(stopper):  # the step's pass over its outputs, with the update and without
                rules, copy, ema = fused_rules.FusedRules(1, out.numel(), dev), torch.empty_like(out), out.clone()
                update = lambda: rules.outputs(out, copy, ema, None, iteration, 0.99, stopper, loss)  # noqa: E731
                alone = lambda: rules.outputs(out, copy, ema, None, iteration, 0.99)  # noqa: E731
        update_ms = _per_call_ms(update, iteration, updates, sync)
        if alone is not None:
            update_ms -= _per_call_ms(alone, iteration, updates, sync)
        rows.append(
            {
                "spec": _spec_dict(spec),
                "fused": alone is not None,
                "update_ms": update_ms,
                "fraction_of_step": update_ms / step_ms,
                "bytes": stopper.bytes(),
            }
        )
    return {"size": size, "device": str(dev), "precision": loops[1].precision, "step_ms": step_ms, "criterion": rows}
