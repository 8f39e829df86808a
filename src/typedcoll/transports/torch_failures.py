"""How the ranks of a private gloo group hear of each other's failures: through the channel's
store.

A gloo operation that timed out closes its connections, so a late rank cannot complete it: it
fails in the backend instead, and there is no notice to look for after a completed call. A
failure of the backend is reported to the peers through the channel's store (the counter
"failed", then "failed/<rank>": what this rank's backend said), which every collective waiting
on this channel reads between slices of its wait (``_wait``).

A timeout is not reported to the waits (each rank reports its own, naming whom it waited for),
but its notice ("gave_up/<rank>": the call number) is kept: a slow peer that arrives later finds
its call failed by the closed connections, as if this rank had died, and the notice tells it
that this rank gave up instead (``given_up``, read when a call ends unmet).

A failure leaves two keys: "failed/<rank>", the text the waits show, and "failed_in/<rank>",
the call's number alone. A rank that comes after its peers left reads the numbers beside the
give-ups' (which call each left, compared as numbers) without parsing a message meant for
people; the text stays free to change.
"""

from __future__ import annotations

import time
from typing import Any, List, Optional, Tuple

from ..core.plumbing import register_internal
from ..core.errors import numbered
from ..core.transport import TransportFailure
from .gloo import wait_work

RECEIVE_TIMED_OUT = "that its receive from rank "  # how a report of a receive's timeout starts
STORE_LOST_S = 1.0  # how long the store may fail to answer before a waiting rank gives up


class FailureReports:
    """Giving up, and waiting for an operation while listening for the peers' failures, over
    ``store`` (a prefix of the job's store private to the channel); the torch transport's base."""

    store: Any
    rank: int
    size: int
    _store_lost_at: Optional[float]  # when the store first failed to answer
    _last_work: Any  # the latest operation waited for (TorchTransport.__init__ says why)

    def give_up(self, seq: int, failure: str) -> None:
        if failure:
            try:  # a rank that comes late reads who left the call before it (failed_in)
                self.store.set(f"failed_in/{self.rank}", str(seq))
            except Exception:  # the store died with its rank: the report below fails too
                pass
            self._report(f"{numbered(seq)}: {failure}")
            return
        try:
            self.store.set(f"gave_up/{self.rank}", str(seq))
        except Exception:  # the store died with its rank: the peers' own waits end theirs
            pass

    def _report(self, text: str) -> None:
        """Tell the channel's waits that this rank's backend failed, and why."""
        try:
            self.store.set(f"failed/{self.rank}", text)
            self.store.add("failed", 1)
        except Exception:  # the store died with its rank: the peers' own waits end theirs
            pass

    def receive_timed_out(self, source: int) -> None:
        """A point-to-point receive's wait ran out: gloo closed the pair, which this channel's
        collectives use too, so the peers' next collective fails in the backend. They are told
        why, as for a backend failure, instead of reading that a process is gone."""
        self._report(f"{RECEIVE_TIMED_OUT}{source} timed out: gloo closes the connection of a "
                     f"receive that times out, which this communicator's collectives use")

    def given_up(self) -> List[Tuple[int, int]]:
        return self._notices("gave_up")

    def failed_in(self) -> List[Tuple[int, int]]:
        return self._notices("failed_in")

    def _notices(self, kind: str) -> List[Tuple[int, int]]:
        found = []
        try:
            for peer in range(self.size):
                key = f"{kind}/{peer}"
                if peer != self.rank and self.store.check([key]):
                    found.append((peer, int(self.store.get(key))))
        except Exception:  # the store is gone: no notice can be read, the failure stands
            pass
        return found

    def _peer_failure(self) -> str:
        try:
            failed = int(self.store.add("failed", 0))
            self._store_lost_at = None
            if failed == 0:
                return ""
            for peer in range(self.size):
                key = f"failed/{peer}"
                if peer != self.rank and self.store.check([key]):
                    return f"rank {peer} reported {self.store.get(key).decode(errors='replace')}"
        except Exception as exc:
            # The store died with the rank that hosted it (tcp:// and env:// host it on rank
            # 0). gloo fails a call only on the ranks that exchange with the dead one; a rank
            # whose neighbours are alive would wait for them until they exit: a store that
            # stays unreachable is that failure.
            now = time.monotonic()
            if self._store_lost_at is None:
                self._store_lost_at = now
            elif now - self._store_lost_at >= STORE_LOST_S:
                return (f"the job's store has not answered for {now - self._store_lost_at:.1f} s "
                        f"(the rank that hosted it, rank 0 under tcp:// or env://, is gone?): "
                        f"{type(exc).__name__}: {exc}")
        return ""

    def _wait(self, work: Any, deadline: Optional[float]) -> None:
        try:
            wait_work(work, deadline, self._peer_failure)
        except TransportFailure as exc:
            # A peer whose receive timed out closed its connections on purpose: its report
            # says so, where gloo's own error (read first by the ranks it exchanged with
            # directly) would say "connection closed by peer", as for a dead process.
            reported = self._peer_failure()
            if RECEIVE_TIMED_OUT in reported and RECEIVE_TIMED_OUT not in str(exc):
                raise TransportFailure(reported) from None
            raise
        self._last_work = work


register_internal(__file__)
