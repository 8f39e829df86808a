"""Torch custom ops registered in the analysed files: ``torch.ops.<ns>.<name>(...)`` runs the
registered function, which decides what the call issues and returns (vLLM's
``all_reduce_symmetric_with_copy``, whose result the caller tests against None)."""

import torch
import torch.distributed as dist
from torch.library import custom_op
from vllm.utils.torch_utils import direct_register_custom_op


def register_symmetric_ops(comm):
    def reduce_copy_impl(tensor):
        out = torch.empty_like(tensor)
        return comm.all_reduce(tensor, out)

    def reduce_copy_fake(tensor):
        return torch.empty_like(tensor)

    direct_register_custom_op(op_name="reduce_copy", op_func=reduce_copy_impl,
                              fake_impl=reduce_copy_fake)


@custom_op("engine::sync_all", mutates_args=())
def sync_all(tensor: torch.Tensor) -> None:
    dist.barrier()


class Communicator:
    def __init__(self, comm, use_symmetric):
        self.comm = comm
        self.use_symmetric = use_symmetric

    def all_reduce(self, tensor):
        if self.use_symmetric:
            out = torch.ops.engine.reduce_copy(tensor)
            if out is not None:
                return out
        return self.comm.all_reduce(tensor)

    def drain(self, tensor, pending):
        if pending.qsize():
            torch.ops.engine.reduce_copy(tensor)  # expect: collective-under-rank-local-gate

    def settle(self, tensor, pending):
        while not pending.empty():
            torch.ops.engine.sync_all(tensor)  # expect: collective-under-rank-local-gate
        torch.ops.engine.not_registered_here(tensor)


@custom_op("other::barrier_all", mutates_args=())
def barrier_all(tensor: torch.Tensor) -> None:
    dist.barrier()


def overload(tensor, pending):
    if pending.qsize():
        torch.ops.engine.sync_all.default(tensor)  # expect: collective-under-rank-local-gate


def another_namespace(tensor, pending):
    if pending.qsize():
        torch.ops.engine.barrier_all(tensor)  # registered as other::barrier_all: not this op
