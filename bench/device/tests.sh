#!/usr/bin/env bash
# The tests that need the device host, in one call: NCCL on its GPU, Open MPI and gloo with one
# rank per core at 16 ranks, and Python 3.12 under the C fast path (the dev VM's C leg is 3.11).
# Each pytest run writes its log to $OUT/device-tests-<name>.log.
#
#   device run (carry .whl):  bash bench/device/tests.sh        knobs: BUDGET_S=540, ONLY=NAMES
set -uo pipefail
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-540}))
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
INC=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
SUF=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
for source in core/_speedups codecs/_ints; do
    gcc -shared -fPIC -O2 -I "$INC" "src/typedcoll/$source.c" \
        -o "src/typedcoll/$source$SUF" || exit 1
done
python3 -c "from typedcoll.core import fast; assert fast.ENABLED, 'C fast path not loaded'"
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__)"
mpirun --version | head -1
nvidia-smi -L || true

# tests NAME SECONDS [ENV=VALUE...] -- PYTEST ARGS: bounded by its limit and the budget left.
# ONLY="gloo16 scale16" runs those alone.
tests() {
    local name=$1 limit=$2 left; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 20 ]; then echo "!! $name skipped: out of time"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name ($(( $(date +%s) - START )) s in)"
    timeout -k 5 "$limit" env "$@" -p no:cacheprovider > "$OUT/device-tests-$name.log" 2>&1
    echo "   rc $?: $(grep -aE '(passed|failed|error)' "$OUT/device-tests-$name.log" | tail -1)"
}
tests gpu 180 python3 -m pytest -q tests/test_torch_gpu.py tests/test_torch_device_roles.py
# Deselected: it imports typedcoll with PYTHONPATH cleared, and here typedcoll is on the path only.
tests identity 120 python3 -m pytest -q tests/test_core_tasks.py tests/test_core_warm.py \
    tests/test_core_callers.py tests/test_core_copies.py \
    tests/test_core_semantics.py tests/test_core_arms.py tests/test_core_units.py \
    --deselect tests/test_core_units.py::test_importing_typedcoll_installs_nothing
tests scale16 240 TYPEDCOLL_TEST_RANKS=16 python3 -m pytest -q tests/test_scale_mpi.py
# gloo: test_torch.py, its desync, bad-argument and timeout program at 2, 4, 8 and 16 ranks.
tests gloo16 240 TYPEDCOLL_TEST_RANKS=16 python3 -m pytest -q tests/test_torch.py
echo "== done in $(( $(date +%s) - START )) s"
