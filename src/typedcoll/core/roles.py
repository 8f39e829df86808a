"""Role branches in the steady state: the identity a call learned in a role branch.

``if rank == root: comm.bcast(x)`` / ``else: comm.bcast(None)`` is one collective on two lines
(``core.arms``): the root's call site differs from its receivers', so the headers disagree and
the verdict accepts the call only from the readable envelopes (``verdict.role_branch``), one
more exchange on every call. Engines broadcast their requests this way every iteration, so
once a call passed that check, each rank sends the same proof in its header instead, step by
step:

  1. ``learn``: where the verdict accepted a role branch, each rank keeps, under its call's
     identity (its site and callers, ``core.callers``), two role identities: the digest, level
     by level, of the site every rank named there or of the branch's key and of its own arm as
     seen from the root (its arm when it is not the root, the other arm when it is). The root
     alone in one arm, every receiver in the other: every rank's value is the same.
  2. ``wire_identity``: the next unnamed rooted call at that site sends the role identity
     for its side (is this rank the root now?) in the header's identity field and sets
     FLAG_ROLE. Headers that agree prove what the envelopes proved: the same branch, the
     root alone in its arm, every other field equal. The C path reads the same table.
  3. ``unrole``: headers that differ where any rank set the flag (a root that moved, a peer
     elsewhere) are exchanged once more by every rank (``guesses.unguess_if_differ``), the
     flagged ranks sending their call site again and forgetting the role; the verdict then
     judges the call sites as at a first run. A rank that learned its site as the receivers'
     arm says so (FLAG_RECEIVERS_ARM): where the call sites then agree, every rank is in that
     arm, the root too, and would take what the root passes there (a receivers' placeholder,
     or a stale value) as this call's: ``verdict.root_in_receivers_arm`` raises instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from ..codecs.digest import digest8
from .call import Call
from .plumbing import register_internal
from .mismatch import EnvelopeInfo, levels, split_levels
from .wire import FLAG_RECEIVERS_ARM, FLAG_ROLE, FLAGS_OFFSET, IDENTITY_OFFSET, NO_ROOT

if TYPE_CHECKING:
    from .protocol import Protocol

MAX_ROLES = 4096  # call sites whose role identity a rank remembers
RECEIVERS_ARMS = "receivers_arms"  # p.extensions: identities this rank learned as receivers'


def learn(p: "Protocol", call: Call, infos: Sequence[EnvelopeInfo]) -> None:
    """Step 1: the verdict accepted ``call`` as a role branch from every rank's ``infos``."""
    keys = split_levels(infos, call.root)
    # role_branch held: unnamed, split by a role branch at one level at least
    assert keys is not None and call.name is None
    receivers_arms = p.extensions.setdefault(RECEIVERS_ARMS, set())
    if len(p.roles) >= MAX_ROLES:
        p.roles.clear()
        receivers_arms.clear()
    # Level by level (the site, then its callers: core.callers): a level where every rank
    # names one site is that site; one split by a role branch is the branch and this rank's
    # arm, as seen from the root. The thin wrapper a level went through is part of it, as it is
    # of the site. The root's side only where each split's branch is that level's innermost:
    # the verdict accepts a root whose innermost branch every rank names, and the steady state
    # must accept no more (a root here in an inner branch of its own is another call to its
    # peers).
    mine, roots, innermost = [], [], True
    for (site, column, via, branch), key in zip(levels(infos[p.rank]), keys):
        if key is None:
            mine.append(f"{site}:{column}:{via}")
            roots.append(mine[-1])
            continue
        assert branch is not None
        arm = dict(branch.candidates())[key]
        mine.append(f"{key}:{arm}:{via}")
        roots.append(f"{key}:{arm ^ 1}:{via}")
        innermost = innermost and key == branch.key
    identity = p.identity(call)
    p.roles[identity] = (digest8("role:" + "|".join(mine)),
                         digest8("role:" + "|".join(roots)) if innermost else None)
    if p.rank != call.root:
        receivers_arms.add(identity)
    else:
        receivers_arms.discard(identity)


def wire_identity(p: "Protocol", call: Call, identity: bytes) -> Optional[bytes]:
    """Step 2: the role identity ``call`` sends in place of ``identity``, or None."""
    if call.name is not None or call.root == NO_ROOT:
        return None
    pair = p.roles.get(identity)
    return None if pair is None else pair[p.rank == call.root]


def unrole(p: "Protocol", call: Call) -> None:
    """Step 3: this rank's header names its call site again, and the role is forgotten."""
    send = p.send
    if send[FLAGS_OFFSET] & FLAG_ROLE:
        identity = p.identity(call)
        p.roles.pop(identity, None)
        send[FLAGS_OFFSET] &= ~FLAG_ROLE
        receivers_arms = p.extensions.get(RECEIVERS_ARMS, set())
        if identity in receivers_arms:
            receivers_arms.discard(identity)
            if p.rank != call.root:
                send[FLAGS_OFFSET] |= FLAG_RECEIVERS_ARM
        send[IDENTITY_OFFSET:IDENTITY_OFFSET + 8] = identity


register_internal(__file__)
