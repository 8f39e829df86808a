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
        print("rank 1 waits in the barrier", flush=True)
        comm.barrier()  # rank 0 never joins: rank 1 is blocked inside MPI when the signal comes
    else:
        # The launcher ends this rank once rank 1 is gone; if it does not, this rank ends itself
        # when rank 1 has (no MPI_Finalize: its peer is dead). What it saw tells where a hang
        # stopped.
        path = os.path.join(os.environ["TYPEDCOLL_TRACE_DIR"], "rank1.json")
        deadline = time.monotonic() + 50
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"rank 0 {'saw' if os.path.exists(path) else 'never saw'} rank 1's dump", flush=True)

        def alive(pid: int) -> bool:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        while alive(pids[1]) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"rank 0: rank 1 {'is still running' if alive(pids[1]) else 'ended'}", flush=True)
        os._exit(0)
