"""Native CPU ops suite (tests/native): each op of dipfast.native against its eager PyTorch twin.

Oracle: the eager twin in float64 on the same input (upcast); tolerances in _native_helpers.py.
Kernel tests skip where the extension is not built (test_native_build.py then says whether that
was allowed); the fallback tests run either way.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test (restored afterwards): the tensors are small, and a second thread
    on a shared 2-core machine costs more in hand-offs than it saves. Thread-count tests set their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
