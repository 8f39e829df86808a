"""Whether a class instance comes back as it was sent: what the drop-ins check before sending.

The drop-ins stand in for pickle, which rebuilds an object as it was. msgspec rebuilds a class
instance from its declared fields, by their declared types, and that differs where:

- a field holds a subclass of its declared class (an engine's ``kv_connector_metadata:
  KVConnectorMetadata`` holding a connector's own subclass): it comes back as the declared
  class, the subclass's fields gone;
- ``__post_init__`` rewrites fields: it runs again on every receiver (and on no pickle
  receiver), overwriting what was sent;
- an instance carries attributes outside its declared fields (set after construction).

Each would hand the receivers a value the sender never had, silently. So the sender decodes
each instance as its peers will and compares: records must come back of the same class with
every field the same and no attribute lost; other values must compare equal (NaN equal to NaN,
a Decimal NaN too, arrays by dtype, shape and contents, an aware datetime in its own offset:
msgspec carries it in UTC), of any type that compares equal (an ``IntEnum`` in an
``int`` field, a tuple in a ``list`` field come back equal enough to pass). ``why_not`` says
where they first differ, or None.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
from typing import Any, Optional

import msgspec
import numpy as np

from ..core.plumbing import register_internal

_MAX_DEPTH = 64  # beyond the drop-ins' own nesting limit: never reached on a value they send


def why_not(sent: Any, back: Any, path: str = "$", depth: int = 0) -> Optional[str]:
    """None where ``back`` is ``sent`` as a receiver rebuilds it, else where and how not."""
    if sent is back or depth > _MAX_DEPTH:
        return None
    kind = type(sent)
    if isinstance(sent, msgspec.Struct) or dataclasses.is_dataclass(sent):
        if type(back) is not kind:
            record = isinstance(back, msgspec.Struct) or dataclasses.is_dataclass(back)
            reason = ("the field's declared class: the subclass's fields are lost" if record else
                      "the field's declared type does not rebuild it: declare the field with its "
                      "class")
            return (f"{path} is a {kind.__name__} and would arrive as a "
                    f"{type(back).__name__} ({reason})")
        return _record(sent, back, path, depth)
    if isinstance(sent, decimal.Decimal) and isinstance(back, decimal.Decimal):
        # NaN is no more equal to itself here than in a float; compare_total tells every
        # Decimal apart (NaN from sNaN, 1.0 from 1.00) and matches it to itself
        return None if sent.compare_total(back) == 0 else \
            f"{path} {sent!r:.80} would arrive as {back!r:.80}"
    if isinstance(sent, datetime.datetime) and isinstance(back, datetime.datetime) and \
            sent == back and sent.utcoffset() != back.utcoffset():
        return (f"{path} {sent.isoformat()} would arrive as {back.isoformat()} (the same "
                f"instant: an aware datetime travels in UTC; send it in UTC, or its isoformat())")
    if kind is float or isinstance(sent, np.floating):
        return None if sent == back or (sent != sent and back != back) else \
            f"{path} {sent!r:.80} would arrive as {back!r:.80}"
    if isinstance(sent, np.ndarray):
        same = isinstance(back, np.ndarray) and sent.dtype == back.dtype \
            and sent.shape == back.shape \
            and bool(np.array_equal(sent, back, equal_nan=sent.dtype.kind in "fc"))
        return None if same else f"{path} (an array) would arrive different"
    if isinstance(sent, (list, tuple)) and isinstance(back, (list, tuple)):
        if len(sent) != len(back):
            return f"{path} would arrive with {len(back)} items instead of {len(sent)}"
        for i, (a, b) in enumerate(zip(sent, back)):
            why = why_not(a, b, f"{path}[{i}]", depth + 1)
            if why is not None:
                return why
        return None
    if isinstance(sent, dict) and isinstance(back, dict):
        if sent.keys() != back.keys():
            return f"{path} would arrive with other keys"
        for key, a in sent.items():
            why = why_not(a, back[key], f"{path}[{key!r:.40}]", depth + 1)
            if why is not None:
                return why
        return None
    try:
        if bool(sent == back):
            return None
    except Exception:  # a type whose == does not give a truth value
        pass
    return f"{path} {sent!r:.80} would arrive as {back!r:.80}"


def _record(sent: Any, back: Any, path: str, depth: int) -> Optional[str]:
    if isinstance(sent, msgspec.Struct):
        names = sent.__struct_fields__
    else:
        names = tuple(f.name for f in dataclasses.fields(sent))
    for name in names:
        why = why_not(getattr(sent, name, None), getattr(back, name, None), f"{path}.{name}",
                      depth + 1)
        if why is not None:
            if getattr(type(sent), "__post_init__", None) is not None:
                why += f" ({type(sent).__name__}.__post_init__ runs again on every receiver)"
            return why
    extra = set(getattr(sent, "__dict__", ())) - set(getattr(back, "__dict__", ()))
    if extra:
        return (f"{path} carries attributes outside its declared fields "
                f"({', '.join(sorted(extra)[:5])}), which would not arrive")
    return None


register_internal(__file__)
