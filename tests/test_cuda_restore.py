"""restore() on CUDA, through the public call: what the CPU suites (tests/test_api.py, which pin device='auto'
to the CPU) cannot show. Each needs a GPU; bench/gpu_quick.sh's `tests` step runs them."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import FAST, random_image

import dipfast
from dipfast import backends
from dipfast.tiles import Blend, TileGrid, tile_seed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: restore() on the GPU")


def test_auto_is_native_bf16_on_a_gpu_with_bf16_hardware(np_rng):
    r = dipfast.restore(random_image(np_rng, 16, 16, 3), iters=2, device="cuda", **FAST)
    assert r.backend == "native" and r.device.startswith("cuda")
    assert r.precision == ("bf16" if backends.bf16_native(torch.device("cuda")) else "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_list_of_images_runs_vectorised_in_each_precision(np_rng, precision):
    """N > 1 images of one size share a vmapped step on CUDA; in bf16 it raised before dipfast.vmap_autocast
    (H200, bench/results/2026-12-04-h200-504226cc86/)."""
    images = [random_image(np_rng, 24, 20, 3) for _ in range(3)]
    results = dipfast.restore(images, iters=4, device="cuda", backend="native", precision=precision, **FAST)
    assert [r.image.shape for r in results] == [(24, 20, 3)] * 3
    assert all(np.isfinite(r.image).all() for r in results)
    assert not np.array_equal(results[0].image, results[1].image)


# a tile trained beside others against its crop fitted alone, after 3 iterations: on CUDA the vmapped step's grouped
# convolutions round otherwise than one network's (tests/test_tiles.py holds the CPU's bit-for-bit version)
TILE_TOL = {"fp32": 1e-3, "bf16": 5e-2}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiles_trained_side_by_side_are_the_separate_fits_of_their_crops(np_rng, precision):
    """The tiled path on the GPU: every tile of the image in one captured step, the blend of their outputs that of
    the crops fitted one at a time with the tiles' seeds."""
    image = random_image(np_rng, 26, 21, 3)
    kwargs = {"iters": 3, "device": "cuda", "backend": "native", "precision": precision, **FAST}
    whole = dipfast.restore(image, seed=5, tile=10, overlap=3, **kwargs)
    grid = TileGrid.cover(26, 21, 10, 3)
    assert whole.extras["tiling"]["per_step"] == len(grid) > 4
    expected = Blend(grid, 3)
    for k, box in enumerate(grid.boxes):
        crop = image[box.y : box.y + box.h, box.x : box.x + box.w]
        alone = dipfast.restore(np.ascontiguousarray(crop), seed=tile_seed(5, k), tile=None, **kwargs)
        expected.add(k, torch.from_numpy(alone.image).permute(2, 0, 1))
    blended = expected.image.permute(1, 2, 0).numpy()
    assert np.isfinite(whole.image).all()
    np.testing.assert_allclose(whole.image, blended, atol=TILE_TOL[precision], rtol=0)


def test_a_custom_operator_with_its_tensors_on_the_gpu(np_rng):
    """Each reported loss is the MSE of the operator's output against the image, computed again here."""
    x = random_image(np_rng, 12, 12, 3)
    k = torch.full((3, 1, 3, 3), 1 / 9, device="cuda")

    def blur(t):
        return F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), k, groups=3)

    seen = []
    r = dipfast.restore(x, "custom", operator=blur, iters=6, device="cuda", report_every=1,
                        callback=lambda p: seen.append((p.loss, p.image.clone())), **FAST)  # fmt: skip
    target = torch.from_numpy(x.transpose(2, 0, 1)).cuda()[None]
    assert r.image.shape == x.shape and len(seen) == 6
    for loss, out in seen:
        assert loss == pytest.approx(F.mse_loss(blur(out.cuda()), target).item(), rel=1e-4)


def test_a_loss_that_reads_the_host_is_a_one_line_error(np_rng):
    """.item() inside loss= cannot be captured in a CUDA graph: the error says so, and what runs instead."""

    def loss(out):
        v = ((out - 0.25) ** 2).mean()
        v.item()
        return v

    with pytest.raises(dipfast.InputError, match="pure tensor function") as info:
        dipfast.restore(random_image(np_rng, 10, 10, 3), "custom", loss=loss, iters=5, device="cuda", **FAST)
    assert "\n" not in str(info.value) and "backend='reference'" in str(info.value)
    # the failed capture's side stream is not left current: the rerun the message suggests runs on the caller's
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    r = dipfast.restore(random_image(np_rng, 10, 10, 3), "custom", loss=loss, iters=5, device="cuda",
                        backend="reference", **FAST)  # fmt: skip
    assert np.isfinite(r.image).all()


def test_a_fit_warns_of_no_stream_mismatch_in_its_cuda_graph():
    """The CUDA graph's warm-up calls and its capture run on one stream: on a fresh stream per warm-up call autograd
    found the parameters' AccumulateGrad nodes, kept alive by the module's last views, on another call's stream, and
    warned (once a process, so in a fresh one) of a mismatch that 'may break CUDA graph capture'."""
    code = (
        "import numpy as np, dipfast\n"
        "from dipfast.nets import SkipSpec\n"
        "net = SkipSpec(channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2))\n"
        "x = np.random.default_rng(0).random((24, 24, 3), dtype=np.float32)\n"
        "r = dipfast.restore(x, iters=8, device='cuda', backend='native', net=net, input_depth=4, progress=False)\n"
        "assert r.extras['capture_seconds'] > 0, r.extras\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "AccumulateGrad" not in run.stderr, run.stderr[-2000:]
