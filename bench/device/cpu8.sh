#!/usr/bin/env bash
# 8-rank CPU figures on the device host (16 cores: no oversubscription), as reported in the issues.
# That host has Python 3.12 with torch, Open MPI 4.1.6 and no package registry: msgspec and mpi4py
# travel as cp312 wheels in .whl/ (see the device tool's README), and the C fast path is compiled
# here with the host's gcc, as `pip install` would. Results land in $OUT.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
python3 - <<'PY'
import subprocess, sysconfig
inc = sysconfig.get_paths()["include"]
out = "src/typedcoll/_speedups" + sysconfig.get_config_var("EXT_SUFFIX")
subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-I", inc, "src/typedcoll/_speedups.c", "-o", out], check=True)
import typedcoll._protocol as p
assert p._fast_allgather is not None, "C fast path not loaded"
print("built", out)
PY
lscpu | grep -E "Model name|^CPU\(s\)" || true
for n in ${RANKS:-2 8}; do
  echo "== core overhead, $n ranks"
  mpirun --oversubscribe -n $n python3 bench/core_overhead.py --rounds 15 --json $OUT/core_overhead_${n}.json
done
echo "== flush cost, 8 ranks"
mpirun --oversubscribe -n 8 python3 bench/flush_cost.py --rounds 15 --iters 1000 --json $OUT/flush_cost_8.json
