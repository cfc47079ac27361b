"""The extension's build and load, and the eager fallback every function takes without it.

CI sets DIPFAST_REQUIRE_NATIVE=1: there, a missing or unloadable extension fails
test_native_ops_built_when_required instead of skipping the kernel tests quietly.
"""

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from _native_helpers import requires_native

import dipfast.native as native
from dipfast.native.blocks import NativeBlocks
from dipfast.native.philox import philox_normal_eager
from dipfast.nets import skip
from dipfast.nets.blocks import use_block_ops

pytestmark = pytest.mark.native


def test_native_ops_built_when_required():
    assert native.AVAILABLE or os.environ.get("DIPFAST_REQUIRE_NATIVE") != "1", (
        "DIPFAST_REQUIRE_NATIVE=1 but dipfast's native CPU ops are not built or did not load: "
        "run `pip install --no-build-isolation -e .` and read its output"
    )


def test_loader_warns_when_the_library_is_missing(monkeypatch, caplog):
    monkeypatch.setattr(native.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="dipfast.native"):
        assert native._load() is False
    assert [r.getMessage() for r in caplog.records] == ["dipfast: native CPU ops not built; eager ops take over"]


def test_loader_warns_when_the_library_does_not_load(monkeypatch, caplog):
    def fail(path):
        raise OSError(f"{path}: undefined symbol")

    monkeypatch.setattr(native.torch.ops, "load_library", fail)
    monkeypatch.setattr(native.importlib.util, "find_spec", lambda name: type("Spec", (), {"origin": "x.so"})())
    with caplog.at_level(logging.WARNING, logger="dipfast.native"):
        assert native._load() is False
    assert len(caplog.records) == 1 and "failed to load (x.so: undefined symbol)" in caplog.records[0].getMessage()


def _eager_inputs(rng):
    x = torch.randn(2, 6, 5, 7, generator=rng, dtype=torch.float64)
    skip_part = torch.randn(2, 2, 5, 7, generator=rng, dtype=torch.float64)
    weight, bias = torch.rand(8, generator=rng, dtype=torch.float64) + 0.5, torch.randn(8, generator=rng).double()
    return x, skip_part, weight, bias


def _assert_every_function_is_its_eager_twin(rng):
    assert not native.enabled()
    x, skip_part, weight, bias = _eager_inputs(rng)
    bn = F.batch_norm(x, None, None, weight[:6], bias[:6], training=True, eps=1e-5)
    assert torch.equal(native.batch_norm_act(x, weight[:6], bias[:6]), F.leaky_relu(bn, 0.2))
    assert torch.equal(native.batch_norm(x, weight[:6], bias[:6]), bn)
    merged = F.batch_norm(torch.cat([skip_part, x], 1), None, None, weight, bias, training=True, eps=1e-5)
    assert torch.equal(native.concat_batch_norm(skip_part, x, weight, bias), merged)
    padded = F.pad(F.leaky_relu(bn, 0.2), (2, 2, 2, 2), mode="reflect")
    assert torch.equal(native.batch_norm_act_reflect_pad(x, weight[:6], bias[:6], pad=2), padded)
    upsampled = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.equal(native.upsample_bilinear2x(x), upsampled)
    out = native.normal_(torch.empty(3, 50), 9, 4)
    assert torch.equal(out, philox_normal_eager((3, 50), 9, 4).float())


def test_every_function_falls_back_to_eager_without_the_extension(monkeypatch, rng):
    monkeypatch.setattr(native, "AVAILABLE", False)
    _assert_every_function_is_its_eager_twin(rng)


def test_every_function_is_eager_inside_disabled(rng):
    with native.disabled():
        _assert_every_function_is_its_eager_twin(rng)


@requires_native
def test_disabled_nests_and_restores_the_ops_even_on_an_error():
    assert native.enabled()
    with pytest.raises(ValueError):
        with native.disabled():
            with native.disabled():
                assert not native.enabled()
            assert not native.enabled()
            raise ValueError("inside")
    assert native.enabled()


@requires_native
def test_fallback_draw_matches_the_kernel(monkeypatch):
    """Without the extension a run draws the same noise, to fp32 rounding of the polynomials."""
    kernel = native.normal_(torch.empty(4, 1000), 9, 4)
    monkeypatch.setattr(native, "AVAILABLE", False)
    torch.testing.assert_close(native.normal_(torch.empty(4, 1000), 9, 4), kernel, atol=2e-6, rtol=2e-6)


def test_native_blocks_without_the_extension_match_the_reference(monkeypatch, rng):
    monkeypatch.setattr(native, "AVAILABLE", False)
    reference = skip(4, channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2)).double()
    fallback = use_block_ops(skip(4, channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2)), NativeBlocks())
    fallback.load_state_dict(reference.state_dict())
    z = torch.rand(1, 4, 17, 23, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(fallback.double()(z), reference(z), rtol=1e-12, atol=1e-12)


def test_unsupported_inputs_take_the_eager_path(rng):
    """fp16 is not a kernel dtype: the eager twin runs, with or without the extension."""
    x = torch.randn(1, 3, 4, 4, generator=rng).half()
    up = native.upsample_bilinear2x(x)
    assert up.dtype == torch.float16 and torch.equal(up, F.interpolate(x, scale_factor=2, mode="bilinear"))
