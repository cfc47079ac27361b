#!/usr/bin/env bash
# The prepared GPU window (issues 12 and 13): one command for an H100/H200 machine with no network, its
# steps in priority order so that the first minutes carry the most, each under its own time limit, and
# every result packed into one archive after each step, so that a time limit or a lost machine loses
# nothing that finished.
#
#   bench/gpu_quick.sh [--tiny] [--data DIR] [DEST]
#
# DEST: where gpu-quick.tar.gz (every result) and summary.tsv go: default $OUT where set (the device
# machine's returned folder), else ./bench-out. The results are written to a work folder outside DEST
# (DIPFAST_GPU_QUICK_WORK, default a new temporary one) and packed from there.
#
# Steps (name: what; expected seconds on an H200, cold):
#   install       pip install --no-deps --no-build-isolation -e . without the C++ CPU ops: the whole run sets
#                 DIPFAST_NO_NATIVE=1 (no CUDA path calls them, and their build took 36 and 42 s of the
#                 H200's two calls; the CPU cases of the tests and parity steps run their eager twins).
#                 With DIPFAST_GPU_QUICK_NATIVE=1 they are built against the machine's torch, and where the
#                 install fails so, it runs again without them; PYTHONPATH as well                   5
#   environment   GPU, driver, torch/CUDA/cuDNN/triton and test tools' versions, commit, native ops, nvidia-smi  5
#   throughput    512 x 512, batch 1, default net, in one harness run: native bf16 / tf32 / fp32 (on CUDA
#                 its BatchNorm + LeakyReLU by the Triton kernels that write the next conv's pad), the
#                 original loop as the paper ran it (IEEE fp32) and under today's PyTorch default (TF32
#                 convolutions), native-reference-blocks bf16 / tf32 (the reference blocks' separate ops:
#                 what the padded kernels are worth), native-packed-parameters bf16 (the conv weights off
#                 16-byte alignment, as before: what aligning them is worth), native-unfused-rules bf16 (the
#                 rules after the backward as some 48 torch ops: what fusing them is worth), native-pdl bf16 (the
#                 Triton kernels as programmatic dependent launches: what overlapping ~200 launches is worth),
#                 native-folded-finalize bf16 (each BatchNorm's finalize in its reduction's last program: 60
#                 launches fewer), native-cl bf16 (channels_last:
#                 its 14 legacy dgrad calls may have been the same misaligned weights, and NHWC would save
#                 cuDNN's 1.1 ms of layout conversions); each row is written as it ends, and after a CUDA error
#                 that loses the context (one new kernel's illegal address) the rest run in a fresh process, the
#                 original loops included (dipfast/bench/lost_context.py). The compiled paths
#                 are the `compile` step's (a minute of compiling each: in the 222367b4a8 run they ran last
#                 here, and the step's limit cut compile-nchw and what came after)                    150
#   profile       dipfast bench profile of the two fastest paths of `throughput`; then bench/launch_gap.py:
#                 what one launch costs in a CUDA graph (chains of 200 one-program and GPU-filling Triton
#                 launches, with and without programmatic dependent launch, and ATen's add_), and that the
#                 dependent ones keep their order: the price of the step's ~280 launches   30
#   convs         bench/step_convs.py: the step's own conv calls (native bf16, one eager step, as the dispatcher
#                 sees them below vmap and autocast), each replayed alone with operands of the recorded
#                 strides and pointer alignment, its kernels listed, cuDNN's legacy ones flagged; then the same
#                 with native-cl (channels_last ran 14 legacy dgrad calls, 16.6 ms) and native-packed-parameters
#                 (the flat buffer's conv weights 8 bytes off 16 before): which calls ran the legacy kernels, and
#                 whether the aligned weights took them away. (Each conv
#                 alone in four layouts, bench/conv_layouts.py, ran no legacy kernel on the H200.)      60
#   cudnn         bench/cudnn_fusion.py: cuDNN's graph API on the four costliest convs: conv + BatchNorm statistics
#                 in the epilogue, BatchNorm + LeakyReLU in the prologue, the gradients with the same, each checked
#                 against torch in fp32 and timed beside ATen's conv: whether the fused engines take LeakyReLU in
#                 bf16 on Hopper and pay (gpu-step.md's fix 5). Needs the `cudnn` module: installed from a
#                 nvidia-cudnn-frontend wheel in .gpu-data/wheels where absent (no network on the device:
#                 bench/gpu_prepare.sh downloads it here)                                                   90
#   batch         256 x 256, batch 1 against batch 4, on the fastest path that batches, and native and
#                 native-per-network at its precision (the 4 networks one after another in the graph, not vmapped
#                 into grouped convs): what vmap is worth, the batch and tiles targets' lever (Backend.vectorised) 60
#   start-up      bench/cold_start.py: a cold start in parts (the process, restore()'s preparation and set-up, the
#                 CUDA graph's warm-up and capture, the first step), each fit in a fresh process with empty Triton
#                 and Inductor caches: native against native-parallel-compile (the step's Triton kernels compiled
#                 side by side before its first call, not one at a time at their first launches), 2 rounds   45
#   time-to-psnr  F16 denoising (sigma 25) from --data, cold (fresh process and compile caches):
#                 the original loop against the fastest path, 1800 iterations: `auto`'s quality  160
#   tests         the rest of the suite's CUDA tests (test_cuda_restore: restore() on the GPU;
#                 test_backends, test_early_stop_wiring (the criterion in the CUDA graph),
#                 test_group_invariance, test_vmap_autocast, test_bilinear_x2 (its capture),
#                 test_aligned_channels, test_parallel_compile (the first step finds its kernels compiled),
#                 tests/bench)                                                                      120
#   tasks         every task through restore() on each fast backend, tiny net (bench/gpu_tasks.py) 110
#   parity        issue 13: the CUDA parity tests, the real shapes first in runs of their own, the fp32 dx
#                 error map of the 132 -> 128 conv at 512 px before them (junit XML, no -x)       90+
#   ops           issue 13: the op micro-benchmarks (bench/ops), forward + backward, fused op against
#                 cuDNN + eager, each timed as a CUDA graph replay (the step pays no launch cost), after
#                 the native step's BatchNorm kernels (bf16, NCHW) against torch's eager ops, in GB/s, with
#                 and without their finalize launches (triton-folded: the last program finalizes)       120
#   triton        issue 13: the triton backend's throughput in bf16 (without torch.compile: the triton-eager
#                 variant, first; native beside it; channels_last; NCHW as before: triton-nchw), tf32 and fp32,
#                 and the profile of its eager bf16 step against the floor                          160
#   compile       the compile backend's throughput, bf16 in channels_last and NCHW (compile-nchw, the layout
#                 that made native 2.74x faster), each compiling for about a minute                  150
#   early-stop    issue 14: the 9 paper images from --data at 256 x 256, side by side, 2000 iterations
#                 recorded, the calibrated rules replayed, and the criterion's cost at 512 px    240
#   large         issue 17: a 12 MP photo (a mosaic of the paper's images, sigma 25) through restore(tile='auto',
#                 stop='auto') until the step's time runs out, with the rate and the projected end-to-end
#                 time (bench/large_photo.py); end to end it needs a call of its own:
#                 DIPFAST_GPU_QUICK_STEPS=large DIPFAST_GPU_QUICK_BUDGET=560                  300+
# That is about 30 minutes in all: DIPFAST_GPU_QUICK_BUDGET (default 480 s) stops starting steps that
# could not finish in time, and summary.tsv marks them 'skipped (budget)': run those in a second call
# (e.g. DIPFAST_GPU_QUICK_STEPS="environment tasks parity ops triton"). Each step's limit is its own or
# the budget left, whichever is less. headline.md compares the figures with issue 12's targets and sets each variant
# (native-pdl, native-per-network, compile-nchw, ...) beside its backend, with the Backend field its figure says to
# set (more than 2 % faster in the same run); summary.md is the short table of every JSON.
#
# --tiny: the same steps on a CPU at toy sizes (tiny net, 16-32 px, 1-6 iterations), so that the script
# cannot rot (tests/bench/test_gpu_quick.py): the fast backends are native alone (compile and triton
# take minutes to compile on a CPU; tests/test_backends.py and tests/parity cover them), except the
# triton step, which runs the triton backend's kernels in Triton's interpreter (TRITON_INTERPRET=1) at
# 16 px with torch.compile off (TORCHDYNAMO_DISABLE=1); the CUDA-only parity tests skip; no install.
#
# Environment:
#   DIPFAST_GPU_QUICK_STEPS     the steps to run, in the order given (default: all, in the order above)
#   DIPFAST_GPU_QUICK_BUDGET    seconds for the whole run (default 480; --tiny 600)
#   DIPFAST_GPU_QUICK_DATA      the paper's images (default ../shared/data/dip beside the repository, else
#                               .gpu-data/dip inside it); --data too. Only the repository travels to a device
#                               machine: bench/gpu_prepare.sh copies the images into .gpu-data/dip (git-ignored:
#                               never committed) with the cudnn step's wheel; name .gpu-data in the run's carry.
#   DIPFAST_GPU_QUICK_WORK      the results folder (default: a new temporary one)
#   DIPFAST_GPU_QUICK_BACKENDS  the fast backends the tasks step runs (default "native compile triton"; --tiny "native")
#   DIPFAST_GPU_QUICK_INSTALL   1 to pip install the working tree first (default 1; --tiny 0)
#   DIPFAST_GPU_QUICK_NATIVE    1 to build and load the C++ CPU ops (default 0, DIPFAST_NO_NATIVE=1: no CUDA path calls
#                               them; --tiny leaves them as they are)
#   DIPFAST_GPU_QUICK_PYTEST    extra pytest arguments for the parity and tests steps
#   DIPFAST_BENCH_COMMIT        the commit to record where the copy has no .git
#   PYTHON                      the interpreter (default python3)
# Exit status: 0 when every step that ran passed, else 1.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
TINY=0
DATA=${DIPFAST_GPU_QUICK_DATA:-$ROOT/../shared/data/dip}
[ -z "${DIPFAST_GPU_QUICK_DATA:-}" ] && [ ! -d "$DATA" ] && DATA=$ROOT/.gpu-data/dip  # carried to a device
DEST=${OUT:-./bench-out}
RUN_STEP=""  # internal: run one step's function (the parent runs each step so, under its time limit)
while [ $# -gt 0 ]; do
    case $1 in
        --tiny) TINY=1 ;;
        --data) DATA=${2:?--data needs a folder}; shift ;;
        --run-step) RUN_STEP=${2:?}; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_quick: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) DEST=$1 ;;
    esac
    shift
done
mkdir -p "$DEST" && DEST=$(cd "$DEST" && pwd) || exit 2
WORK=${DIPFAST_GPU_QUICK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-quick.XXXXXX")}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd) || exit 2
export DIPFAST_GPU_QUICK_WORK=$WORK DIPFAST_GPU_QUICK_DATA=$DATA
ARCHIVE=$DEST/gpu-quick.tar.gz
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
ALL_STEPS="install environment throughput profile convs cudnn batch start-up time-to-psnr"
ALL_STEPS+=" tests tasks parity ops triton compile early-stop large"
STEPS=" ${DIPFAST_GPU_QUICK_STEPS:-$ALL_STEPS} "
for name in $STEPS; do
    [[ " $ALL_STEPS " == *" $name "* ]] || { echo "gpu_quick: unknown step '$name'; valid: $ALL_STEPS" >&2; exit 2; }
done

if [ "$TINY" = 1 ]; then
    BUDGET=${DIPFAST_GPU_QUICK_BUDGET:-600}
    BACKENDS=${DIPFAST_GPU_QUICK_BACKENDS:-native}
    INSTALL=${DIPFAST_GPU_QUICK_INSTALL:-0}
    DEVICE=(--device cpu)
    TP=(--net tiny --size 16 --iters 1 --repeats 2 --warmup 1)
    PROFILE=(--net tiny --size 16 --iters 2 --warmup 1)
    LAUNCH_GAP=(--launches 3 --repeats 1)
    BATCH=(--net tiny --size 16 --iters 1 --repeats 2 --warmup 1)
    TASKS=(--size 16 --iters 2 --precision fp32 --device cpu)
    PARITY=(tests/parity/test_configs.py)  # after the real shapes, which skip here (CUDA only): one quick file
    OPS=(--benchmark-max-time=0.01 --benchmark-min-rounds=1 --benchmark-warmup=off)  # the CPU cases once
    BN_OPS=("${OPS[@]}")
    TRITON_TP=(--net tiny --size 16 --iters 1 --repeats 1 --warmup 1)
    TRITON_CONFIGS=(triton:fp32 triton-eager:fp32 native:fp32)  # the interpreter's tf32 is IEEE fp32
    TRITON_ENV=(TRITON_INTERPRET=1 TORCHDYNAMO_DISABLE=1)
    COMPILE_ENV=(TORCHDYNAMO_DISABLE=1)  # the step's plumbing: compiling takes minutes on a CPU
    TTP=(--net tiny --size 32 --iters 6 --report-every 2)
    CONVS=(--device cpu --net tiny --size 16 --precision bf16 --repeats 2)
    CUDNN=(--device cpu --net tiny --size 16 --top 1 --repeats 2)  # its aten rows; the cuDNN ones say "needs CUDA"
    COLD_START=(--device cpu --net tiny --size 16 --iters 2 --rounds 1)
    TESTS=(tests/test_backends.py -k "resolve")  # a few CPU cases: the step's plumbing
    EARLY_STOP=(--net tiny --size 32 --iters 120 --limit 2 --cost 16)
    LARGE=(--device cpu --megapixels 0.01 --iters 6 --stop iterations --report-every 2)
    # the budget is all there is on a CPU: the limits only catch a hang
    declare -A LIMIT=([install]=120 [environment]=60 [throughput]=240 [profile]=120 [convs]=120 [cudnn]=120 [batch]=120
                      [start-up]=120 [tasks]=240 [parity]=120 [ops]=120 [triton]=240 [compile]=120 [time-to-psnr]=240
                      [tests]=120 [early-stop]=240 [large]=120)
else
    BUDGET=${DIPFAST_GPU_QUICK_BUDGET:-480}
    BACKENDS=${DIPFAST_GPU_QUICK_BACKENDS:-native compile triton}
    INSTALL=${DIPFAST_GPU_QUICK_INSTALL:-1}
    # the C++ CPU ops neither built nor loaded (nor built on first use: dipfast.native's JIT path), unless asked for
    [ "${DIPFAST_GPU_QUICK_NATIVE:-0}" = 1 ] || export DIPFAST_NO_NATIVE=1
    DEVICE=(--device cuda)
    TP=(--net default --size 512 --iters 10 --repeats 3 --warmup 10)
    PROFILE=(--net default --size 512 --iters 5 --warmup 10)
    LAUNCH_GAP=(--launches 200 --repeats 20)
    BATCH=(--net default --size 256 --iters 10 --repeats 3 --warmup 10)
    TASKS=(--size 64 --iters 4 --precision bf16 --device cuda)
    PARITY=(tests/parity --ignore=tests/parity/test_cuda_shapes.py)  # after the real shapes (parity())
    # forward + backward (the targets' measure; the forward-only cases used the H200 window's whole step), each
    # timed as a CUDA graph's replay, as the step runs them (bench/ops/cuda_timing.py)
    OPS=(-k op_full --benchmark-warmup=on --benchmark-warmup-iterations=3 --benchmark-max-time=0.1 --benchmark-min-rounds=5)
    BN_OPS=("${OPS[@]}" -k "op_full and nchw and not fp32")  # the native step's: bf16, NCHW (the last -k wins)
    TRITON_TP=("${TP[@]}")
    # the eager step first (its Triton kernels compile in seconds, Inductor's graph in a minute), then native beside
    # it (issue 13's target: no slower than the fastest other backend, in the same run), then torch.compile's
    TRITON_CONFIGS=(triton-eager:bf16 native:bf16 triton:bf16 triton-nchw:bf16 triton:tf32 triton:fp32)
    TRITON_ENV=()
    COMPILE_ENV=()
    TTP=(--iters 1800 --report-every 10)
    CONVS=(--device cuda --net default --size 512 --precision bf16 --repeats 10)
    CUDNN=(--device cuda --net default --size 512 --top 4 --repeats 10)
    COLD_START=(--device cuda --net default --size 512 --precision bf16 --iters 10 --rounds 2)
    TESTS=(tests/test_cuda_restore.py tests/test_backends.py tests/test_early_stop_wiring.py tests/test_group_invariance.py
           tests/test_noise_level.py tests/test_vmap_autocast.py tests/test_bilinear_x2.py tests/test_aligned_channels.py
           tests/test_parallel_compile.py
           tests/bench --ignore=tests/bench/test_gpu_quick.py)
    EARLY_STOP=(--size 256 --iters 2000 --cost 512)
    LARGE=(--device cuda --megapixels 12 --stop auto --report-every 25)
    declare -A LIMIT=([install]=90 [environment]=30 [throughput]=240 [profile]=90 [convs]=90 [cudnn]=120 [batch]=90
                      [start-up]=90 [tasks]=120 [parity]=120 [ops]=140 [triton]=180 [compile]=180 [time-to-psnr]=200
                      [tests]=150 [early-stop]=240 [large]=590)
fi
# the smallest slice of the budget that a step is started with: time-to-psnr's first result comes at its end (the
# original loop alone runs 105 s on an H200), so with less it leaves the budget to the steps after it
declare -A MIN=([install]=5 [environment]=5 [throughput]=60 [profile]=30 [convs]=20 [cudnn]=30 [batch]=30 [start-up]=40
                [tasks]=30 [parity]=30 [ops]=20 [triton]=40 [compile]=60 [time-to-psnr]=150 [tests]=30 [early-stop]=120
                [large]=120)

PYTEST_PLUGINS=()
if "$PY" -c "import pytest_timeout" 2> /dev/null; then PYTEST_PLUGINS+=(--timeout 90); fi
if [ "$TINY" = 0 ] && "$PY" -c "import xdist" 2> /dev/null; then PYTEST_PLUGINS+=(-n 4); fi
# shellcheck disable=SC2206  # word splitting wanted: a list of arguments
PYTEST_EXTRA=(${DIPFAST_GPU_QUICK_PYTEST:-})

record() {  # record NAME STATUS SECONDS LIMIT NOTE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/summary.tsv"
}
pack() {  # the whole work folder into one archive, replaced atomically, and the summary beside it
    tar czf "$ARCHIVE.part" -C "$WORK" . && mv "$ARCHIVE.part" "$ARCHIVE"
    cp "$WORK/summary.tsv" "$DEST/summary.tsv"
}
step() {  # step NAME FUNCTION: run under min(its limit, budget left), log to WORK/NAME.log, record, pack
    local name=$1 function=$2 left limit start status note=""
    left=$(( BUDGET - ($(date +%s) - START) ))
    limit=${LIMIT[$name]}
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt "${MIN[$name]}" ]; then
        echo "== $name: skipped, ${left} s of the budget left"
        record "$name" "skipped (budget)" 0 "$limit" "rerun: DIPFAST_GPU_QUICK_STEPS=\"$name ...\""
        pack
        return
    fi
    echo "== $name (at most ${limit} s)"
    start=$(date +%s)
    # SIGINT first: pytest and the harness then write what they have (junit XML, partial JSON)
    STEP_LIMIT=$limit timeout --signal=INT --kill-after=15 "$limit" bash "$ROOT/bench/gpu_quick.sh" "${SELF[@]}" \
        --run-step "$function" > "$WORK/$name.log" 2>&1
    status=$?
    if [ "$status" -eq 0 ]; then
        status=ok
    else
        FAILED=1
        [ "$status" -eq 124 ] && note="timed out" || note="exit $status"
        status=failed
        echo "   $name failed ($note); last lines of $name.log:"
        tail -n 5 "$WORK/$name.log" | sed 's/^/   | /'
    fi
    record "$name" "$status" "$(( $(date +%s) - start ))" "$limit" "$note"
    pack
}
step_with_data() {  # step_with_data NAME FUNCTION: the step where --data has the paper's images, else recorded skipped
    if [ -f "$DATA/denoising/F16_GT.png" ]; then
        step "$1" "$2"
    else
        echo "== $1: skipped, no $DATA/denoising/F16_GT.png (give --data or DIPFAST_GPU_QUICK_DATA)"
        record "$1" "skipped (no data)" 0 0 "no $DATA/denoising/F16_GT.png"
        pack
    fi
}
bench() { "$PY" -m dipfast.bench "$@"; }

install() {  # without the C++ CPU ops where DIPFAST_NO_NATIVE=1 (set above)
    local status=0
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"; then
        echo "gpu_quick: the install failed; again without the native CPU ops (DIPFAST_NO_NATIVE=1)"
        DIPFAST_NO_NATIVE=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" || status=1
    fi
    if ! "$PY" -c "import dipfast.kernels" 2> /dev/null && [ ! -e "$ROOT/dipfast/kernels" ]; then
        echo "gpu_quick: dipfast.kernels not importable; linking dipfast/kernels -> ../kernels (PYTHONPATH alone)"
        ln -s ../kernels "$ROOT/dipfast/kernels"
    fi
    return $status
}
environment() {
    "$PY" "$ROOT/bench/gpu_quick_steps.py" environment "$WORK/environment" || return 1
    for so in "$ROOT"/dipfast/_native*.so; do  # how they link: their error path crashed on the first H100
        [ -f "$so" ] || continue
        { command -v c++ > /dev/null && c++ --version | head -n 1; ldd "$so" | grep -E "stdc|gomp"
        } >> "$WORK/environment/environment.txt" 2>&1
    done
    return 0
}
throughput() {
    # in the order of what decides most (each row is written as it ends): auto's path and the baselines, then
    # bf16's variants, tf32's and fp32's (the compiled paths are the compile step's)
    bench throughput "${DEVICE[@]}" "${TP[@]}" --batch 1 --quiet --out "$WORK/throughput" --configs \
        native:bf16 original-loop:fp32 original-loop-tf32:tf32 native-reference-blocks:bf16 \
        native-packed-parameters:bf16 native-unfused-rules:bf16 native-pdl:bf16 native-folded-finalize:bf16 \
        native-cl:bf16 native:tf32 \
        native-reference-blocks:tf32 native:fp32
}
fastest() {  # fastest N [--batched]: the N fastest paths of the throughput step, native's where it has none
    "$PY" "$ROOT/bench/gpu_quick_steps.py" fastest "$WORK/throughput/throughput.json" "$@" \
        --fallback native:bf16 native:tf32 native:fp32  # auto's path first, where a call has no throughput step
}
profile() {  # the two fastest, then the price of a launch
    local status=0
    # shellcheck disable=SC2046  # fastest prints a list of words
    bench profile "${DEVICE[@]}" "${PROFILE[@]}" --quiet --out "$WORK/profile" --configs $(fastest 2) || status=1
    "$PY" "$ROOT/bench/launch_gap.py" "${DEVICE[@]}" "${LAUNCH_GAP[@]}" --out "$WORK/profile/launch_gap" || status=1
    return $status
}
convs() {  # the step's conv calls: native (parameters aligned), channels_last (14 legacy dgrad calls on 2026-12-04),
    local status=0 method  # the parameters packed as before alignment
    for method in native native-cl native-packed-parameters; do
        "$PY" "$ROOT/bench/step_convs.py" "${CONVS[@]}" --method "$method" --out "$WORK/convs/$method" || status=1
    done
    return $status
}
cudnn() {  # the frontend from a carried wheel where it is not installed (the device machine has no network)
    local wheel
    if ! "$PY" -c "import cudnn" 2> /dev/null; then
        for wheel in "$ROOT"/.gpu-data/wheels/nvidia_cudnn_frontend-*.whl; do
            [ -f "$wheel" ] && "$PY" -m pip install -q --no-deps --no-index "$wheel"
        done
    fi
    "$PY" "$ROOT/bench/cudnn_fusion.py" "${CUDNN[@]}" --out "$WORK/cudnn"
}
batch() {  # the fastest path that batches, and native and native-per-network at its precision (what vmap is worth)
    local best
    best=$(fastest 1 --batched)
    # shellcheck disable=SC2046  # a list of words, each once
    bench throughput "${DEVICE[@]}" "${BATCH[@]}" --batch 1 4 --quiet --out "$WORK/batch" --configs \
        $(printf '%s\n' "$best" "native:${best#*:}" "native-per-network:${best#*:}" | awk '!seen[$0]++')
}
start_up() {  # a cold start in parts: native against native-parallel-compile, each fit a fresh process
    "$PY" "$ROOT/bench/cold_start.py" "${COLD_START[@]}" --out "$WORK/start-up"
}
tasks() {
    # shellcheck disable=SC2086  # BACKENDS is a list of words
    "$PY" "$ROOT/bench/gpu_tasks.py" --out "$WORK/tasks" --backends $BACKENDS "${TASKS[@]}"
}
parity() {  # the real shapes first, in a run of their own: xdist's workers would take them in any order
    mkdir -p "$WORK/parity"
    local status=0 dx_map="error_map and 132-512"
    # first the fp32 dx error map at the 132 -> 128 conv at 512 px (the H100's fp32 failure: one kink flip, or wrong
    # by tile?), which the file's order puts 26th of 52 cases: the 12-04 step finished 2 in its limit
    "$PY" -m pytest tests/parity/test_cuda_shapes.py -k "$dx_map" -q -rfE -p no:cacheprovider "${PYTEST_PLUGINS[@]}" \
        "${PYTEST_EXTRA[@]}" --junitxml="$WORK/parity/cuda_shapes_dx_map.xml" || status=1
    "$PY" -m pytest tests/parity/test_cuda_shapes.py -k "not ($dx_map)" -q -rfE -p no:cacheprovider \
        "${PYTEST_PLUGINS[@]}" "${PYTEST_EXTRA[@]}" --junitxml="$WORK/parity/cuda_shapes.xml" || status=1
    "$PY" -m pytest "${PARITY[@]}" -q -rfE -p no:cacheprovider "${PYTEST_PLUGINS[@]}" "${PYTEST_EXTRA[@]}" \
        --junitxml="$WORK/parity/junit.xml" || status=1
    return $status
}
ops() {
    mkdir -p "$WORK/ops"
    local status=0
    # first (14 short cases): the native step's BatchNorm kernels against torch's eager BatchNorm + LeakyReLU + pad,
    # in GB/s; then the fused conv ops, whose cold Triton compilations take most of the step's limit
    "$PY" -m pytest bench/ops/bench_batch_norm_act.py -q -p no:cacheprovider "${BN_OPS[@]}" \
        --benchmark-json="$WORK/ops/batch_norm.json" --junitxml="$WORK/ops/junit-batch-norm.xml" || status=1
    "$PY" -m pytest bench/ops/bench_conv_bn_lrelu.py bench/ops/bench_lanczos2.py -q -p no:cacheprovider \
        "${OPS[@]}" --benchmark-json="$WORK/ops/benchmarks.json" --junitxml="$WORK/ops/junit.xml" || status=1
    "$PY" "$ROOT/bench/gpu_quick_steps.py" ops "$WORK/ops/batch_norm.json" "$WORK/ops/benchmarks.json" \
        --out "$WORK/ops/ops.md" || status=1
    return $status
}
triton_backend() {
    env "${TRITON_ENV[@]}" "$PY" -m dipfast.bench throughput "${DEVICE[@]}" "${TRITON_TP[@]}" --batch 1 --quiet \
        --out "$WORK/triton" --configs "${TRITON_CONFIGS[@]}" || return 1
    # where its 77 ms go (the H200 run had no profile of it); the interpreter's would say nothing of a GPU. The
    # eager step's: the same Triton kernels, without a minute of compiling again in the profile's process
    [ "$TINY" = 1 ] || bench profile "${DEVICE[@]}" "${PROFILE[@]}" --quiet --out "$WORK/triton/profile" \
        --configs triton-eager:bf16
}
compile_backend() {  # as the throughput step's rows, the layout variant beside its backend
    env "${COMPILE_ENV[@]}" "$PY" -m dipfast.bench throughput "${DEVICE[@]}" "${TP[@]}" --batch 1 --quiet \
        --out "$WORK/compile" --configs compile:bf16 compile-nchw:bf16
}
time_to_psnr() {
    # cold: a fresh process and empty compile caches, as a user's first image
    # shellcheck disable=SC2046
    TORCHINDUCTOR_CACHE_DIR="$WORK/.cold-cache/inductor" TRITON_CACHE_DIR="$WORK/.cold-cache/triton" \
        bench time-to-psnr "${DEVICE[@]}" --data "$DATA" --tasks denoise "${TTP[@]}" --no-warm --baselines none \
        --targets 28 30 --quiet --out "$WORK/time-to-psnr" --configs original-loop:fp32 $(fastest 1)
    local status=$?
    rm -rf "$WORK/.cold-cache"
    return $status
}
suite_tests() {
    mkdir -p "$WORK/tests"
    "$PY" -m pytest "${TESTS[@]}" -q -rfE -p no:cacheprovider "${PYTEST_PLUGINS[@]}" "${PYTEST_EXTRA[@]}" \
        --junitxml="$WORK/tests/junit.xml"
}
large() {  # the fit's own budget: the step's limit less a minute for set-up and the final forward
    local data=()
    [ -f "$DATA/denoising/F16_GT.png" ] && data=(--data "$DATA")
    "$PY" "$ROOT/bench/large_photo.py" "${LARGE[@]}" "${data[@]}" --budget $(( ${STEP_LIMIT:-120} - 60 )) \
        --out "$WORK/large"
}
early_stop() {
    bench early-stop "${DEVICE[@]}" --data "$DATA" --tasks denoise "${EARLY_STOP[@]}" --quiet --out "$WORK/early-stop"
}

if [ -n "$RUN_STEP" ]; then
    # the time limit's SIGINT: pytest and the harness catch it, write what they have and return normally, and bash
    # would go on to the function's next command until the SIGKILL 15 s later. It ends the step there instead
    trap 'exit 124' INT
    "$RUN_STEP"
    exit $?
fi
SELF=(--data "$DATA" "$DEST")  # the arguments each step's own run of this script repeats
[ "$TINY" = 1 ] && SELF+=(--tiny)
START=$(date +%s)
FAILED=0
printf 'step\tstatus\tseconds\tlimit\tnote\n' > "$WORK/summary.tsv"

echo "gpu_quick: results in $WORK, packed into $ARCHIVE after every step (budget ${BUDGET} s)"
declare -A FUNCTION=([install]=install [environment]=environment [throughput]=throughput [profile]=profile
                    [convs]=convs [cudnn]=cudnn [batch]=batch [start-up]=start_up [time-to-psnr]=time_to_psnr
                    [tests]=suite_tests [tasks]=tasks [parity]=parity [ops]=ops [triton]=triton_backend
                    [compile]=compile_backend [early-stop]=early_stop [large]=large)
for name in $STEPS; do  # in the order given: a second call puts first what the first call did not reach
    case $name in
        install) if [ "$INSTALL" = 1 ]; then step install install
                 else record install "skipped" 0 0 "DIPFAST_GPU_QUICK_INSTALL=0"; fi ;;
        time-to-psnr|early-stop) step_with_data "$name" "${FUNCTION[$name]}" ;;
        *) step "$name" "${FUNCTION[$name]}" ;;
    esac
done

"$PY" "$ROOT/bench/gpu_quick_steps.py" headline "$WORK" > /dev/null 2>&1
for folder in throughput profile batch triton compile time-to-psnr; do
    [ -d "$WORK/$folder" ] && { echo "### $folder"; "$PY" -m dipfast.bench summary "$WORK/$folder"; }
done > "$WORK/summary.md" 2>&1
pack
echo
cat "$WORK/headline.md" 2> /dev/null
column -t -s $'\t' "$WORK/summary.tsv" 2> /dev/null || cat "$WORK/summary.tsv"
echo "packed: $ARCHIVE ($(( $(date +%s) - START )) s in all)"
exit $FAILED
