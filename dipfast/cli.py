"""The `dipfast` command: restore, batch, demo, bench, doctor, --version.

Bad input ends in one line on stderr and exit status 2, never a traceback; no input file is
ever overwritten, and an existing output only with --force.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dipfast.backends import BACKENDS, PRECISIONS
from dipfast.cli_args import EXIT_BAD_INPUT, OneLineErrorParser, non_negative_int, positive_int, tile_option
from dipfast.early_stop import STOPS
from dipfast.errors import InputError, NumericalError

EXIT_INTERRUPTED = 130
EXIT_NUMERICAL = 3  # the fit went NaN or inf (dipfast.errors.NumericalError)
EXIT_SOME_FAILED = 1  # batch: some images failed (each one's error is in the manifest and the summary)
STOP_HELP = (
    "auto (stop where the fit starts to fit the noise, no ground truth needed; --iters is the upper bound) or "
    "iterations (the preset's fixed count); default: the task's (auto for denoise)"
)


def _parser() -> argparse.ArgumentParser:
    from dipfast.doctor import VersionAction
    from dipfast.tasks import TASKS

    parser = OneLineErrorParser(prog="dipfast", description="Deep Image Prior, fast and faithful.")
    parser.add_argument("--version", action=VersionAction, help="the version and a one-line `dipfast doctor`")
    sub = parser.add_subparsers(dest="command", metavar="{restore,batch,demo,bench,doctor}")

    r = sub.add_parser("restore", help="restore one image", description="Restore one image with Deep Image Prior.")
    r.add_argument("input", help="the corrupted image (PNG, JPEG, TIFF, ...)")
    r.add_argument("-o", "--output", required=True, help="where to write the restored image")
    r.add_argument("--task", default="denoise", choices=[t for t in TASKS if t != "custom"])
    r.add_argument("--preset", help="a named preset of the task (see the README's task table)")
    r.add_argument("--scale", type=int, help="SR factor: 2, 4 or 8")
    r.add_argument("--mask", help="mask image for inpaint/restore (white = known pixel)")
    r.add_argument("--guide", help="the flash image for --task flash")
    r.add_argument("--target", help="ground truth: report PSNR and SSIM")
    r.add_argument("--iters", type=positive_int, help="number of iterations (default: the preset's)")
    r.add_argument("--seed", type=non_negative_int, default=0)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--precision", default="auto", help=f"{', '.join(PRECISIONS)} (default: auto)")
    r.add_argument(
        "--backend", default="auto", help=f"{', '.join(BACKENDS)} (default: auto, the measured fastest for the device)"
    )
    r.add_argument(
        "--restarts", type=positive_int, default=1, help="average this many fits of different seeds (the paper: 2)"
    )
    _add_tiling(r)
    r.add_argument("--stop", choices=STOPS, help=STOP_HELP)
    r.add_argument("--ema-output", help="also write the EMA of the outputs here")
    r.add_argument("--force", action="store_true", help="overwrite existing output files")
    r.add_argument("--quiet", action="store_true", help="no progress bar")

    _add_batch_parser(sub, TASKS)

    d = sub.add_parser(
        "demo",
        help="denoise a built-in example",
        description=(
            "Denoise a crop of scikit-image's astronaut with synthetic sigma = 25 noise and write the "
            "noisy, restored and EMA images and a plot of PSNR against iterations."
        ),
    )
    d.add_argument("--out", default="dipfast-demo", help="folder for the results (default: dipfast-demo)")
    d.add_argument("--iters", type=positive_int, default=400)
    d.add_argument("--size", type=positive_int, default=64, help="side of the square crop (default: 64)")
    d.add_argument("--device", default="auto")
    d.add_argument("--seed", type=non_negative_int, default=0)
    d.add_argument("--force", action="store_true", help="overwrite existing result files")
    d.add_argument("--quiet", action="store_true")

    from dipfast.bench.cli import add_bench_parser

    add_bench_parser(sub)
    sub.add_parser(
        "doctor",
        help="which paths run here: native ops, Triton, CUDA, bf16",
        description="Say which of dipfast's paths are active on this machine, and why (dipfast/doctor.py).",
    )
    return parser


def _add_batch_parser(sub, tasks) -> None:
    from dipfast.batch import UNSUPPORTED_TASKS

    b = sub.add_parser(
        "batch",
        help="restore many images into a folder (resumable; --ray for a cluster)",
        description=(
            "Restore every image of the inputs into OUT_DIR, keeping relative paths and formats. A manifest "
            "(manifest.jsonl) records each image; a rerun skips the finished ones. Failed images are listed at "
            "the end and the exit status is 1."
        ),
    )
    b.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (searched recursively) or globs")
    b.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the outputs and manifest")
    b.add_argument("--task", default="denoise", choices=[t for t in tasks if t not in UNSUPPORTED_TASKS])
    b.add_argument("--preset", help="a named preset of the task")
    b.add_argument("--scale", type=int, help="SR factor: 2, 4 or 8")
    b.add_argument("--mask-dir", help="inpaint/restore: the masks, at the inputs' relative paths (white = known)")
    b.add_argument("--target-dir", help="ground truths at the inputs' relative paths: PSNR in the manifest")
    _add_tiling(b)
    b.add_argument("--stop", choices=STOPS, help=STOP_HELP)
    b.add_argument("--iters", type=positive_int, help="number of iterations (default: the preset's)")
    b.add_argument("--seed", type=non_negative_int, default=0, help="every image's seed (as restore --seed)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--precision", default="auto", help=f"{', '.join(PRECISIONS)} (default: auto)")
    b.add_argument("--backend", default="auto", help=f"{', '.join(BACKENDS)} (default: auto)")
    b.add_argument(
        "--batch", type=positive_int, default=4, metavar="N", help="most images per step on a GPU (default: 4)"
    )
    b.add_argument(
        "--ray",
        nargs="?",
        const=True,
        default=None,
        metavar="ADDRESS",
        help="run the groups as Ray tasks: on ADDRESS, else RAY_ADDRESS, else a local cluster",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_tiling(parser) -> None:
    parser.add_argument(
        "--tile",
        type=tile_option,
        default="auto",
        help="auto (tiles only when an image would not fit the device's memory), none, or a tile side in pixels",
    )
    parser.add_argument(
        "--overlap", type=non_negative_int, help="pixels shared by neighbouring tiles (default: tile / 8)"
    )


def _batch(args) -> int:
    from dipfast.batch import print_summary, restore_many

    summary = restore_many(
        args.inputs,
        args.output,
        task=args.task,
        preset=args.preset,
        scale=args.scale,
        mask_dir=args.mask_dir,
        target_dir=args.target_dir,
        iters=args.iters,
        backend=args.backend,
        precision=args.precision,
        device=args.device,
        batch=args.batch,
        seed=args.seed,
        ray=args.ray,
        stop=args.stop,
        tile=args.tile,
        overlap=args.overlap,
        progress=not args.quiet,
    )
    print_summary(summary)
    if summary.interrupted:
        print("dipfast: interrupted; rerun the same command to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_SOME_FAILED if summary.failed else 0


def _check_output(path: Path, inputs: list[str | None], force: bool) -> None:
    """Refuse to write over an input, over an existing file without --force, or where we cannot."""
    from PIL import Image

    for given in inputs:
        if given is not None and Path(given).exists() and path.exists() and os.path.samefile(given, path):
            raise InputError(f"output {str(path)!r} is the input file {given!r}; choose another output path")
    if path.is_dir():
        raise InputError(f"output {str(path)!r} is a folder; give a file name such as restored.png")
    if path.exists() and not force:
        raise InputError(f"output {str(path)!r} exists; pass --force to overwrite it")
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if path.suffix.lower() not in writable:
        raise InputError(f"output {str(path)!r} has no image extension Pillow can write; use .png, .tif or .jpg")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"output {str(path)!r} is not writable; check the folder's permissions")


def _save(image, path: Path) -> None:
    """The output file, written atomically (images.write_atomic): a failed write leaves no partial file."""
    from dipfast import images

    images.write_atomic(path, images.encode_image(image, path.suffix))


def _restore(args) -> int:
    from dipfast import images, restore

    out = Path(args.output)
    sources = [args.input, args.mask, args.guide, args.target]
    _check_output(out, sources, args.force)
    if args.ema_output:
        if Path(args.ema_output) == out:
            raise InputError("--ema-output must differ from --output")
        _check_output(Path(args.ema_output), sources, args.force)
    image = images.load_image(args.input, "input")
    result = restore(
        image,
        args.task,
        preset=args.preset,
        scale=args.scale,
        mask=args.mask,
        guide=args.guide,
        target=args.target,
        iters=args.iters,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        restarts=args.restarts,
        tile=args.tile,
        overlap=args.overlap,
        stop=args.stop,
        progress=not args.quiet,
    )
    _save(result.image, out)
    if args.ema_output:
        _save(result.ema_image, Path(args.ema_output))
    quality = f", PSNR {result.psnr:.2f} dB (EMA {result.ema_psnr:.2f} dB)" if result.psnr is not None else ""
    tiling = result.extras.get("tiling")
    tiles = ""
    if tiling:  # the tiles are of one size: the tile side, clipped to the image
        n, (_, _, h, w) = len(tiling["boxes"]), tiling["boxes"][0]
        tiles = f", {n} tile{'s' * (n != 1)} of {f'{h} px' if h == w else f'{h} x {w} px'}"
    if result.stop_reason == "early-stop" and tiling:
        stops = [t for t in tiling["stop_iterations"][0] if t is not None]
        tiles += f", each stopped early: its output of iteration {min(stops)} to {max(stops)}"
    elif result.stop_reason == "early-stop":
        tiles += f", stopped early: the output of iteration {result.stop_iteration}"
    elif result.stop_reason == "iterations" and result.extras.get("noise_gate_opened") is False:  # say why
        sigma = result.extras["noise_sigma"]
        tiles += (
            f", never stopped early: the loss never came down to the noise estimated in the image "
            f"(sigma {255 * sigma:.1f}/255), so the fit had no noise to stop before"
        )
    print(
        f"{out}: {result.iterations} iterations in {result.seconds:.1f} s ({result.its:.1f} it/s){tiles}{quality}"
        + (" [interrupted]" if result.stop_reason == "interrupted" else "")
    )
    return 0


def _demo(args) -> int:
    from dipfast.demo import run_demo

    run_demo(
        Path(args.out),
        iters=args.iters,
        size=args.size,
        device=args.device,
        seed=args.seed,
        force=args.force,
        progress=not args.quiet,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    if args.command == "bench":
        from dipfast.bench.cli import run_bench

        try:
            return run_bench(args)
        except KeyboardInterrupt:
            print("dipfast bench: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    if args.command == "doctor":
        from dipfast.doctor import report

        print(report())
        return 0
    try:
        return {"restore": _restore, "batch": _batch, "demo": _demo}[args.command](args)
    except InputError as e:
        print(f"dipfast: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NumericalError as e:  # nothing is written: the output would be NaN
        print(f"dipfast: error: {e}", file=sys.stderr)
        return EXIT_NUMERICAL
    except KeyboardInterrupt:
        print("dipfast: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
