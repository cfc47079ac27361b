"""Does torch.compile + CPU bf16 autocast training of a DIP skip net give NaN? (docs/notes/compile-bf16-nan.md)

Self-contained (torch only). Builds the default DIP net's geometry (skip encoder-decoder: reflection
pad + conv + BatchNorm2d in training mode + LeakyReLU(0.2), stride-2 down, bilinear x2 up, concat
with a 1x1 skip branch, BN, 1x1 head, sigmoid), then trains three copies from the same initial
weights on the same inputs for --iters Adam steps (lr 0.01, the input perturbed by N(0, 1/30)):

    eager fp32 | eager bf16 autocast | torch.compile(net) bf16 autocast

and checks, every iteration, whether the loss, the output, the gradients and the parameters
after the Adam step are finite, to tell a forward, a backward and an optimizer-step NaN apart.

Exit status 1 when the compiled bf16 run produces a non-finite value (the bug reproduces),
0 otherwise. Default: the default DIP net (5 levels x 128 channels, skip 4, input depth 32) at
64 x 64. On the 2-core CI machine: 55 s with a warm Inductor cache, 2-3 minutes cold while the
machine was shared (load 3-4); almost all of it is the compile. --small (3 levels x 16 channels,
32 x 32) is not much faster cold: the compile time is mostly fixed cost. --channels-last puts the
net and the input in channels_last first.

    python docs/notes/compile_bf16_nan_repro.py [--small] [--size 64] [--iters 10] [--channels-last]
                                                [--no-layout-opt]

On a machine where it reproduces, the next runs separate the suspects (docs/notes/compile-bf16-nan.md):
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python ...   # oneDNN without its AMX kernels
    ONEDNN_VERBOSE=1 python ... 2>&1 | grep conv      # which oneDNN convolution kernels ran
    python ... --no-layout-opt                        # Inductor without its channels_last conv layouts
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn


class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, k, stride=1):
        super().__init__()
        self.pad = (k - 1) // 2
        self.conv = nn.Conv2d(cin, cout, k, stride)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, mode="reflect")
        return F.leaky_relu(self.bn(self.conv(x)), 0.2)


class Level(nn.Module):
    def __init__(self, cin, down, up, skip, depth_left):
        super().__init__()
        self.skip = ConvBNAct(cin, skip, 1)
        self.down = ConvBNAct(cin, down, 3, stride=2)
        self.conv = ConvBNAct(down, down, 3)
        self.inner = Level(down, down, up, skip, depth_left - 1) if depth_left > 1 else None
        k = up if self.inner is not None else down
        self.merge_bn = nn.BatchNorm2d(skip + k)
        self.up = ConvBNAct(skip + k, up, 3)
        self.up1x1 = ConvBNAct(up, up, 1)

    def forward(self, x):
        d = self.conv(self.down(x))
        if self.inner is not None:
            d = self.inner(d)
        d = F.interpolate(d, scale_factor=2, mode="bilinear", align_corners=False)
        return self.up1x1(self.up(self.merge_bn(torch.cat([self.skip(x), d], 1))))


class SkipNet(nn.Module):
    def __init__(self, input_depth=32, channels=128, skip=4, depth=5, n_out=3):
        super().__init__()
        self.level = Level(input_depth, channels, channels, skip, depth)
        self.head = nn.Conv2d(channels, n_out, 1)

    def forward(self, z):
        return torch.sigmoid(self.head(self.level(z)))


def finite(t) -> bool:
    return bool(torch.isfinite(t).all())


def train(net, zs, target, iters, bf16, compiled):
    """Losses per iteration and the first non-finite event as (iteration, where) or None."""
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    fn = torch.compile(net) if compiled else net
    losses, event, t_first = [], None, None
    for i in range(iters):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = fn(zs[i])
        loss = F.mse_loss(out.float(), target)
        losses.append(loss.item())
        if event is None and not (finite(out) and finite(loss)):
            event = (i, "forward (output/loss)")
        loss.backward()
        bad = [n for n, p in net.named_parameters() if p.grad is not None and not finite(p.grad)]
        if event is None and bad:
            event = (i, f"backward (non-finite grads in {len(bad)} tensors, e.g. {bad[:3]})")
        opt.step()
        bad = [n for n, p in net.named_parameters() if not finite(p)]
        if event is None and bad:
            event = (i, f"Adam step (non-finite params in {len(bad)} tensors)")
        if t_first is None:
            t_first = time.perf_counter() - t0
    return losses, event, t_first


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="3 levels x 16 channels, input depth 8 (seconds)")
    ap.add_argument("--size", type=int, default=None, help="input side (default 64; 32 with --small)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-layout-opt",
        action="store_true",
        help="torch._inductor.config.layout_optimization = False: convolutions keep eager's layout",
    )
    args = ap.parse_args()
    if args.no_layout_opt:
        inductor_config.layout_optimization = False

    depth, ch, d_in = (3, 16, 8) if args.small else (5, 128, 32)
    size = args.size or (32 if args.small else 64)
    torch.manual_seed(args.seed)
    net0 = SkipNet(d_in, ch, 4, depth)
    z = torch.rand(1, d_in, size, size) * 0.1
    zs = [z + torch.randn_like(z) / 30 for _ in range(args.iters)]
    target = torch.rand(1, 3, size, size)
    if args.channels_last:
        net0 = net0.to(memory_format=torch.channels_last)
        zs = [x.contiguous(memory_format=torch.channels_last) for x in zs]

    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}, "
        f"threads {torch.get_num_threads()}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}"
    )
    print(f"net: depth {depth}, {ch} channels, input {d_in} x {size} x {size}, channels_last={args.channels_last}")
    runs = {}
    configs = (("eager fp32", False, False), ("eager bf16", True, False), ("compiled bf16", True, True))
    for name, bf16, compiled in configs:
        t0 = time.perf_counter()
        runs[name] = train(copy.deepcopy(net0), zs, target, args.iters, bf16, compiled)
        print(f"{name}: {time.perf_counter() - t0:.1f} s (first iteration {runs[name][2]:.1f} s)", flush=True)

    print("iter " + " ".join(f"{n:>14}" for n in runs))
    for i in range(args.iters):
        print(f"{i:4d} " + " ".join(f"{runs[n][0][i]:14.6f}" for n in runs))
    for name, (_, event, _) in runs.items():
        verdict = "all finite" if event is None else f"first non-finite at iteration {event[0]}: {event[1]}"
        print(f"{name}: {verdict}")

    if runs["compiled bf16"][1] is not None:
        print("REPRODUCED: compiled bf16 training went non-finite")
        return 1
    print("NOT REPRODUCED: compiled bf16 training stayed finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
