"""The backend-independent protocol: envelopes, checks and the two phases of every collective.

Every typed collective, whatever its kind, starts with the same backend operation:

  Phase 1 (always; one backend collective). Each rank writes a slot of ``slot`` bytes: the
    56-byte envelope header (``_wire``) and, when it fits, its encoded payload. One fixed-size
    allgather of the slots gives every rank every envelope. Because every kind of typed collective
    begins with this identical allgather, ranks that disagree about *what* they are calling still
    meet in a well-defined backend operation: a root, op or size mismatch can never reach
    undefined MPI/NCCL behaviour.
  Check. Each rank compares the first ``CHECKED`` header bytes of every slot with its own. Equal
    everywhere (the steady state) means: same op, seq, step, schema fingerprint, root, reduce op,
    array dtype+shape. Every rank sees the same slots, so every rank reaches the same verdict:
      - some header differs -> every rank sends its readable envelope (``EnvelopeInfo``) in an
        allgatherv, and every rank raises the same ``DesyncError``;
      - some rank flagged a local error -> it raises ``EncodeError`` with its own text, every other
        rank ``PeerError`` naming it (the text rode in its slot: no extra collective).
  Slot size. Every rank also sees every payload length, so all apply the same ``SlotPolicy`` rule
    and agree on the next collective's slot size without exchanging it.
  Phase 2 (only when some payload overflowed its slot). The lengths in the headers tell every rank
    exactly which ranks overflowed and by how much, so the second collective's counts are computed
    identically everywhere: an allgatherv (allgather), a gatherv to the root (gather), a bcast of
    the root's bytes (bcast), or a plain allreduce of the array (allreduce of large arrays, whose
    dtype and shape the check already proved equal).
  Decode. Payloads are decoded with the schema's msgspec decoder, built once; never pickle.

The timeout, when set, is one deadline for both phases, enforced with nonblocking backend calls.
"""

from __future__ import annotations

import operator
import time
import weakref
from typing import Any, Callable, List, Optional, Tuple

import msgspec
import numpy as np

from . import _schema
from ._callsite import format_site, register_internal, site_fingerprint, user_frame
from ._errors import (CollectiveError, CollectiveTimeout, DecodeError, DesyncError, EncodeError,
                      PeerError)
from ._mismatch import EnvelopeInfo, desync_message, group_envelopes, mismatch_kinds
from ._transport import TransportTimeout
from ._recorder import FlightRecorder, capacity_from_env
from ._schema import ENCODER, KIND_ARRAY, KIND_MSGSPEC, KIND_NUMPY_SCALAR, SchemaInfo
from ._wire import (CHECKED, FLAG_LOCAL_ERROR, FLAG_NO_PAYLOAD, FLAG_NONE_VALUE, FLAG_OVERFLOW,
                    FLAGS_OFFSET, HEADER, HEADER_SIZE, LENGTH_OFFSET, MAGIC, MAX_PAYLOAD,
                    NATIVE_LITTLE, NO_ROOT, NO_STEP, OPS, REDUCE_OPS, REDUCING_OPS, ROOTED_OPS,
                    SlotPolicy)

MODE_MSG, MODE_ARRAY, MODE_EMPTY = 0, 1, 2
_ZEROS = bytes(8)
_ENVELOPE_INFO_DECODER = msgspec.msgpack.Decoder(EnvelopeInfo)
# Above this many ranks the envelope check switches from a byte-compare loop to one numpy
# comparison (measured crossover on the dev machine: the loop wins below ~32 ranks).
_VECTOR_CHECK_RANKS = 32

# Called as hook(protocol, error) before a CollectiveError propagates (diagnostics dumps).
ERROR_HOOKS: List[Callable[["Protocol", BaseException], None]] = []
# Called as hook(protocol) when a communicator is created (diagnostics attach hang reporters).
NEW_PROTOCOL_HOOKS: List[Callable[["Protocol"], None]] = []
# Every live protocol, for dumps on signals and at exit.
LIVE: "weakref.WeakSet[Protocol]" = weakref.WeakSet()

_ARRAY_LIKE_REDUCE = {"sum": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum}
_SCALAR_REDUCE = {"sum": operator.add, "prod": operator.mul, "max": max, "min": min}


class Phase1:
    """What phase 1 left behind for phase 2: flags and lengths of every rank, own overflow."""

    __slots__ = ("seq", "flags", "lengths", "overflow", "deadline", "info", "op")

    def __init__(self, seq, flags, lengths, overflow, deadline, info, op):
        self.seq = seq
        self.flags = flags
        self.lengths = lengths
        self.overflow = overflow
        self.deadline = deadline
        self.info = info
        self.op = op


class Protocol:
    """One communicator's protocol state: sequence number, slot buffers, flight recorder."""

    def __init__(self, transport: Any, name: str, timeout: Optional[float]) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout: expected None or seconds > 0, got {timeout!r}")
        self.transport = transport
        self.rank: int = transport.rank
        self.size: int = transport.size
        self.name = name
        self.timeout = timeout
        self.seq = 0
        self.policy = SlotPolicy()
        self.slot = 0
        self._alloc(self.policy.size)
        capacity = capacity_from_env()
        self.recorder: Optional[FlightRecorder] = FlightRecorder(capacity) if capacity else None
        self.broken: Optional[CollectiveTimeout] = None
        # Set by diagnostics: (protocol, seq) -> (missing ranks or None, report text).
        self.hang_reporter: Optional[Callable[["Protocol", int], Tuple[Any, str]]] = None
        self._site: Tuple[Any, int] = (None, 0)
        LIVE.add(self)
        for hook in list(NEW_PROTOCOL_HOOKS):
            hook(self)

    def _alloc(self, slot: int) -> None:
        self.slot = slot
        self.send = bytearray(slot)
        self.recv = bytearray(slot * self.size)
        self.recv_view = memoryview(self.recv)
        self.recv_u32 = self.recv_view.cast("I") if NATIVE_LITTLE else None

    # --- phase 1 ---------------------------------------------------------------------------
    def phase1(self, op: str, info: Optional[SchemaInfo], value: Any, mode: int, *,
               root: int = NO_ROOT, reduce_op: int = 0, step: Optional[int] = None,
               array_fp: bytes = _ZEROS, pin_site: bool = False, validate: bool = False,
               error: Optional[str] = None) -> Phase1:
        if self.broken is not None:
            self._raise_broken(op, info)
        if self.slot != self.policy.size:
            self._alloc(self.policy.size)
        frame = user_frame(2)
        code = frame.f_code if frame is not None else None
        lineno = frame.f_lineno if frame is not None else 0
        seq = self.seq
        self.seq = seq + 1
        slot = self.slot
        send = self.send
        flags = 0
        overflow = None
        if step is None:
            step = NO_STEP
        if error is None:
            error = self._encode(info, value, mode)
            if error is None and validate and info.kind == KIND_MSGSPEC:
                error = self._validate(info)
        if error is not None:
            flags = FLAG_LOCAL_ERROR
            send[HEADER_SIZE:] = error.encode()[:slot - HEADER_SIZE]
        elif mode == MODE_EMPTY:
            flags = FLAG_NO_PAYLOAD
        elif value is None:
            flags = FLAG_NONE_VALUE
        n = len(send) - HEADER_SIZE
        if n > slot - HEADER_SIZE:
            overflow = bytes(send[HEADER_SIZE:])
            del send[HEADER_SIZE:]
            flags |= FLAG_OVERFLOW
        if len(send) < slot:
            send.extend(bytes(slot - len(send)))
        fingerprint = info.fingerprint if info is not None else _ZEROS
        site_fp = site_fingerprint(code, lineno) if pin_site else _ZEROS
        HEADER.pack_into(send, 0, MAGIC, OPS[op], reduce_op, 0, root, seq, step, fingerprint,
                         array_fp, site_fp, flags, n)
        recorder = self.recorder
        if recorder is not None:
            recorder.start(seq, op, info, code, lineno, step, n)
        self._site = (code, lineno)

        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        recv = self.recv
        try:
            if deadline is None:
                self.transport.allgather_slots(send, recv)
            else:
                self.transport.allgather_slots_until(send, recv, deadline)
        except TransportTimeout:
            self._timed_out(seq, op, info, code, lineno)

        flags_all = recv[FLAGS_OFFSET::slot]
        if self.recv_u32 is not None:
            lengths = self.recv_u32[LENGTH_OFFSET // 4::slot // 4].tolist()
        else:
            lengths = [int.from_bytes(recv[r * slot + LENGTH_OFFSET:r * slot + HEADER_SIZE],
                                      "little") for r in range(self.size)]
        self.policy.observe(max(lengths))
        check = send[:CHECKED]
        if self.size <= _VECTOR_CHECK_RANKS:
            agree = True
            for offset in range(0, len(recv), slot):
                if not recv.startswith(check, offset):
                    agree = False
                    break
        else:
            rows = np.frombuffer(recv, dtype=np.uint8).reshape(self.size, slot)[:, :CHECKED]
            agree = bool((rows == np.frombuffer(check, dtype=np.uint8)).all())
        if not agree or FLAG_LOCAL_ERROR in flags_all:
            self._disagreement(seq, op, info, code, lineno, pin_site, root, reduce_op, step,
                               value if mode == MODE_ARRAY else None, flags_all, deadline)
        return Phase1(seq, flags_all, lengths, overflow, deadline, info, op)

    def _encode(self, info: Optional[SchemaInfo], value: Any, mode: int) -> Optional[str]:
        """Write the payload after the header; returns an error text instead of raising."""
        send = self.send
        try:
            if mode == MODE_MSG:
                ENCODER.encode_into(value, send, HEADER_SIZE)
            elif mode == MODE_ARRAY:
                send[HEADER_SIZE:] = _schema.encode_array(value)
            else:
                del send[HEADER_SIZE:]
        except Exception as exc:  # any failure to encode becomes this rank's flagged error
            return f"{type(exc).__name__}: {exc}"
        if len(send) - HEADER_SIZE > MAX_PAYLOAD:
            return f"ValueError: expected a payload of at most {MAX_PAYLOAD} bytes, " \
                   f"got {len(send) - HEADER_SIZE}"
        return None

    def _validate(self, info: SchemaInfo) -> Optional[str]:
        """Decode our own payload, for ops whose receivers are not every rank (gather)."""
        try:
            info.decoder.decode(self.send[HEADER_SIZE:])
        except msgspec.DecodeError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    # --- the disagreement path (cold) -------------------------------------------------------
    def _disagreement(self, seq, op, info, code, lineno, pin_site, root, reduce_op, step,
                      array, flags_all, deadline) -> None:
        slot, recv = self.slot, self.recv
        failed = [r for r in range(self.size) if flags_all[r] & FLAG_LOCAL_ERROR]
        regions = {bytes(recv[r * slot:r * slot + CHECKED])
                   for r in range(self.size) if r not in failed}
        if len(regions) > 1:
            own_error = None
            if self.rank in failed:
                own_error = self._error_text(self.rank).split("\n", 1)[-1]
            mine = EnvelopeInfo(
                rank=self.rank, seq=seq, op=op, schema=info.name if info else "?",
                fingerprint=info.fingerprint.hex() if info else "", site=format_site(code, lineno),
                site_checked=pin_site, step=None if step == NO_STEP else step,
                root=root if op in ROOTED_OPS else None,
                reduce_op=_reduce_name(reduce_op) if op in REDUCING_OPS else None,
                shape=tuple(array.shape) if isinstance(array, np.ndarray) else None,
                dtype=str(array.dtype) if isinstance(array, (np.ndarray, np.generic)) else None,
                error=own_error)
            envelopes = self.exchange_infos(mine, deadline, seq, op, info, code, lineno)
            kinds = mismatch_kinds(envelopes)
            groups = group_envelopes(envelopes)
            raise DesyncError(desync_message(seq, self.name, kinds, groups), seq=seq,
                              comm=self.name, kinds=kinds, groups=groups)
        if failed:
            first = failed[0]
            error_type, _, detail = self._error_text(first).partition("\n")
            if self.rank in failed:
                raise EncodeError(f"collective #{seq} on {self.name}: rank {self.rank} could not "
                                  f"send its {op}[{info.name if info else '?'}] contribution: "
                                  f"{self._error_text(self.rank).partition(chr(10))[2]}",
                                  seq=seq, comm=self.name)
            others = "" if len(failed) == 1 else f" (and {len(failed) - 1} more)"
            raise PeerError(f"collective #{seq} on {self.name}: rank {first}{others} failed its "
                            f"{op}[{info.name if info else '?'}] contribution: {detail}",
                            seq=seq, comm=self.name, ranks=failed, error_type=error_type,
                            detail=detail)

    def _error_text(self, rank: int) -> str:
        offset = rank * self.slot
        n = int.from_bytes(self.recv[offset + LENGTH_OFFSET:offset + HEADER_SIZE], "little")
        text = bytes(self.recv[offset + HEADER_SIZE:offset + HEADER_SIZE + n])
        kind, _, detail = text.decode(errors="replace").partition(": ")
        return f"{kind}\n{detail}"

    def exchange_infos(self, mine: EnvelopeInfo, deadline, seq, op, info, code,
                       lineno) -> List[EnvelopeInfo]:
        """Allgather every rank's readable envelope (lengths first, so counts agree)."""
        payload = ENCODER.encode(mine)
        try:
            lengths = self.transport.allgatherv(len(payload).to_bytes(4, "little"),
                                                [4] * self.size, deadline)
            counts = [int.from_bytes(lengths[4 * r:4 * r + 4], "little") for r in range(self.size)]
            blob = self.transport.allgatherv(payload, counts, deadline)
        except TransportTimeout:
            self._timed_out(seq, op, info, code, lineno)
        out, offset = [], 0
        for r, count in enumerate(counts):
            try:
                out.append(_ENVELOPE_INFO_DECODER.decode(blob[offset:offset + count]))
            except msgspec.DecodeError as exc:
                raise DecodeError(f"collective #{seq} on {self.name}: the envelope description "
                                  f"from rank {r} does not decode: {exc}", seq=seq,
                                  comm=self.name, source=r, schema="EnvelopeInfo") from exc
            offset += count
        return out

    # --- timeouts ---------------------------------------------------------------------------
    def _timed_out(self, seq, op, info, code, lineno):
        schema = info.name if info else "?"
        site = format_site(code, lineno)
        text = (f"collective #{seq} on {self.name}: {op}[{schema}] at {site} did not complete "
                f"within {self.timeout:g} s")
        missing = None
        if self.hang_reporter is not None:
            try:
                missing, report = self.hang_reporter(self, seq)
                if report:
                    text += "\n" + report
            except Exception as exc:  # a failing report must not hide the timeout itself
                text += f"\n(hang report unavailable: {type(exc).__name__}: {exc})"
        err = CollectiveTimeout(text, seq=seq, comm=self.name, op=op, schema=schema, site=site,
                                timeout=self.timeout or 0.0, missing=missing)
        self.broken = err
        raise err

    def _raise_broken(self, op, info):
        cause = self.broken
        assert cause is not None
        raise CollectiveTimeout(
            f"collective #{self.seq} on {self.name}: {op}[{info.name if info else '?'}] refused: "
            f"the communicator is unusable since collective #{cause.seq} ({cause.op}"
            f"[{cause.schema}] at {cause.site}) timed out", seq=self.seq, comm=self.name, op=op,
            schema=info.name if info else "?", site=cause.site, timeout=cause.timeout,
            missing=cause.missing)

    # --- phase 2 and decoding ------------------------------------------------------------------
    def inline_view(self, rank: int, length: int) -> memoryview:
        offset = rank * self.slot + HEADER_SIZE
        return self.recv_view[offset:offset + length]

    def gather_payloads(self, p1: Phase1, root: Optional[int] = None) -> Optional[List[Any]]:
        """Every rank's payload (all ranks, or only ``root`` when given; None elsewhere)."""
        flags, lengths = p1.flags, p1.lengths
        overflowed = [bool(f & FLAG_OVERFLOW) for f in flags] if any(flags) else None
        extra = None
        if overflowed is not None and any(overflowed):
            counts = [n if o else 0 for n, o in zip(lengths, overflowed)]
            own = p1.overflow or b""
            try:
                if root is None:
                    extra = self.transport.allgatherv(own, counts, p1.deadline)
                else:
                    extra = self.transport.gatherv(own, counts, root, p1.deadline)
            except TransportTimeout:
                self._timed_out_p2(p1)
        if root is not None and self.rank != root:
            return None
        out: List[Any] = []
        offset = 0
        for r in range(self.size):
            if overflowed is not None and overflowed[r]:
                out.append(memoryview(extra)[offset:offset + lengths[r]])  # type: ignore[arg-type]
                offset += lengths[r]
            else:
                out.append(self.inline_view(r, lengths[r]))
        return out

    def bcast_payload(self, p1: Phase1, root: int) -> Any:
        if not p1.flags[root] & FLAG_OVERFLOW:
            return self.inline_view(root, p1.lengths[root])
        buf = bytearray(p1.overflow) if self.rank == root else bytearray(p1.lengths[root])
        try:
            self.transport.bcast_bytes(buf, root, p1.deadline)
        except TransportTimeout:
            self._timed_out_p2(p1)
        return buf

    def allreduce_large(self, p1: Phase1, array: np.ndarray, op: str) -> np.ndarray:
        try:
            return self.transport.allreduce_array(array, op, p1.deadline)
        except TransportTimeout:
            self._timed_out_p2(p1)
            raise  # unreachable: _timed_out raises

    def _timed_out_p2(self, p1: Phase1):
        self._timed_out(p1.seq, p1.op, p1.info, *self._site)

    def decode(self, p1: Phase1, buf: Any, source: int) -> Any:
        info = p1.info
        try:
            if info.kind == KIND_MSGSPEC:
                return info.decoder.decode(buf)
            arr = _schema.decode_array(buf)
            return arr[()] if info.kind == KIND_NUMPY_SCALAR else arr
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            if source == self.rank:
                raise EncodeError(f"collective #{p1.seq} on {self.name}: rank {self.rank} could "
                                  f"not send its {p1.op}[{info.name}] contribution: {exc}",
                                  seq=p1.seq, comm=self.name) from exc
            raise DecodeError(f"collective #{p1.seq} on {self.name}: payload from rank {source} "
                              f"does not decode as {info.name}: {exc}", seq=p1.seq,
                              comm=self.name, source=source, schema=info.name) from exc

    # --- bookkeeping ------------------------------------------------------------------------
    def completed(self) -> None:
        if self.recorder is not None:
            self.recorder.in_flight = False

    def failed(self, exc: BaseException) -> None:
        if self.recorder is not None:
            text = str(exc)
            self.recorder.fail(self.seq - 1, f"{type(exc).__name__}: "
                                             f"{text.splitlines()[0] if text else ''}")
        if isinstance(exc, CollectiveError):
            for hook in list(ERROR_HOOKS):
                try:
                    hook(self, exc)
                except Exception:  # diagnostics never raise into user code
                    pass


def reduce_values(values: List[Any], op: str) -> Any:
    """Combine in rank order, so every rank computes the bitwise same result."""
    first = values[0]
    if isinstance(first, np.ndarray):
        acc = first.copy()
        ufunc = _ARRAY_LIKE_REDUCE[op]
        for v in values[1:]:
            ufunc(acc, v, out=acc)
        return acc
    combine = _SCALAR_REDUCE[op]
    acc = first
    for v in values[1:]:
        acc = combine(acc, v)
    return acc


def _reduce_name(code: int) -> Optional[str]:
    for name, c in REDUCE_OPS.items():
        if c == code:
            return name
    return None


register_internal(__file__)
