"""Presentation context negotiation (PS3.7 D.3, PS3.8 9.3.3.2): what the archive
accepts, in which transfer syntax, in which role. Pure: the same tables feed the
acceptor, the requestor and the conformance statement.

Transfer syntax choice, per context:
- the requestor sends us instances (its SCU role, our SCP role: C-STORE to the
  archive): the uncompressed syntaxes first in our order, then the requestor's order:
  an instance is stored as it arrives, whatever the syntax;
- the requestor takes instances from us (its SCP role, negotiated by SCP/SCU role
  selection: C-GET sub-operations): the requestor's order, the first we can send;
- anything else (verification, query/retrieve, storage commitment): uncompressed, our order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE)
ACCEPT, USER_REJECTION, NO_REASON, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 1, 2, 3, 4
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


@dataclass(frozen=True)
class Proposed:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class Accepted:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    requestor_scu: bool = True  # the requestor sends requests on it (we are the SCP)
    requestor_scp: bool = False  # the requestor takes requests from us (C-GET sub-operations)


@dataclass(frozen=True)
class Support:
    """What the archive supports for one abstract syntax: `syntaxes` it accepts (in its
    order of preference), and whether a requestor may be its SCP (`offers_scu`: we can
    send it requests: storage, for C-GET)."""

    syntaxes: tuple[str, ...]
    offers_scu: bool = False


@dataclass
class Outcome:
    results: list[tuple[int, int, str]] = field(default_factory=list)  # (context id, result, transfer syntax)
    accepted: dict[int, Accepted] = field(default_factory=dict)
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # replies: SOP class -> (scu, scp)


def choose(proposed: tuple[str, ...], supported: tuple[str, ...], requestor_order: bool) -> str | None:
    """The transfer syntax to accept from those proposed, or None."""
    offered = [ts for ts in proposed if ts in supported]
    if not offered:
        return None
    if requestor_order:
        return offered[0]
    ours = [ts for ts in supported if ts in UNCOMPRESSED and ts in offered]
    return ours[0] if ours else offered[0]


def negotiate(proposed: list[Proposed], roles: dict[str, tuple[bool | None, bool | None]],
              support: dict[str, Support], *, any_storage: Support | None = None) -> Outcome:
    """Negotiate as the acceptor. `roles`: the requestor's SCP/SCU role selection items
    (SOP class -> (scu, scp), None where it left one out); `support`: per abstract syntax;
    `any_storage`: what an abstract syntax we do not know gets (None: refused)."""
    outcome = Outcome()
    for context in proposed:
        supported = support.get(context.abstract_syntax, any_storage)
        if supported is None:
            outcome.results.append((context.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, context.transfer_syntaxes[0]
                                    if context.transfer_syntaxes else IMPLICIT_LE))
            continue
        scu, scp = True, False
        if context.abstract_syntax in roles:
            proposed_scu, proposed_scp = roles[context.abstract_syntax]
            scu = bool(proposed_scu) if proposed_scu is not None else False
            scp = bool(proposed_scp) and supported.offers_scu
            outcome.roles[context.abstract_syntax] = (scu, scp)
        syntax = choose(context.transfer_syntaxes, supported.syntaxes, requestor_order=scp)
        if syntax is None:
            outcome.results.append((context.context_id, TRANSFER_SYNTAXES_NOT_SUPPORTED,
                                    context.transfer_syntaxes[0] if context.transfer_syntaxes else IMPLICIT_LE))
            continue
        if not (scu or scp):
            outcome.results.append((context.context_id, USER_REJECTION, syntax))
            continue
        outcome.results.append((context.context_id, ACCEPT, syntax))
        outcome.accepted[context.context_id] = Accepted(context.context_id, context.abstract_syntax, syntax, scu, scp)
    return outcome
