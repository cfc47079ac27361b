"""The padded BatchNorm kernels with their finalize folded into the reduction's last program (channel_sums.
folded_finalize, the harness's native-folded-finalize) against the finalize launches it replaces: the same output
and gradients whichever program arrives last, and every arrival counter back at zero after each launch (the next
launch on the stream counts from there).

In the interpreter the programs also run reversed and shuffled (_program_order.py): the last to arrive is then
another program each launch, and the results must still be the finalize launches' bit for bit (both sum each
channel's partial rows in the same fixed order). On a GPU the programs arrive in the hardware's order, and the
last program's sums are laid out over its own tile (BLOCK_C channels, not the finalize launch's 32), so they may
round differently: there they are held to the parity tolerance of the precision (conftest.TOL) against the
unfolded path."""

import contextlib
import importlib

import pytest
import torch
from _program_order import ORDERS, programs_in_order
from test_batch_norm_act import LAYOUTS, _grad_for, _inputs, _merge_inputs, _run

import dipfast.kernels
from dipfast.kernels import channel_sums, configs

batch_norm_act_module = importlib.import_module("dipfast.kernels.batch_norm_act")
_INTERPRET = batch_norm_act_module._INTERPRET

pytestmark = pytest.mark.parity

# the GPU's own order there; the interpreter's serial order and the two it can be told
PROGRAM_ORDERS = ["serial", *ORDERS] if _INTERPRET else ["gpu"]
# 8 x 16 tiles aiming at 32 programs: 2 channel tiles (or the merge's one) of 9 (or 16) programs each, 2 rows a
# program, so a last program that merged too early (before every partial row was stored) shows
MANY_PROGRAMS = {("plane", p): configs.PlaneTiles(128, 8, 16, 32, 4) for p in ("fp32", "bf16")}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(batch_norm_act_module, "POISON_OUTPUTS", True)  # a mean or rstd never written stays NaN


def _op_and_inputs(op: str, rng, device, fmt, dtype):
    """(the op with its keywords, its inputs, the upstream gradient): odd sizes, 2 images x 9 rows of programs."""
    if op == "single":
        tensors = _inputs((2, 20, 9, 13), rng, device, fmt, dtype)  # 20 channels: a short channel tile
        return (
            lambda *t: dipfast.kernels.batch_norm_act(*t, pad=1),
            tensors,
            _grad_for((2, 20, 11, 15), rng, device, fmt),
        )
    tensors = _merge_inputs(rng, device, fmt, cs=4, cd=12, dtype=dtype)  # the merge's two sources, skip a crop
    return lambda *t: dipfast.kernels.concat_batch_norm(*t, pad=1), tensors, _grad_for((2, 16, 9, 11), rng, device, fmt)


# each op in each layout, each precision twice
CASES = [("single", "nchw", torch.float32), ("single", "cl", torch.bfloat16), ("merge", "nchw", torch.bfloat16),
         ("merge", "cl", torch.float32)]  # fmt: skip


@pytest.mark.parametrize("order", PROGRAM_ORDERS)
@pytest.mark.parametrize(("op", "layout", "dtype"), CASES, ids=[f"{o}-{la}-{str(d)[6:]}" for o, la, d in CASES])
def test_the_last_program_finalizes_as_the_finalize_launches(op, layout, dtype, order, rng, device, monkeypatch,
                                                             assert_parity):  # fmt: skip
    fn, tensors, grad = _op_and_inputs(op, rng, device, LAYOUTS[layout], dtype)
    launched = []  # the finalize launches, forward and backward
    for name in ("chan_finalize", "column_sums"):
        launch = getattr(batch_norm_act_module, name)
        monkeypatch.setattr(batch_norm_act_module, name, lambda *a, f=launch: launched.append(f.__name__) or f(*a))
    with configs.forced_tiles(MANY_PROGRAMS):
        separate = _run(fn, tensors, grad)
    assert launched == ["chan_finalize", "column_sums"]
    launched.clear()
    reordered = programs_in_order(monkeypatch, order, seed=3) if order in ORDERS else contextlib.nullcontext()
    with channel_sums.folded_finalize(True), reordered, configs.forced_tiles(MANY_PROGRAMS):
        folded = _run(fn, tensors, grad)
    assert launched == [], "a finalize launch ran with the finalize folded"
    for name, actual, expected in zip(["out", *range(len(tensors))], folded, separate, strict=True):
        if _INTERPRET:
            assert torch.equal(actual, expected), f"{name} differs with the finalize in the last program"
        else:
            assert_parity(actual, expected.double(), dtype)
    counters = channel_sums._COUNTERS
    assert counters and all(int(c.abs().sum()) == 0 for c in counters.values()), "an arrival counter left non-zero"


def test_off_by_default_and_restored_after_an_exception(device):
    x = torch.ones(1, device=device)
    assert not channel_sums.finalize_folded(x, 4)
    with pytest.raises(RuntimeError), channel_sums.folded_finalize(True):
        assert channel_sums.finalize_folded(x, 4)
        raise RuntimeError
    assert not channel_sums.finalize_folded(x, 4)


def test_wide_channel_tiles_keep_the_finalize_launch(rng, device, monkeypatch):
    """A channels_last tile of 64 channels would have its last program hold 32 x 64 partials: the finalize stays a
    launch of its own there (channel_sums.finalize_folded), with the same results."""
    wide = {("plane", "fp32"): configs.PlaneTiles(512, 8, 64, 32, 4)}
    x, weight, bias = _inputs((1, 64, 5, 7), rng, device, torch.channels_last)
    grad = _grad_for((1, 64, 7, 9), rng, device, torch.channels_last)
    launched = []
    launch = batch_norm_act_module.chan_finalize
    monkeypatch.setattr(batch_norm_act_module, "chan_finalize", lambda *a: launched.append(1) or launch(*a))
    fn = lambda *t: dipfast.kernels.batch_norm_act(*t, pad=1)  # noqa: E731
    with configs.forced_tiles(wide):
        separate = _run(fn, [x, weight, bias], grad)
        with channel_sums.folded_finalize(True):
            folded = _run(fn, [x, weight, bias], grad)
    assert launched == [1, 1]
    for actual, expected in zip(folded, separate, strict=True):
        assert torch.equal(actual, expected)


def test_the_counters_grow_and_keep_the_buffer_they_replace(device, monkeypatch):
    """A launch with more channel tiles than the stream's buffer holds gets a larger one at zero; the smaller one is
    kept, since a CUDA graph captured with it still counts in it at every replay."""
    monkeypatch.setattr(channel_sums, "_COUNTERS", {})
    monkeypatch.setattr(channel_sums, "_OUTGROWN", [])
    x = torch.ones(1, device=device)
    small = channel_sums.arrival_counters(x, 3)
    assert small.dtype == torch.int32 and small.numel() >= 3 and int(small.abs().sum()) == 0
    assert channel_sums.arrival_counters(x, small.numel()) is small
    large = channel_sums.arrival_counters(x, small.numel() + 1)
    assert large.numel() > small.numel() and int(large.abs().sum()) == 0
    assert channel_sums._OUTGROWN == [small] and channel_sums.arrival_counters(x, 5) is large
