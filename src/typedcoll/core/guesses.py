"""Receivers that name no schema: the root's class they took at the same call last time.

A receiver of ``bcast`` or ``scatter`` without ``schema=`` takes the root's class. At a call's
first run (per identity: its ``name=``, else its call site) it finds the class by the path the
root sends, among the modules it imported (``payloads.resolve_wild``); whether it can is this
rank's own affair, so every rank agrees on the outcome in one more exchange
(``Protocol.settle``). Control planes repeat the same call with the same class, so from then on
the receiver guesses, step by step:

  1. ``guess``: it sends the class it remembered as if it had named it (its fingerprint in the
     checked header, compared on every rank like any schema) and sets FLAG_GUESSED. Headers
     that agree make the call's steady state: one exchange, no search, no settle; the C path
     serves it, reading the same table (``Protocol.guesses``).
  2. ``unguess_if_differ``: headers that differ where any rank guessed (the flag is in the
     agreement block every rank reads) may mean only that the root changed class. Every rank,
     whatever its call, exchanges once more; a guesser now names no schema (FLAG_WILD_SCHEMA,
     its schema field left out of the comparison) and forgets its guess, the others send the
     same header. A root that changed class then agrees and is found by name as at a first
     run; a real disagreement shows again, without the flag, and every rank raises it. The
     settle exchange follows the same rule, so ranks never differ in how many exchanges they
     run.
  3. After an agreed guess the class path the root sent is compared with the guess's: the
     fingerprint holds the structure and the qualified name, not the module. Another module's
     class of the same name and structure is taken where this rank has it, else the guessed
     class decodes the same bytes alike; neither raises, so nothing needs settling.
  4. ``remember``: every class found by name is kept for the next call there, in a table
     bounded by ``MAX_GUESSES`` (generated call sites).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..codecs import SchemaInfo
from . import roles
from .call import Call
from .plumbing import register_internal
from .wire import (FLAG_GUESSED, FLAG_ROLE, FLAG_WILD_SCHEMA, FLAGS_OFFSET, SCHEMA_OFFSET, agreed,
                   block_flags)

if TYPE_CHECKING:
    from .protocol import Protocol

MAX_GUESSES = 4096  # call identities whose root's class a rank remembers
_ZEROS = bytes(8)


def guess(p: "Protocol", call: Call, identity: Optional[bytes] = None) -> None:
    """Step 1: ``call`` (a receiver that named no schema) sends the class it remembered here."""
    info = p.guesses.get(identity if identity is not None else p.identity(call))
    if info is not None:
        call.info, call.wild, call.guessed = info, False, True


def remember(p: "Protocol", call: Call, info: SchemaInfo) -> None:
    """Step 4: the root's class this rank found by name, for the next call here to guess."""
    if len(p.guesses) >= MAX_GUESSES:
        p.guesses.clear()
    p.guesses[p.identity(call)] = info


def unguess_if_differ(p: "Protocol", call: Call, shape: int) -> None:
    """Step 2, after each exchange of ``shape``: once more where headers differ and any rank
    guessed, the guessers now naming no schema (their header rewritten in place); so too
    where any rank sent a role identity (``roles.unrole``: its call site again)."""
    if not block_flags(p.block) & (FLAG_GUESSED | FLAG_ROLE) or agreed(p.block):
        return
    roles.unrole(p, call)
    if call.guessed:
        p.guesses.pop(p.identity(call), None)
        call.info, call.wild, call.guessed = None, True, False
        send = p.send
        send[FLAGS_OFFSET] = (send[FLAGS_OFFSET] & ~FLAG_GUESSED) | FLAG_WILD_SCHEMA
        send[SCHEMA_OFFSET:SCHEMA_OFFSET + 8] = _ZEROS
    p.run_exchange(call, shape)


register_internal(__file__)
