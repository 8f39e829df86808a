#!/usr/bin/env bash
# Two commits measured interleaved on the device host, old and new alternating RUNS times in
# one call, so both see the same machine: core_overhead.py and collectives.py at N ranks
# (Open MPI, one rank per core), or with GPU=1 torch_gpu.py at world size 1.
#
#   here:  rm -rf .ab && mkdir -p .ab/old .ab/new && echo /.ab/ >> .git/info/exclude
#          git archive OLD src bench | tar -x -C .ab/old
#          git archive NEW src bench | tar -x -C .ab/new
#   device run (carry .whl and .ab):  N=16 RUNS=3 bash bench/device/ab.sh   [GPU=1]
#
# Each tree's C extensions are built there; every JSON goes into $OUT/ab.tgz, one line per run
# is printed (the figures of docs/bench.md's A/B paragraphs).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
INC=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
SUF=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
for tree in old new; do
    for source in core/_speedups codecs/_ints; do
        gcc -shared -fPIC -O2 -I "$INC" ".ab/$tree/src/typedcoll/$source.c" \
            -o ".ab/$tree/src/typedcoll/$source$SUF" || exit 1
    done
done
N=${N:-16}
RESULTS=$(mktemp -d)
MPI="mpirun --oversubscribe --bind-to core -n $N"
for run in $(seq "${RUNS:-3}"); do
    for tree in old new; do
        cd ".ab/$tree" || exit 1
        export PYTHONPATH=/tmp/site:$PWD/src
        if [ -n "${GPU:-}" ]; then
            timeout 120 torchrun --nproc-per-node=1 bench/torch_gpu.py --rounds 3 --iters 200 \
                --json "$RESULTS/gpu-$tree-$run.json" > /dev/null 2>&1
            python3 -c "import json; j = json.load(open('$RESULTS/gpu-$tree-$run.json'));
print('$tree $run all-gather typed, raw (us):', {s: (round(v['ag_typed']), round(v['ag_raw']))
      for s, v in j['us_per_call'].items()})"
        else
            timeout 60 $MPI python3 bench/core_overhead.py --rounds 15 --iters 2000 \
                --json "$RESULTS/co-$tree-$run.json" | grep -a "^RankState"
            timeout 60 $MPI python3 bench/collectives.py --rounds 15 --iters 1000 \
                --json "$RESULTS/coll-$tree-$run.json" | grep -aE "^(bcast|barrier|reduce) "
        fi
        echo "-- $tree, run $run"
        cd ../..
    done
done
tar -C "$RESULTS" -czf "$OUT/ab.tgz" .
