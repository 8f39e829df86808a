"""The peers benchmark's methods: every way a rank can allgather a payload.

A method is built once per payload into a zero-argument call that performs one allgather and
returns what it received, checked against what every rank built before it is timed. Methods
that cannot run here (no torch, no typed torch transport yet) are reported unavailable with the
reason, never given a number.

torch.distributed starts inside the MPI launch: rank and world size come from MPI, the
rendezvous is TCP on 127.0.0.1 (one host) at a port rank 0 picks and broadcasts over MPI.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .records import Payload, problem


class Method(NamedTuple):
    """One row of the peers table: its key, what it is, its backend, and whether it is a floor."""

    key: str
    label: str
    backend: str  # "mpi" or "torch"
    is_floor: bool = False


METHODS: List[Method] = [
    Method("mpi_raw", "MPI Allgather of the same bytes (floor)", "mpi", is_floor=True),
    Method("mpi_pickle", "mpi4py allgather (pickle)", "mpi"),
    Method("mpi_pkl5", "mpi4py.util.pkl5 allgather", "mpi"),
    Method("typed_mpi", "typedcoll on MPI", "mpi"),
    Method("gloo_raw", "gloo all_gather of the same bytes (gloo floor)", "torch", is_floor=True),
    Method("gloo_detail", "gloo under TORCH_DISTRIBUTED_DEBUG=DETAIL", "torch"),
    Method("gloo_object", "torch all_gather_object (pickle)", "torch"),
    Method("typed_gloo", "typedcoll on gloo", "torch"),
]
KEYS = [m.key for m in METHODS]


class Torch:
    """torch.distributed as the run found it: usable groups, or why each torch method is not."""

    def __init__(self) -> None:
        self.torch: Any = None
        self.dist: Any = None
        self.version: Optional[str] = None
        self.detail_group: Any = None
        self.detail_check: Optional[str] = None
        self.unavailable: Dict[str, str] = {}

    def gather_into_tensor(self) -> Callable[..., Any]:
        # torch 2.13 names it all_gather_single and deprecates the old name (a FutureWarning
        # per call); torch 2.11, on the device host, has only all_gather_into_tensor.
        return getattr(self.dist, "all_gather_single", None) or self.dist.all_gather_into_tensor


def init_torch(world: Any, wanted: bool) -> Torch:
    """gloo over the MPI world, a second group under DETAIL, and a probe of the typed one."""
    state = Torch()
    torch_keys = [m.key for m in METHODS if m.backend == "torch"]
    try:
        if not wanted:
            raise ImportError("left out (--no-torch)")
        import torch
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_gloo_available()):
            raise ImportError("torch.distributed with gloo is not available")
    except ImportError as exc:
        why = str(exc) if not wanted else f"torch: {exc}"
        world.allgather(None)  # the ranks' MPI sequences stay alike whatever each found
        state.unavailable = {k: why for k in torch_keys}
        return state
    if not all(world.allgather(True)):
        state.unavailable = {k: "torch is missing on another rank" for k in torch_keys}
        return state
    state.torch, state.dist, state.version = torch, dist, torch.__version__
    from typedcoll.transports.gloo import free_port
    port = world.bcast(free_port() if world.rank == 0 else None, root=0)
    # gloo binds to the interface the hostname resolves to; in containers that is often not
    # routable between local processes, loopback always is.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=world.rank,
                            world_size=world.size, timeout=timedelta(seconds=120))
    state.detail_group = _detail_group(state)
    why_not = _verify_detail(state, world)
    if why_not:
        state.unavailable["gloo_detail"] = why_not
    why_not = None
    try:
        import typedcoll
        typedcoll.TypedComm.from_torch(None)  # a probe; each payload gets its own
    except Exception as exc:  # the torch transport is still being adapted: say so, never fake
        why_not = f"TypedComm.from_torch failed: {type(exc).__name__}: {str(exc)[:160]}"
    answers = world.allgather(why_not)
    if any(answers):
        state.unavailable["typed_gloo"] = next(a for a in answers if a)
    return state


def _detail_group(state: Torch) -> Any:
    """A gloo group created under TORCH_DISTRIBUTED_DEBUG=DETAIL, the rest left as found.

    torch reads the debug level when it creates a group (and then wraps its backend in a
    ProcessGroupWrapper that checks every collective over a helper group), so setting it around
    one ``new_group`` gives one DETAIL group beside plain ones, in one process.
    """
    dist = state.dist
    previous_env = os.environ.get("TORCH_DISTRIBUTED_DEBUG")
    previous = dist.get_debug_level()
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    dist.set_debug_level(dist.DebugLevel.DETAIL)
    try:
        return dist.new_group(backend="gloo")
    finally:
        dist.set_debug_level(previous)
        if previous_env is None:
            del os.environ["TORCH_DISTRIBUTED_DEBUG"]
        else:
            os.environ["TORCH_DISTRIBUTED_DEBUG"] = previous_env


def _verify_detail(state: Torch, world: Any) -> Optional[str]:
    """None when DETAIL is live: its wrapper is there and a shape mismatch on a throwaway DETAIL
    group is caught (on a plain group the same mismatch is undefined behaviour, so it is only
    tried once the wrapper is known to be there)."""
    try:
        from torch._C._distributed_c10d import _ProcessGroupWrapper
        wrapped = isinstance(state.detail_group._get_backend(state.torch.device("cpu")),
                             _ProcessGroupWrapper)
    except (ImportError, AttributeError, RuntimeError):
        wrapped = False
    if not all(world.allgather(wrapped)):
        return "TORCH_DISTRIBUTED_DEBUG=DETAIL did not wrap the group created in-process"
    if world.size == 1:
        state.detail_check = "not verifiable at 1 rank"
        return None
    torch = state.torch
    n = 4 if world.rank == 0 else 8
    try:
        state.gather_into_tensor()(torch.empty(n * world.size, dtype=torch.uint8),
                                   torch.zeros(n, dtype=torch.uint8), group=_detail_group(state))
    except RuntimeError as exc:
        if "mismatch" in str(exc).lower():
            state.detail_check = "caught: " + str(exc).splitlines()[0][:160]
    world.Barrier()  # the ranks raised at different moments: start the benchmark together
    if not all(world.allgather(state.detail_check is not None)):
        return "a shape mismatch on a DETAIL group went undetected"
    return None


def _check_bytes(expected: bytes) -> Callable[[Any], Optional[str]]:
    def check(got: Any) -> Optional[str]:
        data = bytes(np.asarray(got).reshape(-1).view(np.uint8))
        return None if data == expected else f"expected every rank's {len(expected)} bytes back"
    return check


def _check_values(expected: List[Any], what: str) -> Callable[[Any], Optional[str]]:
    return lambda got: problem(got, expected, what)


class Builder:
    """Builds each method's call for one payload, on communicators of its own per family."""

    def __init__(self, world: Any, torch_state: Torch) -> None:
        from mpi4py.util import pkl5

        self.world = world
        self.rank, self.size = world.rank, world.size
        self.raw_comm = world.Dup()
        self.pickle_comm = world.Dup()
        self.pkl5_comm = pkl5.Intracomm(world.Dup())
        self.torch = torch_state

    def build(self, key: str, payload: Payload) -> Tuple[Callable[[], Any],
                                                         Callable[[Any], Optional[str]]]:
        """(call, check of its result)."""
        size, rank = self.size, self.rank
        typed = [payload.typed(r) for r in range(size)]
        natives = [payload.native(r) for r in range(size)]
        floors = [payload.floor(r) for r in range(size)]
        width = max(len(f) for f in floors)
        floor_all = b"".join(f.ljust(width, b"\0") for f in floors)
        own_floor = floor_all[rank * width:(rank + 1) * width]
        if key == "mpi_raw":
            send = np.frombuffer(own_floor, dtype=np.uint8).copy()
            recv = np.empty(width * size, dtype=np.uint8)
            gather = self.raw_comm.Allgather

            def raw() -> Any:
                gather(send, recv)
                return recv
            return raw, _check_bytes(floor_all)
        if key == "mpi_pickle":
            native, comm = natives[rank], self.pickle_comm
            return (lambda: comm.allgather(native)), _check_values(natives, key)
        if key == "mpi_pkl5":
            native, comm5 = natives[rank], self.pkl5_comm
            return (lambda: comm5.allgather(native)), _check_values(natives, key)
        if key == "typed_mpi":
            import typedcoll
            value, tcomm = typed[rank], typedcoll.TypedComm(self.world)  # own slot size
            schema = payload.schema
            return (lambda: tcomm.allgather(value, schema=schema)), _check_values(typed, key)
        torch, dist = self.torch.torch, self.torch.dist
        if key in ("gloo_raw", "gloo_detail"):
            group = self.torch.detail_group if key == "gloo_detail" else None
            send_t = torch.frombuffer(bytearray(own_floor), dtype=torch.uint8)
            recv_t = torch.empty(width * size, dtype=torch.uint8)
            gather_t = self.torch.gather_into_tensor()

            def gloo() -> Any:
                gather_t(recv_t, send_t, group=group)
                return recv_t.numpy()
            return gloo, _check_bytes(floor_all)
        if key == "gloo_object":
            native = natives[rank]
            out: List[Any] = [None] * size

            def gather_object() -> Any:
                dist.all_gather_object(out, native)
                return out
            return gather_object, _check_values(natives, key)
        if key == "typed_gloo":
            import typedcoll
            value, gcomm = typed[rank], typedcoll.TypedComm.from_torch(None)
            schema = payload.schema
            return (lambda: gcomm.allgather(value, schema=schema)), _check_values(typed, key)
        raise ValueError(f"expected a method key in {KEYS}, got {key!r}")

