"""Step 2 of the protocol (``core.protocol``): this rank's contribution becomes its payload, or
the error text that stands for it. A failure to encode never raises here: a rank never raises
before the exchange, where its peers would wait for it; not even an interrupt that a schema's
hook raises as the value is checked (kept on the call, raised once the peers know of it). A
base of ``Protocol``.
"""

from __future__ import annotations

from typing import Optional, Tuple

from ..codecs import ENCODER, KIND_MSGSPEC, encode_array, nesting_ok
from ..codecs.array import encode_array_split
from ..codecs.nesting import MAX_NESTING
from . import verdict
from .call import MODE_ARRAY, MODE_BYTES, Call
from .fresh import on_fresh_stack
from .plumbing import register_internal
from .wire import GATHER, HEADER_SIZE, MAX_PAYLOAD

_encode = ENCODER.encode


class EncodeStep:
    """``Protocol.encode``: step 2, this rank's payload for a call."""

    __slots__ = ()
    slot: int  # the communicator's slot size (``Protocol``)

    def encode(self, call: Call) -> Tuple[bytes, Optional[str]]:
        """(payload, None) or (b"", error text): a failure to encode never raises here."""
        value = call.value
        if call.mode == MODE_BYTES:  # packed parts, encoded and checked by the op already
            return value, None
        try:
            if call.mode == MODE_ARRAY:
                if call.shape == GATHER and MAX_PAYLOAD >= value.nbytes > self.slot - HEADER_SIZE:
                    # Past the slot anyway: its dtype and shape ride inline and phase 2 sends
                    # the array's own memory, received into one buffer and decoded as views.
                    call.split = encode_array_split(value)
                    return call.split[0], None
                payload = encode_array(value)
            else:
                try:
                    payload = _encode(value)
                except RecursionError:  # deep in this rank's stack, not in the value
                    payload = on_fresh_stack(_encode, value)
                if (len(payload) > MAX_NESTING and call.info is not None
                        and call.info.needs_nesting_scan and not nesting_ok(payload)):
                    return b"", (f"ValueError: expected a value nested at most {MAX_NESTING} "
                                 f"deep, got one nested deeper")
                info = call.info
                if call.validate and info is not None and info.kind == KIND_MSGSPEC:
                    # Only a root decodes this payload: check it here, so a bad value fails on
                    # every rank in this call, not only on the root.
                    verdict.decode_any(info, payload)
        except Exception as exc:  # any failure to encode becomes this rank's flagged error
            return b"", verdict.error_text(exc, call)
        except BaseException as exc:  # an interrupt in a hook: raised after the exchange
            call.interrupt = exc
            return b"", f"{type(exc).__name__}: {exc}"
        if call.op in PATH_OPS and call.info is not None:
            payload = call.info.path_prefix + payload
        if len(payload) > MAX_PAYLOAD:
            return b"", (f"ValueError: expected a payload of at most {MAX_PAYLOAD} bytes, "
                         f"got {len(payload)}")
        return payload, None


# Ops whose receivers may name no schema: the root's payload starts with its class's path.
PATH_OPS = frozenset({"bcast", "scatter"})


register_internal(__file__)
