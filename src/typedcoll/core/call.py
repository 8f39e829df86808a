"""The per-call record: everything one typed collective carries through the protocol.

An op builds one :class:`Call` from its arguments; the protocol fills in what the exchange
decides (sequence number, deadline, own payload) and every later step, cold paths included,
reads the record instead of a long list of positional parameters.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from ..codecs import SchemaInfo
from .wire import GATHER, NO_ROOT, NO_STEP

# How a contribution travels: msgspec-encoded, as a numpy array, not at all (a barrier, the
# non-roots of bcast), or as bytes the op encoded itself (scatter's and alltoall's parts).
MODE_MSG, MODE_ARRAY, MODE_EMPTY, MODE_BYTES = 0, 1, 2, 3

_ZEROS = bytes(8)


class Call:
    """One typed collective on one rank."""

    __slots__ = ("op", "shape", "info", "mode", "value", "root", "reduce_op", "step", "name",
                 "code", "lasti", "via", "callers", "error", "array_fp", "validate", "wild",
                 "guessed", "settings", "seq", "deadline", "overflow", "occurrence",
                 "array_meta", "same_shape", "inline", "split", "timed_out", "observed",
                 "clocked", "settles", "interrupt")

    def __init__(self, op: str, shape: int, info: Optional[SchemaInfo], mode: int, value: Any, *,
                 root: int = NO_ROOT, reduce_op: int = 0, step: Any = None,
                 name: Optional[str] = None, error: Optional[str] = None,
                 array_fp: bytes = _ZEROS, validate: bool = False, wild: bool = False,
                 settings: Optional[str] = None,
                 array_meta: Optional[Tuple[Tuple[int, ...], str]] = None,
                 same_shape: bool = True, clocked: bool = True) -> None:
        self.op = op
        self.shape = shape  # wire.GATHER or wire.REDUCE
        self.info = info
        self.mode = mode
        self.value = value  # what this rank encodes (None where it sends nothing)
        self.root = root
        self.reduce_op = reduce_op
        self.step = step  # None: the communicator's step clock
        self.name = name
        self.error = error  # this rank's argument or value error, flagged to every rank
        self.array_fp = array_fp
        self.validate = validate  # decode our own payload before sending (only a root decodes)
        self.wild = wild  # this rank named no schema: it takes the root's
        self.guessed = False  # it named none, and sends the root's class of the last call here
        self.settings = settings  # communicator settings compared at creation (messages)
        self.array_meta = array_meta  # (shape, dtype.str) of an array contribution
        self.same_shape = same_shape  # the op combines values: shapes must agree, not only dtypes
        # The payload rides in the slot (GATHER; a bcast root's in REDUCE); otherwise it moves
        # whole in phase 2, on the backend's own rooted collective.
        self.inline = shape == GATHER or op == "bcast"
        self.code: Any = None
        self.lasti = 0
        self.via: Any = None  # the thin wrapper the call went through (core.identity)
        self.callers: Tuple[Any, ...] = ()  # of a call in a role branch (core.callers)
        self.seq = 0
        self.deadline: Optional[float] = None
        self.overflow: Any = None  # own payload bytes that move in phase 2
        # An array too big for its slot, in two parts: (dtype-and-shape prefix, its own memory).
        self.split: Any = None
        self.occurrence = 0
        self.clocked = clocked  # stamped with the step clock unless it gives its own step
        self.timed_out = False  # the C path's exchange passed its deadline (Python reports it)
        self.observed = False  # the C path fed this exchange to the slot-size rule already
        # Some rank's decoding runs user code: every rank settles the outcome (core/settle.py).
        self.settles = False
        # An interrupt (KeyboardInterrupt) raised by a hook as this rank checked its own value
        # before the exchange: flagged as its error so its peers raise too, then re-raised here.
        self.interrupt: Optional[BaseException] = None

    @property
    def wire_step(self) -> int:
        return NO_STEP if self.step is None else self.step

    @property
    def schema_name(self) -> str:
        """The schema as messages show it: none where this rank has no payload and names no
        schema (a barrier; a bcast receiver that takes the root's), "?" where it did not
        resolve."""
        if self.info is not None:
            return self.info.name
        return "" if self.mode == MODE_EMPTY else "?"
