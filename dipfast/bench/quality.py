"""Quality: the paper's protocols on a folder of images, per image and averaged.

The protocols are those of notes/reference_dip.md, "PSNR protocol":

    denoise  sigma = 25; PSNR over all pixels and channels, data range 1, of the final output and of
             the EMA, for 1 run and for the average of 2 runs (seeds s and s + 1: the mean image)
    sr4, sr8 Y-channel PSNR of the 8-bit output (Y = (0.299 R + 0.587 G + 0.114 B) * 219/255 + 16/255),
             4 px shaved at the start and 5 at the end of each axis (the paper's evaluation script);
             also of the EMA, and the RGB all-pixel PSNR
    restore  50% of the pixels kept; PSNR vs the full (padded) ground truth, and the masked PSNR
             compare_psnr(img * m, out * m) that the notebook prints
    inpaint  the given mask; PSNR vs the full image, of the output and of the EMA

Baselines on the same inputs: bicubic (SR), non-local means and BM3D when installed (denoising).
"""

from __future__ import annotations

import statistics

import numpy as np

from dipfast.bench import baselines, runs
from dipfast.bench.data import Case, bicubic_upsample, numpy_psnr
from dipfast.metrics import psnr_y
from dipfast.tasks import preset_for

PRIMARY = {"denoise": "psnr", "sr4": "psnr_y", "sr8": "psnr_y", "restore": "psnr", "inpaint": "psnr"}
PROTOCOL = {
    "denoise": "RGB, all pixels, data range 1",
    "sr4": "Y channel of 8-bit images, shave 4/5 px",
    "sr8": "Y channel of 8-bit images, shave 4/5 px",
    "restore": "all pixels of the padded image",
    "inpaint": "all pixels",
}


def score(case: Case, images: list[np.ndarray], emas: list[np.ndarray | None]) -> dict:
    """The protocol's figures for one method on one case; images[0] is the first run."""
    t, image, ema = case.target, images[0], emas[0]
    if case.bench_task in ("sr4", "sr8"):
        out = {"psnr_y": psnr_y(image, t), "psnr_rgb": numpy_psnr(image, t)}
        if ema is not None:
            out["ema_psnr_y"] = psnr_y(ema, t)
        return out
    out = {"psnr": numpy_psnr(image, t)}
    if ema is not None:
        out["ema_psnr"] = numpy_psnr(ema, t)
    if case.bench_task == "denoise" and len(images) > 1:
        out["psnr_avg2"] = numpy_psnr(np.mean(images, axis=0), t)
        if all(e is not None for e in emas):
            out["ema_psnr_avg2"] = numpy_psnr(np.mean(emas, axis=0), t)
    if case.bench_task == "restore":
        m = case.mask[..., None]
        out["masked_psnr"] = numpy_psnr(t * m, image * m)
    return out


def _iters(case: Case, iters: int | None) -> int:
    return iters if iters is not None else preset_for(case.task, case.preset, case.scale).iterations


def run_quality(
    cases: list[Case],
    methods,
    precisions,
    *,
    iters: int | None = None,
    runs_denoise: int = 2,
    baseline_names=("nlm", "bm3d", "bicubic"),
    device="auto",
    net: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    from tqdm.auto import tqdm

    from dipfast import api
    from dipfast.errors import InputError

    dev = api.resolve_device(device)
    combos = runs.combinations(methods, precisions)
    rows, unsupported = [], []
    with tqdm(total=len(cases) * len(combos), disable=not progress, desc="quality", unit="fit") as bar:
        for case in cases:
            base = {
                "case": case.key,
                "image": case.name,
                "bench_task": case.bench_task,
                "preset": case.preset,
                "source": case.source,
                "protocol": PROTOCOL[case.bench_task],
            }
            rows.append(
                {
                    **base,
                    "method": "input",
                    "precision": None,
                    "kind": "input",
                    "iterations": 0,
                    "seconds": None,
                    "runs": 0,
                    "metrics": {PRIMARY[case.bench_task]: _input_score(case)},
                }
            )
            n_runs = runs_denoise if case.bench_task == "denoise" else 1
            for method, precision in combos:
                bar.set_postfix_str(f"{case.key} {method} {precision}")
                try:
                    fits = [
                        runs.run_dip(
                            case,
                            method,
                            precision,
                            iters=_iters(case, iters),
                            seed=seed + k,
                            device=dev,
                            net=net,
                            progress=progress,
                        )
                        for k in range(n_runs)
                    ]
                except InputError as e:
                    unsupported.append({"case": case.key, "method": method, "precision": precision, "reason": str(e)})
                    bar.update(1)
                    continue
                rows.append(
                    {
                        **base,
                        "method": method,
                        "precision": fits[0].precision,
                        "kind": "dip",
                        "iterations": fits[0].iterations,
                        "seconds": fits[0].seconds,
                        "runs": n_runs,
                        "seconds_all": [f.seconds for f in fits],
                        "seeds": [f.seed for f in fits],
                        "metrics": score(case, [f.image for f in fits], [f.ema_image for f in fits]),
                    }
                )
                bar.update(1)
            for name in baseline_names:
                if not baselines.applies(name, case.bench_task):
                    continue
                reason = baselines.unavailable(name)
                if reason is not None:
                    unsupported.append({"case": case.key, "method": name, "precision": None, "reason": reason})
                    continue
                run = runs.run_baseline(case, name)
                rows.append(
                    {
                        **base,
                        "method": name,
                        "precision": None,
                        "kind": "baseline",
                        "iterations": 0,
                        "seconds": run.seconds,
                        "runs": 1,
                        "settings": baselines.settings(name),
                        "metrics": score(case, [run.image], [None]),
                    }
                )
    return {
        "suite": "quality",
        "settings": {
            "methods": list(methods),
            "precisions": list(precisions),
            "device": str(dev),
            "iters": iters if iters is not None else "each preset's (the paper's)",
            "net": net or "preset",
            "runs_denoise": runs_denoise,
            "seed": seed,
            "baselines": list(baseline_names),
            "protocols": PROTOCOL,
            "primary_metric": PRIMARY,
        },
        "rows": rows,
        "averages": averages(rows),
        "unsupported": unsupported,
    }


def _input_score(case: Case) -> float:
    """The input's own figure under the primary protocol (SR: the bicubic upsampling's)."""
    if case.bench_task in ("sr4", "sr8"):
        return psnr_y(bicubic_upsample(case.observed, case.target.shape[:2]), case.target)
    return numpy_psnr(case.observed, case.target)


def averages(rows: list[dict]) -> list[dict]:
    """Mean of every metric over the images of each (task, method, precision)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["bench_task"], r["method"], r["precision"]), []).append(r)
    out = []
    for (task, method, precision), members in groups.items():
        names = sorted({k for r in members for k in r["metrics"]})
        means = {k: statistics.fmean(r["metrics"][k] for r in members if k in r["metrics"]) for k in names}
        out.append(
            {"bench_task": task, "method": method, "precision": precision, "images": len(members), "metrics": means}
        )
    return out
