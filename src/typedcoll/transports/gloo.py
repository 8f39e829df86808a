"""gloo's own primitives under the torch transport: private groups and how long they wait.

A private group is a ``ProcessGroupGloo`` this package constructs over a store prefix of its own
(``transports/torch_channels.py`` says why not ``dist.new_group``). Connecting it waits for every
member, within a bound (``connect_bound``): a member that never comes fails creation on the others
with a CollectiveTimeout naming it, where a year-long bound would hang them. That bound is also the
group's default timeout, which no operation may use: a collective sets its own (``options``), and a
point-to-point operation, which takes no options, is waited for with the call's own bound
(``wait_work``); either is a year where the call has no deadline. Waiting for an operation
(``wait_work``) turns gloo's errors into the transport's: a timeout, or a failure where a peer's
process or connection is gone.
"""

from __future__ import annotations

import math
import random
import socket
import time
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from ..core.errors import CREATE_SEQ, CollectiveTimeout
from ..core.mismatch import numbering_of
from ..core.plumbing import register_internal
from ..core.transport import TransportFailure, TransportTimeout
from ..core.verdict import CREATION_MIN_TIMEOUT

# Gloo needs a finite timeout: "no deadline" is a year of it.
FOREVER = timedelta(days=365)
DEFAULT_CONNECT_S = 1800.0  # torch's default timeout of a gloo group
FOREVER_S = FOREVER.total_seconds()
# gloo fails an operation at the call's own deadline. With any margin past it, a rank that came
# within the margin completed the call its peers had just given up on: it returned while they
# raised. Failed there, its operation fails too, and it reads their reports ("abandoned").
MIN_TIMEOUT_S = 1e-3  # gloo's timeout of an operation posted at its deadline
ALARM_SLICE_S = 0.5  # how often a waiting collective looks for a peer's report of a failure
EMPTY = torch.empty(0, dtype=torch.uint8)


def u8(buf: Any) -> torch.Tensor:
    """A uint8 CPU tensor over ``buf``'s memory: no copy for writable buffers (bytearrays).

    Read-only ones (bytes) are copied first: torch warns on a read-only view. torch.frombuffer
    refuses empty buffers.
    """
    if not len(buf):
        return EMPTY
    if memoryview(buf).readonly:
        buf = bytearray(buf)
    return torch.frombuffer(buf, dtype=torch.uint8)


def options(kind: Any, deadline: Optional[float]) -> Any:
    """Options of one gloo operation, its timeout taken from ``deadline`` (None: none; the
    group's own is only its connection bound)."""
    opts = kind()
    opts.timeout = FOREVER
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining < FOREVER_S:
            opts.timeout = timedelta(seconds=max(remaining, MIN_TIMEOUT_S))
    return opts


def wait_work(work: Any, deadline: Optional[float],
              alarm: Optional[Callable[[], str]] = None) -> None:
    """Wait for a torch operation; TransportTimeout once ``deadline`` has passed,
    TransportFailure when the backend fails it first (a peer's process or connection is gone).

    ``alarm`` (collectives only): read between slices of the wait, the text of a peer's report
    that the backend failed a call of this channel, or "". gloo fails a call with a dead peer
    only on the ranks that exchange with it directly; the others would wait for their
    neighbours, who have given up, until the deadline, or forever without one.
    """
    while True:
        remaining = math.inf if deadline is None else deadline - time.monotonic()
        sliced = alarm is not None and remaining > ALARM_SLICE_S
        try:
            if sliced:
                work.wait(timedelta(seconds=ALARM_SLICE_S))
            elif remaining >= FOREVER_S:  # None, math.inf, or beyond what a timedelta holds
                # Never the bare wait(): a receive would then end at the group's default
                # timeout, the connection bound, not when the call's own deadline says.
                work.wait(FOREVER)
            else:
                work.wait(timedelta(seconds=max(remaining, 1e-3)))
            return
        except RuntimeError as exc:
            # Collectives stay pending after a timed-out wait; point-to-point operations are
            # failed by it (gloo closes the pair). Before the deadline, a completed operation
            # that raised is a real failure (a peer died).
            if sliced:
                if not work.is_completed():
                    reported = alarm()  # type: ignore[misc]  # sliced: alarm is not None
                    if reported:
                        raise TransportFailure(reported) from None
                    continue
                # The slice ran out as the collective completed: only the completed
                # operation says whether it succeeded (it returns or raises at once).
                try:
                    work.wait(timedelta(seconds=ALARM_SLICE_S))
                    return
                except RuntimeError as outcome:
                    exc = outcome
            if deadline is not None and (not work.is_completed()
                                         or time.monotonic() >= deadline - 1e-3):
                raise TransportTimeout() from None
            raise TransportFailure(f"{type(exc).__name__}: {exc}") from exc


def group_name(group: Any) -> str:
    """``WORLD`` for the default group, else ``group[0,2,5]`` (its global ranks)."""
    if group is None or group is dist.group.WORLD:
        return "WORLD"
    return "group[" + ",".join(map(str, dist.get_process_group_ranks(group))) + "]"


def post(operation: Callable[..., Any], *args: Any) -> Any:
    """A point-to-point operation posted; TransportFailure where gloo refuses to post it (the
    peer's connection closed: its process is gone), as when it fails the operation later."""
    try:
        return operation(*args)
    except RuntimeError as exc:
        raise TransportFailure(str(exc)) from None


def free_port() -> int:
    """A free localhost TCP port, for launching test and benchmark process groups.

    The port is found free here and bound later by another process, so it is drawn from below
    the kernel's ephemeral range: a port the kernel hands out itself (``bind(0)``, or a connecting
    socket such as gloo's own pairs) can be taken by any process in between.
    """
    low = _ephemeral_low()
    below = range(max(1024, low - 8192), low)
    for port in random.SystemRandom().sample(below, min(64, len(below))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken: draw another
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default where it does not say)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def group_timeout(group: Any) -> Optional[float]:
    """The seconds after which torch fails a call of ``group`` (None: the default group), as
    ``init_process_group(timeout=)`` or ``new_group(timeout=)`` set them; None where the group
    does not say."""
    try:
        pg = c10d._get_default_group() if group is None else group
        for device in ("cpu", "cuda"):
            try:
                backend = pg._get_backend(torch.device(device))
            except Exception:  # no backend for this device
                continue
            seconds = backend.options._timeout.total_seconds()
            if 0 < seconds < 10 ** 9:
                return float(seconds)
    except Exception:  # a torch without these internals: no timeout, as before
        pass
    return None


def connect_bound(timeout: Any, group: Any) -> float:
    """How long connecting a private group may wait for its last member: the communicator's
    timeout (at least the creation exchange's), else the caller's group's own, else torch's
    default; a member that never comes then fails creation instead of hanging it."""
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) \
            and 0 < timeout < FOREVER_S:
        return max(float(timeout), CREATION_MIN_TIMEOUT)
    return group_timeout(group) or DEFAULT_CONNECT_S


def make_gloo(store: Any, prefix: str, rank: int, size: int, connect_s: float, label: str,
              world_ranks: Optional[List[int]] = None) -> Any:
    """A gloo group over ``prefix``, connected within ``connect_s`` (CollectiveTimeout naming
    the members that never came, with the job's ranks of the group's, ``world_ranks``). Each
    operation sets its own timeout (``options``)."""
    store.set(f"{prefix}/joined/{rank}", b"1")
    try:
        return c10d.ProcessGroupGloo(c10d.PrefixStore(prefix + "/gloo/", store), rank, size,
                                     timedelta(seconds=connect_s))
    except RuntimeError as exc:
        missing: List[int] = []
        lost = ""
        for r in range(size):
            try:
                if not store.check([f"{prefix}/joined/{r}"]):
                    missing.append(r)
            except Exception as gone:  # the store went with its host: who came is unknown
                lost = f"{type(gone).__name__}: {str(gone).splitlines()[0][:200]}"
                break
        who = (f"the job's store no longer answers (the rank that hosted it, rank 0 under "
               f"tcp:// or env://, is gone?), so who came is unknown: {lost}" if lost else
               f"rank(s) {', '.join(map(str, missing))} of {size}"
               f"{numbering_of(size, world_ranks)} never came" if missing else
               "every member came but some did not connect")
        missing = [] if lost else missing
        raise CollectiveTimeout(
            f"creating typedcoll's private group over {label} did not complete within "
            f"{connect_s:g} s: {who} (every rank of the group must create its TypedComm or "
            f"drop-in over it at the same point); gloo: {str(exc).splitlines()[0][:300]}",
            seq=CREATE_SEQ, comm=label, timeout=connect_s, missing=missing or None,
            failure=str(exc)[:300]) from None


def make_nccl(store: Any, prefix: str, rank: int, size: int) -> Any:
    return c10d.ProcessGroupNCCL(c10d.PrefixStore(prefix + "/nccl/", store), rank, size,
                                 c10d.ProcessGroupNCCL.Options())


register_internal(__file__)
