"""An overlap loop whose extra votes run only on ranks that still hold a batch.

With attention DP each rank keeps the requests assigned to it. Both sides of the gate are
reported: the ranks that skip the previous batch issue one collective where the others issue three
or four."""


class OverlapExecutor:
    def __init__(self, dist, enable_iter_stats):
        self.dist = dist
        self.enable_iter_stats = enable_iter_stats
        self.active_requests = []
        self.timed_out = []

    def _fetch_new_requests(self):
        new = self.dist.broadcast(self._pending_from_frontend(), root=0)
        self.active_requests.extend(r for r in new if r["rank"] == self.dist.tp_rank)

    def _pending_from_frontend(self):
        return []

    def _schedule(self):
        return list(self.active_requests)

    def _forward(self, batch):
        self.dist.tp_allgather([bool(batch), len(batch)])
        return batch

    def _gather_kv_responses(self):
        return self.dist.tp_gather([])

    def _process_previous_batch(self, batch):
        self.dist.tp_gather(batch)
        any_timed_out = self.dist.tp_allgather(bool(self.timed_out))
        if self.enable_iter_stats:
            self.dist.tp_allgather({"batch": len(batch)})
        return any_timed_out

    def loop(self):
        previous_batch = None
        while True:
            self._fetch_new_requests()
            batch = self._schedule()
            sizes = self.dist.tp_allgather(len(batch))
            can_queue = 0 not in sizes
            can_queue_this_rank = len(batch) > 0
            if can_queue:
                self._forward(batch)
            self._gather_kv_responses()
            if previous_batch is not None and (can_queue or not can_queue_this_rank):
                self._process_previous_batch(previous_batch)  # expect: collective-under-rank-local-gate
            else:
                self.dist.tp_gather([])  # expect: collective-under-rank-local-gate
            previous_batch = batch if can_queue_this_rank else None
