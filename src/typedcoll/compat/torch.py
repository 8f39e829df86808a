"""The torch drop-in: torch.distributed's collectives over typed collectives, no pickle.

``typedcoll.compat.torch(group=None)`` returns a :class:`TorchDistributed` whose methods have
the names and signatures of ``torch.distributed``'s object collectives (``all_gather_object``,
``broadcast_object_list``, ``gather_object``, ``scatter_object_list``, ``send_object_list``,
``recv_object_list``, ``barrier``) and of its tensor collectives (``all_reduce``,
``broadcast``, ``all_gather``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``, and
their newer names ``all_gather_single`` and ``reduce_scatter_single``; plus ``get_rank`` and
``get_world_size``), and fill their lists and tensors in place as those do.
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

from typing import Any, Dict, List, Optional, Tuple

from .._comm import TypedComm
from ..core import p2p
from ..core.errors import DecodeError
from ..core.identity import register_internal
from . import objects
from . import values as tagged
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


class TorchDistributed:
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

    # --- ranks -------------------------------------------------------------------------------
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
        if self._torch_group and _default_group(group) is _default_group(self.group):
            return None  # dist.group.WORLD and the default group are one group
        return (f"ValueError: {op}: expected group=None or the group this object was made "
                f"for, got {group!r}"[:300])

    def set_step(self, step: Optional[int]) -> None:
        """The step clock of the TypedComm beneath (``TypedComm.set_step``): every later call
        carries ``step`` until it is set again, so a rank that skipped a call at one line (a
        per-step vote skipped on an idle step) raises there instead of pairing with the next
        step's call."""
        self.typed.set_step(step)

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
        return _done(async_op)

    # --- tensor collectives -------------------------------------------------------------------
    # Engines' control-plane votes are often tensors (a per-step MAX all-reduce of a batch size
    # on the CPU group): here each is one checked tensor collective (``tensor.ops``), CPU tensors
    # on the private gloo side after the envelope exchange, CUDA tensors on the group's NCCL
    # behind the device envelope. A caller's output tensors are filled by one copy of the
    # result. ``async_op=True`` returns the handle of a call that has already run on the host
    # (``_Done``: on CUDA its ``wait()`` orders the waiting stream after the call).
    def get_rank(self, group: Any = None) -> int:
        """This rank's rank in the group."""
        _raise_if(self._check_group("get_rank", group))
        return self._p.rank

    def get_world_size(self, group: Any = None) -> int:
        """The group's size."""
        _raise_if(self._check_group("get_world_size", group))
        return self._p.size

    def all_reduce(self, tensor: Any, op: Any = None, group: Any = None,
                   async_op: bool = False,
                   *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``tensor`` reduced across the group, in place (``op``: ``ReduceOp.SUM`` when None,
        ``PRODUCT``, ``MAX``, ``MIN``, or their names)."""
        from ..tensor import ops as tensor_ops
        tensor_ops.all_reduce_tensor(self._p, tensor, _op_name(op), name, step,
                                     error=self._check_group("all_reduce", group))
        return _done(async_op, tensor)

    def broadcast(self, tensor: Any, src: Optional[int] = None, group: Any = None,
                  async_op: bool = False, group_src: Optional[int] = None,
                  *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``tensor`` overwritten in place with ``src``'s."""
        from ..tensor import ops as tensor_ops
        root, error = self._group_rank("broadcast", src, group_src, 0)
        error = self._check_group("broadcast", group) or error
        # An unknown root stays None: flagged by the collective too, so that no rank enqueues
        # a payload with a root its peers do not share (the device path).
        tensor_ops.broadcast_tensor(self._p, tensor, root, name, step, error=error)
        return _done(async_op, tensor)

    def all_gather(self, tensor_list: List[Any], tensor: Any, group: Any = None,
                   async_op: bool = False,
                   *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``tensor_list[i]`` = rank i's ``tensor`` (one tensor per rank, each of its shape and
        dtype)."""
        from ..tensor import ops as tensor_ops
        p = self._p
        error = self._check_group("all_gather", group) or _output_tensors(tensor_list, tensor,
                                                                          p.size)
        out = tensor_ops.all_gather_tensor(p, tensor, name, step, error=error)
        parts = out.reshape((p.size,) + tuple(tensor.shape))
        for i in range(p.size):
            tensor_list[i].copy_(parts[i])
        return _done(async_op, *tensor_list)

    def all_gather_into_tensor(self, output_tensor: Any, input_tensor: Any, group: Any = None,
                               async_op: bool = False,
                               *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``output_tensor`` = every rank's ``input_tensor``, concatenated along dim 0 or stacked
        (its numel: size times the input's)."""
        from ..tensor import ops as tensor_ops
        p = self._p
        error = self._check_group("all_gather_into_tensor", group) or _output_tensor(
            "output_tensor", output_tensor, input_tensor, p.size, 1)
        out = tensor_ops.all_gather_tensor(p, input_tensor, name, step, error=error)
        output_tensor.copy_(out.reshape(output_tensor.shape))
        return _done(async_op, output_tensor)

    def reduce_scatter_tensor(self, output: Any, input: Any, op: Any = None, group: Any = None,
                              async_op: bool = False,
                              *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """``output`` = block ``rank`` of ``input`` reduced across the group (``input``: the
        blocks concatenated along dim 0 or stacked)."""
        from ..tensor import ops as tensor_ops
        p = self._p
        error = self._check_group("reduce_scatter_tensor", group) or _output_tensor(
            "output", output, input, 1, p.size)
        out = tensor_ops.reduce_scatter_tensor(p, input, _op_name(op), name, step, error=error)
        output.copy_(out.reshape(output.shape))
        return _done(async_op, output)

    # torch's newer names for the two.
    all_gather_single = all_gather_into_tensor
    reduce_scatter_single = reduce_scatter_tensor

    # --- point to point ----------------------------------------------------------------------
    def send_object_list(self, object_list: List[Any], dst: Optional[int] = None,
                         group: Any = None, device: Any = None,
                         group_dst: Optional[int] = None, use_batch: bool = False) -> None:
        """Send the items of ``object_list`` to ``dst``, whose list must have the same length."""
        p = self._p
        peer, error = self._group_rank("send_object_list", dst, group_dst, None)
        error = self._check_group("send_object_list", group) or error
        if error is None and peer is None:
            error = "ValueError: send_object_list: expected dst or group_dst, got neither"
        if error is not None or peer == p.rank:
            raise ValueError((error or f"ValueError: send_object_list: expected a destination "
                              f"other than this rank ({p.rank})").partition(": ")[2])
        trees, refused = _encode_each(object_list)
        # torch's send returns once the receiver took the message: so does this one.
        p2p.send(p, trees, peer, 0, _schema(len(object_list)), None, refused, complete=True)

    def recv_object_list(self, object_list: List[Any], src: Optional[int] = None,
                         group: Any = None, device: Any = None,
                         group_src: Optional[int] = None, use_batch: bool = False) -> int:
        """Fill ``object_list`` from ``src`` (None: any rank); returns the sender's global rank."""
        p = self._p
        peer, error = self._group_rank("recv_object_list", src, group_src, None)
        error = self._check_group("recv_object_list", group) or error
        if error is not None or peer == p.rank:
            raise ValueError((error or f"ValueError: recv_object_list: expected a source other "
                              f"than this rank ({p.rank})").partition(": ")[2])
        request = p2p.irecv(p, peer, 0, _schema(len(object_list)), None)
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

    # --- lifetime ----------------------------------------------------------------------------
    def free(self) -> None:
        """Collective: free the TypedComm beneath (its private groups), not ``group``."""
        self.typed.free()


class _Done:
    """The work handle of an ``async_op`` call, which has already run on the host. A CUDA call
    is ordered on the stream it was issued on: ``wait()`` makes the stream current at the wait
    wait for it (an event recorded there), as torch's ``Work.wait()`` does."""

    __slots__ = ("_event", "_result")

    def __init__(self, event: Any = None, result: Optional[List[Any]] = None) -> None:
        self._event = event
        self._result = result if result is not None else []

    def wait(self, timeout: Any = None) -> bool:
        if self._event is not None:
            import torch
            torch.cuda.current_stream().wait_event(self._event)
        return True

    def is_completed(self) -> bool:
        return self._event is None or bool(self._event.query())

    def is_success(self) -> bool:
        return True

    def exception(self) -> None:
        return None

    def result(self) -> List[Any]:
        return self._result

    def get_future(self) -> Any:
        import torch
        future: Any = torch.futures.Future()
        future.set_result(self._result)
        return future


# The name of this class before it took the tensor collectives.
ObjectCollectives = TorchDistributed


def _default_group(group: Any) -> Any:
    """torch's rule: None and ``dist.group.WORLD`` name the default group."""
    import torch.distributed as dist
    if group is None or group is dist.group.WORLD:
        return dist.distributed_c10d._get_default_group()
    return group


def _done(async_op: bool, *tensors: Any) -> Optional[_Done]:
    """None, or with ``async_op`` the handle of a call that wrote ``tensors``."""
    if not async_op:
        return None
    event = None
    if any(t.is_cuda for t in tensors):
        import torch
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()  # on the current stream, where the call and its copies were issued
    return _Done(event, list(tensors))


def _raise_if(error: Optional[str]) -> None:
    """A local argument error of a call that exchanges nothing (no peer waits for it)."""
    if error is not None:
        raise ValueError(error.partition(": ")[2])


def _op_name(op: Any) -> Any:
    """torch's ``ReduceOp`` as the name the tensor collectives take (anything else as it is:
    their argument check names it)."""
    if op is None:
        return "sum"
    if isinstance(op, str):
        return op
    from ..transports.torch import TORCH_OPS
    for name, torch_op in TORCH_OPS.items():
        try:
            if op == torch_op:
                return name
        except Exception:  # an array, say: the collective's check names it, on every rank
            return op
    return op


def _output_tensors(outputs: Any, tensor: Any, size: int) -> Optional[str]:
    """Why ``outputs`` cannot take every rank's ``tensor`` (``all_gather``), or None."""
    import torch
    if not isinstance(outputs, list) or len(outputs) != size:
        got = f"a list of {len(outputs)}" if isinstance(outputs, list) else \
            type(outputs).__name__
        return f"ValueError: expected tensor_list to be a list of {size} tensors, got {got}"
    if not isinstance(tensor, torch.Tensor):
        return None  # the collective's own check names it
    for i, out in enumerate(outputs):
        if not isinstance(out, torch.Tensor) or out.shape != tensor.shape or \
                out.dtype != tensor.dtype:
            got = (f"shape {tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor)
                   else type(out).__name__)
            return (f"ValueError: expected tensor_list[{i}] to be a tensor of shape "
                    f"{tuple(tensor.shape)} {tensor.dtype}, got {got}")
    return None


def _output_tensor(what: str, out: Any, tensor: Any, times: int, per: int) -> Optional[str]:
    """Why ``out`` cannot hold ``tensor``'s numel x ``times`` / ``per`` items, or None."""
    import torch
    if not isinstance(tensor, torch.Tensor):
        return None  # the collective's own check names it
    numel = tensor.numel() * times // per
    if not isinstance(out, torch.Tensor) or out.numel() != numel or out.dtype != tensor.dtype:
        got = (f"{out.numel()} elements of {out.dtype}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        return (f"ValueError: expected {what} to be a tensor of {numel} elements of "
                f"{tensor.dtype}, got {got}")
    return None


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
