"""pytest-benchmark micro-benchmarks of single ops, collected only when asked:

    python -m pytest bench/ops --benchmark-only          (timings)
    python -m pytest bench/ops --benchmark-disable       (each once, as a smoke test)

The default `python -m pytest` never comes here: pyproject's testpaths is ["tests"]. Files are
named bench_<op>.py after the op they time (STYLE.md, section 5.2); this hook collects them,
since pytest's default file pattern is test_*.py.
"""

import pytest
import torch


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)
