"""typedcoll: typed, self-checking collectives between ranks.

Every collective carries an envelope that every rank checks in band: which call it is (its
``name=`` or its call site), on which communicator, with which op, schema, step, root, reduce op
and shape. A rank that skipped, added or reordered a collective makes every rank raise the same
precise :class:`DesyncError` in the same call, instead of a TypeError far from the cause, a hang,
or another call's data. Payloads are msgspec-encoded; never pickle.

Layout (imports point down only)::

    typedcoll/__init__.py   this file: the public names, re-exported
    _comm.py                TypedComm: each method one call into the core
    core/                   wire format, call identity, the protocol, verdicts, payloads, the C
                            fast path and its contract, the flight recorder, errors
    codecs/                 schemas and fingerprints, numpy arrays, nesting, reductions, the
                            user hooks decoding runs
    transports/             mpi (mpi4py), torch (torch.distributed), memory (threads)
    tensor/                 checked tensor collectives (torch, NCCL)
    diagnostics/            hang reports, dumps, logs, the trace analyzer
    executor/               SymmetricFlush: conditional messages, drained symmetrically
    compat/                 drop-in surfaces for mpi4py and torch object collectives
    testing/                N ranks as threads of one process
    lint/                   the static check for collectives under rank-local conditions
    demo/                   the engine model behind ``typedcoll demo``
"""

from . import compat, diagnostics, testing
from ._comm import TypedComm
from ._version import __version__
from .codecs import decides_from_fields
from .core.errors import (CollectiveError, CollectiveTimeout, ConcurrentCallError, DecodeError,
                          DesyncError, EncodeError, PeerError)
from .core.plumbing import transparent
from .core.mismatch import EnvelopeInfo, Group, MismatchKind, Note

__all__ = [
    "CollectiveError",
    "CollectiveTimeout",
    "ConcurrentCallError",
    "DecodeError",
    "DesyncError",
    "EncodeError",
    "EnvelopeInfo",
    "Group",
    "MismatchKind",
    "Note",
    "PeerError",
    "TypedComm",
    "__version__",
    "compat",
    "decides_from_fields",
    "diagnostics",
    "testing",
    "transparent",
]
