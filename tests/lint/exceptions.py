"""A caught exception is rank-local: handlers, and code after a handler that exits, are gated."""

import torch.distributed as dist

SHARDS = ("a.bin", "b.bin")


def load(path):
    with open(path) as f:
        return f.read()


def report_failure(path):
    try:
        load(path)
    except OSError:
        dist.barrier()  # expect: collective-under-rank-local-gate


def skip_on_failure():
    for path in SHARDS:
        try:
            load(path)
        except OSError:
            continue
        dist.barrier()  # expect: collective-under-rank-local-gate


def always_synchronises(path):
    try:
        load(path)
    finally:
        dist.barrier()


def reraises(path):
    try:
        load(path)
    except OSError:
        raise
    dist.barrier()
