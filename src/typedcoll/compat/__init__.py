"""Drop-in surfaces: mpi4py's object API and torch.distributed's collectives, typed, no pickle.

``typedcoll.compat.mpi4py(comm)`` and ``typedcoll.compat.torch(group)`` take the place of an
mpi4py communicator and of ``torch.distributed``'s object and tensor collectives with no change
to the calls: the same methods and signatures, results equal to theirs for the supported payloads
(builtins, dataclasses, msgspec Structs, NamedTuple, TypedDict, Enum, numpy arrays and scalars),
while every call becomes a typed collective whose identity, order and arguments every rank
checks. Neither mpi4py nor torch is imported until a communicator over them is made.
See docs/migrating.md.
"""

from __future__ import annotations

from typing import Any, Optional

# The submodules are imported first, so that the functions below (the public names, named like
# the libraries they stand in for) are what ``typedcoll.compat.mpi4py`` and ``.torch`` are.
from . import mpi4py as _mpi4py_surface
from . import torch as _torch_surface
from .mpi4py import Comm, Request
from .torch import ObjectCollectives, TorchDistributed
from .values import Refused

__all__ = ["Comm", "ObjectCollectives", "Refused", "Request", "TorchDistributed", "mpi4py",
           "torch"]


def mpi4py(comm: Any, timeout: Optional[float] = None) -> Comm:  # noqa: F811
    """mpi4py's lowercase communicator API over ``comm`` (an mpi4py intracommunicator, or a
    TypedComm). Collective: every rank makes its own at the same point."""
    return _mpi4py_surface.Comm(comm, timeout)


def torch(group: Any = None,  # noqa: F811
          timeout: Optional[float] = None, *,
          tensor_check: Optional[str] = None) -> TorchDistributed:
    """torch.distributed's object and tensor collectives over ``group`` (None: the default
    group; or a TypedComm). Collective: every rank of the group makes its own at the same point.
    ``timeout``: seconds per call; None takes the group's own (``init_process_group(timeout=)``,
    30 minutes by default on gloo), so a rank that never arrives fails its peers' calls as
    torch's would, with a report naming it. ``tensor_check``: how CUDA tensor envelopes are
    verified, as ``TypedComm.from_torch``."""
    return _torch_surface.TorchDistributed(group, timeout, tensor_check=tensor_check)
