import triton, triton.language as tl, re
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit(do_not_specialize=["channels", "width"])
def k(x, out, channels, width, sh, sw, EVEN_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    h = tl.program_id(0)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    if EVEN_C:
        mask = (w < width)[:, None]
    else:
        mask = (w < width)[:, None] & (c < channels)[None, :]
    v = tl.load(x + h * sh + w[:, None] * sw + c[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out + tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C), tl.sum(v, axis=0))

for even in (False, True):
    sig = {"x": "*bf16", "out": "*fp32", "channels": "i32", "width": "i32", "sh": "i32", "sw": "i32",
           "EVEN_C": "constexpr", "BLOCK_W": "constexpr", "BLOCK_C": "constexpr"}
    attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (4,): [["tt.divisibility", 16]], (5,): [["tt.divisibility", 16]]}
    src = ASTSource(fn=k, signature=sig, constexprs={"EVEN_C": even, "BLOCK_W": 8, "BLOCK_C": 128}, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    print("EVEN_C", even, sorted(set(re.findall(r"ld\.global[.\w]*", ptx))), len(re.findall(r"ld\.global", ptx)))
