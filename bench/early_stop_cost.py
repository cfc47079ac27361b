"""What stop='auto' adds to a step: the criterion, the freeze of stopped networks and the EMA's mask,
timed on the real step's tensors against the step itself, in one process, interleaved.

    python bench/early_stop_cost.py --size 128 --device cpu        # issue 14: at most 5% of a step

The default net (the denoise preset), one network, the native backend; the rule has the calibrated
form (W = 100, the window's mean) and a patience that never runs out, so every step pays the update.
Both freeze branches are timed: the CPU's (host-read mask) and the CUDA graph's (masked where over
every parameter and Adam moment); where the step runs its rules fused (CUDA, or --fused under
TRITON_INTERPRET=1), the fused kernels' update and freeze too (dipfast.kernels.fused_rules: what the
step runs there), against the fused EMA alone. Prints one JSON line: medians in ms and the ratios to
the step.

    python bench/early_stop_cost.py --size 512 --device cuda       # the GPU's figure, fused
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dipfast import backends, engine, fast_step, nets, step_rules
from dipfast.early_stop import EarlyStopSpec
from dipfast.presets import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fused", action="store_true", help="the fused rules on the CPU (under TRITON_INTERPRET=1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    preset = PRESETS["denoise"]
    size = (args.size, args.size)
    work = nets.working_size(preset.net, preset.input_depth, *size)
    y = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    problem = engine.Problem(input_shape=(preset.input_depth, *work), z=None, out_size=size, n_channels=3, y=y)
    plan = backends.resolve("native", "auto", device)
    spec = EarlyStopSpec("wmv", window=100, patience=10**9, returns="window-mean")
    built, zs = fast_step.build_nets([problem], preset, [0])
    fused = True if args.fused else None
    step = fast_step.FastStep(built, zs, [problem], preset, device, [0], 25, plan, fused_rules=fused, early_stop=spec)
    freezes = {"cpu": step_rules.Freeze(graph_safe=False), "graph_safe": step_rules.Freeze(graph_safe=True)}
    losses, scratch = torch.zeros(1, device=device), torch.empty_like(step.out)

    def added_fused():  # FastStep.after_backward's early-stopping share, fused: the update, the freeze's two copies
        es, held = step.early_stop, step._held()
        step.fused.outputs(step.out, scratch, step.ema, None, step.iteration, preset.ema, es, losses)
        step.freeze.save(held, es.stopped)  # the step's Freeze: the fused row copies
        step.freeze.restore(held, es.stopped)

    def ema_alone_fused():
        step.fused.outputs(step.out, scratch, step.ema, None, step.iteration, preset.ema)

    def added(freeze):
        es, held = step.early_stop, step._held()
        es.update(step.out, step.iteration)
        freeze.save(held, es.stopped)
        step_rules.ema_update(step.ema, step.out, step.iteration == 0, preset.ema, es.stopped)
        freeze.restore(held, es.stopped)

    def ema_alone():  # what the step does without early stopping, subtracted from `added`
        step_rules.ema_update(step.ema, step.out, step.iteration == 0, preset.ema)

    def timed(fn, n):
        sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - start) / n * 1e3

    with engine.ieee_fp32():
        for _ in range(4):  # past the CUDA graph's warm-up and capture, Adam's state made
            step()
        rows = {"step": [], "ema_alone": [], "cpu": [], "graph_safe": []}
        if step.fused is not None:
            rows |= {"fused": [], "ema_alone_fused": []}
        for _ in range(args.rounds):
            rows["step"].append(timed(step, 4))
            rows["ema_alone"].append(timed(ema_alone, 40))
            for name, freeze in freezes.items():
                rows[name].append(timed(lambda f=freeze: added(f), 40))
            if step.fused is not None:
                rows["fused"].append(timed(added_fused, 40))
                rows["ema_alone_fused"].append(timed(ema_alone_fused, 40))
    ms = {k: statistics.median(v) for k, v in rows.items()}
    added_ms = {k: ms[k] - ms["ema_alone"] for k in freezes}
    if step.fused is not None:
        added_ms["fused"] = ms["fused"] - ms["ema_alone_fused"]
    report = {
        "size": args.size,
        "device": str(device),
        "precision": plan.precision,
        "threads": args.threads,
        "params": sum(b.numel() for b in step.flat.buffers),
        "step_ms": ms["step"],
        **{f"added_ms_{k}": v for k, v in added_ms.items()},
        **{f"ratio_{k}": v / ms["step"] for k, v in added_ms.items()},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
