"""Benchmark inputs, corrupted as the original notebooks do (notes/reference_dip.md, sections 4-5).

Two sources, the same cases:
- ``--data DIR``: the paper's images, laid out as the DIP repository's data/ folder
  (denoising/F16_GT.png, sr/zebra_GT.png, restoration/barbara.png, inpainting/kate.png +
  kate_mask.png, vase + mask, library + mask).
- no folder: images that ship with scikit-image (astronaut, coffee, chelsea, camera), so the
  harness runs on a fresh machine. Noise, masks and strokes come from fixed seeds.

Bench tasks and what each case holds (arrays are float32 (H, W, C) in [0, 1]):
    denoise  observed = clip(gt + N(0, (25/255)^2), 0, 1), not quantised; target = gt
    sr4, sr8 HR = centre crop to a multiple of 32; observed = PIL LANCZOS resize of HR by 1/f; target = HR
    restore  gt reflection-padded by 1 (barbara 512 -> 514); mask keeps 50% of the pixels
             (Bernoulli); observed = gt * mask; target = gt
    inpaint  a given mask (white = known); observed = gt * mask; target = gt
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dipfast.errors import InputError

SIGMA = 25 / 255
TASKS = ("denoise", "sr4", "sr8", "restore", "inpaint")
RESTORE_KEEP = 0.5

# bench task -> (restore() task, preset, scale)
RESTORE_ARGS = {
    "denoise": ("denoise", "denoise", None),
    "sr4": ("sr", "sr4", 4),
    "sr8": ("sr", "sr8", 8),
    "restore": ("restore", "restore", None),
    "inpaint": ("inpaint", "inpaint", None),
}

# The paper's images: bench task -> [(name, path in DIR, mask path, preset)]
PAPER_IMAGES = {
    "denoise": [("F16", "denoising/F16_GT.png", None, "denoise")],
    "sr4": [("zebra", "sr/zebra_GT.png", None, "sr4")],
    "sr8": [("zebra", "sr/zebra_GT.png", None, "sr8")],
    "restore": [("barbara", "restoration/barbara.png", None, "restore")],
    "inpaint": [
        ("kate", "inpainting/kate.png", "inpainting/kate_mask.png", "inpaint"),
        ("vase", "inpainting/vase.png", "inpainting/vase_mask.png", "inpaint-meshgrid"),
        ("library", "inpainting/library.png", "inpainting/library_mask.png", "inpaint-deep"),
    ],
}

# scikit-image's bundled images: bench task -> [(name, skimage.data function)]
BUNDLED_IMAGES = {
    "denoise": [("astronaut", "astronaut"), ("coffee", "coffee")],
    "sr4": [("chelsea", "chelsea")],
    "sr8": [("chelsea", "chelsea")],
    "restore": [("camera", "camera")],
    "inpaint": [("astronaut", "astronaut")],
}


@dataclass
class Case:
    """One benchmark input: what restore() is given and the ground truth it is scored against."""

    name: str  # the image: 'F16', 'astronaut', ...
    bench_task: str  # one of TASKS
    observed: np.ndarray  # (h, w, C) float32: the corrupted input
    target: np.ndarray  # (H, W, C) float32: the ground truth at the output size
    mask: np.ndarray | None = None  # (h, w) float32 {0, 1}, 1 = known pixel
    preset: str = ""
    source: str = ""
    protocol: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.bench_task}/{self.name}"

    @property
    def task(self) -> str:
        return RESTORE_ARGS[self.bench_task][0]

    @property
    def scale(self) -> int | None:
        return RESTORE_ARGS[self.bench_task][2]

    def restore_kwargs(self) -> dict:
        """The arguments restore() takes for this case, besides the image: the preset's fixed count of
        iterations (stop='iterations'), so that every method runs the same number."""
        kwargs = {"task": self.task, "preset": self.preset, "target": self.target, "stop": "iterations"}
        if self.scale is not None:
            kwargs["scale"] = self.scale
        if self.mask is not None:
            kwargs["mask"] = self.mask
        return kwargs

    def input_psnr(self) -> float:
        """The PSNR of the input itself against the target: noisy image, bicubic LR (SR), masked image."""
        if self.scale is not None:
            return numpy_psnr(bicubic_upsample(self.observed, self.target.shape[:2]), self.target)
        return numpy_psnr(self.observed, self.target)

    def meta(self) -> dict:
        return {
            "key": self.key,
            "name": self.name,
            "bench_task": self.bench_task,
            "task": self.task,
            "preset": self.preset,
            "scale": self.scale,
            "source": self.source,
            "protocol": self.protocol,
            "observed_shape": list(self.observed.shape),
            "target_shape": list(self.target.shape),
            "known_fraction": None if self.mask is None else float(self.mask.mean()),
            **self.extras,
        }


def numpy_psnr(x: np.ndarray, ref: np.ndarray) -> float:
    """All pixels and channels, data range 1, float64 mean (dipfast.metrics.psnr)."""
    from dipfast.metrics import psnr

    return float(psnr(torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(ref))))


def _seed(seed: int, *words: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(w.encode()) for w in words)])


def _to_float(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32) / 255
    return arr[..., None] if arr.ndim == 2 else arr


def crop_image(img: Image.Image, d: int = 32) -> Image.Image:
    """The original's crop_image: centre-crop W and H down to multiples of d (integer bbox)."""
    w, h = img.size
    nw, nh = w - w % d, h - h % d
    return img.crop((int((w - nw) / 2), int((h - nh) / 2), int((w + nw) / 2), int((h + nh) / 2)))


def crop_hr(img: Image.Image, d: int = 32) -> Image.Image:
    """load_LR_HR_imgs_sr's 'CROP': the same centre crop with a float bbox that PIL rounds."""
    w, h = img.size
    nw, nh = w - w % d, h - h % d
    return img.crop(((w - nw) / 2, (h - nh) / 2, (w + nw) / 2, (h + nh) / 2))


def centre_crop_image(img: Image.Image, size: int | None, multiple: int = 1) -> Image.Image:
    """A size x size centre crop (each side at most the image's), sides rounded down to `multiple`."""
    if size is None:
        return img
    w, h = img.size
    cw, ch = min(size, w), min(size, h)
    cw, ch = cw - cw % multiple, ch - ch % multiple
    if cw <= 0 or ch <= 0:
        raise InputError(f"--size {size} leaves no pixels of a {w} x {h} image at a multiple of {multiple}")
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def noisy(gt: np.ndarray, rng: np.random.Generator, sigma: float = SIGMA) -> np.ndarray:
    """get_noisy_image: Gaussian noise, clipped to [0, 1], not quantised."""
    return np.clip(gt + rng.normal(scale=sigma, size=gt.shape), 0, 1).astype(np.float32)


def sr_pair(hr: Image.Image, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(LR, HR) as load_LR_HR_imgs_sr: LR = HR.resize((W // f, H // f), LANCZOS) (the old ANTIALIAS)."""
    w, h = hr.size
    lr = hr.resize((w // factor, h // factor), Image.LANCZOS)
    return _to_float(lr), _to_float(hr)


def bicubic_upsample(lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL BICUBIC resize of the 8-bit LR image to size = (H, W): the SR notebook's baseline."""
    lr8 = np.round(np.clip(lr, 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(lr8[..., 0] if lr8.shape[2] == 1 else lr8)
    out = np.asarray(img.resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32) / 255
    return out[..., None] if out.ndim == 2 else out


def numpy_bernoulli_mask(h: int, w: int, keep: float, rng: np.random.Generator) -> np.ndarray:
    """get_bernoulli_mask: U[0, 1) > 1 - keep, one mask for all channels. (h, w) float32."""
    return (rng.random((h, w)) > 1.0 - keep).astype(np.float32)


def stroke_mask(h: int, w: int, rng: np.random.Generator, holes: float = 0.05) -> np.ndarray:
    """A text-like mask for the bundled images: horizontal strokes 2 px high until `holes` are covered."""
    mask = np.ones((h, w), dtype=np.float32)
    while 1 - mask.mean() < holes:
        y = int(rng.integers(0, max(h - 2, 1)))
        length = int(rng.integers(max(w // 10, 1), max(w // 3, 2)))
        x = int(rng.integers(0, max(w - length, 1)))
        mask[y : y + 2, x : x + length] = 0
    return mask


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode in ("RGB", "L") else img.convert("RGB")


def _make(
    bench_task: str,
    name: str,
    img: Image.Image,
    size: int | None,
    seed: int,
    source: str,
    preset: str,
    mask_img: Image.Image | None = None,
    sigma: float = SIGMA,
) -> Case:
    """sigma: the denoise task's noise (the paper's 25/255 by default)."""
    rng = _seed(seed, bench_task, name)
    if bench_task == "denoise":
        gt = _to_float(centre_crop_image(crop_image(img, 32), size))
        return Case(
            name,
            bench_task,
            noisy(gt, rng, sigma),
            gt,
            preset=preset,
            source=source,
            protocol=f"gt + N(0, ({sigma * 255:g}/255)^2), clipped to [0, 1], not quantised (seeded)",
        )
    if bench_task in ("sr4", "sr8"):
        factor = RESTORE_ARGS[bench_task][2]
        hr = centre_crop_image(crop_hr(img, 32), size, multiple=factor)
        lr, hr_np = sr_pair(hr, factor)
        return Case(
            name,
            bench_task,
            lr,
            hr_np,
            preset=preset,
            source=source,
            protocol=f"HR centre-cropped to a multiple of 32; LR = PIL LANCZOS resize by 1/{factor}",
        )
    if bench_task == "restore":
        gt = _to_float(centre_crop_image(img, size))
        gt = np.pad(gt, ((1, 1), (1, 1), (0, 0)), mode="reflect")
        mask = numpy_bernoulli_mask(*gt.shape[:2], RESTORE_KEEP, rng)
        return Case(
            name,
            bench_task,
            gt * mask[..., None],
            gt,
            mask,
            preset=preset,
            source=source,
            protocol="reflection-padded by 1 px; Bernoulli mask keeping 50% (seeded); observed = gt * mask",
        )
    if bench_task == "inpaint":
        img = centre_crop_image(crop_image(img, 64), size)
        gt = _to_float(img)
        if mask_img is not None:
            mask = (_to_float(centre_crop_image(crop_image(mask_img.convert("L"), 64), size))[..., 0] > 0.5).astype(
                np.float32
            )
            protocol = "the given mask (white = known); observed = gt * mask"
        else:
            mask = stroke_mask(*gt.shape[:2], rng)
            protocol = "synthetic 2-px strokes covering 5% (seeded); observed = gt * mask"
        return Case(name, bench_task, gt * mask[..., None], gt, mask, preset=preset, source=source, protocol=protocol)
    raise InputError(f"unknown bench task {bench_task!r}; valid: {list(TASKS)}")


def load_cases(data_dir: str | Path | None, tasks=TASKS, size: int | None = None, seed: int = 0) -> list[Case]:
    """The cases of `tasks` from the paper's images in data_dir, or from scikit-image's when None.

    size: centre-crop every image to at most size x size (None: the notebooks' working sizes).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InputError(f"unknown bench task {unknown[0]!r}; valid: {list(TASKS)}")
    cases = []
    if data_dir is None:
        from skimage import data as skdata

        for task in tasks:
            for name, fn in BUNDLED_IMAGES[task]:
                img = Image.fromarray(getattr(skdata, fn)())
                cases.append(_make(task, name, img, size, seed, f"skimage.data.{fn}", RESTORE_ARGS[task][1]))
        return cases
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(
            f"--data {str(root)!r} is not a folder; give the paper's data folder (e.g. ../shared/data/dip)"
        )
    for task in tasks:
        for name, rel, mask_rel, preset in PAPER_IMAGES[task]:
            path = root / rel
            if not path.is_file():
                continue  # a folder may hold only some of the paper's images (F16 alone for bench/gpu_quick.sh)
            mask_img = None
            if mask_rel is not None:
                if not (root / mask_rel).is_file():
                    raise InputError(f"{str(path)!r} has no mask {str(root / mask_rel)!r}")
                mask_img = _open(root / mask_rel)
            cases.append(_make(task, name, _rgb(_open(path)), size, seed, str(rel), preset, mask_img))
    if not cases:
        raise InputError(
            f"no images of tasks {list(tasks)} found in {str(root)!r}; expected e.g. {PAPER_IMAGES['denoise'][0][1]}"
        )
    return cases


def missing_images(data_dir: str | Path, tasks=TASKS) -> list[tuple[str, str]]:
    """(task, path) of the paper's images of `tasks` that data_dir lacks (load_cases leaves them out)."""
    root = Path(data_dir)
    return [(task, rel) for task in tasks for _, rel, _, _ in PAPER_IMAGES[task] if not (root / rel).is_file()]


def _open(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.copy()


def throughput_case(size: int, seed: int = 0) -> Case:
    """A size x size denoising input for the throughput table: astronaut, cropped or resized."""
    from skimage import data as skdata

    img = Image.fromarray(skdata.astronaut())
    if size > min(img.size):
        img = img.resize((size, size), Image.BICUBIC)
    gt = _to_float(centre_crop_image(img, size))
    return Case(
        "astronaut",
        "denoise",
        noisy(gt, _seed(seed, "throughput", str(size))),
        gt,
        preset="denoise",
        source="skimage.data.astronaut",
        protocol=f"{size} x {size}, sigma = 25",
    )


def save_case(case: Case, path: Path) -> None:
    """Write a case for a worker process: arrays in an .npz, the rest as JSON inside it."""
    arrays = {"observed": case.observed, "target": case.target}
    if case.mask is not None:
        arrays["mask"] = case.mask
    meta = {
        "name": case.name,
        "bench_task": case.bench_task,
        "preset": case.preset,
        "source": case.source,
        "protocol": case.protocol,
        "extras": case.extras,
    }
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def load_case(path: Path) -> Case:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return Case(
            meta["name"],
            meta["bench_task"],
            z["observed"],
            z["target"],
            z.get("mask"),
            meta["preset"],
            meta["source"],
            meta["protocol"],
            meta["extras"],
        )
