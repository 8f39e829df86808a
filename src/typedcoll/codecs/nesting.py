"""How deep a msgpack payload nests, decided from its bytes alone.

msgspec guards its recursion with the interpreter's recursion limit, so whether a deeply nested
payload decodes depends on how deep in its own stack the decoding rank is: one rank raises,
its peer returns. Every rank therefore checks the nesting of every payload it decodes against
``MAX_NESTING`` first, from the bytes alone, and reaches the same verdict. This is the Python
twin of the C scanner in ``core/_speedups.c``; the tests hold them to the same answers, and
where the extension is loaded the C scanner answers.

A payload of n bytes nests at most n deep (every container header is at least one byte), so
payloads shorter than ``MAX_NESTING`` need no scan at all.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Union

MAX_NESTING = 128

# Bytes that may open a container: fixmap, fixarray, array16/32, map16/32. Counting them bounds
# the depth from above at C speed; only payloads with more of them than the limit are parsed.
_CONTAINER = bytes(1 if (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF) else 0 for b in range(256))

# Bytes that follow a type byte before the next object, for fixed-size types.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
# Types followed by a big-endian length of this many bytes, then that many bytes (+1 for ext).
_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
          0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}


# The C twin (``core/fast.py`` installs it when the extension is loaded): the same answers,
# without a Python loop per msgpack object, which a long list of ints needs below.
_native: Optional[Callable[[Any, int], bool]] = None


def use_native(scanner: Optional[Callable[[Any, int], bool]]) -> None:
    """Answer :func:`nesting_ok` with ``scanner(buf, limit)`` (None: this module's scan)."""
    global _native
    _native = scanner


def nesting_ok(buf: Union[bytes, bytearray, memoryview], limit: int = MAX_NESTING) -> bool:
    """False when the first msgpack object in ``buf`` nests deeper than ``limit``.

    Malformed bytes count as fine here: the decoder rejects them itself, at a depth the scan has
    already proved within the limit.
    """
    if len(buf) <= limit:
        return True
    if _native is not None and 0 <= limit <= MAX_NESTING:
        return _native(buf, limit)
    return python_nesting_ok(buf, limit)


def python_nesting_ok(buf: Union[bytes, bytearray, memoryview], limit: int = MAX_NESTING) -> bool:
    """:func:`nesting_ok` in Python alone (the C twin is held to its answers)."""
    if len(buf) <= limit:
        return True
    data = bytes(buf)
    if data.translate(_CONTAINER).count(1) <= limit:
        return True
    return _depth_within(data, limit)


def _depth_within(data: bytes, limit: int) -> bool:
    # remaining[i]: objects still to read in the i-th open container (maps count keys and values)
    remaining: List[int] = []
    pos, end = 0, len(data)
    while pos < end:
        b = data[pos]
        pos += 1
        items = -1
        if b <= 0x7F or b >= 0xE0 or 0xA0 <= b <= 0xBF:
            if 0xA0 <= b <= 0xBF:
                pos += b & 0x1F
        elif b <= 0x8F:
            items = 2 * (b & 0x0F)
        elif b <= 0x9F:
            items = b & 0x0F
        elif b in _FIXED:
            pos += _FIXED[b]
        elif b in _SIZED:
            width, extra = _SIZED[b]
            if pos + width > end:
                return True
            pos += width + extra + int.from_bytes(data[pos:pos + width], "big")
        elif b in (0xDC, 0xDD, 0xDE, 0xDF):
            width = 2 if b in (0xDC, 0xDE) else 4
            if pos + width > end:
                return True
            items = int.from_bytes(data[pos:pos + width], "big") * (2 if b >= 0xDE else 1)
            pos += width
        else:  # 0xC1, never used: malformed
            return True
        if items > 0:
            if len(remaining) >= limit:
                return False
            remaining.append(items)
            continue
        # a complete object (a scalar, or an empty container): close every container it fills
        while remaining:
            remaining[-1] -= 1
            if remaining[-1]:
                break
            remaining.pop()
        if not remaining:
            return True
    return True
