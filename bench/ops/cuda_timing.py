"""What the op benchmarks that time a CUDA op share: the skip mark off CUDA, and the timed call.

The fast step runs these ops inside one CUDA graph, so what counts is their time on the GPU, not the Python
and launch cost of calling them one by one: on the H200 the fused Triton conv block's wall time per call
was 0.33-0.77 ms at every shape, 16 px included (bench/results/2026-12-04-h200-504226cc86/call2/ops.log),
a fixed cost that the step's graph never pays. graphed() times a replay of the op captured in a CUDA graph;
an op that cannot be captured is timed as a synced call, and extra_info["timing"] says which.
"""

import pytest
import torch

from dipfast.cuda_graph import first_cause

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA only: the Triton op runs on CPU only in the interpreter, not timeable"
)


def synced(fn):
    """fn, followed by torch.cuda.synchronize(): the call's wall time, launches and Python included."""

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def graphed(benchmark, fn, warmup: int = 2):
    """fn captured once in a CUDA graph (after `warmup` calls on a side stream, which compile and pick
    algorithms); the returned call replays it and waits. Call it in the contexts fn needs (flags, no_grad)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except RuntimeError as error:  # not capturable: its wall time, marked so
        e = first_cause(error)  # the error inside the capture, under the capture end's own
        benchmark.extra_info["timing"] = f"wall ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"
        torch.cuda.synchronize()
        return synced(fn)
    benchmark.extra_info["timing"] = "cuda-graph replay"

    def run():
        graph.replay()
        torch.cuda.synchronize()
        return out

    return run
