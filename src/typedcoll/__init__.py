"""typedcoll: typed, self-checking collectives between ranks.

Every collective carries a schema-tagged, sequence-numbered envelope that every rank checks, so a
rank that skipped or reordered a collective makes every rank raise a precise :class:`DesyncError`
(which ranks called what, with which schema, from which line) instead of a positional TypeError
far from the cause, silently wrong data, or a hang. Payloads are msgspec-encoded; never pickle.
"""

from ._comm import TypedComm
from ._errors import (CollectiveError, CollectiveTimeout, DecodeError, DesyncError, EncodeError,
                      PeerError)
from ._mismatch import EnvelopeInfo, Group, MismatchKind
from ._diag import dump_traces

__version__ = "0.1.0"

__all__ = [
    "CollectiveError",
    "CollectiveTimeout",
    "DecodeError",
    "DesyncError",
    "EncodeError",
    "EnvelopeInfo",
    "Group",
    "MismatchKind",
    "PeerError",
    "TypedComm",
    "dump_traces",
]
