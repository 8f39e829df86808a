"""Running a codec on a fresh stack, so that its outcome does not depend on the caller's depth.

msgspec guards its recursion with the interpreter's recursion limit: a value nested 100 deep
encodes and decodes at a shallow stack and raises RecursionError deep in another rank's. Every
payload's nesting is bounded (``codecs.nesting``), so a call that hit the limit only because of
where it was called from is run again here, on a new thread's stack with room for the bound,
and gives the result every other rank gets.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, List

from ..codecs.nesting import MAX_NESTING

# Frames a codec may need for MAX_NESTING levels, with room for user hooks (__post_init__).
_NEEDED = 4 * MAX_NESTING + 200


def on_fresh_stack(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a new thread; its result, or its exception re-raised here."""
    result: List[Any] = []
    error: List[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except BaseException as exc:  # handed to the calling thread as is
            error.append(exc)

    old = sys.getrecursionlimit()
    if old < _NEEDED:  # a rank that lowered its limit still decodes what its peers decode
        sys.setrecursionlimit(_NEEDED)
    try:
        thread = threading.Thread(target=run, name="typedcoll-fresh-stack")
        thread.start()
        thread.join()
    finally:
        if old < _NEEDED:
            sys.setrecursionlimit(old)
    if error:
        raise error[0]
    return result[0]
