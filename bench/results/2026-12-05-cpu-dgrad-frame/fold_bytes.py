"""Bytes that the triton backend's input-gradient fold moves in one default-net step, before and after
65af487 / f1856a2, from the cost model's list of convs (python -m dipfast.bench floor ... --out DIR).

    python bench/results/2026-12-05-cpu-dgrad-frame/fold_bytes.py DIR/floor.json

bf16 step. Before: every conv with a pad wrote its padded input gradient in fp32 (4 bytes an element), which
_reflect_fold_kernel read back (4) to write d(input) (bf16 2, or the merge's fp32 d(merged) 4). After, a conv
(channels_last) stores the pixels off the frame into d(input) (2) and the pad and frame into a bf16 buffer
that the fold reads (2) and completes (2); the merge still writes its padded fp32 gradient (unchanged, not
counted) and folds the frame in place (read 4, write 4), with no d(merged) of its own.
"""

import json
import re
import sys

from dipfast.bench.floor import GPUS

BANDWIDTH = GPUS["h200"].bandwidth_tbs * 1e12  # bytes/s


def main(path: str) -> None:
    before = after = 0
    for op in json.load(open(path))["ops"]:
        if op["group"] != "conv" or op["op"] != "input grad":
            continue
        c, hp, wp, k = map(int, re.match(r"(\d+)x(\d+)x(\d+) -> .*, (\d)x\d", op["shape"]).groups())
        pad = (k - 1) // 2
        if pad == 0:
            continue  # no fold
        h, w = hp - 2 * pad, wp - 2 * pad
        frame = 2 * (pad + 1) * w + 2 * (pad + 1) * (h - 2 * (pad + 1))
        ring = hp * wp - h * w
        if ".up.conv" in op["name"]:  # the merge
            old, new = c * h * w * (4 + 4), c * frame * (4 + 4)
        else:
            old, new = c * h * w * (4 + 4 + 2), c * (h * w * 2 + (frame + ring) * 2 + frame * (2 + 2))
        before, after = before + old, after + new
        print(f"{op['name']:<22} {op['shape']:<40} {old / 1e6:8.1f} MB -> {new / 1e6:6.1f} MB")
    saved = before - after
    print(
        f"all: {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB; {saved / 1e6:.0f} MB less, "
        f"{saved / BANDWIDTH * 1e3:.3f} ms at {BANDWIDTH / 1e12:.1f} TB/s"
    )


if __name__ == "__main__":
    main(sys.argv[1])
