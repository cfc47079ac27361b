"""Property test over restore() inputs: a valid input comes back in its own shape and dtype, an
invalid one raises dipfast.InputError, and nothing else ever escapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import FAST, torch_threads
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dipfast

NUMPY_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float32": np.float32, "float64": np.float64}
TORCH_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "float32": torch.float32, "float64": torch.float64}
# how float values are drawn: in [0, 1] (valid), exactly 0 and 1, out of range, NaN, infinite
FLOAT_VALUES = ("unit", "edges", "above 1", "below 0", "nan", "inf")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@st.composite
def restore_inputs(draw):
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    layout = draw(st.sampled_from(["HW", "HWC", "CHW"]))
    channels = 1 if layout == "HW" else draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(list(NUMPY_DTYPES)))
    values = draw(st.sampled_from(FLOAT_VALUES)) if dtype.startswith("float") else "integers"
    seed = draw(st.integers(0, 2**32 - 1))
    task = draw(st.sampled_from(["denoise", "inpaint"]))
    mask = draw(st.sampled_from(["none", "right", "wrong"])) if task == "inpaint" else "none"
    mask_dtype = draw(st.sampled_from(["bool", "uint8", "float32"]))
    mask_hw = (h, w) if mask == "right" else (h + draw(st.integers(1, 3)), w) if mask == "wrong" else None
    return {
        "h": h,
        "w": w,
        "layout": layout,
        "channels": channels,
        "dtype": dtype,
        "values": values,
        "seed": seed,
        "task": task,
        "mask": mask,
        "mask_dtype": mask_dtype,
        "mask_hw": mask_hw,
    }


def _build(case):
    rng = np.random.default_rng(case["seed"])
    h, w, c = case["h"], case["w"], case["channels"]
    dtype = np.dtype(NUMPY_DTYPES[case["dtype"]])
    if dtype.kind == "u":
        hwc = rng.integers(0, np.iinfo(dtype).max, size=(h, w, c), endpoint=True).astype(dtype)
    else:
        hwc = rng.random((h, w, c))
        flat = hwc.reshape(-1)
        k = rng.integers(flat.size)
        if case["values"] == "edges":
            flat[: flat.size // 2] = 0.0
            flat[k] = 1.0
        elif case["values"] == "above 1":
            flat[k] = 1.0 + rng.uniform(1e-3, 10)
        elif case["values"] == "below 0":
            flat[k] = -rng.uniform(1e-3, 10)
        elif case["values"] == "nan":
            flat[k] = np.nan
        elif case["values"] == "inf":
            flat[k] = rng.choice([np.inf, -np.inf])
        hwc = hwc.astype(dtype)
    if case["layout"] == "HW":
        image = hwc[..., 0]
    elif case["layout"] == "HWC":
        image = hwc
    else:
        image = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
        assert image.dtype == TORCH_DTYPES[case["dtype"]]
    mask = None
    if case["mask_hw"] is not None:
        known = rng.random(case["mask_hw"]) < 0.5
        mask = known.astype(NUMPY_DTYPES.get(case["mask_dtype"], bool))
    mask_usable = case["mask"] == "right" and mask.any()  # an all-hole mask is rejected: nothing to fit
    valid = (case["values"] in ("integers", "unit", "edges")) and (case["task"] == "denoise" or mask_usable)
    return image, mask, valid


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(restore_inputs())
def test_restore_returns_the_input_form_or_raises_input_error(case):
    image, mask, valid = _build(case)
    event("valid" if valid else "invalid")
    event(f"{case['layout']} {case['dtype']} {case['values']} {case['task']} mask={case['mask']}")
    try:
        result = dipfast.restore(image, case["task"], mask=mask, iters=1, seed=0, **FAST)
    except dipfast.InputError as e:
        assert not valid, f"valid input rejected: {e}"
        assert str(e) and "\n" not in str(e)
        return
    assert valid, "invalid input accepted"
    for out in (result.image, result.ema_image):
        assert type(out) is type(image)
        assert tuple(out.shape) == tuple(image.shape) and out.dtype == image.dtype
        values = np.asarray(out, dtype=np.float64)
        assert np.isfinite(values).all() and values.min() >= 0
    assert result.iterations == 1 and len(result.history) == 1
