"""Parameters of functions nobody here calls are rank-local, unless named as configuration."""

import torch
import torch.distributed as dist


def coordinate(num_tokens, parallel_config):
    if parallel_config.data_parallel_size == 1:
        return num_tokens
    counts = torch.tensor([num_tokens])
    dist.all_reduce(counts)
    return counts


class Runner:
    def __init__(self, parallel_config):
        self.parallel_config = parallel_config

    def execute(self, scheduler_output):
        num_tokens = scheduler_output.total_num_scheduled_tokens
        if not num_tokens:
            return None
        return coordinate(num_tokens, self.parallel_config)  # expect: collective-under-rank-local-gate
