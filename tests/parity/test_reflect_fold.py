"""reflect_fold, the adjoint of the reflection pad, and the frame that dgrad leaves to it.

In channels_last the conv's dgrad stores the pixels off the frame (frame_bounds) straight into dx and only the pad
and the frame into the padded gradient; reflect_fold(frame_only=True) then sums the frame's pre-images. The frame
must hold every pixel a pad mirrors, or a mirrored gradient is lost; these tests hold both parts to the adjoint of
F.pad(mode="reflect") in float64.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

conv_module = importlib.import_module("dipfast.kernels.conv_bn_lrelu")

SHAPES = [  # (N, C, H, W, pad)
    (2, 3, 7, 9, 1),  # a frame of 2 around 3 x 5 inner pixels
    (1, 5, 11, 12, 3),  # k = 7: a frame of 4
    (1, 4, 5, 6, 2),  # the frame is the whole image (H <= 2 (pad + 1))
    (1, 2, 4, 9, 3),  # pad = H - 1: every row mirrored, inner columns none
    (1, 20, 6, 13, 1),  # channels past one tile
]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _adjoint(dxp: torch.Tensor, pad: int) -> torch.Tensor:
    """d(input) for the padded gradient dxp, by autograd through F.pad(mode='reflect') in float64."""
    n, c, hp, wp = dxp.shape
    x = torch.zeros(n, c, hp - 2 * pad, wp - 2 * pad, dtype=torch.float64, requires_grad=True)
    F.pad(x, (pad,) * 4, mode="reflect").backward(dxp.double())
    return x.grad


def _frame_mask(h: int, w: int, pad: int) -> torch.Tensor:
    top, bottom, left, right = conv_module.frame_bounds(h, w, pad)
    mask = torch.ones(h, w, dtype=torch.bool)
    mask[top:bottom, left:right] = False
    return mask


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_frame_holds_every_mirrored_pixel(shape):
    """A padded gradient that is zero but on the pad reaches, through the adjoint, only pixels of the frame."""
    n, c, h, w, pad = shape
    ring = torch.rand(n, c, h + 2 * pad, w + 2 * pad, dtype=torch.float64) + 0.5
    ring[:, :, pad : pad + h, pad : pad + w] = 0
    reached = _adjoint(ring, pad).abs().sum((0, 1)) > 0
    frame = _frame_mask(h, w, pad)
    assert reached.any() and not (reached & ~frame).any(), "a mirrored pixel lies off the frame"
    if h > 2 * (pad + 1) and w > 2 * (pad + 1):
        assert not frame.all(), "an image with inner pixels got a frame of the whole"


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reflect_fold_matches_the_pad_adjoint(shape, dtype, layout, device, tol, assert_parity, monkeypatch):
    """Whole: every pixel of dx from dxp. frame_only: the frame from dxp, the rest as dgrad left it (here the
    expected values; NaN on the frame until the fold writes it)."""
    monkeypatch.setattr(conv_module, "POISON_OUTPUTS", True)
    n, c, h, w, pad = shape
    dxp = torch.randn(n, c, h + 2 * pad, w + 2 * pad).to(dtype).contiguous(memory_format=layout)
    expected = _adjoint(dxp, pad)
    whole = torch.full((n, c, h, w), float("nan"), dtype=dtype).contiguous(memory_format=layout).to(device)
    conv_module.reflect_fold(dxp.to(device), whole, pad)
    assert_parity(whole, expected, dtype)
    frame = _frame_mask(h, w, pad).expand(n, c, h, w)
    partial = expected.masked_fill(frame, float("nan")).to(dtype).contiguous(memory_format=layout).to(device)
    conv_module.reflect_fold(dxp.to(device), partial, pad, frame_only=True)
    assert_parity(partial, expected, dtype)
    assert torch.equal(partial.cpu()[~frame], expected.to(dtype)[~frame]), "the fold wrote off the frame"
