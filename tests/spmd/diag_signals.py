"""SPMD: SIGUSR1 dumps a rank blocked inside MPI and it continues; SIGTERM dumps and still ends.

Run by tests/test_diag_mpi.py at 2 ranks with TYPEDCOLL_TRACE_DIR set; DIAG_SIGNAL chooses the
case. A Python handler cannot run while the main thread is inside MPI: the diagnostics thread
receives the signal through the wake-up fd and writes the dump.
"""

import json
import os
import signal
import threading
import time

# This program tests the default dispositions. A launcher may hand down a blocked SIGTERM (seen
# on a CI runner: the signal then stays pending and the job hangs), so start from the defaults,
# before MPI starts threads that would inherit the mask.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGUSR1})
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGUSR1, signal.SIG_DFL)

from mpi4py import MPI  # noqa: E402

import typedcoll as tc
import typedcoll.diagnostics

typedcoll.diagnostics.install()
comm = tc.TypedComm(MPI.COMM_WORLD)
pids = comm.allgather(os.getpid(), step=7)
if os.environ["DIAG_SIGNAL"] == "USR1":
    if comm.rank == 0:
        time.sleep(0.5)  # rank 1 is now blocked inside MPI in the barrier below
        os.kill(pids[1], signal.SIGUSR1)
        path = os.path.join(os.environ["TYPEDCOLL_TRACE_DIR"], "rank1.json")
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        doc = json.load(open(path))
        last = doc["comms"][0]["entries"][-1]
        assert doc["reason"] == "SIGUSR1", doc
        assert (last["op"], last["state"], last["seq"]) == ("barrier", "started", 1), last
        print("live dump ok", flush=True)
    comm.barrier()
    print(f"rank {comm.rank} continued", flush=True)
else:
    if comm.rank == 1:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        comm.barrier()  # rank 0 never joins: rank 1 is blocked inside MPI when the signal comes
    else:
        time.sleep(30)  # ended by the launcher once rank 1 is gone
