"""Triton's interpreter made to round and compare as a GPU does, where the two differ in what a kernel computes.

as_the_gpu_computes(monkeypatch) patches the interpreter's builder (triton/runtime/interpreter.py) for the rest of
the test:
- fp32 -> bf16 (`.to(tl.bfloat16)`, a store of fp32 values through a bf16 pointer) rounds to nearest even, as the
  GPU's cvt.rn.bf16.f32 and torch's cast do; the interpreter truncates the mantissa. A bf16 kernel's rounding error
  measured in the interpreter was so up to twice the GPU's (2^-7 relative against 2^-8), which hid a kernel's own
  error behind the interpreter's and set the parity tolerances of conftest.TOL twice as loose as the GPU needs.
- tl.maximum and tl.minimum of a NaN and a number return the number: they lower to LLVM's maxnum / minnum (PTX
  max.f32 / min.f32); the interpreter's np.maximum / np.minimum return the NaN.
"""

from __future__ import annotations

import numpy as np
import torch
from triton.runtime import interpreter

tl = interpreter.tl


def as_the_gpu_computes(monkeypatch) -> None:
    builder = interpreter.interpreter_builder
    cast_impl = builder.cast_impl

    def rounded_cast(src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)  # a copy: 0-d stays 0-d
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast_impl(src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", rounded_cast)
    monkeypatch.setattr(builder, "create_maxnumf", lambda a, b: builder.binary_op(a, b, np.fmax))
    monkeypatch.setattr(builder, "create_minnumf", lambda a, b: builder.binary_op(a, b, np.fmin))
