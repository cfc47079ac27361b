"""A pytest-xdist worker whose CUDA context a test has left unusable ends, and xdist starts a fresh one.

An illegal address or a kernel that fails to launch is sticky: every CUDA call after it in the same process fails
with the same error, so one broken kernel failed every test its worker ran after it (a quarter of a GPU window's
parity step, with four workers). xdist reports the test the worker was running as crashed, beside its own failure.
Without xdist the run goes on in its one process, as before.
"""

import os
import sys

import torch

from dipfast.bench import lost_context


def pytest_runtest_teardown(item):
    if "PYTEST_XDIST_WORKER" in os.environ and torch.cuda.is_initialized() and lost_context.context_lost("cuda"):
        print(f"\n{item.nodeid} left the CUDA context unusable: this worker ends", file=sys.stderr, flush=True)
        os._exit(1)
