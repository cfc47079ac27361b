#!/usr/bin/env bash
# Before a GPU window's first call: what the device machine needs from this one, and the calls to make.
#
#   bench/gpu_prepare.sh [--data DIR] [--left SECONDS]
#
# The device machine has no network and receives the working tree with the ignored paths a call carries. This
# puts into .gpu-data (git-ignored, never committed) the paper's images (DIR, default ../shared/data/dip beside the
# repository: gpu_quick's time-to-psnr, early-stop and large steps) and the nvidia-cudnn-frontend wheel for the
# device's Python (gpu_quick's cudnn step installs it there), checks the carry against the device tool's 64 MiB,
# and prints the window's calls with the commit they measure; --left: the device tool's budget_left_s after call 1,
# for call 2's budget and limit. Run it again at any time: it copies and downloads only what is missing.
#
# Environment: DIPFAST_GPU_DATA (default .gpu-data in the repository), DIPFAST_DEVICE_PYTHON (the device's Python,
# default 3.12, as on every window so far), PYTHON (default python3).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=$ROOT/../shared/data/dip
LEFT=""
while [ $# -gt 0 ]; do
    case $1 in
        --data) DATA=${2:?--data needs a folder}; shift ;;
        --left) LEFT=${2:?--left needs the seconds left}; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_prepare: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
CARRY=${DIPFAST_GPU_DATA:-$ROOT/.gpu-data}
PY=${PYTHON:-python3}
FRONTEND=nvidia-cudnn-frontend==1.16.0  # the version the cudnn step was written against (bench/cudnn_fusion.py)
status=0

if [ -f "$CARRY/dip/denoising/F16_GT.png" ]; then
    echo "images: $CARRY/dip is there"
elif [ -f "$DATA/denoising/F16_GT.png" ]; then
    mkdir -p "$CARRY" && cp -r "$DATA" "$CARRY/dip" && echo "images: copied $DATA to $CARRY/dip"
else
    echo "images: no $DATA/denoising/F16_GT.png; give --data: without them gpu_quick skips time-to-psnr," \
         "early-stop and the paper's images in large" >&2
    status=1
fi

if compgen -G "$CARRY/wheels/nvidia_cudnn_frontend-*.whl" > /dev/null; then
    echo "wheel: $(basename "$(compgen -G "$CARRY/wheels/nvidia_cudnn_frontend-*.whl" | head -n 1)") is there"
elif "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${DIPFAST_DEVICE_PYTHON:-3.12}" \
        --platform manylinux_2_28_x86_64 "$FRONTEND" -d "$CARRY/wheels"; then
    echo "wheel: downloaded $FRONTEND into $CARRY/wheels"
else
    echo "wheel: pip could not download $FRONTEND: gpu_quick's cudnn step will record that the module is missing" >&2
    status=1
fi

size=$(du -sm "$CARRY" 2> /dev/null | cut -f1)
if [ "${size:-0}" -gt 60 ]; then
    echo "carry: $CARRY is $size MiB, over what the device tool carries (64 MiB with everything else)" >&2
    status=1
fi

commit=$(git -C "$ROOT" rev-parse HEAD 2> /dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2> /dev/null)" ]; then
    echo "tree: uncommitted changes; commit them first, so that the results name what they measured" >&2
    status=1
fi
carried=$(realpath --relative-to="$ROOT" "$CARRY")
if [[ $carried == ..* ]]; then
    echo "carry: $CARRY is outside the repository, and the device tool carries paths inside it only" >&2
    status=1
fi
env="DIPFAST_BENCH_COMMIT=$commit"
# call 2: gpu_quick, then 90 s of tuning and the transfers, within what the session has left after call 1
if [ -n "$LEFT" ]; then
    call2="  call 2  on the warm machine, only where 'status' leaves 240 s or more, timeout_s $((LEFT - 10)):
    $env DIPFAST_GPU_QUICK_STEPS=\"install environment triton parity tasks tests\" DIPFAST_GPU_QUICK_BUDGET=$((LEFT - 110)) bash bench/gpu_quick.sh; cp kernels/tuned_tiles.json \$OUT/; timeout 90 python3 bench/ops/tune_conv_bn_lrelu.py --blocks L0-merge --families conv --precisions bf16 --record \$OUT/tune-merge.jsonl --table \$OUT/tuned_tiles.json
  (the returned tuned_tiles.json is the whole table, the merge's entries merged in: kernels/tuned_tiles.json)"
else
    call2="  call 2  after call 1: bench/gpu_prepare.sh --left <the device tool's budget_left_s> prints it with its budget"
fi
cat << EOF

The window (device tool: 'status' first; every call carries ["$carried"]):
  call 1  timeout_s 540:
    $env bash bench/gpu_quick.sh
$call2
  then give_back, and here:
    python bench/gpu_results.py CALL1/gpu-quick.tar.gz CALL2/gpu-quick.tar.gz --command "..." --command "..."
  a window of its own for issue 17's 12 MP photo:
    $env DIPFAST_GPU_QUICK_STEPS=large DIPFAST_GPU_QUICK_BUDGET=560 bash bench/gpu_quick.sh
EOF
exit $status
