#!/usr/bin/env bash
# The GPU check (issue 3): one prepared command for an H100/H200 machine with no network.
#
#   bench/gpu_check.sh DATA_DIR          DATA_DIR holds denoising/F16_GT.png (as ../shared/data/dip)
#
# Steps, each under its own time limit (what the first H100 run took, with room: bench/results/
# 2026-11-26-h100-f6a7824f76/). The whole check runs past one 10-minute device command, so run it as two:
# DIPFAST_GPU_CHECK_STEPS="tests throughput" (under 8 minutes), then "time-to-psnr" (under 4).
#   1. install the project without network (pip --no-deps --no-build-isolation -e .; PYTHONPATH as well)
#   2. the tests that run on CUDA (tests/parity, test_backends, test_bench, test_api, test_engine), on 8
#      pytest-xdist workers where xdist is installed; the CPU-only rest is CI's
#   3. the throughput tables: default net, 512 x 512: the fp32 methods (reference, original loop, native) at
#      batch 1 and 4, the bf16 ones (native, compile, triton) at batch 1 (each compiles for a minute)
#   4. time-to-PSNR on F16 from DATA_DIR, cold and warm: reference and original loop in fp32,
#      native and compile in bf16
#   (profile, only when DIPFAST_GPU_CHECK_STEPS names it: the top CUDA kernels per iteration of native fp32 and
#      bf16 and triton bf16, 512 x 512, under 4 minutes)
#   5. a short table of the results, printed last
# Results: JSON, Markdown and plots under $OUT (default ./bench-out), plus each step's log and
# steps.tsv (step, exit status, seconds): more than a device call may bring back file by file, so pack $OUT
# (tar) when it has to travel. Exit status: 0 when every step passed, else 1.
#
# Environment:
#   OUT                          where results go (default ./bench-out)
#   PYTHON                       the interpreter (default python)
#   DIPFAST_GPU_CHECK_TINY=1     a smoke run on any machine (CPU too): tiny net, 32 px, a few iterations
#   DIPFAST_GPU_CHECK_PYTEST     pytest arguments (default: step 2's tests; the tiny mode's runs none: "--co -q")
#   DIPFAST_GPU_CHECK_INSTALL=0  skip the pip install (PYTHONPATH alone)
#   DIPFAST_GPU_CHECK_STEPS      which of "tests throughput time-to-psnr profile" to run (default: the first three),
#                                so that a short device lease can split the check over two calls
#   DIPFAST_BENCH_COMMIT         the commit to record when the copy has no .git (else git's HEAD and dirty flag)
#   DIPFAST_GPU_CHECK_ARCHIVE    also pack $OUT into this .tar.gz (for machines that return a few files only)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DATA=${1:?usage: bench/gpu_check.sh DATA_DIR (the folder holding denoising/F16_GT.png)}
DATA=$(cd "$DATA" && pwd) || { echo "gpu_check: no folder $1" >&2; exit 1; }
OUT=${OUT:-./bench-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "${DIPFAST_GPU_CHECK_TINY:-0}" = 1 ]; then
    PYTEST_ARGS=${DIPFAST_GPU_CHECK_PYTEST:-"--co -q"}
    THROUGHPUT=(--size 32 --net tiny --batch 1 2 --iters 2 --repeats 2 --warmup 2)
    BF16_BATCHES=(1 2)
    TTP=(--size 32 --net tiny --iters 10 --report-every 2 --time-limit 60 --targets 10 15 20)
    PROFILE=(--size 32 --net tiny --iters 2 --warmup 2)
    BF16_METHODS=(native)  # compile and triton take minutes to compile on a CPU: tests/test_backends.py has them
    LIMITS=(60 120 60 60 120 60 60 300)
else
    CUDA_TESTS="tests/parity tests/test_backends.py tests/test_bench.py tests/test_api.py tests/test_engine.py"
    if "$PY" -c "import xdist" 2> /dev/null; then  # one GPU, 8 processes: the CPU-side work overlaps
        CUDA_TESTS="-n 8 $CUDA_TESTS"
    fi
    PYTEST_ARGS=${DIPFAST_GPU_CHECK_PYTEST:-"-q -rf $CUDA_TESTS"}
    THROUGHPUT=(--size 512 --net default --batch 1 4 --iters 10 --repeats 5 --warmup 10)
    BF16_BATCHES=(1)
    TTP=(--iters 3000 --report-every 10 --time-limit 20 --targets 26 28 30)
    BF16_METHODS=(native compile triton)
    PROFILE=(--size 512 --net default --iters 10 --warmup 10)
    # install, tests, throughput fp32 and bf16 (465 s at most), time-to-psnr fp32 and bf16 (200 s), profile (210 s)
    LIMITS=(45 180 60 180 90 110 60 150)
fi

STEPS=" ${DIPFAST_GPU_CHECK_STEPS:-tests throughput time-to-psnr} "
wants() { [[ $STEPS == *" $1 "* ]]; }

printf 'step\tstatus\tseconds\n' > "$OUT/steps.tsv"
FAILED=0
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, record the status
    local name=$1 limit=$2 start status
    shift 2
    start=$(date +%s)
    echo "== $name (at most ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" >> "$OUT/steps.tsv"
    if [ "$status" -ne 0 ]; then
        FAILED=1
        echo "   $name failed (exit $status; 124 = timed out); last lines of $OUT/$name.log:"
        tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
    fi
}

if [ "${DIPFAST_GPU_CHECK_INSTALL:-1}" = 1 ]; then
    step install "${LIMITS[0]}" "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
fi
"$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
EOF
command -v nvidia-smi > /dev/null && nvidia-smi >> "$OUT/environment.txt" 2>&1
for so in "$ROOT"/dipfast/_native*.so; do  # their error path crashed on the first H100 machine: how they link
    [ -f "$so" ] || continue
    { c++ --version | head -n 1; ldd "$so" | grep -E "stdc|gomp"
      echo "std::locale symbols defined in $(basename "$so"): $(nm -C --defined-only "$so" | grep -c 'std::locale')"
      echo "libstdc++ in a process that loaded them:"
      "$PY" -c "import torch, dipfast.native; print(*{l.split()[-1] for l in open('/proc/self/maps') if 'stdc++' in l})"
    } >> "$OUT/environment.txt" 2>&1
done
if wants tests; then
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
    step tests "${LIMITS[1]}" "$PY" -m pytest $PYTEST_ARGS
fi
if wants throughput; then
    step throughput-fp32 "${LIMITS[2]}" "$PY" -m dipfast.bench throughput "${THROUGHPUT[@]}" \
        --backend reference original-loop native --precision fp32 --out "$OUT/fp32" --quiet
    step throughput-bf16 "${LIMITS[3]}" "$PY" -m dipfast.bench throughput "${THROUGHPUT[@]}" \
        --batch "${BF16_BATCHES[@]}" --backend "${BF16_METHODS[@]}" --precision bf16 --out "$OUT/bf16" --quiet
fi
if wants time-to-psnr; then
    step time-to-psnr-fp32 "${LIMITS[4]}" "$PY" -m dipfast.bench time-to-psnr --data "$DATA" --tasks denoise \
        "${TTP[@]}" --backend reference original-loop --precision fp32 --out "$OUT/fp32" --quiet
    step time-to-psnr-bf16 "${LIMITS[5]}" "$PY" -m dipfast.bench time-to-psnr --data "$DATA" --tasks denoise \
        "${TTP[@]}" --backend "${BF16_METHODS[@]:0:2}" --precision bf16 --out "$OUT/bf16" --quiet
fi
if wants profile; then
    step profile-native "${LIMITS[6]}" "$PY" -m dipfast.bench profile "${PROFILE[@]}" --backend native \
        --precision fp32 bf16 --out "$OUT/profile-native" --quiet
    step profile-triton "${LIMITS[7]}" "$PY" -m dipfast.bench profile "${PROFILE[@]}" --backend triton \
        --precision bf16 --out "$OUT/profile-triton" --quiet
fi
echo
cat "$OUT/environment.txt" | head -n 2
column -t "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
[ -f "$OUT/tests.log" ] && grep -E "passed|failed|error|no tests ran|collected" "$OUT/tests.log" | tail -n 1
for folder in fp32 bf16 profile-native profile-triton; do
    [ -d "$OUT/$folder" ] && "$PY" -m dipfast.bench summary "$OUT/$folder"
done
if [ -n "${DIPFAST_GPU_CHECK_ARCHIVE:-}" ]; then
    tar czf "$DIPFAST_GPU_CHECK_ARCHIVE" -C "$OUT" . && echo "packed $OUT into $DIPFAST_GPU_CHECK_ARCHIVE"
fi
exit $FAILED
