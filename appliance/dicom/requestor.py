"""Associations the archive opens: to C-MOVE destinations, and to send a storage
commitment report to a caller whose association is gone. Negotiated with pynetdicom's
PDU codecs (pynetdicom_glue.py), then served by the same message layer (link.py)."""

from __future__ import annotations

import socket

from appliance.dicom import pdu
from appliance.dicom.link import Link
from appliance.dicom.negotiation import ACCEPT, Accepted, Proposed
from appliance.dicom.pynetdicom_glue import decode_associate_ac, encode_associate_rq
from appliance.dicom.wire import Connection, ConnectionClosed, nodelay
from appliance.errors import ApplianceError
from appliance.format.p10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION


class AssociationRefused(ApplianceError):
    """The peer refused the association, or could not be reached."""


class RequestedAssociation(Link):
    """An association we requested; `contexts` holds what the peer accepted."""

    @classmethod
    def open(cls, host: str, port: int, *, calling_ae: str, called_ae: str, contexts: list[Proposed],
             max_pdu: int, timeout: float, roles: dict[str, tuple[bool, bool]] | None = None,
             ) -> "RequestedAssociation":
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise AssociationRefused(f"cannot connect to {called_ae} at {host}:{port}: {exc.strerror or exc}") \
                from None
        nodelay(sock)
        conn = Connection(sock, max_data=max_pdu)
        try:
            conn.send([encode_associate_rq(calling_ae=calling_ae, called_ae=called_ae, contexts=contexts,
                                           max_pdu=max_pdu, implementation_uid=IMPLEMENTATION_CLASS_UID,
                                           implementation_version=IMPLEMENTATION_VERSION, roles=roles)])
            pdu_type, body = conn.read_pdu()
        except (ConnectionClosed, OSError, pdu.ProtocolError) as exc:
            conn.close()
            raise AssociationRefused(f"{called_ae} at {host}:{port} did not answer the association: {exc}") \
                from None
        if pdu_type != pdu.ASSOCIATE_AC:
            conn.close()
            raise AssociationRefused(f"{called_ae} at {host}:{port} refused the association")
        accept = decode_associate_ac(pdu.HEADER.pack(pdu_type, 0, len(body)) + bytes(body))
        by_id = {proposed.context_id: proposed for proposed in contexts}
        accepted = {}
        for context_id, result, syntax in accept.results:
            proposed = by_id.get(context_id)
            if result == ACCEPT and proposed is not None:
                scu, scp = True, False
                if roles and proposed.abstract_syntax in roles:
                    scu, scp = accept.roles.get(proposed.abstract_syntax, (False, False))
                # Our roles mirrored: we are the requestor, "requestor_scu" is ours here.
                accepted[context_id] = Accepted(context_id, proposed.abstract_syntax, syntax, scu, scp)
        return cls(conn, accepted, accept.max_pdu)

    def release(self) -> None:
        try:
            self.conn.send([pdu.release_rq()])
            while True:
                pdu_type, _ = self.conn.read_pdu()
                if pdu_type in (pdu.RELEASE_RP, pdu.ABORT):
                    break
        except (ConnectionClosed, OSError, pdu.ProtocolError):
            pass
        finally:
            self.conn.close()

    def abort(self) -> None:
        try:
            self.conn.send([pdu.abort(pdu.ABORT_USER)])
        except ConnectionClosed:
            pass
        finally:
            self.conn.close()
