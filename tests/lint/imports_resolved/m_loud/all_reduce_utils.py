import torch.distributed as dist


def publish(t):
    dist.all_reduce(t)
