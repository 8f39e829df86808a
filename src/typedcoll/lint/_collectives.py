"""Which calls are collectives: torch.distributed, mpi4py, typedcoll, and configured wrappers.

A method name alone is decisive when no common Python type has a method of that name
(``allgather``, ``all_gather_object``, ``Bcast``); the ambiguous ones (``reduce``, ``gather``,
``send``, ``split``, ``flush``...) count only on a receiver whose name says it is a communicator
(``comm``, ``self.tp_group``, ``get_world_group()``), so ``functools.reduce``, a generator's
``send`` or a file's ``flush`` are not collectives.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

from ._config import Config

TORCH_DISTRIBUTED_OPS = frozenset({
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
    "all_to_all_single", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
    "barrier", "monitored_barrier", "send", "recv", "isend", "irecv", "send_object_list",
    "recv_object_list", "batch_isend_irecv", "new_group", "new_subgroups",
    "all_reduce_coalesced", "all_gather_coalesced", "_all_gather_base", "_reduce_scatter_base",
})

# No builtin or common library type has a method of these names.
DISTINCTIVE_OPS = frozenset({
    "allgather", "allreduce", "alltoall", "bcast", "barrier", "exscan", "sendrecv",
    "all_gather", "all_gather_object", "all_gather_into_tensor", "all_reduce", "all_to_all",
    "all_to_all_single", "broadcast_object_list", "gather_object", "scatter_object_list",
    "reduce_scatter", "reduce_scatter_tensor", "monitored_barrier", "all_gather_tensor",
    "all_reduce_tensor", "broadcast_tensor", "send_object_list", "recv_object_list",
    "isend_object", "irecv_object", "send_object", "recv_object",
})

# Collectives only on a communicator-like receiver.
AMBIGUOUS_OPS = frozenset({
    "gather", "reduce", "scatter", "broadcast", "scan", "send", "recv", "isend", "irecv",
    "split", "dup", "flush",
})

# mpi4py's buffer interface; upper-case method names are otherwise rare in Python.
MPI_BUFFER_OPS = frozenset({
    "Allgather", "Allgatherv", "Allreduce", "Alltoall", "Alltoallv", "Alltoallw", "Barrier",
    "Bcast", "Gather", "Gatherv", "Reduce", "Reduce_scatter", "Reduce_scatter_block", "Scan",
    "Exscan", "Scatter", "Scatterv", "Iallgather", "Iallgatherv", "Iallreduce", "Ialltoall",
    "Ialltoallv", "Ialltoallw", "Ibarrier", "Ibcast", "Igather", "Igatherv", "Ireduce",
    "Ireduce_scatter", "Ireduce_scatter_block", "Iscan", "Iexscan", "Iscatter", "Iscatterv",
    "Split", "Split_type", "Dup", "Send", "Recv", "Isend", "Irecv", "Ssend", "Issend", "Bsend",
    "Rsend", "Sendrecv", "Sendrecv_replace",
})

POINT_TO_POINT_OPS = frozenset({
    "send", "recv", "isend", "irecv", "sendrecv", "Send", "Recv", "Isend", "Irecv", "Ssend",
    "Issend", "Bsend", "Rsend", "Sendrecv", "Sendrecv_replace", "send_object_list",
    "recv_object_list", "isend_object", "irecv_object", "send_object", "recv_object",
    "batch_isend_irecv",
})

# On a communicator-like receiver, a method whose name has one of these words is a collective
# (``self.dist.tp_gather``, ``tp_group.broadcast_object``, ``self.dist.recv_object``).
COLLECTIVE_WORDS = frozenset({
    "allgather", "gather", "allreduce", "reduce", "scatter", "broadcast", "bcast", "barrier",
    "alltoall", "send", "isend", "recv", "irecv", "sendrecv", "split", "dup", "flush", "scan",
})
_POINT_TO_POINT_WORDS = frozenset({"send", "isend", "recv", "irecv", "sendrecv"})

# GPU kernel languages: their ``barrier`` synchronises the threads of one kernel, not processes.
KERNEL_LANGUAGES = ("cutlass.", "cute.", "flydsl.", "triton.", "tilelang.", "numba.cuda.")

_RECEIVES = re.compile(r"recv", re.IGNORECASE)
# Only the root gets a gather's or a reduce's result; each rank its own part of a scatter.
_ROOTED = re.compile(r"gather|reduce|scatter|alltoall|all_to_all|scan", re.IGNORECASE)
_EVERYONE = re.compile(r"all_?gather|all_?reduce|bcast|broadcast|barrier", re.IGNORECASE)

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


@functools.lru_cache(maxsize=4096)
def words(identifier: str) -> Tuple[str, ...]:
    """``tp_group`` -> (tp, group); ``COMM_WORLD`` -> (comm, world); ``getRank`` -> (get, rank)."""
    return tuple(w.lower() for w in _WORD.findall(identifier))


def is_rank_name(identifier: str, config: Config) -> bool:
    """Names this process's identity: the last word is ``rank`` (``tp_rank``, ``get_rank``,
    ``Get_rank``, ``is_first_pp_rank``), or a configured name. ``ranks``, ``num_ranks`` and
    ``per_rank_request_cap`` are not: they describe all ranks, or are computed per rank alike."""
    found = words(identifier)
    return bool(found) and found[-1] == "rank" or config.matches("rank_names", identifier)


def dotted_name(node: ast.expr) -> Optional[str]:
    """``a.b.c`` for a chain of names and attributes (a call in it written as ``f()``)."""
    parts: List[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Name):
            parts.append(node.id)
            return ".".join(reversed(parts))
        elif isinstance(node, ast.Call):
            inner = dotted_name(node.func)
            if inner is None:
                return None
            parts.append(inner + "()")
            return ".".join(reversed(parts))
        else:
            return None


def resolve_alias(dotted: str, imports: Dict[str, str]) -> str:
    """Replace the first component by what it was imported as (``dist.x`` ->
    ``torch.distributed.x``)."""
    head, _, rest = dotted.partition(".")
    target = imports.get(head)
    if target is None:
        return dotted
    return f"{target}.{rest}" if rest else target


def last_identifier(node: ast.expr) -> Optional[str]:
    """The name a receiver goes by: ``self.tp_group`` -> tp_group, ``get_world_group()`` -> its
    callee's (the last of :func:`chain_identifiers`)."""
    names = chain_identifiers(node)
    return names[-1] if names else None


def chain_identifiers(node: ast.expr) -> List[str]:
    """Every name along a receiver's chain: ``cp_group.cpu_group`` -> cp_group, cpu_group;
    ``get_pp_group().device_group`` -> get_pp_group, device_group (a call's arguments left out)."""
    out: List[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            out.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Name):
            out.append(node.id)
            return out[::-1]
        else:
            return out[::-1]


@dataclass(frozen=True)
class CollectiveOp:
    """A call recognised as a collective.

    ``result`` says what the call returns: ``symmetric`` (every rank the same), ``role`` (differs
    by rank identity: only the root gets a gather's list) or ``local`` (a point-to-point receive).
    ``in_place`` ops also leave their buffer arguments holding that result.
    """

    display: str
    op: str
    point_to_point: bool
    result: str
    in_place: bool
    by_wrapper: bool = False  # recognised only through the configured wrapper names
    # a method named like a collective on a receiver not named like a communicator
    # (``info.all_gather()``): analysed methods of that name that issue collectives run instead
    by_method_name: bool = False
    module_function: bool = False  # torch.distributed's own: the group argument names the group


# Where an in-place op leaves its result: the positional arguments that receive it (the others
# are sent and keep what they held, so a send buffer of rank-local data stays rank-local). An op
# not listed receives into its first argument (``all_reduce(t)``, ``all_gather(out, t)``,
# ``Bcast(buf)``, ``Recv(buf)``).
_RECEIVE_NOTHING = frozenset({
    "send", "isend", "send_object_list", "batch_isend_irecv", "barrier", "monitored_barrier",
    "new_group", "new_subgroups", "Send", "Isend", "Ssend", "Issend", "Bsend", "Rsend",
    "Barrier", "Ibarrier", "Split", "Split_type", "Dup",
})
_RECEIVE_SECOND = frozenset({  # (input, output, ...): torch's gathers, MPI's (sendbuf, recvbuf)
    "gather", "gather_object", "Allgather", "Allgatherv", "Allreduce", "Alltoall", "Alltoallv",
    "Alltoallw", "Gather", "Gatherv", "Reduce", "Reduce_scatter", "Reduce_scatter_block",
    "Scan", "Exscan", "Scatter", "Scatterv", "Iallgather", "Iallgatherv", "Iallreduce",
    "Ialltoall", "Ialltoallv", "Ialltoallw", "Igather", "Igatherv", "Ireduce",
    "Ireduce_scatter", "Ireduce_scatter_block", "Iscan", "Iexscan", "Iscatter", "Iscatterv",
})
# Keyword arguments that receive an in-place op's result.
OUTPUT_KEYWORDS = frozenset({
    "recvbuf", "output", "output_tensor", "output_tensor_list", "output_split_sizes_tensor",
    "tensor_list", "gather_list", "object_gather_list", "object_list",
    "scatter_object_output_list",
})


def received_into(op: str) -> Tuple[int, ...]:
    """The positional arguments an in-place op ``op`` leaves its result in."""
    if op in _RECEIVE_NOTHING:
        return ()
    if op == "Sendrecv":
        return (3,)  # (sendbuf, dest, sendtag, recvbuf, ...)
    return (1,) if op in _RECEIVE_SECOND else (0,)


def _result_kind(op: str) -> str:
    if _RECEIVES.search(op):
        return "local"
    if _EVERYONE.search(op):
        return "symmetric"
    if _ROOTED.search(op):
        return "role"
    return "symmetric"


def _splits_text(call: ast.Call) -> bool:
    """``name.split(":")``, ``line.split(sep=",")``: str.split, whose separator a communicator's
    split (a color and a key, both ints) never takes."""
    first = call.args[0] if call.args else None
    return (isinstance(first, ast.Constant) and isinstance(first.value, (str, bytes))) or \
        any(k.arg in ("sep", "maxsplit") for k in call.keywords)


class CollectiveTable:
    """Classifies call expressions under one :class:`Config`; caches the receiver tests."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._communicator: Dict[str, bool] = {}
        self._words: FrozenSet[str] = frozenset(config.communicator_words)

    def is_communicator_name(self, name: str) -> bool:
        hit = self._communicator.get(name)
        if hit is None:
            hit = any(w in self._words for w in words(name))
            self._communicator[name] = hit
        return hit

    def classify(self, call: ast.Call, imports: Dict[str, str]) -> Optional[CollectiveOp]:
        func = call.func
        if isinstance(func, ast.Name):
            op = func.id
            receiver: Optional[ast.expr] = None
        elif isinstance(func, ast.Attribute):
            op = func.attr
            receiver = func.value
        else:
            return None
        display = dotted_name(func) or op
        resolved = resolve_alias(display, imports)
        config = self.config
        if config.matches("not_collectives", op) or config.matches("not_collectives", resolved):
            return None
        if resolved.startswith(KERNEL_LANGUAGES) or (op == "split" and _splits_text(call)):
            return None
        torch_op = resolved.startswith("torch.distributed.") and op in TORCH_DISTRIBUTED_OPS
        in_place = torch_op or op in MPI_BUFFER_OPS
        known = torch_op or op in MPI_BUFFER_OPS or op in DISTINCTIVE_OPS
        wrapper = config.matches("wrappers", op) or config.matches("wrappers", resolved)
        if not (known or wrapper):
            if receiver is None:
                return None
            op_words = set(words(op))
            if op not in AMBIGUOUS_OPS and not op_words & COLLECTIVE_WORDS:
                return None
            name = last_identifier(receiver)
            if name is None or not self.is_communicator_name(name):
                return None
        point_to_point = op in POINT_TO_POINT_OPS or bool(set(words(op)) & _POINT_TO_POINT_WORDS)
        by_wrapper = wrapper and not known and not (
            receiver is not None and (op in AMBIGUOUS_OPS or set(words(op)) & COLLECTIVE_WORDS)
            and self.is_communicator_name(last_identifier(receiver) or ""))
        by_method_name = receiver is not None and not in_place and not by_wrapper and not (
            self.is_communicator_name(last_identifier(receiver) or ""))
        return CollectiveOp(display, op, point_to_point, _result_kind(op), in_place, by_wrapper,
                            by_method_name, torch_op and receiver is not None)


# Keyword arguments that name the communicator a collective runs on.
GROUP_KEYWORDS = ("group", "comm", "process_group", "pg", "dist_group")


def communicator_text(call: ast.Call, op: CollectiveOp) -> Optional[str]:
    """The communicator a collective call writes out, as source text: its group keyword, else
    its receiver (``self.tp_comm.allgather``); None when the call leaves it implicit
    (``dist.all_reduce(t)``, a plain function without a group keyword)."""
    for keyword in call.keywords:
        if keyword.arg in GROUP_KEYWORDS:
            return ast.unparse(keyword.value)
    if not isinstance(call.func, ast.Attribute) or op.module_function:
        return None
    receiver = call.func.value
    # The object itself, however the method reaches it: a communicator class's own methods.
    if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
        return "self"
    if (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name)
            and receiver.func.id == "super"):
        return "self"
    return ast.unparse(receiver)
