"""Inductor's layout optimisation and the compile backend: its own rule (GraphLowering.decide_layout_opt)
counts aten.convolution nodes, and a backward graph has none (its convs are convolution_backward), so the
backward of the generator is lowered without layout optimisation while the forward gets it. The
harness's compile-forced-layout (backends.Backend.layout_optimization) forces it on both, and compile-nchw
turns it off on both; these tests pin those facts, so that a PyTorch upgrade that changes one shows here."""

from __future__ import annotations

import numpy as np
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
    # torch's own patch(), not monkeypatch: pytest 9.2's undo deletes an attribute the module's __dict__ lacked,
    # and deleting a torch config entry hides it for the rest of the process
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield seen
    torch._dynamo.reset()


def _compiled_fit(image):
    return dipfast.restore(image, iters=2, backend="compile", precision="fp32", **FAST)


def test_inductor_lowers_the_backward_without_layout_optimisation_unless_forced(np_rng, lowered):
    """Inductor's own rule: the forward with layout optimisation, the backward without. Forced
    (compile-forced-layout): both with it, and the fit the same to fp32 rounding (tolerance: 2 Adam steps
    of IEEE fp32 whose convolutions run in another layout, so another summation order)."""
    image = random_image(np_rng, 16, 16)
    plain = _compiled_fit(image)
    assert plain.iterations == 2
    assert (False, True) in lowered  # the forward: channels_last by Inductor's own rule
    assert (True, False) in lowered  # the backward: its convs are convolution_backward, not convolution

    lowered.clear()
    torch._dynamo.reset()
    with runs.method_context(runs.COMPILE_FORCED_LAYOUT):
        assert backends.resolve("compile", "fp32", torch.device("cpu")).inductor_options()
        forced = _compiled_fit(image)
    assert lowered and {layout for _, layout in lowered} == {True}
    assert {backward for backward, _ in lowered} == {False, True}
    np.testing.assert_allclose(forced.image, plain.image, rtol=0, atol=1e-4)

    assert not inductor_config.force_layout_optimization  # the process's settings untouched
    assert backends.resolve("compile", "fp32", torch.device("cpu")).inductor_options() is None


def test_compile_nchw_lowers_every_graph_without_layout_optimisation(np_rng, lowered):
    """compile-nchw measures NCHW convolutions: with NCHW inputs alone, Inductor's own rule still ran the forward's
    convs channels_last (on CUDA too, by its heuristics for the default net at batch 1), so the variant was NCHW at
    the graph's edge and NHWC inside."""
    with runs.method_context("compile-nchw"):
        result = dipfast.restore(random_image(np_rng, 16, 16), iters=2, backend="compile", precision="bf16", **FAST)
    assert result.iterations == 2
    assert lowered and {layout for _, layout in lowered} == {False}
    assert {backward for backward, _ in lowered} == {False, True}
    assert inductor_config.layout_optimization  # the process's settings untouched
