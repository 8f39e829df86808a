"""The torch drop-in: torch.distributed's collectives over typed collectives, no pickle.

``typedcoll.compat.torch(group=None)`` returns a :class:`TorchDistributed` whose methods have
the names and signatures of ``torch.distributed``'s object collectives (``all_gather_object``,
``broadcast_object_list``, ``gather_object``, ``scatter_object_list``, ``send_object_list``,
``recv_object_list``, ``barrier``, ``monitored_barrier``), of its tensor collectives
(``all_reduce``, ``reduce``, ``broadcast``, ``all_gather``, ``gather``, ``scatter``,
``all_gather_into_tensor``, ``reduce_scatter_tensor``, and their newer names
``all_gather_single`` and ``reduce_scatter_single``, ``reduce_scatter`` of a list,
``all_to_all_single`` and ``all_to_all``) and tensor point to point (``send``, ``recv``,
``isend``, ``irecv``, ``batch_isend_irecv``; ``compat.torch_p2p``), plus ``get_rank`` and
``get_world_size``, and fill their lists and tensors in place as those do. A name of
torch.distributed it lacks raises AttributeError saying so and what it has.
Object traffic runs on the group's private gloo side (``TypedComm.from_torch``); values are
self-describing (``compat.values``), never pickled. Tensors take the checked tensor
collectives (``tensor.ops``): CPU tensors on the private gloo side, CUDA tensors on NCCL.

As in torch, ``src``/``dst`` are global ranks and ``group_src``/``group_dst`` ranks within the
group. A list whose length must match between ranks (``broadcast_object_list``,
``send_object_list``/``recv_object_list``) travels under the schema ``tuple[Any, ...]`` of its
length, so lengths that differ are a DesyncError naming both sides instead of a hang. Argument
errors (an output list of the wrong size, a missing input list on the source) are flagged in the
call: every rank raises in it.

torch is imported only by ``TypedComm.from_torch``; built over a TypedComm instead (any
transport, ``typedcoll.testing`` say), ranks are that communicator's.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Tuple

from .._comm import TypedComm
from ..core import p2p
from ..core.errors import DecodeError
from ..core.plumbing import register_internal
from . import objects
from . import values as tagged
from .torch_p2p import TensorPointToPoint
from .torch_tensor import TensorCalls, done
from .values import Refused, Unresolved

_TUPLES: Dict[int, Any] = {}


def _schema(n: int) -> Any:
    """``tuple[Any, ..., Any]`` of length ``n``: a list's length in its envelope."""
    schema = _TUPLES.get(n)
    if schema is None:
        schema = _TUPLES[n] = Tuple[(Any,) * n] if n else Tuple[()]
    return schema


def group_timeout(group: Any) -> Optional[float]:
    """The seconds after which torch fails a call of ``group`` (None: the default group); None
    where the group does not say (``transports.gloo.group_timeout``)."""
    from ..transports.gloo import group_timeout as of_group
    return of_group(group)


class TorchDistributed(TensorCalls, TensorPointToPoint):
    """torch.distributed's object and tensor collectives, bound to one group (or a
    TypedComm)."""

    def __init__(self, group: Any = None, timeout: Optional[float] = None, *,
                 tensor_check: Optional[str] = None) -> None:
        if isinstance(group, TypedComm):
            self.typed = group
            self.group = None
            self._torch_group = False
        else:
            if timeout is None:  # torch's own calls fail after the group's timeout: so do these
                timeout = group_timeout(group)
            self.typed = TypedComm.from_torch(group, timeout, tensor_check=tensor_check)
            self.group = group
            self._torch_group = True
        self._p = self.typed._p
        # The comm's ranks as torch's global ranks, where it runs over torch (src/dst are
        # global in torch's API); None: they are the comm's own.
        world = self._p.transport.world_ranks() if self._p.transport.kind == "torch" else None
        self._world: Optional[List[int]] = world

    def __repr__(self) -> str:
        return f"compat.torch({self.typed!r})"

    def set_step(self, step: Optional[int]) -> None:
        """The step clock of the TypedComm beneath (``TypedComm.set_step``): every later call
        carries ``step`` until it is set again, so a rank that skipped a call at one line (a
        per-step vote skipped on an idle step) raises there instead of pairing with the next
        step's call."""
        self.typed.set_step(step)

    def note(self, key: str, value: Any) -> None:
        """A rank-local decision (``can_queue``, a local timeout) for error reports, as
        ``TypedComm.note``: a DesyncError or a hang report lists the latest notes whose values
        differ between ranks, with the line that made each and its step; dumps hold them too.
        Local and cheap; ``value`` should be small and msgspec-encodable (``repr`` otherwise)."""
        self._p.note(key, value, sys._getframe(1))

    # --- collectives -------------------------------------------------------------------------
    # Every collective takes two keywords torch lacks: ``name=`` (the call's identity instead
    # of its line: the same name on every rank makes calls from different lines one call)
    # and ``step=`` (this call's step, instead of the clock's).
    def all_gather_object(self, object_list: List[Any], obj: Any, group: Any = None,
                          *, name: Optional[str] = None, step: Optional[int] = None) -> None:
        """``object_list[i]`` = rank i's ``obj`` (``object_list`` holds at least one slot per
        rank)."""
        p = self._p
        error = self._check_group("all_gather_object", group) or _output_list(
            "object_list", object_list, p.size)
        if error is not None:
            objects.refuse(p, "allgather", error, step, name)
        object_list[:p.size] = objects.allgather(p, obj, step, name)

    def broadcast_object_list(self, object_list: List[Any], src: Optional[int] = None,
                              group: Any = None, device: Any = None,
                              group_src: Optional[int] = None,
                              *, name: Optional[str] = None, step: Optional[int] = None) -> None:
        """Every rank's ``object_list`` items become ``src``'s (same length on every rank;
        ``src``'s own list is left as it is)."""
        p = self._p
        root, error = self._group_rank("broadcast_object_list", src, group_src, 0)
        error = self._check_group("broadcast_object_list", group) or error
        if error is None and not isinstance(object_list, list):
            error = (f"TypeError: broadcast_object_list: expected object_list to be a list, "
                     f"got {type(object_list).__name__}")
        if error is not None:
            objects.refuse(p, "bcast", error, step, name, root=root)
        got = objects.bcast(p, object_list, root, step, name, schema=_schema(len(object_list)))
        if p.rank != root:
            object_list[:] = got

    def gather_object(self, obj: Any, object_gather_list: Optional[List[Any]] = None,
                      dst: Optional[int] = None, group: Any = None,
                      group_dst: Optional[int] = None,
                      *, name: Optional[str] = None, step: Optional[int] = None) -> None:
        """On ``dst``, ``object_gather_list[i]`` = rank i's ``obj``."""
        p = self._p
        root, error = self._group_rank("gather_object", dst, group_dst, 0)
        error = self._check_group("gather_object", group) or error
        if error is None and p.rank == root:
            error = _output_list("object_gather_list", object_gather_list, p.size)
        if error is not None:
            objects.refuse(p, "gather", error, step, name, root=root)
        got = objects.gather(p, obj, root, step, name)
        if got is not None and object_gather_list is not None:
            object_gather_list[:p.size] = got

    def scatter_object_list(self, scatter_object_output_list: List[Any],
                            scatter_object_input_list: Optional[List[Any]] = None,
                            src: Optional[int] = None, group: Any = None,
                            group_src: Optional[int] = None,
                            *, name: Optional[str] = None, step: Optional[int] = None) -> None:
        """``scatter_object_output_list[0]`` = ``src``'s ``scatter_object_input_list[rank]``."""
        p = self._p
        root, error = self._group_rank("scatter_object_list", src, group_src, 0)
        error = self._check_group("scatter_object_list", group) or error
        if error is None and (not isinstance(scatter_object_output_list, list)
                              or len(scatter_object_output_list) < 1):
            error = ("ValueError: expected argument scatter_object_output_list to be a list of "
                     "size at least 1")
        if error is None and p.rank == root and scatter_object_input_list is None:
            error = "ValueError: source rank must provide non-None scatter_object_input_list"
        if error is not None:
            objects.refuse(p, "scatter", error, step, name, root=root)
        scatter_object_output_list[0] = objects.scatter(p, scatter_object_input_list, root, step,
                                                        name)

    def barrier(self, group: Any = None, async_op: bool = False, device_ids: Any = None,
                timeout: Any = None,
                *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """A checked barrier; with ``async_op``, an already completed work handle."""
        error = self._check_group("barrier", group)
        if error is not None:
            objects.refuse(self._p, "barrier", error, step, name)
        objects.barrier(self._p, step, name)
        return done(async_op)

    def monitored_barrier(self, group: Any = None, timeout: Any = None,
                          wait_all_ranks: bool = False,
                          *, name: Optional[str] = None, step: Optional[int] = None) -> None:
        """A checked barrier bounded by ``timeout`` (a timedelta or seconds; None: the
        communicator's): a rank that does not come in time is named by the CollectiveTimeout
        every waiting rank raises (all such ranks, with or without ``wait_all_ranks``)."""
        error = self._check_group("monitored_barrier", group)
        seconds = getattr(timeout, "total_seconds", lambda: timeout)()
        if error is None and seconds is not None and not (
                isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
                and seconds > 0):
            error = (f"ValueError: monitored_barrier: expected a positive timeout, got "
                     f"{timeout!r}"[:300])
        if error is not None:
            objects.refuse(self._p, "barrier", error, step, name)
        p = self._p
        if seconds is None:
            objects.barrier(p, step, name)
            return
        bound, p.timeout = p.timeout, float(seconds)
        p.refresh_fast()  # the C path holds the timeout it was bound with
        try:
            objects.barrier(p, step, name)
        finally:
            p.timeout = bound
            p.refresh_fast()

    # --- point to point ----------------------------------------------------------------------
    def send_object_list(self, object_list: List[Any], dst: Optional[int] = None,
                         group: Any = None, device: Any = None,
                         group_dst: Optional[int] = None, use_batch: bool = False, *,
                         name: Optional[str] = None) -> None:
        """Send the items of ``object_list`` to ``dst``, whose list must have the same length.
        ``name=`` (typedcoll's own): the receive that names it alike is this message's; one
        that names another raises ``DesyncError`` (the receiver checks a point to point
        message; this call returns once the receiver took it)."""
        p = self._p
        peer = self._peer("send_object_list", dst, group_dst, group, receiving=False)
        trees, refused = _encode_each(object_list)
        # torch's send returns once the receiver took the message: so does this one.
        p2p.send(p, trees, peer, 0, _schema(len(object_list)), name, refused, complete=True)

    def recv_object_list(self, object_list: List[Any], src: Optional[int] = None,
                         group: Any = None, device: Any = None,
                         group_src: Optional[int] = None, use_batch: bool = False, *,
                         name: Optional[str] = None) -> int:
        """Fill ``object_list`` from ``src``; returns the sender's global rank. ``src=None`` (any
        rank) is refused here: torch's transports cannot look for a message without waiting.
        ``name=`` as :meth:`send_object_list` takes it."""
        p = self._p
        peer = self._peer("recv_object_list", src, group_src, group, receiving=True)
        request = p2p.irecv(p, peer, 0, _schema(len(object_list)), name)
        trees = request.wait()
        source, _, _ = p2p.matched(request)
        try:
            object_list[:] = [tagged.decode(tree) for tree in trees]
        except Exception as exc:  # a class this rank lacks, or malformed markers
            detail = str(exc) if isinstance(exc, Unresolved) else f"{type(exc).__name__}: {exc}"
            raise DecodeError(f"{p2p.head(p, request)}: could not rebuild the objects from rank "
                              f"{source}: {detail}", seq=-1, comm=p.name, source=source,
                              schema="Any") from None
        return self._global_rank(source)

    def __getattr__(self, attribute: str) -> Any:
        # Only names the class lacks reach here: say which of torch's calls are missing.
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        has = sorted(n for n in dir(type(self)) if not n.startswith("_"))
        raise AttributeError(
            f"compat.torch has no {attribute!r}: the drop-in covers {', '.join(has)}; call "
            f"torch.distributed.{attribute} directly (unchecked), or exchange the value with a "
            f"call the drop-in has")

    # --- lifetime ----------------------------------------------------------------------------
    def free(self) -> None:
        """Collective: free the TypedComm beneath (its private groups), not ``group``."""
        self.typed.free()


# The name of this class before it took the tensor collectives.
ObjectCollectives = TorchDistributed


def _output_list(what: str, value: Any, size: int) -> Optional[str]:
    if isinstance(value, list) and len(value) >= size:
        return None
    got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
    return f"ValueError: expected {what} to be a list of at least {size} items, got {got}"


def _encode_each(items: List[Any]) -> Tuple[Optional[Tuple[Any, ...]], Optional[str]]:
    trees = []
    for i, item in enumerate(items):
        try:
            trees.append(tagged.encode(item)[0])
        except Refused as exc:
            kind, _, detail = exc.text().partition(": ")
            return None, f"{kind}: item {i}: {detail}"
    return tuple(trees), None


register_internal(__file__)
