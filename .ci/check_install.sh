#!/usr/bin/env bash
# CI: a clean `pip install .` as a new user runs it (pip's build isolation on) in a fresh virtual
# environment ends with working native CPU ops. The isolated build has no torch (pyproject.toml), so the
# ops come from the build at first use: this checks that the installed package ships the C++ sources,
# builds them for the running torch into a fresh cache, runs them, and that a second process reuses it.
# Run from a folder outside the checkout, so `import dipfast` is the installed copy.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# a copy of the checkout's files (tracked and new, never build outputs such as dipfast/_native*.so)
mkdir "$work/src"
git -C "$repo" ls-files -z --cached --others --exclude-standard | (cd "$repo" && xargs -0 tar -c) | tar -x -C "$work/src"

start=$SECONDS
python3 -m venv --system-site-packages "$work/venv"  # the machine's torch; pip adds what is missing
"$work/venv/bin/python" -m pip install -q "$work/src"
install_s=$((SECONDS - start))

cd "$work"
run() { env -u PYTHONPATH XDG_CACHE_HOME="$work/cache" DIPFAST_REQUIRE_NATIVE=1 "$work/venv/bin/python" "$@"; }
check='
import sys, torch, torch.nn.functional as F
import dipfast, dipfast.native as native
assert dipfast.__file__.startswith(sys.prefix), dipfast.__file__
status = native.status()
assert native.enabled() and status.path == "jit", status
x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
torch.testing.assert_close(native.upsample_bilinear2x(x), F.interpolate(x, scale_factor=2, mode="bilinear"))
print(status.path, status.detail)
'
start=$SECONDS
run -c "$check"
build_s=$((SECONDS - start))
start=$SECONDS
run -c "$check" | grep -q "cached in" || { echo "check_install: the second process did not reuse the build" >&2; exit 1; }
reuse_s=$((SECONDS - start))
env -u PYTHONPATH XDG_CACHE_HOME="$work/cache" "$work/venv/bin/dipfast" doctor
echo "check_install: pip install . ${install_s} s, first use (build) ${build_s} s, second process ${reuse_s} s"
