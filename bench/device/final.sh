#!/usr/bin/env bash
# Every figure the closing notes quote from the device host, in one call: the GPU tests and the
# NCCL check's cost (one H100: world size 1), then the CPU figures at 2 and 8 ranks (16 cores,
# no oversubscription). Same set-up as cpu8.sh. Results land in $OUT.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 - <<'PY'
import subprocess, sysconfig
out = "src/typedcoll/_speedups" + sysconfig.get_config_var("EXT_SUFFIX")
subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-I", sysconfig.get_paths()["include"],
                "src/typedcoll/_speedups.c", "-o", out], check=True)
import typedcoll._protocol as p
assert p._fast_allgather is not None, "C fast path not loaded"
from mpi4py import MPI
from typedcoll._mpi import direct_allgather
assert direct_allgather(MPI.COMM_WORLD) is not None, "direct MPI_Allgather binding not found"
PY
nvidia-smi -L
echo "== GPU tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_torch_gpu.py
echo "== MPI tests of the fast path (Open MPI here)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_protocol_paths.py
echo "== GPU check cost"
timeout 240 torchrun --nproc-per-node=1 bench/torch_gpu.py --rounds 5 --json $OUT/gpu.json
for n in 2 8; do
  echo "== core overhead, $n ranks"
  mpirun --oversubscribe -n $n python3 bench/core_overhead.py --rounds 15 --json $OUT/core_overhead_${n}.json
done
for n in 2 8; do
  echo "== every collective against pickle, $n ranks"
  mpirun --oversubscribe -n $n python3 bench/collectives.py --json $OUT/collectives_${n}.json
done
echo "== where the time goes, 2 ranks"
mpirun --oversubscribe -n 2 python3 bench/core_decompose.py
echo "== flush cost, 2 ranks"
mpirun --oversubscribe -n 2 python3 bench/flush_cost.py --rounds 15 --iters 1000 --json $OUT/flush_cost_2.json
echo "== flush cost, 8 ranks"
mpirun --oversubscribe -n 8 python3 bench/flush_cost.py --rounds 15 --iters 1000 --json $OUT/flush_cost_8.json
echo "== peers, 8 ranks"
mpirun --oversubscribe -n 8 python3 bench/peers.py --no-progress --json $OUT/8ranks-device.json --png ''
echo "== scale"
python3 bench/scale.py --rounds 5 --json $OUT/scale-device.json --png '' --no-progress
# One archive: the device tool returns a limited number of files per call.
tar -C $OUT -czf $OUT/results.tgz $(cd $OUT && ls *.json) && (cd $OUT && rm -f *.json)
