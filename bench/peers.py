"""Allgather latency of typedcoll against the raw floor and every peer, at the launch's N ranks.

Run: ``mpiexec -n N python bench/peers.py [--quick] [--json F] [--png F]`` (Open MPI:
``mpirun --oversubscribe -n N ...``). The same as ``typedcoll bench``, which launches itself;
the engine, its options and how it measures are in ``typedcoll/_bench.py``.
"""

import sys

from typedcoll._bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
