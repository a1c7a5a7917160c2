#!/usr/bin/env bash
# The GPU check (issue 16), for a machine with an NVIDIA GPU, in under 8 minutes:
#   1. install CuPy for the local CUDA major version (read from nvidia-smi),
#   2. run the test suite: the backend fixture's "cuda" cases then run on real CuPy,
#   3. run `python -m tinymoe bench --device cuda --compare-torch` on small and openmoe-base
#      (a few timed steps each; the torch side needs a CUDA build of PyTorch).
# Without a GPU it stops at once with one line and a non-zero exit status.
#
# Usage: bash scripts/gpu_check.sh            (PYTHON=/path/to/python to choose the interpreter)
# Time limits (seconds): install 120, tests 230, each bench 60 -> at most 470 s, under 8 min
# in all; a normal run takes far less. A CuPy that already imports is used as it is (a
# machine without the package index can have the wheel put in place beforehand).
set -euo pipefail

fail() {
    echo "gpu_check: $*" >&2
    exit 1
}

command -v nvidia-smi >/dev/null 2>&1 \
    || fail "no nvidia-smi on PATH: no NVIDIA GPU driver on this machine, nothing checked"
smi=$(nvidia-smi 2>/dev/null) || fail "nvidia-smi failed: no usable GPU, nothing checked"
cuda_major=$(printf '%s\n' "$smi" | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)
[ -n "$cuda_major" ] || fail "nvidia-smi reports no CUDA version"
case "$cuda_major" in
    11) pkg=cupy-cuda11x ;;
    12) pkg=cupy-cuda12x ;;
    13) pkg=cupy-cuda13x ;;
    *) fail "CUDA $cuda_major: no CuPy wheel known for it (cupy-cuda11x/12x/13x)" ;;
esac

cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
echo "gpu_check: CUDA $cuda_major -> $pkg"
if "$py" -c "import cupy" >/dev/null 2>&1; then
    echo "gpu_check: CuPy already installed, not installing $pkg"
else
    timeout 120 "$py" -m pip install -q "$pkg" || fail "pip install $pkg failed"
fi
"$py" -c "from tinymoe import backend as B; B.set_device('cuda'); print('gpu_check: CuPy', B.xp.__version__, 'sees', B.xp.cuda.runtime.getDeviceCount(), 'GPU(s)')" \
    || fail "CuPy does not see the GPU"

echo "gpu_check: test suite (cuda cases on CuPy)"
OPENBLAS_NUM_THREADS=4 timeout 230 "$py" -m pytest -q -x -p no:cacheprovider || fail "test suite failed on CuPy"

for config in small openmoe-base; do
    echo "gpu_check: bench $config"
    timeout 60 "$py" -m tinymoe bench --device cuda --compare-torch --config "$config" --steps 2 --warmup 1 \
        || fail "bench --device cuda --compare-torch --config $config failed"
done
echo "gpu_check: done"
