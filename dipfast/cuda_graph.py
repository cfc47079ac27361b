"""GraphedStep: a step function run a few times eagerly, then captured once as a CUDA graph and replayed.

PyTorch's whole-network capture recipe (torch.cuda.graphs, "Whole-network capture"): the warm-up
calls run on a side stream, so lazy initialisation, torch.compile's compilation and cuDNN's
algorithm search happen before the capture; the capture records one call; every later call replays
it. The warm-up calls and the capture share one side stream: a parameter's AccumulateGrad node runs on
the stream it was made on, and it outlives a call (the eager step's module keeps the last call's
parameter views: ModuleSlots), so with a fresh stream per call autograd synced the two streams and warned
of the mismatch ("may break CUDA graph capture": the H200 runs' throughput logs).
The warm-up and the capture run with cudnn.benchmark on: cuDNN times its candidate algorithms
(which syncs, so it must happen before the capture, PyTorch PR #91032) and the graph keeps the
fastest; the caller's flags are restored afterwards. Random generators registered with the graph
draw fresh numbers on every replay. No automatic garbage collection runs during the capture: since torch 2.9,
torch.cuda.graph no longer collects before capturing, and a collection inside the capture that frees an
unreachable CUDAGraph (another fit's, in a reference cycle) destroys it while the stream captures, which CUDA
refuses and the capture's end reports as its own failure (PyTorch PR #161037).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Sequence

import torch

from dipfast.errors import GraphCaptureError

WARMUP = 3  # eager calls before the capture: cuDNN's search needs >= 2 at each shape, compile 1


class GraphedStep:
    """Call it as the step: the first WARMUP calls run `step` eagerly, the next captures it, later ones replay.

    `before_capture` runs right before the capture (e.g. the optimiser's zero_grad(set_to_none=True), so
    the gradients are allocated from the graph's memory pool); `before_first`, where given, at the start of the first
    warm-up call, on its stream (e.g. the step's Triton kernels compiled side by side), its time the warm-up's.
    """

    def __init__(
        self,
        step: Callable[[], None],
        device: torch.device,
        generators: Sequence[torch.Generator] = (),
        before_capture: Callable[[], None] = lambda: None,
        before_first: Callable[[], None] | None = None,
    ):
        self.step, self.device, self.generators, self.before_capture = step, device, list(generators), before_capture
        self.before_first = before_first
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captures = 0  # one per fit, unless something re-records
        # the eager calls, from the first's start to the end of their GPU work: lazy initialisation, cuDNN's
        # algorithm search, the Triton kernels' compilation (or their load from its cache), torch.compile
        self.warmup_seconds = 0.0
        self.capture_seconds = 0.0
        self._first_call = 0.0
        self.stream: torch.cuda.Stream | None = None  # the warm-up's and the capture's, made at the first call

    def __call__(self) -> None:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.calls <= WARMUP:
            if self.calls == 1:
                self._first_call = time.perf_counter()
                self.stream = torch.cuda.Stream(self.device)
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream), _cudnn_benchmark():
                if self.calls == 1 and self.before_first is not None:
                    self.before_first()
                self.step()
            current.wait_stream(self.stream)
        else:
            self._capture()
            self.graph.replay()  # the capture only records: this call's iteration runs now

    def release(self) -> None:
        """The graph and its memory pool let go (a fit's loop is over): the pool holds a whole step's activations,
        which eager work after the loop (the final forward) cannot allocate from while the graph lives."""
        self.graph = None

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        self.warmup_seconds = start - self._first_call
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        self.before_capture()
        caller = torch.cuda.current_stream(self.device)
        try:
            with _no_automatic_gc(), torch.cuda.graph(graph, stream=self.stream), _cudnn_benchmark():
                self.step()
        except RuntimeError as error:  # torch.AcceleratorError too
            # a capture that fails to end leaves torch.cuda.graph's stream context entered: the caller's comes back
            torch.cuda.set_stream(caller)
            cause = first_cause(error)
            if isinstance(cause, torch.OutOfMemoryError):  # the memory's, not the capture's: as an eager step raises it
                raise cause from None
            raise GraphCaptureError(cause) from error
        torch.cuda.synchronize(self.device)
        self.graph = graph
        self.captures += 1
        self.capture_seconds = time.perf_counter() - start


def first_cause(error: BaseException) -> BaseException:
    """The error raised inside the capture: the capture's end raises its own ("operation failed due to a previous
    error during capture") over it, with the first one as its context."""
    while error.__context__ is not None:
        error = error.__context__
    return error


@contextlib.contextmanager
def _no_automatic_gc():
    """Dead cycles collected first, while nothing captures; then no automatic collection inside, the caller's
    setting restored on exit."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _cudnn_benchmark():
    """cudnn.benchmark on inside, the caller's setting restored on exit."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
