"""TypedComm's typed point to point (``core/p2p.py``), a base of ``_comm.TypedComm``.

Each method is one call into ``core.p2p``, imported when first called, as it was when these
methods were written in ``_comm.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from .core.plumbing import register_internal

if TYPE_CHECKING:
    from .core.protocol import Protocol


class PointToPoint:
    """The point-to-point methods of :class:`typedcoll.TypedComm`."""

    __slots__ = ()
    _p: Protocol

    def send(self, value: Any, dest: int, tag: int = 0, *, schema: Any = None,
             name: Optional[str] = None, step: Optional[int] = None) -> None:
        """Send ``value`` to rank ``dest``: one message, its envelope (schema, call identity,
        its number among this rank's messages to ``dest`` with ``tag``, the step: ``step``,
        else the step clock) before the payload."""
        from .core import p2p
        p2p.send(self._p, value, dest, tag, schema, name, step=step)

    def recv(self, source: Optional[int], tag: Optional[int] = 0, *, schema: Any = None,
             name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """The next message from ``source`` with ``tag`` (None: any rank, any tag), checked
        against its envelope; without ``schema``, decoded as the sender's class. Its step must
        be ``step``, else the step clock's. The communicator's ``timeout`` bounds the wait."""
        from .core import p2p
        return p2p.recv(self._p, source, tag, schema, name, step)

    def isend(self, value: Any, dest: int, tag: int = 0, *, schema: Any = None,
              name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """Start :meth:`send`; the request's ``wait()`` completes it."""
        from .core import p2p
        return p2p.isend(self._p, value, dest, tag, schema, name, step=step)

    def irecv(self, source: Optional[int], tag: Optional[int] = 0, *, schema: Any = None,
              name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """Post :meth:`recv` now (messages are matched in posting order); the request's
        ``wait()`` returns the value, ``test()`` gives ``(done, value or None)``. It carries
        the step clock as it is now: one posted ahead for a later iteration passes ``step``."""
        from .core import p2p
        return p2p.irecv(self._p, source, tag, schema, name, step)

    def sendrecv(self, value: Any, dest: int, source: Optional[int], sendtag: int = 0,
                 recvtag: Optional[int] = 0, *, schema: Any = None, recv_schema: Any = None,
                 name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """Send ``value`` to ``dest`` and receive from ``source`` without deadlocking on a
        pair that does the same: the receive is posted before the send starts."""
        from .core import p2p
        return p2p.sendrecv(self._p, value, dest, source, sendtag, recvtag, schema,
                            recv_schema, name, step=step)


register_internal(__file__)
