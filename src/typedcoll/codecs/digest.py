"""Fingerprints: 8 bytes of blake2b that agree across processes (Python's hash is salted)."""

from __future__ import annotations

import hashlib


def digest8(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()
