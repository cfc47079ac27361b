"""bench/conv_layouts.py, the per-conv layout experiment of gpu_quick's convs step: its list of the net's convs
agrees with the floor model's trace, and each variant computes the same conv (it times four ways of one thing)."""

from __future__ import annotations

import pytest
import torch

from dipfast.bench import floor
from dipfast.nets import SkipSpec

from ._suites import bench_script


@pytest.fixture(scope="module")
def conv_layouts():
    return bench_script("conv_layouts")


def test_the_convs_listed_are_the_floor_models_convs(conv_layouts):
    rows = conv_layouts.net_convs("default", 512)
    assert sum(r["count"] for r in rows) == 26  # 5 levels x (skip, down, conv, up, up1x1) + the head
    assert sum(not r["input_grad"] for r in rows) == 2  # the two that read z: level 0's skip and down convs
    modelled = floor.floor_report(SkipSpec(), size=512, precision="bf16", gpu="h200", input_depth=32, n_channels=3)
    # the floor also counts the bias gradients (a sum over pixels per channel): a few hundred MFLOP of 460 GFLOP
    assert sum(r["gflop"] * r["count"] for r in rows) == pytest.approx(
        modelled["groups"]["conv"]["flops"] / 1e9, rel=1e-3
    )
    assert {(r["c_in"], r["c_out"]) for r in rows if r["c_in"] % 8 or r["c_out"] % 8} == {
        (132, 128),
        (128, 4),
        (32, 4),
        (128, 3),
    }


@pytest.mark.parametrize("variant", ["nchw-aligned", "cl", "cl-aligned"])
def test_each_variant_runs_the_same_conv(conv_layouts, variant):
    row = next(r for r in conv_layouts.net_convs("tiny", 16) if r["c_in"] % 8)
    results = []
    for v in ("nchw", variant):
        fmt = torch.channels_last if v.startswith("cl") else torch.contiguous_format
        conv = conv_layouts._conv(row, torch.float64, torch.device("cpu")).to(memory_format=fmt)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(1, row["c_in"], row["h"], row["w"], generator=g, dtype=torch.float64)
        x = x.contiguous(memory_format=fmt).requires_grad_(row["input_grad"])
        grad = torch.randn(conv(x).shape, generator=g, dtype=torch.float64)
        conv_layouts._step(conv, x, grad, 4 if v.endswith("aligned") else 1)()
        results.append([conv.weight.grad, conv.bias.grad, x.grad])
    for got, expected in zip(*results, strict=True):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
