"""Scale by simulation: envelope check and decode cost at N = 8 ... 16,384 ranks, with no MPI.

Run: ``python bench/scale.py [--quick] [--json F] [--png F]``, the same as
``typedcoll bench --scale``; the simulation is described in ``typedcoll/_bench_scale.py``.
"""

import sys

from typedcoll._bench_scale import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
