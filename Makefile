# The README's two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# the suite's processes (pytest-xdist): one per core; TEST_WORKERS=0 runs it in this one process
TEST_WORKERS ?= auto

.PHONY: install demo test

# --no-build-isolation: build against the torch installed here, never a second one fetched by pip.
install:
	$(PIP) install -q -r requirements-ci.txt
	$(PIP) install -q --no-build-isolation --no-deps -e .

demo: install
	$(PYTHON) -m dipfast.cli demo --force

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS)
