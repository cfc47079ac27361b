"""Side-by-side ms/iteration of the default DIP net on CPU: eager vs torch.compile, fp32 vs bf16 autocast.

One process; every configuration trains its own copy of the same initial net (dipfast's default
denoising net) on the same input sequence (z + N(0, 1/30) noise, fixed target), one iteration =
forward + MSE + backward + Adam step (lr 0.01). Iteration 0 of each configuration is timed alone
(it includes torch.compile's compile for the compiled ones); then WARM more warm-up iterations each;
then ROUNDS rounds in which every configuration runs one timed iteration in turn (interleaved, so
that the load of a shared machine hits all of them alike). Reported: the median, min and max of
the timed iterations, and the losses of all iterations with a finiteness check.

Run with a fresh Inductor cache for cold compile times:
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python docs/notes/compile_bf16_bench.py [--size 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import dipfast.nets
import dipfast.presets

CONFIGS = {  # name: (bf16 autocast, channels_last, compiled)
    "eager fp32": (False, False, False),
    "eager bf16": (True, False, False),
    "eager bf16 + channels_last": (True, True, False),
    "compiled fp32": (False, False, True),
    "compiled bf16": (True, False, True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the configuration names")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = args.size
    n_iter = 1 + args.warm + args.rounds

    torch.manual_seed(0)
    net0 = dipfast.nets.build(dipfast.presets.PRESETS["denoise"].net, 32, 3)
    z = dipfast.nets.noise_input(32, s, s)
    inputs = [z + torch.randn_like(z) / 30 for _ in range(n_iter)]
    target = torch.rand(1, 3, s, s)

    states = {}
    for name, (bf16, cl, compiled) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        net = copy.deepcopy(net0)
        xs = inputs
        if cl:
            net = net.to(memory_format=torch.channels_last)
            xs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        states[name] = dict(
            net=net, fn=torch.compile(net) if compiled else net, opt=opt, xs=xs, bf16=bf16, i=0, losses=[], times=[]
        )

    def step(st) -> float:
        t0 = time.perf_counter()
        st["opt"].zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=st["bf16"]):
            out = st["fn"](st["xs"][st["i"]])
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        st["opt"].step()
        dt = time.perf_counter() - t0
        st["losses"].append(loss.item())
        st["finite"] = st.get("finite", True) and all(torch.isfinite(p).all() for p in st["net"].parameters())
        st["i"] += 1
        return dt

    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    for name, st in states.items():
        st["first"] = step(st)
        print(f"{name}: first iteration {st['first']:.1f} s", flush=True)
        for _ in range(args.warm):
            step(st)
    for _ in range(args.rounds):
        for st in states.values():
            st["times"].append(step(st))

    print(f"\ndefault net, {s}x{s}, forward + backward + Adam; median of {args.rounds} interleaved iterations")
    print("| path | first iteration (s) | compile (s, about) | ms/iteration median | min | max | finite |")
    print("|---|---|---|---|---|---|---|")
    for name, st in states.items():
        med = statistics.median(st["times"])
        comp = f"{st['first'] - med:.0f}" if CONFIGS[name][2] else "-"
        print(
            f"| {name} | {st['first']:.1f} | {comp} | {1e3 * med:.0f} | {1e3 * min(st['times']):.0f} "
            f"| {1e3 * max(st['times']):.0f} | {st['finite']} |"
        )
    print("\nloss per iteration")
    print("| iteration | " + " | ".join(states) + " |")
    print("|---" * (len(states) + 1) + "|")
    for i in range(n_iter):
        print(f"| {i} | " + " | ".join(f"{st['losses'][i]:.6f}" for st in states.values()) + " |")


if __name__ == "__main__":
    main()
