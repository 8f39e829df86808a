"""The overlap loop after the fix: conditional payloads are buffered, then drained every iteration."""


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

    def _local_responses(self, batch):
        return [(len(batch), "done")]

    def _drain(self, responses, timed_out, stats):
        # every rank, every iteration: a rank with nothing pending contributes an empty payload
        self.dist.tp_gather(responses)
        any_timed_out = any(self.dist.tp_allgather(timed_out))
        if self.enable_iter_stats:
            self.dist.tp_allgather(stats)
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
            responses, timed_out, stats = [], None, None
            if previous_batch is not None and (can_queue or not can_queue_this_rank):
                responses = self._local_responses(previous_batch)
                timed_out = bool(self.timed_out)
                stats = {"batch": len(previous_batch)}
            if self._drain(responses, timed_out, stats):
                self.timed_out.clear()
            previous_batch = batch if can_queue_this_rank else None


class ResponseBuffer:
    """The drain's gate is rank-local only when the drain issues no collective anyway."""

    def __init__(self, dist, enable_attention_dp):
        self.dist = dist
        self.enable_attention_dp = enable_attention_dp
        self.pending = []

    def stage(self, response):
        self.pending.append(response)

    def _publish(self, responses):
        if self.enable_attention_dp and self.dist.world_size != 1:
            return self.dist.tp_gather(responses)
        return [responses]

    def flush(self):
        responses, self.pending = self.pending, []
        if responses or self.enable_attention_dp:
            self._publish(responses)
