"""Why the channels_last BatchNorm passes move 2-byte elements: an 8 x 128 bf16 tile of a 16-aligned NHWC plane,
loaded as the statistics pass loads it, compiled for sm_90 with the channel mask (`c < channels`, the count left
unspecialised) and without it (the tile known to be whole along the channels). Prints the PTX's global loads."""

import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit(do_not_specialize=["channels", "width"])
def tile_sums(x, out, channels, width, sh, sw, EVEN_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    h = tl.program_id(0)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    if EVEN_C:
        mask = (w < width)[:, None]
    else:
        mask = (w < width)[:, None] & (c < channels)[None, :]
    v = tl.load(x + h * sh + w[:, None] * sw + c[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out + tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C), tl.sum(v, axis=0))


SIGNATURE = {"x": "*bf16", "out": "*fp32", "channels": "i32", "width": "i32", "sh": "i32", "sw": "i32",
             "EVEN_C": "constexpr", "BLOCK_W": "constexpr", "BLOCK_C": "constexpr"}  # fmt: skip
ALIGNED = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 4, 5)}  # the pointers and the row and pixel strides

for even in (False, True):
    constexprs = {"EVEN_C": even, "BLOCK_W": 8, "BLOCK_C": 128}
    source = ASTSource(fn=tile_sums, signature=SIGNATURE, constexprs=constexprs, attrs=ALIGNED)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    loads = re.findall(r"ld\.global[.\w]*", ptx)
    print(f"EVEN_C={even}: {len(loads)} global loads a thread, {sorted(set(loads))}")
