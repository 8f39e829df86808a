"""The benchmark's methods: every way a rank can allgather a payload, each checked before timing.

A method is set up once per payload and yields a zero-argument call that performs one collective
and returns what it received, plus a check of that result against what every rank built (a
benchmark of a wrong answer is worthless). Methods that cannot run here (no torch, no
``TypedComm.from_torch`` yet) are skipped with the reason, never given a number.

torch.distributed runs inside the mpiexec launch: rank and world size come from MPI, the
rendezvous is TCP on 127.0.0.1 (a single host) at a port rank 0 picks and broadcasts over MPI.
"""

from __future__ import annotations

import os
import socket
import warnings
from datetime import timedelta
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import msgspec
import numpy as np

from ._bench_payloads import Payload

Call = Callable[[], Any]
Check = Callable[[Any], Optional[str]]  # the result of one call -> None, or what is wrong


class Method(NamedTuple):
    """One row of the table: JSON key, table label, backend, and which floor it is held against."""

    key: str
    label: str
    backend: str  # "mpi" or "torch"
    is_floor: bool = False


METHODS: List[Method] = [
    Method("mpi_raw", "MPI Allgather (floor)", "mpi", is_floor=True),
    Method("mpi_pickle", "mpi4py allgather (pickle)", "mpi"),
    Method("mpi_pkl5", "mpi4py.util.pkl5 allgather", "mpi"),
    Method("typed_mpi", "typedcoll on MPI", "mpi"),
    Method("gloo_raw", "gloo all_gather_into_tensor", "torch", is_floor=True),
    Method("gloo_detail", "  same, DEBUG=DETAIL", "torch"),
    Method("gloo_object", "torch all_gather_object", "torch"),
    Method("typed_gloo", "typedcoll on gloo", "torch"),
]
METHOD_KEYS = [m.key for m in METHODS]


class TorchState:
    """torch.distributed as the benchmark found it: usable groups, or why there are none."""

    def __init__(self) -> None:
        self.dist: Any = None
        self.torch: Any = None
        self.unavailable: Optional[str] = None
        self.detail_group: Any = None
        self.detail_note: Optional[str] = None
        self.detail_check: Optional[str] = None
        self.typed_unavailable: Optional[str] = None
        self.version = "not installed"

    def gather_into_tensor(self) -> Callable[..., Any]:
        # torch 2.13 deprecates all_gather_into_tensor as an alias of all_gather_single (the same
        # operation, minus a FutureWarning per call); older torch has only the former.
        return getattr(self.dist, "all_gather_single", None) or self.dist.all_gather_into_tensor


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_torch(world: Any) -> TorchState:
    """Initialise gloo over the MPI world, plus a second gloo group wrapped by DETAIL mode."""
    state = TorchState()
    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:
        state.unavailable = f"torch is not installed ({exc})"
        world.allgather(None)  # keep the ranks' collective sequences alike
        return state
    state.torch, state.dist, state.version = torch, dist, torch.__version__
    ok = dist.is_available() and dist.is_gloo_available()
    if not all(world.allgather(ok)):
        state.unavailable = "torch.distributed with gloo is not available on every rank"
        return state
    port = world.bcast(free_port() if world.rank == 0 else None, root=0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # gloo binds to the interface the hostname resolves to; on containers that is often not
    # routable between the local processes, loopback always is.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=world.rank,
                            world_size=world.size, timeout=timedelta(seconds=120))
    state.detail_group = detail_group(state)
    if not detail_active(state, state.detail_group):
        state.detail_note = ("TORCH_DISTRIBUTED_DEBUG=DETAIL did not wrap the group created "
                             "in-process; the DETAIL row is skipped")
    else:
        verify_detail(state, world)
    try:
        from . import _comm
        _comm.TypedComm.from_torch(None)  # probe; the real ones are made per payload
    except Exception as exc:  # any failure means the backend is not ready: skip, never fake
        state.typed_unavailable = (f"TypedComm.from_torch is not available yet "
                                   f"({type(exc).__name__}: {exc})")
    if not all(world.allgather(state.typed_unavailable is None)) \
            and state.typed_unavailable is None:
        state.typed_unavailable = "TypedComm.from_torch failed on another rank"
    return state


def detail_group(state: TorchState) -> Any:
    """A new gloo group created under TORCH_DISTRIBUTED_DEBUG=DETAIL, the rest left as found.

    torch reads the debug level when it creates a group (it then wraps the backend in a
    ProcessGroupWrapper that checks every collective's fingerprint over a helper gloo group), so
    setting it around one ``new_group`` gives one DETAIL group beside plain ones, in one process.
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


def detail_active(state: TorchState, group: Any) -> bool:
    """Whether ``group``'s CPU backend is DETAIL's ProcessGroupWrapper."""
    try:
        from torch._C._distributed_c10d import _ProcessGroupWrapper
        return isinstance(group._get_backend(state.torch.device("cpu")), _ProcessGroupWrapper)
    except (ImportError, AttributeError, RuntimeError):
        return False


def verify_detail(state: TorchState, world: Any) -> None:
    """Prove DETAIL is live: on a throwaway DETAIL group, disagreeing shapes must be caught.

    Only called once the group is known to be wrapped: on a plain gloo group the same mismatch
    is undefined behaviour (a hang or a crash), never an error.
    """
    if world.size == 1:
        state.detail_check = "not verifiable at 1 rank"
        return
    torch = state.torch
    n = 4 if world.rank == 0 else 8
    try:
        state.gather_into_tensor()(torch.empty(n * world.size, dtype=torch.uint8),
                                   torch.zeros(n, dtype=torch.uint8), group=detail_group(state))
    except RuntimeError as exc:
        if "mismatch" in str(exc).lower():
            state.detail_check = "caught: " + str(exc).splitlines()[0][:160]
    world.Barrier()  # the ranks raised at different moments; start the benchmark together
    if not all(world.allgather(state.detail_check is not None)):
        state.detail_note = ("a shape mismatch on a DETAIL group went undetected; the DETAIL "
                             "row is skipped")


def _raw_bytes(payload: Payload, rank: int, width: int) -> bytes:
    value = payload.typed(rank)
    data = value if isinstance(value, bytes) else msgspec.msgpack.encode(value)
    return data.ljust(width, b"\0")


def _check_equal(expected: List[Any]) -> Check:
    def check(got: Any) -> Optional[str]:
        if list(got) == expected:
            return None
        return f"expected {len(expected)} values equal to every rank's, got {list(got)!r:.200}"
    return check


def _check_concat(expected: bytes) -> Check:
    def check(got: Any) -> Optional[str]:
        data = bytes(np.asarray(got).reshape(-1).view(np.uint8))
        return None if data == expected else f"expected every rank's {len(expected)} bytes back"
    return check


class Setup:
    """Builds each method's call for one payload; holds the communicators the calls run on."""

    def __init__(self, world: Any, torch_state: TorchState) -> None:
        from mpi4py import MPI
        from mpi4py.util import pkl5

        self.world = world
        self.rank, self.size = world.rank, world.size
        # Each method family on its own communicator, so no method's messages can meet another's.
        self.raw_comm = world.Dup()
        self.pickle_comm = world.Dup()
        self.pkl5_comm = pkl5.Intracomm(world.Dup())
        self.torch = torch_state
        self.mpi = MPI

    def skipped(self, method: Method) -> Optional[str]:
        """Why ``method`` cannot run here, or None."""
        t = self.torch
        if method.backend == "torch" and t.unavailable:
            return t.unavailable
        if method.key == "gloo_detail" and t.detail_note:
            return t.detail_note
        if method.key == "typed_gloo" and t.typed_unavailable:
            return t.typed_unavailable
        return None

    def build(self, method: Method, payload: Payload) -> Tuple[Call, Check]:
        size, rank = self.size, self.rank
        typed = [payload.typed(r) for r in range(size)]
        natives = [payload.native(r) for r in range(size)]
        width = max(payload.raw_size(r) for r in range(size))
        raw_all = b"".join(_raw_bytes(payload, r, width) for r in range(size))
        own_raw = raw_all[rank * width:(rank + 1) * width]
        key = method.key
        if key == "mpi_raw":
            send = np.frombuffer(own_raw, dtype=np.uint8).copy()
            recv = np.empty(width * size, dtype=np.uint8)
            allgather = self.raw_comm.Allgather

            def raw() -> Any:
                allgather(send, recv)
                return recv
            return raw, _check_concat(raw_all)
        if key == "mpi_pickle":
            native, comm = natives[rank], self.pickle_comm
            return (lambda: comm.allgather(native)), _check_equal(natives)
        if key == "mpi_pkl5":
            native, comm5 = natives[rank], self.pkl5_comm
            return (lambda: comm5.allgather(native)), _check_equal(natives)
        if key == "typed_mpi":
            from ._comm import TypedComm
            value, tcomm = typed[rank], TypedComm(self.world)  # one per payload: own slot size
            return (lambda: tcomm.allgather(value)), _check_equal(typed)
        torch, dist = self.torch.torch, self.torch.dist
        if key in ("gloo_raw", "gloo_detail"):
            group = self.torch.detail_group if key == "gloo_detail" else None
            send_t = torch.frombuffer(bytearray(own_raw), dtype=torch.uint8)
            recv_t = torch.empty(width * size, dtype=torch.uint8)
            gather = self.torch.gather_into_tensor()

            def gloo() -> Any:
                gather(recv_t, send_t, group=group)
                return recv_t.numpy()
            return gloo, _check_concat(raw_all)
        if key == "gloo_object":
            native = natives[rank]
            out: List[Any] = [None] * size

            def gather_object() -> Any:
                dist.all_gather_object(out, native)
                return out
            return gather_object, _check_equal(natives)
        if key == "typed_gloo":
            from ._comm import TypedComm
            value, gcomm = typed[rank], TypedComm.from_torch(None)
            return (lambda: gcomm.allgather(value)), _check_equal(typed)
        raise ValueError(f"expected a method key in {METHOD_KEYS}, got {key!r}")

    def barrier(self) -> None:
        self.raw_comm.Barrier()
