"""A scheduler admitting requests from its own waiting queue, with rank-local breaks."""

from crossfile.cache import PrefetchCache


class Scheduler:
    def __init__(self, group):
        self.cache = PrefetchCache(group)
        self.waiting = []
        self.budget = 4

    def add(self, request):
        self.waiting.append(request)

    def admit(self):
        admitted = []
        for request in self.waiting:
            if len(admitted) >= self.budget:
                break
            if not self.cache.check_progress(request):  # expect: collective-under-rank-local-gate
                continue
            admitted.append(request)
        return admitted
