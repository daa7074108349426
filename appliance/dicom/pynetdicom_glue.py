"""What the DICOM front takes from pynetdicom: the A-ASSOCIATE PDU codecs.

pynetdicom codes and decodes the association PDUs and their items (presentation
contexts, maximum length, implementation class and version, SCP/SCU role selection,
asynchronous operations window, extended negotiation, user identity) through its
documented `pynetdicom.pdu` and `pynetdicom.pdu_primitives` classes; everything after
the association is ours (pdu.py, dimse.py, association.py). This module is the only
one that touches pynetdicom's classes on the server side, and
tests/dicom/test_pynetdicom_glue.py pins their behaviour: if a new pynetdicom codes a
PDU differently, that test says which and where.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pynetdicom import pdu as pn_pdu
from pynetdicom import pdu_primitives as prim
from pynetdicom.presentation import PresentationContext

from appliance.dicom.negotiation import APPLICATION_CONTEXT, Outcome, Proposed
from appliance.dicom.pdu import ProtocolError


@dataclass
class AssociateRequest:
    calling_ae: str
    called_ae: str
    application_context: str
    contexts: list[Proposed]
    roles: dict[str, tuple[bool | None, bool | None]] = field(default_factory=dict)
    max_pdu: int = 0  # the requestor's maximum length received; 0: no limit
    implementation_uid: str = ""
    implementation_version: str = ""
    user_identity: str = ""  # the user name of a user identity item (types 1 and 2), if any
    protocol_version: int = 1


@dataclass
class AssociateAccept:
    results: list[tuple[int, int, str]]  # (context id, result, transfer syntax)
    roles: dict[str, tuple[bool, bool]]
    max_pdu: int
    implementation_uid: str


def decode_associate_rq(raw: bytes) -> AssociateRequest:
    """A whole A-ASSOCIATE-RQ PDU; ProtocolError when it does not decode."""
    rq = pn_pdu.A_ASSOCIATE_RQ()
    try:
        rq.decode(raw)
        primitive = rq.to_primitive()
        contexts = [Proposed(cx.context_id, str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
                    for cx in primitive.presentation_context_definition_list]
        request = AssociateRequest(str(primitive.calling_ae_title).strip(), str(primitive.called_ae_title).strip(),
                                   str(primitive.application_context_name or ""), contexts,
                                   protocol_version=int(rq.protocol_version))
        for item in primitive.user_information:
            if isinstance(item, prim.MaximumLengthNotification):
                request.max_pdu = int(item.maximum_length_received or 0)
            elif isinstance(item, prim.ImplementationClassUIDNotification):
                request.implementation_uid = str(item.implementation_class_uid or "")
            elif isinstance(item, prim.ImplementationVersionNameNotification):
                request.implementation_version = str(item.implementation_version_name or "")
            elif isinstance(item, prim.SCP_SCU_RoleSelectionNegotiation):
                request.roles[str(item.sop_class_uid)] = (item.scu_role, item.scp_role)
            elif isinstance(item, prim.UserIdentityNegotiation) and item.user_identity_type in (1, 2):
                # A user name (type 1, or 2 with a passcode, which is never kept); a Kerberos ticket,
                # SAML assertion or JWT (types 3-5) is a secret: not kept either.
                request.user_identity = (item.primary_field or b"").decode("utf-8", "replace")[:64]
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - pynetdicom raises many types on malformed input
        raise ProtocolError(f"A-ASSOCIATE-RQ does not decode: {type(exc).__name__}") from None
    if any(cx.context_id is None or not cx.abstract_syntax for cx in contexts):
        raise ProtocolError("A-ASSOCIATE-RQ has a presentation context without an id or abstract syntax")
    return request


def _user_information(max_pdu: int, implementation_uid: str, implementation_version: str,
                      roles: dict[str, tuple[bool, bool]]) -> list:
    items: list = []
    length = prim.MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    items.append(length)
    uid = prim.ImplementationClassUIDNotification()
    uid.implementation_class_uid = implementation_uid
    items.append(uid)
    version = prim.ImplementationVersionNameNotification()
    version.implementation_version_name = implementation_version
    items.append(version)
    for sop_class, (scu, scp) in roles.items():
        role = prim.SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = sop_class
        role.scu_role, role.scp_role = scu, scp
        items.append(role)
    return items


def encode_associate_ac(request: AssociateRequest, outcome: Outcome, *, max_pdu: int, implementation_uid: str,
                        implementation_version: str) -> bytes:
    primitive = prim.A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive._called_ae_title = request.called_ae  # echoed, not tested by the peer (PS3.8 9.3.3)
    primitive._calling_ae_title = request.calling_ae
    for context_id, result, syntax in outcome.results:
        context = PresentationContext()
        context.context_id = context_id
        context.result = result
        context.transfer_syntax = [syntax]
        primitive.presentation_context_definition_results_list.append(context)
    primitive.user_information = _user_information(max_pdu, implementation_uid, implementation_version,
                                                   outcome.roles)
    return pn_pdu.A_ASSOCIATE_AC(primitive).encode()


def encode_associate_rq(*, calling_ae: str, called_ae: str, contexts: list[Proposed], max_pdu: int,
                        implementation_uid: str, implementation_version: str,
                        roles: dict[str, tuple[bool, bool]] | None = None) -> bytes:
    primitive = prim.A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    for proposed in contexts:
        context = PresentationContext()
        context.context_id = proposed.context_id
        context.abstract_syntax = proposed.abstract_syntax
        context.transfer_syntax = list(proposed.transfer_syntaxes)
        primitive.presentation_context_definition_list.append(context)
    primitive.user_information = _user_information(max_pdu, implementation_uid, implementation_version,
                                                   roles or {})
    return pn_pdu.A_ASSOCIATE_RQ(primitive).encode()


def decode_associate_ac(raw: bytes) -> AssociateAccept:
    ac = pn_pdu.A_ASSOCIATE_AC()
    try:
        ac.decode(raw)
        primitive = ac.to_primitive()
        results = [(cx.context_id, cx.result, str(cx.transfer_syntax[0]) if cx.transfer_syntax else "")
                   for cx in primitive.presentation_context_definition_results_list]
        accept = AssociateAccept(results, {}, 0, "")
        for item in primitive.user_information:
            if isinstance(item, prim.MaximumLengthNotification):
                accept.max_pdu = int(item.maximum_length_received or 0)
            elif isinstance(item, prim.ImplementationClassUIDNotification):
                accept.implementation_uid = str(item.implementation_class_uid or "")
            elif isinstance(item, prim.SCP_SCU_RoleSelectionNegotiation):
                accept.roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
    except Exception as exc:  # noqa: BLE001 - as for the request
        raise ProtocolError(f"A-ASSOCIATE-AC does not decode: {type(exc).__name__}") from None
    return accept
