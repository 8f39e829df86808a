"""Which ``if`` tests split ranks by role alone: the only branches whose arms may pair.

A role branch pairs the root's call in one arm with the receivers' call in the other
(``core/arms.py``). That is sound only where which arm a rank takes follows from its role:
the root always in one, every other rank always in the other. A test that also reads a value
of the rank's own (``if rank == 0 and has_update:``, ``if pending[rank]:``, ``if
rank_ready:``) lets the root take either arm by a decision its receivers cannot see, and
pairing would hand them the root's other call. So a test qualifies only when it is built of:

- role operands: a name whose last word names a role (``rank``, ``tp_rank``, ``self.rank``,
  ``src``, ``root``, ``is_first_rank``, ``is_leader``), one of the usual names of a rank's
  place in a group (``rank_in_group``, ``rank_id``, ``is_driver_worker``, ``is_main_process``),
  ``r`` or ``me``, or a call of such a name (``dist.get_rank()``, ``comm.Get_rank()``);
- comparisons of role operands with constants, plain names and attributes (``rank == src``,
  ``rank % tp == 0``, ``rank in (0, 1)``), at least one operand a role's;
- ``not``, ``and`` and ``or`` of such tests.

Anything else (a subscript, a call of another function, a flag in an ``and``) makes the ``if``
an ordinary one: its arms' calls are compared as they are, and a rank in the other arm raises.
Nothing here is proved, only read: a rank-local flag named like a role (``is_rank_ready`` is
not, ``leader`` would be) still passes, which the README states.
"""

from __future__ import annotations

import ast
import re
from typing import Optional

from .plumbing import register_internal

# The last word of a name that holds a rank's role.
ROLE_WORDS = frozenset({"rank", "root", "src", "source", "dst", "dest", "leader", "driver",
                        "master", "coordinator", "primary", "main"})
# Whole endings that name a rank's place in its group, where the last word alone does not.
ROLE_ENDINGS = ("rank_in_group", "rank_id", "driver_worker", "main_process", "rank_zero")
ROLE_NAMES = frozenset({"r", "me"})  # a rank's usual one-letter names

_CAMEL = re.compile(r"([a-z0-9])([A-Z])")


def _words(identifier: str) -> str:
    """``getRank`` and ``get_rank`` alike: ``get_rank``."""
    return _CAMEL.sub(r"\1_\2", identifier).lower().strip("_")


def _identifier(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def is_role_operand(node: ast.AST) -> bool:
    """A name, attribute or call whose name holds a rank's role."""
    if isinstance(node, ast.Call):
        return is_role_operand(node.func)
    identifier = _identifier(node)
    if identifier is None:
        return False
    if identifier in ROLE_NAMES:
        return True
    words = _words(identifier)
    return words.rsplit("_", 1)[-1] in ROLE_WORDS or words.endswith(ROLE_ENDINGS)


def _plain_operand(node: ast.AST) -> bool:
    """What a role may be compared with: constants, names, attributes, arithmetic of them."""
    if isinstance(node, (ast.Constant, ast.Name)) or is_role_operand(node):
        return True
    if isinstance(node, ast.Attribute):
        return _plain_operand(node.value)
    if isinstance(node, ast.BinOp):
        return _plain_operand(node.left) and _plain_operand(node.right)
    if isinstance(node, ast.UnaryOp) and not isinstance(node.op, ast.Not):
        return _plain_operand(node.operand)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(_plain_operand(e) for e in node.elts)
    return False


def _has_role(node: ast.AST) -> bool:
    if is_role_operand(node):
        return True
    if isinstance(node, ast.BinOp):
        return _has_role(node.left) or _has_role(node.right)
    if isinstance(node, ast.UnaryOp):
        return _has_role(node.operand)
    return False


def tests_a_role(test: Optional[ast.AST]) -> bool:
    """Whether ``test`` splits ranks by their role alone (the module's docstring)."""
    if test is None:
        return False
    if isinstance(test, ast.BoolOp):
        return all(tests_a_role(v) for v in test.values)
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return tests_a_role(test.operand)
    if isinstance(test, ast.Compare):
        operands = [test.left, *test.comparators]
        return all(_plain_operand(o) for o in operands) and any(_has_role(o) for o in operands)
    return is_role_operand(test)


register_internal(__file__)
