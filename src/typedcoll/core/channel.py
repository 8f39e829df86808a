"""The private channel several TypedComms share, and the state that belongs to it.

Typed traffic never runs on the caller's communicator: a transport owns a private duplicate (one
per parent communicator, shared by every TypedComm built over that parent, so constructing
thousands of them costs no backend resources). What is true of that private communicator is
true of every TypedComm on it, so it lives here: which thread is inside a collective, whether a
collective timed out (the backend operation is still pending: nothing may follow it), and
whether two threads collided.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional

from .errors import CollectiveError

# Called as hook(channel) before a channel's transport is freed (diagnostics stop watching it).
CLOSE_HOOKS: List[Callable[["Channel"], None]] = []


class Channel:
    """One private communicator (a transport) and its shared state."""

    __slots__ = ("transport", "busy", "broken", "instances", "users", "label", "__weakref__")

    def __init__(self, transport: Any, label: str) -> None:
        self.transport = transport
        self.label = label  # the parent's name: communicators on the channel are label, label#2
        # [thread ident, thread name, call site, poison] of the thread inside a collective
        # ([0, "", "", None] when none is): a list, so the C fast path reads and sets it without
        # attribute lookups. The poison is set by a thread that found another inside: the next
        # collective on the channel tells every rank (see ConcurrentCallError).
        self.busy: List[Any] = [0, "", "", None]
        self.broken: Optional[CollectiveError] = None
        self.instances = 0  # TypedComms built on this channel so far
        self.users = 0  # of those, not freed yet

    @property
    def poison(self) -> Optional[str]:
        return self.busy[3]  # type: ignore[no-any-return]

    @poison.setter
    def poison(self, text: Optional[str]) -> None:
        self.busy[3] = text

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
        self.transport.free()


def thread_label() -> str:
    thread = threading.current_thread()
    return f"{thread.name} (ident {thread.ident})"
