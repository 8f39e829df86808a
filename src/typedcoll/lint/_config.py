"""What the checker treats as a collective, a communicator, a rank identity and a rank-local value.

Every list holds names or ``fnmatch`` globs, matched case-sensitively against one identifier (the
called function's or method's own name, an attribute's, a variable's) unless it contains a dot,
in which case it is matched against the call's dotted name after import aliases are resolved
(``time.monotonic``, ``os.environ.get``). A configuration file extends the defaults; it never
replaces them, except through ``not_collectives``, which wins over every other rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Dict, Tuple

# Engine wrappers whose definitions usually live in files other than the loop being checked.
DEFAULT_WRAPPERS = (
    "*_allgather", "*_all_gather", "*_allreduce", "*_all_reduce", "*_bcast",
    "broadcast_pyobj", "broadcast_object",
)

# Receivers whose ambiguous methods (``gather``, ``reduce``, ``send``, ``flush``...) are
# collectives: a name whose snake_case or CamelCase words include one of these (``tp_group``,
# ``COMM_WORLD``, ``self.dist``, ``get_world_group()``).
DEFAULT_COMMUNICATOR_WORDS = (
    "comm", "communicator", "group", "pg", "dist", "distributed", "mpi", "world", "flush",
)

# Besides names ending in the word ``rank``, these name this process's identity.
DEFAULT_RANK_NAMES = ("*rank_in_group", "*rank_id", "is_driver_worker")

# Configuration reaches every rank the same: names like these are symmetric wherever they occur
# (a parameter, an attribute, a receiver whose methods are then taken as pure).
DEFAULT_SYMMETRIC_NAMES = (
    "*config*", "*Config*", "cfg", "*_cfg", "mapping", "args", "*_args", "*world_size*",
    "*parallel_size*", "tp_size", "pp_size", "dp_size", "ep_size", "cp_size", "self", "cls",
)

DEFAULT_CLOCK_CALLS = (
    "time.time", "time.time_ns", "time.monotonic", "time.monotonic_ns", "time.perf_counter",
    "time.perf_counter_ns", "time.process_time", "time.thread_time", "datetime.datetime.now",
    "datetime.datetime.utcnow", "datetime.datetime.today", "datetime.date.today", "*.Wtime",
    "*clock*", "now", "*_now",
)

DEFAULT_ENVIRONMENT_CALLS = ("os.getenv", "os.environ.get", "os.environ", "os.getenvb")

# Results that differ by process, by timing or by what this rank happens to hold.
DEFAULT_RANK_LOCAL_CALLS = (
    "os.getpid", "socket.gethostname", "platform.node", "threading.get_ident", "random.*",
    "uuid.*", "secrets.*", "numpy.random.*", "torch.cuda.mem_get_info", "torch.cuda.memory_*",
    "torch.cuda.max_memory_*", "psutil.*", "input",
    # queue and completion probes on any receiver
    "qsize", "empty", "full", "get_nowait", "iprobe", "Iprobe", "Improbe", "poll", "is_set",
    "done", "is_alive", "query", "Test", "Testall", "Testany",
)

# Methods that set an object up once, on every rank, before it serves: like ``__init__``, what
# they store is configuration, and so are their parameters.
DEFAULT_INIT_METHODS = ("__init__", "__post_init__", "__new__", "init_*", "_init_*",
                        "initialize*", "_initialize*", "setup*", "_setup*", "set_up*")

# Methods that end an object's service, run on every rank as set-up is: what they store from
# symmetric values (the None that vLLM's ``destroy()`` leaves in ``self.pynccl_comm``) is the same
# on every rank, and so is the state it replaces.
DEFAULT_TEARDOWN_METHODS = ("destroy*", "_destroy*", "cleanup*", "_cleanup*", "close", "_close",
                            "shutdown*", "_shutdown*", "teardown*", "tear_down*", "__del__",
                            "__exit__", "__aexit__")

# Words naming a parallel dimension: ``tp_group``, ``pp_rank``, ``self.dist.tp_allgather``. A
# branch on one dimension's rank around a collective of another dimension's group is taken alike by
# every member of that group.
DEFAULT_PARALLEL_DIMENSIONS = ("tp", "pp", "dp", "cp", "ep", "sp")

# rank_safe_functions (none by default): analysed functions, by name or qualified name
# (``PyExecutor._handle_errors``), that may be called under any rank-local condition because they
# buffer, or agree with their peers, before any collective; calls to them are not followed, but the
# gates inside them are still checked.

# Constructors whose instances are filled by other threads or processes: an attribute holding one
# is rank-local even when only ``__init__`` assigns it.
DEFAULT_QUEUE_TYPES = ("*Queue", "deque", "*Pipe")


class ConfigError(Exception):
    """A configuration file could not be read or holds an unknown key or a wrong type.

    The caller's fault (the file); retrying with the same file gives the same error.
    """


@dataclass(frozen=True)
class Config:
    """The tables the checker consults; :func:`load_config` builds one from a file."""

    wrappers: Tuple[str, ...] = DEFAULT_WRAPPERS
    communicator_words: Tuple[str, ...] = DEFAULT_COMMUNICATOR_WORDS
    not_collectives: Tuple[str, ...] = ()
    rank_names: Tuple[str, ...] = DEFAULT_RANK_NAMES
    symmetric_names: Tuple[str, ...] = DEFAULT_SYMMETRIC_NAMES
    clock_calls: Tuple[str, ...] = DEFAULT_CLOCK_CALLS
    environment_calls: Tuple[str, ...] = DEFAULT_ENVIRONMENT_CALLS
    rank_local_calls: Tuple[str, ...] = DEFAULT_RANK_LOCAL_CALLS
    queue_types: Tuple[str, ...] = DEFAULT_QUEUE_TYPES
    init_methods: Tuple[str, ...] = DEFAULT_INIT_METHODS
    teardown_methods: Tuple[str, ...] = DEFAULT_TEARDOWN_METHODS
    parallel_dimensions: Tuple[str, ...] = DEFAULT_PARALLEL_DIMENSIONS
    rank_safe_functions: Tuple[str, ...] = ()
    environment_is_rank_local: bool = True
    resolve_methods_by_name: bool = True
    _cache: Dict[Tuple[str, str], bool] = field(default_factory=dict, compare=False, repr=False)

    def matches(self, table: str, name: str) -> bool:
        """Whether ``name`` (an identifier or a dotted call name) matches an entry of ``table``."""
        key = (table, name)
        hit = self._cache.get(key)
        if hit is None:
            patterns: Tuple[str, ...] = getattr(self, table)
            dotted = "." in name
            hit = any(fnmatchcase(name, p) for p in patterns if ("." in p) == dotted)
            self._cache[key] = hit
        return hit


_LIST_KEYS = {f.name for f in fields(Config) if f.name not in (
    "environment_is_rank_local", "resolve_methods_by_name", "_cache")}
_BOOL_KEYS = {"environment_is_rank_local", "resolve_methods_by_name"}


def config_from_mapping(data: Dict[str, Any], origin: str = "configuration") -> Config:
    """A :class:`Config` whose lists extend the defaults with ``data``'s (same keys as the fields).

    ``not_collectives`` starts empty; the booleans replace the defaults.
    """
    table = data.get("tool", {}).get("typedcoll", {}).get("lint") if "tool" in data else data
    if not isinstance(table, dict):
        raise ConfigError(f"{origin}: no [tool.typedcoll.lint] table")
    base = Config()
    changes: Dict[str, Any] = {}
    for key, value in table.items():
        if key in _BOOL_KEYS:
            if not isinstance(value, bool):
                raise ConfigError(f"{origin}: {key} must be true or false, got {value!r}")
            changes[key] = value
        elif key in _LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{origin}: {key} must be a list of strings, got {value!r}")
            changes[key] = tuple(getattr(base, key)) + tuple(value)
        else:
            known = ", ".join(sorted(_LIST_KEYS | _BOOL_KEYS))
            raise ConfigError(f"{origin}: unknown key {key!r} (known: {known})")
    return replace(base, **changes)


def load_config(path: str) -> Config:
    """Read a TOML file (Python 3.11+) or a JSON file (any version) into a :class:`Config`."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror or exc}") from exc
    if file.suffix == ".json":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    else:
        import tomllib
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings")
    return config_from_mapping(data, path)
