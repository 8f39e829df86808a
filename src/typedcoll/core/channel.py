"""The private channel several TypedComms share, and the state that belongs to it.

Typed traffic never runs on the caller's communicator: a transport owns a private duplicate (one
per parent communicator, shared by every TypedComm built over that parent, so constructing
thousands of them costs no backend resources). What is true of that private communicator is
true of every TypedComm on it, so it lives here: which thread is inside a collective, whether a
collective timed out (the backend operation is still pending: nothing may follow it), and
whether two threads collided.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable, List, Optional, Tuple

from .errors import CollectiveError

# Called as hook(channel) before a channel's transport is freed (diagnostics stop watching it).
CLOSE_HOOKS: List[Callable[["Channel"], None]] = []


# The busy marker's fields (a list, so the C fast path reads and writes it without attribute
# lookups): the thread inside a collective, its call site, and two flags every call checks.
BUSY_IDENT, BUSY_CODE, BUSY_LASTI, BUSY_POISON, BUSY_BROKEN = range(5)


class Channel:
    """One private communicator (a transport) and its shared state."""

    __slots__ = ("transport", "busy", "lock", "_broken", "instances", "users", "label",
                 "mailbox", "settled", "__weakref__")

    def __init__(self, transport: Any, label: str) -> None:
        self.transport = transport
        self.label = label  # the parent's name: communicators on the channel are label, label#2
        # Held by the thread inside a collective: taken without waiting, so a second thread
        # finds it taken and is refused (ConcurrentCallError); nothing else runs between the
        # test and the taking. The busy marker then names that thread and where it is.
        self.lock = threading.Lock()
        # [ident, code, lasti, poison, broken]: the poison is set by a thread refused for a
        # collision (the next collective on the channel tells every rank), broken once a
        # collective timed out or a collision was reported.
        self.busy: List[Any] = [0, None, 0, None, False]
        self._broken: Optional[CollectiveError] = None
        self.instances = 0  # TypedComms built on this channel so far
        self.users = 0  # of those, not freed yet
        # Point to point's posted receives (core.mailbox), made at the first. Held here, not in
        # a table keyed by the channel: a receive never completed refers back to the channel,
        # and only a cycle the collector sees lets both go.
        self.mailbox: Any = None
        # False once a user was released on this rank alone (not by the collective free): its
        # peers may still send to the channel. With a broken one (a call abandoned), the
        # transport is then kept, not freed (close, Transport.free).
        self.settled = True

    def claim(self) -> bool:
        """Enter a collective on this thread; False when another thread is inside."""
        if not self.lock.acquire(False):
            return False
        self.busy[BUSY_IDENT] = threading.get_ident()
        return True

    def unclaim(self) -> None:
        """Leave the collective this thread entered (nothing when it holds none)."""
        busy = self.busy
        if busy[BUSY_IDENT] == threading.get_ident():
            busy[BUSY_IDENT] = 0
            self.lock.release()

    @property
    def poison(self) -> Optional[str]:
        return self.busy[BUSY_POISON]  # type: ignore[no-any-return]

    @poison.setter
    def poison(self, text: Optional[str]) -> None:
        self.busy[BUSY_POISON] = text

    @property
    def broken(self) -> Optional[CollectiveError]:
        """The error that made the channel unusable (a timeout, a collision), or None."""
        return self._broken

    @broken.setter
    def broken(self, error: Optional[CollectiveError]) -> None:
        # A copy that is never raised: the channel keeps what the error says, not the frames of
        # the call that raised it, whose locals (an engine's batches) would live on with it.
        self._broken = copy.copy(error)
        self.busy[BUSY_BROKEN] = error is not None  # every C binding on the channel sees it

    def inside(self) -> Tuple[str, Any, int]:
        """(thread, code, lasti) of the thread inside a collective, for a collision's message."""
        busy = self.busy
        ident = busy[BUSY_IDENT]
        thread = next((t for t in threading.enumerate() if t.ident == ident), None)
        name = f"{thread.name} (ident {ident})" if thread is not None else f"ident {ident}"
        return name, busy[BUSY_CODE], busy[BUSY_LASTI]

    def next_instance(self) -> int:
        self.instances += 1
        self.users += 1
        return self.instances

    def name_of(self, instance: int) -> str:
        return self.label if instance == 1 else f"{self.label}#{instance}"

    def release(self) -> bool:
        """One user freed its communicator; True when it was the last (free the transport)."""
        self.users -= 1
        return self.users <= 0

    def close(self) -> None:
        """Free the private communicator, after telling whoever watches it."""
        for hook in list(CLOSE_HOOKS):
            try:
                hook(self)
            except Exception:  # diagnostics never keep a channel from closing
                pass
        # A broken channel's abandoned call may still have messages in flight, its peers' too.
        self.transport.free(self.settled and self._broken is None)


def thread_label() -> str:
    thread = threading.current_thread()
    return f"{thread.name} (ident {thread.ident})"
