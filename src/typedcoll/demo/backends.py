"""The executor model's distributed layer, one class per mode.

The model (``model``) calls the same methods in all three modes; only what they move differs:
  RawBackend        mpi4py's pickle collectives (``comm.allgather(obj)``) matched by position,
                    decoded the way the engine did (``RankState(*fields)``, flattening gathers).
  TypedBackend      the same collectives over TypedComm: every call checked, schemas typed.
  SymmetricBackend  TypedComm for the unconditional collectives; the conditional messages (and the
                    router's rank states) are posted to a SymmetricFlush, drained once per batch.

This module is registered as typedcoll-internal, so a DesyncError names the *model's* line that
called into it, not a line here.
"""

from __future__ import annotations

import threading
import time
import zlib
from typing import Any, Dict, List, Optional, Tuple

import msgspec

from .._comm import TypedComm
from ..core.plumbing import register_internal
from ..executor import SymmetricFlush
from ..executor import messages as m
from ..executor.messages import IterStats, KvStatus, TimeoutFlag

Assignment = List[Tuple[int, int, int]]  # (rank, request id, tokens to generate)


class RankState:
    """The engine's rank state: a plain class, decoded positionally (``RankState(*fields)``).

    Its positional signature is what turns a misdelivered 26-key dict into "RankState.__init__()
    takes from 2 to 4 positional arguments but 27 were given".
    """

    def __init__(self, rank: int, num_active_requests: int = 0,
                 num_active_tokens: int = 0) -> None:
        self.rank = rank
        self.num_active_requests = num_active_requests
        self.num_active_tokens = num_active_tokens


def engine_dict(message: msgspec.Struct) -> Dict[str, Any]:
    """``message`` as the engine's dict (its keys, nested records as dicts): what it pickled."""
    out = {}
    for field in msgspec.structs.fields(message):
        value = getattr(message, field.name)
        out[field.encode_name] = (engine_dict(value) if isinstance(value, msgspec.Struct)
                                  else value)
    return out


def _no_note(key: str, value: Any) -> None:
    """mpi4py's collectives keep no record of a rank's decisions."""


class RawBackend:
    """mpi4py pickle collectives, matched purely by position (the engine before the fix).

    ``current`` names the collective this rank is blocked in (label, iteration, start time), so a
    watchdog thread can report a rank whose peers left instead of letting it hang silently.
    """

    mode = "raw"
    note = staticmethod(_no_note)

    def __init__(self, tp: Any, world: Any) -> None:
        self.tp = tp
        self.world = world
        self.current: Optional[Tuple[str, int, float]] = None
        self.last: Tuple[str, int] = ("start", -1)
        self.stored: Dict[str, Any] = {}

    def _allgather(self, label: str, it: int, obj: Any) -> List[Any]:
        self.last = (label, it)
        self.current = (label, it, time.monotonic())
        out: List[Any] = self.tp.allgather(obj)
        self.current = None
        return out

    def vote(self, status: KvStatus, it: int) -> bool:
        mine: Dict[str, Any] = {"num_blocked": status.num_blocked}
        if status.error is not None:
            mine["error"] = status.error
        statuses = self._allgather("error/blocked-request vote", it, mine)
        return any("error" in s for s in statuses)

    def router(self, state: m.RankState, it: int) -> List[Any]:
        fields = self._allgather("router gather of rank states", it,
                                 [state.rank, state.num_active_requests, state.num_active_tokens])
        return [RankState(*f) for f in fields]

    def bcast_assignment(self, assignment: Optional[Assignment], it: int) -> Assignment:
        self.last = ("world broadcast of new requests", it)
        self.current = (self.last[0], it, time.monotonic())
        out: Assignment = self.world.bcast(assignment, root=0)
        self.current = None
        return out

    def sizes(self, batch_size: int, it: int) -> List[int]:
        return self._allgather("gather of batch sizes", it, batch_size)

    def fwd_tokens(self, has_context: bool, num_tokens: int, it: int) -> None:
        self.stored["all_rank_num_tokens"] = self._allgather("forward gather of [bool, int]", it,
                                                             [has_context, num_tokens])

    def tp_cp_allgather(self, num_seqs: int, it: int) -> List[int]:
        gathered = self._allgather("forward tp_cp_allgather (flattening)", it, [num_seqs])
        return [n for part in gathered for n in part]

    def fwd_max_tokens(self, max_tokens: int, it: int) -> None:
        self.stored["all_rank_max_tokens"] = self._allgather("forward gather of an int", it,
                                                             max_tokens)

    def kv_responses(self, done: List[int], it: int) -> None:
        self.stored["kv_done"] = self._allgather("gather of KV-transfer responses", it, done)

    def responses(self, responses: List[Tuple[int, int]], it: int) -> int:
        return sum(len(r) for r in self._allgather("gather of responses", it, responses))

    def timeouts(self, flag: TimeoutFlag, it: int) -> None:
        flags = self._allgather("allgather of bool(timed_out_requests)", it,
                                bool(flag.request_ids))
        self.stored["any_timed_out"] = any(flags)

    def iter_stats(self, stats: IterStats, it: int) -> None:
        self.stored["iter_stats"] = self._allgather("allgather of the 26-key iter-stats dict", it,
                                                    engine_dict(stats))

    def start_iteration(self, it: int) -> None:
        pass

    def end_of_batch(self, state: m.RankState, it: int) -> None:
        pass

    def finish(self) -> Dict[str, Any]:
        return {}


class TypedBackend:
    """The same collectives over TypedComm: a desync raises DesyncError on every rank."""

    mode = "typed"

    def __init__(self, tp: TypedComm, world: TypedComm) -> None:
        self.tp = tp
        self.world = world
        self.note = tp.note

    def start_iteration(self, it: int) -> None:
        # The step clock: every collective of the iteration carries it, so a rank that skipped
        # a call of the loop disagrees in step even where op, schema and call site agree.
        self.tp.set_step(it)
        self.world.set_step(it)

    def vote(self, status: KvStatus, it: int) -> bool:
        return any(s.error is not None for s in self.tp.allgather(status))

    def router(self, state: m.RankState, it: int) -> List[m.RankState]:
        return self.tp.allgather(state)

    def bcast_assignment(self, assignment: Optional[Assignment], it: int) -> Assignment:
        return self.world.bcast(assignment, root=0, schema=Assignment)

    def sizes(self, batch_size: int, it: int) -> List[int]:
        return self.tp.allgather(batch_size, schema=int)

    def fwd_tokens(self, has_context: bool, num_tokens: int, it: int) -> None:
        self.tp.allgather((has_context, num_tokens), schema=Tuple[bool, int])

    def tp_cp_allgather(self, num_seqs: int, it: int) -> List[int]:
        gathered = self.tp.allgather([num_seqs], schema=List[int])
        return [n for part in gathered for n in part]

    def fwd_max_tokens(self, max_tokens: int, it: int) -> None:
        self.tp.allgather(max_tokens, schema=int)

    def kv_responses(self, done: List[int], it: int) -> None:
        self.tp.allgather(done, schema=List[int])

    def responses(self, responses: List[Tuple[int, int]], it: int) -> int:
        # One collective reached from two lines of the loop (with the previous batch's
        # responses, or with none): named, so that both lines are the same call.
        gathered = self.tp.allgather(responses, schema=List[Tuple[int, int]], name="responses")
        return sum(len(r) for r in gathered)

    def timeouts(self, flag: TimeoutFlag, it: int) -> None:
        self.tp.allgather(flag)

    def iter_stats(self, stats: IterStats, it: int) -> None:
        self.tp.allgather(stats)

    def end_of_batch(self, state: m.RankState, it: int) -> None:
        pass

    def finish(self) -> Dict[str, Any]:
        return {}


CHANNELS = {"rank_state": m.RankState, "timeouts": TimeoutFlag, "iter_stats": IterStats}


class ConservationError(Exception):
    """Raised at the end of a symmetric run when a posted message was lost, duplicated or altered.

    Every rank compares, for every source rank and channel, the count and an order-sensitive
    digest of what it received against what the source posted. It means a bug in the flush (or
    the transport under it), never in the model; rerunning the same plan reproduces it.
    """


class Ledger(msgspec.Struct, frozen=True, array_like=True):
    """One rank's account of a symmetric run, exchanged once at the end for the check."""

    flushes: int
    posted: Tuple[Tuple[int, int], ...]  # per channel: (count, crc32 chain)
    delivered: Tuple[Tuple[Tuple[int, int], ...], ...]  # per source rank, per channel


_ENC = msgspec.msgpack.Encoder()


class SymmetricBackend(TypedBackend):
    """Typed collectives, with the router states, timeouts and iteration stats flushed together.

    Keeps a ledger (count and a crc32 chain of the encoded messages, per channel and source) so
    :meth:`finish` can prove every posted message reached every rank exactly once, in order.
    """

    mode = "symmetric"

    def __init__(self, tp: TypedComm, world: TypedComm) -> None:
        super().__init__(tp, world)
        self.flush = SymmetricFlush(tp, CHANNELS)
        self.latest_states: List[Optional[m.RankState]] = [None] * tp.size
        n = len(CHANNELS)
        self._posted = [[0, 0] for _ in range(n)]
        self._delivered = [[[0, 0] for _ in range(n)] for _ in range(tp.size)]
        self._index = {ch: i for i, ch in enumerate(CHANNELS)}

    def _post(self, channel: str, message: Any) -> None:
        account = self._posted[self._index[channel]]
        account[0] += 1
        account[1] = zlib.crc32(_ENC.encode(message), account[1])
        self.flush.post(channel, message)

    def router(self, state: m.RankState, it: int) -> List[m.RankState]:
        # The states travelled in the previous batch's flush: no collective here.
        return [s if s is not None else m.RankState(r) for r, s in enumerate(self.latest_states)]

    def timeouts(self, flag: TimeoutFlag, it: int) -> None:
        self._post("timeouts", flag)

    def iter_stats(self, stats: IterStats, it: int) -> None:
        self._post("iter_stats", stats)

    def end_of_batch(self, state: m.RankState, it: int) -> None:
        self._post("rank_state", state)
        delivery = self.flush.flush(step=it)
        for ch, i in self._index.items():
            for source, posted in enumerate(delivery[ch]):
                account = self._delivered[source][i]
                for message in posted:
                    account[0] += 1
                    account[1] = zlib.crc32(_ENC.encode(message), account[1])
        self.latest_states = delivery.latest("rank_state")

    def finish(self) -> Dict[str, Any]:
        """Exchange ledgers and check conservation on every rank; raises ConservationError."""
        mine = Ledger(self.flush.flushes, tuple((a[0], a[1]) for a in self._posted),
                      tuple(tuple((a[0], a[1]) for a in per) for per in self._delivered))
        ledgers = self.tp.allgather(mine)
        me = self.tp.rank
        problems = []
        flushes = {lg.flushes for lg in ledgers}
        if len(flushes) > 1:
            problems.append(f"flush counts differ: {[lg.flushes for lg in ledgers]}")
        for dest, lg in enumerate(ledgers):
            for source, src in enumerate(ledgers):
                for ch, i in self._index.items():
                    if tuple(lg.delivered[source][i]) != tuple(src.posted[i]):
                        problems.append(f"rank {dest} received {lg.delivered[source][i][0]} "
                                        f"{ch} message(s) from rank {source}, which posted "
                                        f"{src.posted[i][0]} (or they differ in content)")
        if problems:
            raise ConservationError(f"rank {me}: messages not conserved after "
                                    f"{self.flush.flushes} flushes: " + "; ".join(problems[:5]))
        posted = sum(count for lg in ledgers for count, _ in lg.posted)
        return {"flushes": self.flush.flushes, "posted": posted,
                "deliveries": posted * self.tp.size,
                "posted_by_channel": {ch: sum(lg.posted[i][0] for lg in ledgers)
                                      for ch, i in self._index.items()}}


MODES = {"typed": TypedBackend, "symmetric": SymmetricBackend}


def typed_backend(mode: str, tp: TypedComm, world: TypedComm) -> TypedBackend:
    """The backend of a typed ``mode`` ("typed" or "symmetric") over two TypedComms."""
    return MODES[mode](tp, world)


class Watchdog:
    """Reports a raw-mode rank blocked in one collective for ``after`` seconds, once.

    mpi4py's blocking collectives cannot be interrupted, so a rank whose peers crashed waits
    forever; the watchdog thread records where it waits (``report(label, iteration, waited)``).
    """

    def __init__(self, backend: RawBackend, after: float, report: Any) -> None:
        self.backend = backend
        self.after = after
        self.report = report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="typedcoll-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            current = self.backend.current
            if current is not None and time.monotonic() - current[2] > self.after:
                label, it, start = current
                self.report(label, it, time.monotonic() - start)
                return


register_internal(__file__)
