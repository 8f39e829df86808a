"""Run the executor model in one mode on this rank and record what this rank observed.

Each rank appends JSON lines (one per mode, plus a watchdog's "hung" line) to
``<results>/rank<R>.jsonl``; the launching process reads them back. Files rather than stdout so
that MPI's own messages on abort cannot interleave with them.

Ending without hanging. Typed and symmetric runs end symmetrically (a DesyncError is raised on
every rank in the same call). A raw run does not: ranks that crash stop issuing collectives and
their peers block forever in mpi4py's uninterruptible ``allgather``. So a raw run ends with a
time-bounded ``Ibarrier``: ranks that finished (crashed or not) wait ``hang_after + grace``
seconds; meanwhile the watchdog of each blocked rank has recorded where it waits; then a finished
rank calls ``Abort``, ending the job. Raw therefore runs last.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Dict, List, Tuple

from mpi4py import MPI

from .._comm import TypedComm
from ..core.errors import DesyncError
from ..core.transport import TransportTimeout
from ..transports.mpi_waits import wait_all
from .backends import ConservationError, RawBackend, Watchdog, typed_backend
from .model import ExecutorModel
from .plan import FaultPlan

ABORT_CODE = 17  # the raw run ended by abort: some rank was left blocked by its crashed peers


class RecordWriter:
    """Appends this rank's JSON records to ``<directory>/rank<R>.jsonl`` (thread-safe)."""

    def __init__(self, directory: str, rank: int) -> None:
        self.path = os.path.join(directory, f"rank{rank}.jsonl")
        self.rank = rank
        self._lock = threading.Lock()

    def write(self, record: Dict[str, Any]) -> None:
        record = dict(record, rank=self.rank)
        with self._lock, open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def run_mode(mode: str, plan: FaultPlan, world: Any, tp_parent: Any, writer: RecordWriter, *,
             timeout: float = 30.0, hang_after: float = 1.5) -> Dict[str, Any]:
    """Run ``plan`` in ``mode`` ("raw", "typed", "symmetric"); write and return this rank's
    record. ``tp_parent`` is the tensor-parallel communicator (a duplicate of ``world``)."""
    rank = world.Get_rank()
    record: Dict[str, Any] = {"mode": mode}
    t0 = time.perf_counter()
    typed: List[TypedComm] = []
    if mode == "raw":
        backend: Any = RawBackend(world.Dup(), world.Dup())
    else:
        typed = [TypedComm(tp_parent, timeout=timeout, name="tp"),
                 TypedComm(world, timeout=timeout, name="world")]
        backend = typed_backend(mode, *typed)
    model = ExecutorModel(backend, plan, rank, world.Get_size())

    def hung(label: str, it: int, waited: float) -> None:
        writer.write({"mode": mode, "status": "hung", "where": label, "iteration": it,
                      "waited_s": round(waited, 2)})

    try:
        if mode == "raw":
            with Watchdog(backend, hang_after, hung):
                summary = model.run()
        else:
            summary = model.run()
        record.update(status="completed", **summary)
    except DesyncError as exc:
        record.update(status="desync", error=f"typedcoll.DesyncError: {exc}", seq=exc.seq,
                      kinds=[k.value for k in exc.kinds], iteration=model.iteration,
                      decisions=[key for key, _, _ in exc.decisions])
    except ConservationError as exc:
        record.update(status="lost", error=f"ConservationError: {exc}")
    except Exception as exc:  # the raw run's failures are the point: record, never re-raise
        record.update(status="crashed", error=f"{type(exc).__name__}: {exc}",
                      iteration=model.iteration)
        if isinstance(backend, RawBackend):
            record["where"] = backend.last[0]
    if record["status"] in ("completed", "desync"):
        # Every rank ended in the same call (a DesyncError is raised on all of them), so every
        # rank reaches these frees; after a desync the ranks' step clocks may differ, and the
        # teardown is no iteration's.
        for comm in typed:
            comm.set_step(None)
            comm.free()
    record["seconds"] = round(time.perf_counter() - t0, 3)
    writer.write(record)
    return record


def settle(comm: Any, deadline_s: float) -> bool:
    """True when every rank arrives within ``deadline_s`` (a nonblocking barrier on ``comm``).

    ``comm`` must be duplicated *before* the run it settles: ``Dup`` is itself a blocking
    collective, which ranks left blocked in a raw collective would never join.
    """
    try:
        wait_all([comm.Ibarrier()], time.monotonic() + deadline_s)
    except TransportTimeout:
        return False
    return True


def worker(results: str, plan: FaultPlan, *,
           modes: Tuple[str, ...] = ("typed", "symmetric", "raw"), cost_rounds: int = 3,
           cost_iters: int = 60, timeout: float = 30.0, hang_after: float = 1.5,
           grace: float = 2.0) -> int:
    """One rank of the demo job: every mode on ``plan``, the cost measurement, raw last."""
    world = MPI.COMM_WORLD
    writer = RecordWriter(results, world.Get_rank())
    tp_parent = world.Dup()  # the engine's tensor-parallel communicator, apart from the world's
    for mode in modes:
        if mode == "raw":
            continue
        sync = world.Dup()
        run_mode(mode, plan, world, tp_parent, writer, timeout=timeout)
        if mode == "symmetric" and cost_rounds:
            from .cost import measure
            with TypedComm(world, name="cost") as comm:
                cost = measure(comm, rounds=cost_rounds, iters=cost_iters, warmup=10,
                               pickle_comm=world.Dup())
            writer.write({"mode": "cost", **cost})
        if not settle(sync, timeout):
            writer.write({"mode": mode, "status": "hung", "where": "end of mode"})
            world.Abort(ABORT_CODE)
    if "raw" in modes:
        sync = world.Dup()
        run_mode("raw", plan, world, tp_parent, writer, hang_after=hang_after)
        if not settle(sync, hang_after + grace):
            world.Abort(ABORT_CODE)
    return 0
