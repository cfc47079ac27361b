"""Inductor's layout optimisation and the compile backend: its own rule (GraphLowering.decide_layout_opt)
counts aten.convolution nodes, and a backward graph has none (its convs are convolution_backward), so the
backward of the generator is lowered without layout optimisation while the forward gets it. The
harness's compile-forced-layout (backends.Backend.force_layout) forces it on both; these tests pin
both facts, so that a PyTorch upgrade that changes either shows here."""

from __future__ import annotations

import pytest
import torch
from _helpers import FAST, random_image
from torch._inductor import config as inductor_config
from torch._inductor import graph as inductor_graph

import dipfast
from dipfast import backends
from dipfast.bench import runs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def lowered(monkeypatch):
    """(is_backward, layout_opt) of every graph Inductor lowers from here on; its caches off, so that
    every graph is lowered in this process."""
    seen: list[tuple[bool, bool]] = []
    init = inductor_graph.GraphLowering.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append((bool(kwargs.get("is_backward")), bool(self.layout_opt)))

    monkeypatch.setattr(inductor_graph.GraphLowering, "__init__", recording_init)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    yield seen
    torch._dynamo.reset()


def _compiled_fit(np_rng):
    return dipfast.restore(random_image(np_rng, 16, 16), iters=2, backend="compile", precision="bf16", **FAST)


def test_inductor_leaves_the_backward_graph_without_layout_optimisation(np_rng, lowered):
    r = _compiled_fit(np_rng)
    assert r.iterations == 2
    assert (False, True) in lowered  # the forward: channels_last by Inductor's own rule
    assert (True, False) in lowered  # the backward: its convs are convolution_backward, not convolution
    assert not inductor_config.force_layout_optimization  # the process's setting untouched


def test_compile_forced_layout_reaches_the_backward_graph(np_rng, lowered):
    with runs.method_context(runs.COMPILE_FORCED_LAYOUT):
        assert backends.resolve("compile", "bf16", torch.device("cpu")).force_layout
        _compiled_fit(np_rng)
    assert lowered and {layout for _, layout in lowered} == {True}
    assert {backward for backward, _ in lowered} == {False, True}
    assert not inductor_config.force_layout_optimization
    assert not backends.resolve("compile", "bf16", torch.device("cpu")).force_layout
