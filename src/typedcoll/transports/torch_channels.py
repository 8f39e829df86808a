"""Channels of the torch transport: one private channel per torch.distributed group.

``channel_for_group(group)`` returns the group's private channel, made once per group and shared by
every TypedComm built over it (constructing thousands costs one gloo group), and freed with the last
TypedComm that frees it. The private group is a gloo backend that this package constructs itself
over a store prefix of its own, not a ``dist.new_group``: that one would name its store keys after
how many groups the process already holds (which differs between ranks once a split left some of
them out, and repeats after a group is destroyed), and would join torch's registry of groups, which
the caller's own later ``new_group`` calls depend on. The prefix is ``typedcoll/<group name>/<n>``,
``n`` counted in the store itself: every member adds 1 before it connects, and no member connects
the next group before every member has added for this one, so all read the same ``n``.
``TorchTransport.split`` and ``dup`` derive their prefixes from their parent's (the derived groups
are made in the same order on every rank).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from ..core.channel import Channel
from ..core.plumbing import register_internal
from .gloo import connect_bound, group_name, make_gloo
from .torch import TorchTransport

_CHANNELS: Dict[int, Tuple[Any, Channel]] = {}


def channel_for_group(group: Any = None, timeout: Optional[float] = None) -> Channel:
    """The private channel of ``group`` (None: the world): made by the first TypedComm over
    it (connecting within ``connect_bound(timeout, group)``), then shared until its last user
    frees."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expected an initialised torch.distributed process group "
                           "(call torch.distributed.init_process_group first)")
    pg = dist.group.WORLD if group is None else group
    try:
        member = pg is not None and pg is not dist.GroupMember.NON_GROUP_MEMBER \
            and dist.get_rank(pg) >= 0
    except ValueError as exc:  # "Group ... is not registered"
        # A ProcessGroup built by hand on a store of its own (vllm's stateless data-parallel
        # group): its ranks and store are not torch.distributed's to tell.
        raise ValueError(
            f"expected a group torch.distributed knows (the default group, or one from "
            f"dist.new_group), got one it does not ({exc}); a group built by hand on its own "
            f"store, as vllm's stateless data-parallel group is, cannot be wrapped: create a "
            f"dist.new_group over the same ranks for typedcoll, or use typedcoll over "
            f"MPI") from None
    if pg is None or not member:
        raise ValueError(f"expected a group this process (global rank {dist.get_rank()}) is a "
                         f"member of, got {group!r}")
    cached = _CHANNELS.get(id(pg))
    if cached is not None and cached[0] is pg and cached[1].users > 0:
        return cached[1]
    store = c10d._get_default_store()
    size = dist.get_world_size(pg)
    count = store.add(f"typedcoll/{pg.group_name}/channels", 1)
    prefix = f"typedcoll/{pg.group_name}/{(count - 1) // size}"
    has_cuda = "nccl" in str(dist.get_backend(pg))
    connect_s = connect_bound(timeout, group)
    ranks = dist.get_process_group_ranks(pg)
    transport = TorchTransport(make_gloo(store, prefix, dist.get_rank(pg), size, connect_s,
                                         group_name(pg), ranks),
                               ranks, store, prefix,
                               pg if has_cuda else None, owns_device_group=False,
                               connect_s=connect_s)
    channel = Channel(transport, group_name(pg))
    _CHANNELS[id(pg)] = (pg, channel)
    return channel


register_internal(__file__)
