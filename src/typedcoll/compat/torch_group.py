"""The torch drop-in's binding to one group: torch's rank rules and the group check.

:class:`GroupBinding` is the base of the drop-in's calls (``compat.torch``): torch names peers
and roots by global rank (``src``, ``dst``) or by rank in the group (``group_src``,
``group_dst``), and takes ``group=`` on every call, which must be the drop-in's own.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from .._comm import TypedComm
from ..core.plumbing import register_internal
from ..core.protocol import Protocol


class GroupBinding:
    """What a drop-in is bound to, and how torch's rank arguments map onto it."""

    typed: TypedComm
    group: Any
    _torch_group: bool
    _p: Protocol
    _world: Optional[List[int]]  # the comm's ranks as torch's global ranks (None: its own)

    def _group_rank(self, op: str, global_rank: Optional[int], group_rank: Optional[int],
                    default: Optional[int]) -> Tuple[Optional[int], Optional[str]]:
        """torch's rule: a global rank or a group rank (not both); (rank in group, error)."""
        if global_rank is not None and group_rank is not None:
            return None, f"ValueError: {op}: expected a global rank or a group rank, got both"
        if group_rank is not None:
            return group_rank, None
        if global_rank is None:
            return default, None
        if self._world is None:
            return global_rank, None
        # Any value a rank passes must come back as a flagged error, never raise here: its
        # peers would wait in the call for it.
        try:
            return self._world.index(global_rank), None
        except Exception:
            return None, (f"ValueError: {op}: expected a global rank of the group "
                          f"{self._world}, got {global_rank!r}"[:300])

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self._world is None else self._world[group_rank]

    def _check_group(self, op: str, group: Any) -> Optional[str]:
        if group is None or group is self.group or group is self.typed:
            return None
        if self._torch_group and default_group(group) is default_group(self.group):
            return None  # dist.group.WORLD and the default group are one group
        return (f"ValueError: {op}: expected group=None or the group this object was made "
                f"for, got {group!r}"[:300])

    def _peer(self, op: str, global_rank: Optional[int], group_rank: Optional[int],
              group: Any, receiving: bool) -> Optional[int]:
        """The group rank of a point-to-point call's peer (a receive may name none: any rank);
        an argument error raises ValueError here, as no peer waits in a collective for it."""
        peer, error = self._group_rank(op, global_rank, group_rank, None)
        error = self._check_group(op, group) or error
        role = "source" if receiving else "destination"
        if error is None and peer is None and not receiving:
            error = f"ValueError: {op}: expected dst or group_dst, got neither"
        if error is None and peer == self._p.rank:
            error = f"ValueError: {op}: expected a {role} other than this rank ({self._p.rank})"
        raise_if(error)
        return peer

    def get_rank(self, group: Any = None) -> int:
        """This rank's rank in the group."""
        raise_if(self._check_group("get_rank", group))
        return self._p.rank

    def get_world_size(self, group: Any = None) -> int:
        """The group's size."""
        raise_if(self._check_group("get_world_size", group))
        return self._p.size


def default_group(group: Any) -> Any:
    """torch's rule: None and ``dist.group.WORLD`` name the default group."""
    import torch.distributed as dist
    if group is None or group is dist.group.WORLD:
        return dist.distributed_c10d._get_default_group()
    return group


def raise_if(error: Optional[str]) -> None:
    """A local argument error of a call that exchanges nothing (no peer waits for it)."""
    if error is not None:
        kind, _, text = error.partition(": ")
        raise (TypeError if kind == "TypeError" else ValueError)(text)


register_internal(__file__)
