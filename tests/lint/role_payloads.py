"""A leader and its followers: the root picks among collective sequences, the other ranks take the
one it picked by what it sent them (a size, then the payload unless the size is 0)."""

import pickle

import torch
import torch.distributed as dist


def share_object(data, rank, group=None, src=0):
    # Each side may issue one broadcast or two; the receivers choose only on the size the root
    # broadcast, so they take the path the root took.
    if rank == src:
        if len(data) == 0:
            dist.broadcast(torch.tensor([0]), src=src, group=group)
        else:
            payload = pickle.dumps(data)
            dist.broadcast(torch.tensor([len(payload)]), src=src, group=group)
            dist.broadcast(torch.frombuffer(payload, dtype=torch.uint8), src=src, group=group)
        return data
    size = torch.tensor([0])
    dist.broadcast(size, src=src, group=group)
    if size.item() == 0:
        return []
    buffer = torch.empty(size.item(), dtype=torch.uint8)
    dist.broadcast(buffer, src=src, group=group)
    return pickle.loads(bytes(buffer))


def share_unless_configured(data, rank, config, group=None):
    # The same shapes, but the receivers choose on configuration, not on what the root sent:
    # with skip_payload set they leave the root's payload broadcast unmatched.
    if rank == 0:
        n = len(data)
        if n == 0:
            dist.broadcast(torch.tensor([0]), 0, group)  # expect: collective-under-rank-local-gate
        else:
            dist.broadcast(torch.tensor([n]), 0, group)  # expect: collective-under-rank-local-gate
            dist.broadcast(torch.tensor(data), 0, group)  # expect: collective-under-rank-local-gate
        return data
    size = torch.tensor([0])
    dist.broadcast(size, src=0, group=group)  # expect: collective-under-unbalanced-rank-branch
    if config.skip_payload:
        return []
    buffer = torch.empty(size.item())
    dist.broadcast(buffer, src=0, group=group)  # expect: collective-under-unbalanced-rank-branch
    return buffer


def many_leaders(data, rank, group=None):
    # More than one rank takes the first side (rank < 2): two of them may pick different paths.
    if rank < 2:
        if len(data) == 0:
            dist.broadcast(torch.tensor([0]), 0, group)  # expect: collective-under-rank-local-gate
        else:
            dist.broadcast(torch.tensor([1]), 0, group)  # expect: collective-under-rank-local-gate
            dist.broadcast(torch.tensor(data), 0, group)  # expect: collective-under-rank-local-gate
        return data
    flag = torch.tensor([0])
    dist.broadcast(flag, 0, group)  # expect: collective-under-unbalanced-rank-branch
    if flag.item() == 0:
        return []
    buffer = torch.empty(4)
    dist.broadcast(buffer, 0, group)  # expect: collective-under-unbalanced-rank-branch
    return buffer


def follow_an_older_vote(data, rank, group=None):
    # The receivers choose on a collective's result, but one from before the branch: nothing
    # ties it to the root's choice on its own data.
    votes = torch.tensor([len(data)])
    dist.all_reduce(votes, group=group)
    if rank == 0:
        if len(data) == 0:
            dist.broadcast(torch.tensor([0]), 0, group)  # expect: collective-under-rank-local-gate
        else:
            dist.broadcast(torch.tensor([1]), 0, group)  # expect: collective-under-rank-local-gate
            dist.broadcast(torch.tensor(data), 0, group)  # expect: collective-under-rank-local-gate
        return data
    dist.broadcast(torch.tensor([0]), 0, group)  # expect: collective-under-unbalanced-rank-branch
    if votes.item() == 0:
        return []
    buffer = torch.empty(4)
    dist.broadcast(buffer, 0, group)  # expect: collective-under-unbalanced-rank-branch
    return buffer


class Coordinator:
    def __init__(self, ranks, rank_in_group, group):
        self.ranks = ranks
        self.rank_in_group = rank_in_group
        self.group = group

    def share_rows(self, rows, src=0):
        # The root is named through the group's rank list, so src is the same on every member:
        # rank_in_group == src is a role, and a send paired with a receive by role is the norm.
        dist.broadcast(rows[0], src=self.ranks[src], group=self.group)
        if self.rank_in_group == src:
            dist.send(rows[1], dst=self.ranks[1])
        elif self.rank_in_group == 1:
            dist.recv(rows[1], src=self.ranks[src])
