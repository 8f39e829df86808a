#!/usr/bin/env bash
# Every benchmark on the 16-core device host, at 2, 8 and 16 ranks, in one call (about 5
# minutes; no step runs past 7 minutes in): the figures of docs/bench.md marked "(device
# figures pending)". Steps run in order of importance, so a slow step costs the later ones.
#
# That host has Python 3.12 with torch, Open MPI 4.1.6 and no package registry: msgspec and
# mpi4py travel as cp312 wheels in .whl/, and the C fast path is compiled here with the host's
# gcc, as `pip install` would. Every JSON result and the log go into one archive,
# $OUT/bench-device.tgz (the device tool returns at most 8 files); unpack it into bench/results/.
#
#   device run (carry .whl):  bash bench/device/run.sh
#   knobs: RANKS="2 8" (rank counts), BUDGET_S=420 (seconds before steps are skipped),
#          TYPEDCOLL_PURE_PYTHON=1 (the Python path), NO_GPU=1 (skip the NCCL step), and for a
#          dry run elsewhere NO_INSTALL=1,
#          NO_BUILD=1, MPI="mpiexec -n", OUT=dir
set -uo pipefail
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-420}))  # leaves time to pack whatever finished
RANKS=${RANKS:-"2 8 16"}
WORK=$(mktemp -d)
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
exec > >(tee "$WORK/run.log") 2>&1

if [ -z "${NO_INSTALL:-}" ]; then  # NO_INSTALL=1: the packages are there already
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

python3 - <<'PY' || exit 1
import os, subprocess, sysconfig
if not os.environ.get("NO_BUILD"):  # NO_BUILD=1: use the extensions already built in place
    for source in ("core/_speedups", "codecs/_ints"):
        out = "src/typedcoll/" + source + sysconfig.get_config_var("EXT_SUFFIX")
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-I", sysconfig.get_paths()["include"],
                        "src/typedcoll/" + source + ".c", "-o", out], check=True)
        print("built", out)
from typedcoll.core import fast
from typedcoll.codecs import int_list
if not os.environ.get("TYPEDCOLL_PURE_PYTHON"):
    assert fast.ENABLED, "C fast path built but not loaded (contract mismatch?)"
    assert int_list.ENABLED, "the C decoder of int lists built but not loaded"
print("C fast path enabled:", fast.ENABLED, "/ C int lists:", int_list.ENABLED)
PY
lscpu | grep -E "Model name|^CPU\(s\)" || true
mpirun --version | head -1
python3 -c "import sys, torch, mpi4py, msgspec, numpy; print(sys.version.split()[0], torch.__version__, mpi4py.__version__, msgspec.__version__, numpy.__version__)"

# step NAME SECONDS COMMAND...: run it bounded by its limit and by what is left of the budget.
step() {
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 15 ]; then echo "!! $name skipped: out of time"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name ($(( $(date +%s) - START )) s in)"
    timeout -k 5 "$limit" "$@"
    local rc=$?
    [ $rc -ne 0 ] && echo "!! $name failed or timed out (rc $rc)"
}
MPI=${MPI:-"mpirun --oversubscribe --bind-to core -n"}  # one rank per core up to 16
MAX_RANKS=$(for n in $RANKS; do echo "$n"; done | sort -n | tail -1)
if ! timeout 60 $MPI "$MAX_RANKS" true; then  # cores that are hardware threads refuse binding
    echo "!! binding $MAX_RANKS ranks to cores failed: running unbound"
    MPI="mpirun --oversubscribe --bind-to none -n"
fi

for n in $RANKS; do
    step "collectives, $n ranks" 60 $MPI "$n" python3 bench/collectives.py --rounds 15 \
        --iters 1000 --json "$WORK/collectives-${n}ranks-device.json"
    step "core overhead, $n ranks" 40 $MPI "$n" python3 bench/core_overhead.py --rounds 15 \
        --iters 2000 --json "$WORK/core-overhead-${n}ranks-device.json"
done
for n in $RANKS; do
    step "drop-in allgather, $n ranks" 40 $MPI "$n" python3 bench/compat_allgather.py \
        --rounds 15 --iters 2000 --json "$WORK/compat-allgather-${n}ranks-device.json"
    step "bcast with and without schema, $n ranks" 40 $MPI "$n" python3 bench/bcast_schema.py \
        --rounds 15 --iters 2000 --json "$WORK/bcast-schema-${n}ranks-device.json"
done
step "collectives, 4 ranks (scale plot)" 60 $MPI 4 python3 bench/collectives.py --rounds 15 \
    --iters 1000 --json "$WORK/collectives-4ranks-device.json"
for n in $RANKS; do
    step "peers, $n ranks" 100 $MPI "$n" python3 bench/peers.py --rounds 5 --iters 2000 \
        --budget 0.03 --json "$WORK/peers-${n}ranks-device.json"
done
for n in $RANKS; do
    step "flush cost, $n ranks" 40 $MPI "$n" python3 bench/flush_cost.py --rounds 7 --iters 500 \
        --json "$WORK/flush-cost-${n}ranks-device.json"
done
for n in $RANKS; do
    step "where the time goes, $n ranks" 60 $MPI "$n" python3 bench/core_decompose.py \
        --rounds 7 --iters 1000 --budget 0.03 --json "$WORK/core-decompose-${n}ranks-device.json"
done
for n in $RANKS; do
    step "recorder cost, $n ranks" 30 $MPI "$n" python3 bench/recorder_cost.py --rounds 11 \
        --iters 2000 --json "$WORK/recorder-cost-${n}ranks-device.json"
done
for n in $RANKS; do
    step "gloo, $n ranks" 60 python3 bench/torch_gloo.py --ranks "$n" --rounds 5 --iters 100 \
        --json "$WORK/torch-gloo-${n}ranks-device.json"
done
if [ -z "${NO_GPU:-}" ] && nvidia-smi -L; then
    step "GPU tensor checks, world size 1" 150 torchrun --nproc-per-node=1 bench/torch_gpu.py \
        --rounds 3 --iters 200 --json "$WORK/torch-gpu-device.json"
fi
PEERS=$(ls -v "$WORK"/peers-*ranks-device.json 2>/dev/null | tail -1)
step "scale model" 30 python3 bench/scale.py --measured "$WORK"/collectives-*ranks-device.json \
    ${PEERS:+--peers "$PEERS"} --json "$WORK/scale-device.json"
echo "== done in $(( $(date +%s) - START )) s"

# One archive: the device tool returns a limited number of files per call.
cp "$WORK/run.log" "$OUT/run.log" 2>/dev/null
tar -C "$WORK" -czf "$OUT/bench-device.tgz" $(cd "$WORK" && ls *.json run.log 2>/dev/null)
tar -tzf "$OUT/bench-device.tgz"
