"""A faithful model of an attention-DP serving engine's executor loops.

N ranks each hold their own requests (attention data parallelism). Every iteration, on the
tensor-parallel communicator ``tp`` unless noted:
  1. (disaggregated serving) the error/blocked-request vote
  2. the router's gather of rank states; rank 0 assigns the new requests to the least loaded
  3. the world broadcast of the assignment (on ``world``)
  4. the gather of batch sizes: ``can_queue = 0 not in sizes``, ``can_queue_this_rank = bs > 0``
  5. if ``can_queue``: the forward pass's collectives ([bool, int]; a flattening
     ``tp_cp_allgather``; an int)
  6. always: the gather of finished KV transfers
  7. under ``previous_batch is not None and (can_queue or not can_queue_this_rank)``: the
     gather of responses, then inline the KV-transfer timeouts (disaggregated serving) and, with
     per-rank metrics on, the 26-key iteration stats; else a gather of ``[]``.
Step 7's two conditional messages are the bug: the gate is rank-local (one rank idles with a
previous batch in hand while its peers hold theirs), so some ranks issue one or two collectives
more than others, and every later collective pairs the wrong calls.

The loops differ where the gated messages sit:
  overlap      step 7 after the forward pass, for the previous iteration's batch. Raw failures:
               the vote receiving a peer's bool ("argument of type 'bool' is not iterable")
               with disaggregated serving; the router receiving a peer's 26-key dict
               ("RankState.__init__() takes from 2 to 4 positional arguments but 27 were
               given") without it.
  non_overlap  the previous iteration's timeouts and stats are reported right after step 4,
               before the forward pass; responses are gathered unconditionally at the end. Raw
               failure: the flattening gather receiving a peer's bare int ("'int' object is not
               iterable").
  pipeline     ``MICRO_BATCHES`` micro-batch slots per iteration, steps 4-7 per slot, each slot
               with its own previous batch; the symmetric mode flushes at the bottom of every
               handled micro-batch, the same number of times on every rank.
Every collective is issued from a line of this module (the backends are registered internal), so
a DesyncError in the typed mode names the two lines here that diverged; the rank-local decisions
(``can_queue``, ``can_queue_this_rank``, ``has_previous_batch``, ``timed_out``) are recorded with
``comm.note``, so it also says which ranks decided what.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..executor import messages as m
from .plan import FaultPlan

MAX_BATCH = 8
MICRO_BATCHES = 2


class Batch:
    """A scheduled batch: its iteration, request ids, and the requests it finished."""

    __slots__ = ("iteration", "rids", "finished")

    def __init__(self, iteration: int, rids: List[int]) -> None:
        self.iteration = iteration
        self.rids = rids
        self.finished: List[Tuple[int, int]] = []


def request_tokens(rid: int) -> int:
    """Tokens a request generates: 3-9, a fixed function of its id so every rank agrees."""
    return 3 + (rid * 2654435761) % 7


class ExecutorModel:
    """One rank of the engine: its requests, its previous batch, and the loop of ``plan.loop``.

    ``backend`` provides the collectives (raw, typed or symmetric) and ``note(key, value)``,
    which records a rank-local decision where the backend can (``TypedComm.note``); ``run``
    returns a summary dict. ``iteration`` is the iteration in progress (for error reports).
    """

    def __init__(self, backend: Any, plan: FaultPlan, rank: int, size: int) -> None:
        self.c = backend
        self.note = backend.note
        self.plan = plan
        self.rank = rank
        self.size = size
        self.active: Dict[int, int] = {}
        self.timed_out: List[int] = []
        self.kv_done: List[int] = []
        self.completed = 0
        self.responses_seen = 0
        self.iteration = -1
        self.prev: List[Optional[Batch]] = [None] * MICRO_BATCHES

    # --- local bookkeeping (no collectives) ------------------------------------------------
    def _state(self) -> m.RankState:
        return m.RankState(self.rank, len(self.active), sum(self.active.values()))

    def _kv_status(self) -> m.KvStatus:
        return m.KvStatus(num_blocked=len(self.timed_out))

    def _assign(self, states: List[Any], it: int) -> List[Tuple[int, int, int]]:
        load = {s.rank: s.num_active_tokens for s in states}
        out = []
        for k in range(int(self.plan.arrivals[it])):
            rid = it * 1000 + k
            target = min(load, key=lambda r: (load[r], r))
            tokens = request_tokens(rid)
            load[target] += tokens
            out.append((target, rid, tokens))
        return out

    def _admit(self, assignment: List[Tuple[int, int, int]], it: int) -> None:
        for target, rid, tokens in assignment:
            if target == self.rank:
                self.active[rid] = tokens
                if self.plan.disaggregated:
                    self.kv_done.append(rid)
        if self.plan.disaggregated and self.plan.timeouts[self.rank, it]:
            self.timed_out.extend(it * 1000 + 900 + self.rank * 10 + k
                                  for k in range(int(self.plan.timeouts[self.rank, it])))

    def _schedule(self, it: int, slot: Optional[int] = None) -> Batch:
        if self.plan.empty[self.rank, it]:
            return Batch(it, [])
        rids = sorted(self.active)
        if slot is not None:
            rids = [r for r in rids if r % MICRO_BATCHES == slot]
        return Batch(it, rids[:MAX_BATCH])

    def _stats(self, it: int) -> m.IterStats:
        ntok = sum(self.active.values())
        used = (ntok + 31) // 32
        scheduled = min(len(self.active), MAX_BATCH)
        return m.IterStats(
            timestamp=f"iteration {it}", iteration=it,
            iter_latency_ms=12.5 + 0.25 * len(self.active),
            num_active_requests=len(self.active), num_completed_requests=self.completed,
            max_num_active_requests=MAX_BATCH, max_batch_size_static=MAX_BATCH,
            max_batch_size_runtime=MAX_BATCH, max_num_tokens_static=8192,
            max_num_tokens_runtime=8192, gpu_mem_usage=(40 << 30) + used * (2 << 20),
            cpu_mem_usage=6 << 30, pinned_mem_usage=1 << 30,
            kv_cache_stats=m.KvCacheStats(
                max_num_blocks=4096, free_num_blocks=4096 - used, used_num_blocks=used,
                tokens_per_block=32, alloc_total_blocks=used,
                alloc_new_blocks=len(self.kv_done)),
            inflight_batching_stats=m.InflightBatchingStats(
                num_scheduled_requests=scheduled, num_gen_requests=scheduled,
                avg_num_decoded_tokens_per_iter=1.0),
            host_step_time_ms=11.0, prev_device_step_time_ms=9.5,
            scheduler_mode="non_overlap" if self.plan.loop == "non_overlap" else "overlap",
            rank=self.rank)

    def _timeout_flag(self, it: int) -> m.TimeoutFlag:
        flag = m.TimeoutFlag(rank=self.rank, iteration=it, request_ids=tuple(self.timed_out))
        self.timed_out.clear()
        return flag

    # --- collectives, issued from this module's lines ----------------------------------------
    def _top(self, it: int) -> None:
        """Steps 1-3: vote, router, assignment broadcast."""
        if self.plan.disaggregated:
            self.c.vote(self._kv_status(), it)
        states = self.c.router(self._state(), it)
        assignment = self.c.bcast_assignment(self._assign(states, it) if self.rank == 0
                                             else None, it)
        self._admit(assignment, it)

    def _forward(self, batch: Batch, it: int) -> None:
        """Step 5: the forward pass's collectives, then one token per scheduled request."""
        self.c.fwd_tokens(False, len(batch.rids), it)
        self.c.tp_cp_allgather(len(batch.rids), it)
        self.c.fwd_max_tokens(max((self.active[r] for r in batch.rids), default=0), it)
        for rid in batch.rids:
            self.active[rid] -= 1
            if self.active[rid] == 0:
                del self.active[rid]
                batch.finished.append((rid, request_tokens(rid)))
                self.completed += 1

    def _report(self, it: int) -> None:
        """The two conditional messages of step 7."""
        if self.plan.disaggregated:
            self.c.timeouts(self._timeout_flag(it), it)
        if self.plan.metrics[self.rank, it]:
            self.c.iter_stats(self._stats(it), it)

    def _kv_responses(self, it: int) -> None:
        self.c.kv_responses(self.kv_done, it)
        self.kv_done = []

    def _gate(self, batch: Batch, prev: Optional[Batch], it: int) -> Tuple[bool, bool]:
        """Step 4, then step 7's rank-local gate: (can_queue, report the previous batch).

        Each decision is noted (``comm.note``), so a DesyncError says which ranks decided what.
        """
        sizes = self.c.sizes(len(batch.rids), it)
        can_queue = 0 not in sizes
        can_queue_this_rank = len(batch.rids) > 0
        report = prev is not None and (can_queue or not can_queue_this_rank)
        note = self.note
        note("can_queue", can_queue)
        note("can_queue_this_rank", can_queue_this_rank)
        note("has_previous_batch", prev is not None)
        if self.plan.disaggregated:
            note("timed_out", bool(self.timed_out))
        return can_queue, report

    def run(self) -> Dict[str, Any]:
        loop = {"overlap": self._overlap, "non_overlap": self._non_overlap,
                "pipeline": self._pipeline}[self.plan.loop]
        # The symmetric mode's first router needs states: one flush before the loop.
        self.c.end_of_batch(self._state(), -1)
        for it in range(self.plan.iterations):
            self.iteration = it
            self.c.start_iteration(it)
            loop(it)
        summary = {"iterations": self.plan.iterations, "completed_requests": self.completed}
        summary.update(self.c.finish())
        return summary

    def _overlap(self, it: int) -> None:
        self._top(it)
        batch = self._schedule(it)
        prev = self.prev[0]
        can_queue, report = self._gate(batch, prev, it)
        if can_queue:
            self._forward(batch, it)
        self._kv_responses(it)
        if report:
            assert prev is not None
            self.responses_seen += self.c.responses(prev.finished, it)
            self._report(it)
            self.prev[0] = None
        else:
            self.responses_seen += self.c.responses([], it)
        if can_queue:
            self.prev[0] = batch
        self.c.end_of_batch(self._state(), it)

    def _non_overlap(self, it: int) -> None:
        self._top(it)
        batch = self._schedule(it)
        can_queue, report = self._gate(batch, self.prev[0], it)
        if report:
            self._report(it)
            self.prev[0] = None
        if can_queue:
            self._forward(batch, it)
            self.prev[0] = batch
        self._kv_responses(it)
        self.responses_seen += self.c.responses(batch.finished, it)
        self.c.end_of_batch(self._state(), it)

    def _pipeline(self, it: int) -> None:
        self._top(it)
        for slot in range(MICRO_BATCHES):
            batch = self._schedule(it, slot)
            prev = self.prev[slot]
            can_queue, report = self._gate(batch, prev, it)
            if can_queue:
                self._forward(batch, it)
            self._kv_responses(it)
            if report:
                assert prev is not None
                self.responses_seen += self.c.responses(prev.finished, it)
                self._report(it)
                self.prev[slot] = None
            else:
                self.responses_seen += self.c.responses([], it)
            if can_queue:
                self.prev[slot] = batch
            # The drain at the bottom of every handled micro-batch: MICRO_BATCHES per iteration
            # on every rank, whatever each rank's gate said.
            self.c.end_of_batch(self._state(), it)
