"""A gate on one dimension's rank around a collective on another dimension's group, the group
named along a chain (cp_group.cpu_group), by the wrapper's keyword, or by position."""

import torch.distributed as dist

from engine_utils import broadcast_pyobj


def nested_group(tensor, tp_group, cp_group):
    if tp_group.rank_in_group == 0:
        dist.broadcast(tensor, src=0, group=cp_group.cpu_group)
    return tensor


def positional_group(data, tp_group, cp_group):
    if cp_group.world_size > 1 and tp_group.rank_in_group == 0:
        data = broadcast_pyobj(data, cp_group.rank, cp_group.cpu_group, src=cp_group.ranks[0])
    return data


def keyword_group(data, tp_group, cp_group):
    if tp_group.rank_in_group == 0:
        data = broadcast_pyobj(data, cp_group.rank, dist_group=cp_group.cpu_group, src=0)
    return data


def same_dimension(data, tp_group):
    if tp_group.rank_in_group == 0:
        data = broadcast_pyobj(data, tp_group.rank, tp_group.cpu_group, src=0)  # expect: collective-under-unbalanced-rank-branch
    return data
