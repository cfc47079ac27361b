"""What the op benchmarks that time a CUDA op share: the skip mark off CUDA, and a timed call that waits for the GPU."""

import pytest
import torch

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA only: the Triton op runs on CPU only in the interpreter, not timeable"
)


def synced(fn):
    """fn, followed by torch.cuda.synchronize(): the benchmark times the kernels, not their launch."""

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run
