#!/bin/bash
# dipfast under another torch and triton on this CPU (by default the GPU windows': torch 2.11.0+cu130, triton 3.6.0):
# a venv with them and the latest test tools, a clone of HEAD installed as gpu_quick.sh installs it, the whole suite,
# and the sm_90 code of the Triton kernels from that triton beside this machine's. About 15 minutes on 2 cores.
#     [PYTHON=python3.12] bash bench/results/2026-12-06-cpu-device-stack/stack_check.sh OUT [TORCH TRITON]
# PYTHON: the venv's interpreter (the windows' is 3.12; default: this machine's python).
set -u
out=$(realpath -m "$1") torch=${2:-2.11.0} triton=${3:-3.6.0}
repo=$(git rev-parse --show-toplevel)
venv=$out/venv clone=$out/clone
mkdir -p "$out"
"${PYTHON:-python}" -m venv "$venv" || exit 1
{
    "$venv/bin/pip" install -q "torch==$torch" "triton==$triton" setuptools wheel numpy pillow scikit-image tqdm \
        matplotlib ninja nvtx ray pytest pytest-benchmark pytest-xdist hypothesis &&
    git clone -q "$repo" "$clone" &&
    (cd "$clone" && DIPFAST_NO_NATIVE=1 "$venv/bin/pip" install -q --no-deps --no-build-isolation -e .)
} > "$out/install.log" 2>&1 || { echo "the install failed: $out/install.log"; exit 1; }
{ "$venv/bin/python" --version; "$venv/bin/pip" freeze | grep -iE "^(torch|triton|pytest|numpy)=="; } > "$out/versions.txt"
(cd "$clone" && PATH=$venv/bin:$PATH python -m pytest -q -n 2 -p no:cacheprovider -rfE > "$out/suite.txt" 2>&1)
echo "suite: $(tail -1 "$out/suite.txt")"
here=$(python -c "import triton; print(triton.__version__)")  # this machine's
for mode in "" --step; do  # the triton backend's GEMM kernels, then the native CUDA step's kernels
    name=${mode:+step}; name=${name:-gemm}
    (cd "$clone" && "$venv/bin/python" bench/sm90_codegen.py $mode --size 512 --out "$out/$name-triton-$triton")
    (cd "$repo" && python bench/sm90_codegen.py $mode --size 512 --out "$out/$name-triton-$here")
done > "$out/codegen.log" 2>&1
