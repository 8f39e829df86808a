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


def spelled_out(x, is_first_pp_rank):
    # vllm's helpers spell the dimension out: a pipeline stage's branch around a
    # tensor-parallel gather is taken alike by every member of that group.
    from vllm.distributed import get_pipeline_model_parallel_rank, tensor_model_parallel_all_gather
    if is_first_pp_rank:
        x = tensor_model_parallel_all_gather(x)
    if get_pipeline_model_parallel_rank() == 0:
        x = tensor_model_parallel_all_gather(x)
    return x


def spelled_out_same_dimension(x):
    from vllm.distributed import get_tensor_model_parallel_rank, tensor_model_parallel_all_gather
    if get_tensor_model_parallel_rank() == 0:
        x = tensor_model_parallel_all_gather(x)  # expect: collective-under-unbalanced-rank-branch
    return x
