"""Each kind of rank-local value, gating a collective."""

import os
import queue
import random
import time
from collections import deque
from datetime import datetime

from mpi4py import MPI

comm = MPI.COMM_WORLD


class Server:
    def __init__(self):
        self.inbox = queue.Queue()
        self.backlog = deque()

    def environment(self):
        if os.environ.get("DEBUG_SYNC"):
            comm.Barrier()  # expect: collective-under-rank-local-gate
        if os.getenv("TRACE") == "1":
            comm.Barrier()  # expect: collective-under-rank-local-gate

    def clocks(self, started):
        if time.perf_counter() - started > 5.0:
            comm.Barrier()  # expect: collective-under-rank-local-gate
        if datetime.now().second == 0:
            comm.Barrier()  # expect: collective-under-rank-local-gate

    def queues(self):
        if self.inbox.qsize() > 0:
            comm.Barrier()  # expect: collective-under-rank-local-gate
        if self.backlog:
            comm.Barrier()  # expect: collective-under-rank-local-gate

    def randomness(self):
        if random.random() < 0.5:
            comm.Barrier()  # expect: collective-under-rank-local-gate

    def caught(self):
        error = None
        try:
            self.inbox.get_nowait()
        except queue.Empty as exc:
            error = exc
        if error is not None:
            comm.Barrier()  # expect: collective-under-rank-local-gate
