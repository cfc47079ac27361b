"""GraphedStep's capture on the CPU, torch.cuda's graph calls replaced by stand-ins that record what runs inside.

What the real capture does is CUDA's (tests/test_cuda_restore.py, tests/test_backends.py on a GPU); these check
what GraphedStep does around it, which no CPU run of a fit reaches (the CPU plan builds no graph).
"""

import contextlib
import gc

import pytest
import torch

from dipfast import cuda_graph
from dipfast.errors import GraphCaptureError


@pytest.fixture
def capturing(monkeypatch):
    """torch.cuda's calls that GraphedStep makes, as stand-ins; yields the list of what happened inside captures."""
    inside = []

    class Graph:
        def register_generator_state(self, generator):
            pass

        def replay(self):
            inside.append("replay")

    @contextlib.contextmanager
    def graph(g, stream=None):
        inside.append("begin")
        yield
        inside.append("end")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "caller's stream")
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: inside.append(f"set {stream}"))
    return inside


def _captured(step) -> cuda_graph.GraphedStep:
    graphed = cuda_graph.GraphedStep(step, torch.device("cuda"))
    graphed.calls = cuda_graph.WARMUP  # past the warm-up: the next call captures
    return graphed


@pytest.mark.parametrize("fails", [False, True], ids=["captured", "failed"])
def test_no_automatic_garbage_collection_runs_inside_a_capture(capturing, fails):
    """A collection inside the capture that frees another fit's unreachable CUDAGraph destroys it while the stream
    captures, and the capture fails at its end: the collector is off inside, and as the caller had it after."""
    seen = []

    def step():
        seen.append(gc.isenabled())
        if fails:
            raise RuntimeError("operation not permitted when stream is capturing")

    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            graphed = _captured(step)
            with pytest.raises(GraphCaptureError) if fails else contextlib.nullcontext():
                graphed()
            assert seen[-1] is False, "the collector ran automatically inside the capture"
            assert gc.isenabled() == enabled
        finally:
            gc.enable()
    assert capturing.count("begin") == 2
    assert capturing.count("replay") == (0 if fails else 2)


def test_out_of_memory_inside_the_capture_is_raised_as_the_memory_error_it_is(capturing):
    """Not a GraphCaptureError ('backend=reference runs without one' would be the wrong advice): the step's own
    torch.OutOfMemoryError, as an eager step raises it, for restore() to turn into its one-line DeviceMemoryError;
    the caller's stream back."""
    out_of_memory = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    def step():
        raise out_of_memory

    with pytest.raises(torch.OutOfMemoryError) as info:
        _captured(step)()
    assert info.value is out_of_memory and not isinstance(info.value, GraphCaptureError)
    assert capturing[-1] == "set caller's stream"
