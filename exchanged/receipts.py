"""What people and nodes sign about a document or a role, built and checked in one place.

Each is canonical JSON inside an attached CMS SignedData, so it travels alone and
`openssl cms -verify -CAfile ca.pem -purpose any` checks it without our code:

- the **delivery receipt**: the recipient's node, on its token, says it stored the document
  (`delivery`);
- the **signed-for receipt**: the recipient unit's designated receiver, on their personal
  token, signs for the document (`signed_for`, `check_signed_for`); it travels back to the
  sender;
- the **return notice**: the recipient unit's registrar or receiver sends a document back with
  the reason (N4: the wrong form is the sender's fault) (`return_notice`, `check_return`); it
  travels back like a signed-for receipt;
- the **relay hop record**: a relay's node, on its token, says it took a document from the
  unit before it on the way (A12) (`relay_hop`, `check_relay_hop`); the sender keeps the first
  relay's as its receipt, the recipient the whole path;
- the **signed request**: an operator, on their own token, asks a node's daemon for an act (a
  role change, an act on the exchange box) (`signed_request`, `open_request`); the daemon
  applies it under `exchanged.roles`. A forward's signed request is also its **custody
  record**, travelling with the forwarded document (`check_forward`).

Whether the signer may sign what they signed (a good certificate, the right role, the right
unit) is the caller's question, answered by `exchanged.pki.verify` and `exchanged.roles`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from exchanged.common import canonical, stamp
from exchanged.errors import ExchangedError
from exchanged.pki.cms import CmsError, verify_attached
from exchanged.pki.operator import Operator, SignedOperator

DELIVERY, SIGNED_FOR, RETURN = "delivery", "signed-for", "return"
RELAY = "relay"
FORWARD = "document-forward"


class ReceiptError(ExchangedError):
    code = "bad-receipt"


def open_signed(cms: bytes, issuer: x509.Certificate, what: str = "receipt", *,
                code: str = "bad-receipt") -> tuple[x509.Certificate, bytes, dict[str, Any]]:
    """An attached signature by a certificate of `issuer`: (signer, content, content as a JSON
    object). ReceiptError if it does not verify or carries no JSON object."""
    try:
        signer, content = verify_attached(cms, issuer)
        payload = json.loads(content)
    except (CmsError, ValueError, RecursionError) as e:
        raise ReceiptError(f"the {what} does not verify: {e}", code=code) from None
    if not isinstance(payload, dict):
        raise ReceiptError(f"the {what} does not verify: not a JSON object", code=code)
    if canonical(payload) != content:  # one byte form per act: what the audit log keeps
        raise ReceiptError(f"the {what} is not canonical JSON", code=code)
    return signer, content, payload


# -- delivery ---------------------------------------------------------------------------------

def delivery(node: Operator, *, doc_id: str, sha256: str, sender: str, recipient: str,
             received_at: str) -> bytes:
    """The recipient node's receipt for a stored document, signed on its token."""
    _, cms = node.sign({"type": DELIVERY, "doc_id": doc_id, "sha256": sha256, "sender": sender,
                        "recipient": recipient, "received_at": received_at}, detached=False)
    return cms


def check_delivery(payload: dict[str, Any], *, doc_id: str, sha256: str, sender: str,
                   recipient: str) -> None:
    """The delivery receipt is for exactly this document: its id, its content (the package's
    digest), its sender and its recipient unit."""
    _check(DELIVERY, payload, doc_id=doc_id, sha256=sha256, sender=sender, recipient=recipient)


def _check(kind: str, payload: dict[str, Any], **want: str) -> None:
    wrong = [k for k, v in {"type": kind, **want}.items() if payload.get(k) != v]
    if wrong:
        raise ReceiptError(f"the receipt is not a {kind} receipt of document {want['doc_id']} "
                           f"from {want['sender']} to {want['recipient']} ({', '.join(wrong)} "
                           "differ)")


# -- relayed ----------------------------------------------------------------------------------

def relay_hop(node: Operator, *, doc_id: str, sha256: str, sender: str, recipient: str,
              from_unit: str, relay_unit: str) -> bytes:
    """A relay's node took document `doc_id` (this content, from `sender` to `recipient`)
    from `from_unit` to pass it on; signed on its token."""
    _, cms = node.sign({"type": RELAY, "doc_id": doc_id, "sha256": sha256, "sender": sender,
                        "recipient": recipient, "from": from_unit, "node": relay_unit,
                        "at": stamp()}, detached=False)
    return cms


def check_relay_hop(payload: dict[str, Any], *, doc_id: str, sha256: str, sender: str,
                    recipient: str, from_unit: str, relay_unit: str) -> None:
    """The hop record is for exactly this document, and this step of its way."""
    want = {"type": RELAY, "doc_id": doc_id, "sha256": sha256, "sender": sender,
            "recipient": recipient, "from": from_unit, "node": relay_unit}
    wrong = [k for k, v in want.items() if payload.get(k) != v]
    if wrong or not isinstance(payload.get("at"), str):
        raise ReceiptError(f"the hop record is not {relay_unit}'s of {doc_id} from "
                           f"{from_unit} ({', '.join(wrong) or 'at'} differ)")


# -- signed for -------------------------------------------------------------------------------

def signed_for(op: Operator, *, doc_id: str, sha256: str, sender: str, recipient: str,
               division: str = "") -> bytes:
    """A receiver signs for a document on their personal token: for the unit (the archives
    section), or for the copy `division` was given."""
    body = {"type": SIGNED_FOR, "doc_id": doc_id, "sha256": sha256, "sender": sender,
            "recipient": recipient, "by": op.serial, "at": stamp()}
    _, cms = op.sign({**body, "division": division} if division else body, detached=False)
    return cms


def check_signed_for(payload: dict[str, Any], *, doc_id: str, sha256: str, sender: str,
                     recipient: str, division: str | None = "") -> None:
    """The signed-for receipt is for exactly this document: its id, its content, its sender
    and its recipient unit (and the division whose copy it is, unless `division` is None:
    any)."""
    _check(SIGNED_FOR, payload, doc_id=doc_id, sha256=sha256, sender=sender,
           recipient=recipient)
    if division is not None and payload.get("division", "") != division:
        raise ReceiptError(f"the receipt is for the {payload.get('division') or 'unit'}'s copy, "
                           f"not the {division or 'unit'}'s")


# -- returned ---------------------------------------------------------------------------------

def return_notice(op: Operator, *, doc_id: str, sha256: str, sender: str, recipient: str,
                  reason: str) -> bytes:
    """The recipient sends a document back, with the reason the sender will see."""
    _, cms = op.sign({"type": RETURN, "doc_id": doc_id, "sha256": sha256, "sender": sender,
                      "recipient": recipient, "reason": reason, "by": op.serial,
                      "at": stamp()}, detached=False)
    return cms


def check_return(payload: dict[str, Any], *, doc_id: str, sha256: str, sender: str,
                 recipient: str) -> str:
    """The return notice is for exactly this document; returns its reason."""
    _check(RETURN, payload, doc_id=doc_id, sha256=sha256, sender=sender, recipient=recipient)
    reason = payload.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ReceiptError("a return notice gives its reason")
    return reason


# -- forwarded --------------------------------------------------------------------------------

def check_forward(payload: dict[str, Any], *, doc_id: str, sha256: str, from_unit: str,
                  to_unit: str) -> None:
    """A custody record: the forward of exactly this document (id, content) from one unit to
    the next."""
    want = {"action": FORWARD, "object": doc_id, "sha256": sha256, "node": from_unit,
            "to": to_unit}
    wrong = [k for k, v in want.items() if payload.get(k) != v]
    if wrong:
        raise ReceiptError(f"the custody record is not the forward of {doc_id} from "
                           f"{from_unit} to {to_unit} ({', '.join(wrong)} differ)")


# -- signed requests --------------------------------------------------------------------------

def signed_request(op: Operator, *, action: str, obj: str, node: str,
                   grantee: x509.Certificate | None = None, **extra: Any) -> dict[str, Any]:
    """An act at node `node` (a role change, an act on the exchange box), signed on the
    operator's token: the control request's arguments (the signed request, and the grantee's
    certificate for a grant)."""
    # The nonce makes two requests for the same act in the same second two requests; a
    # replay (even signed anew) repeats the nonce and is refused.
    _, cms = op.sign({"action": action, "object": obj, "actor": op.serial, "at": stamp(),
                      "node": node, "nonce": secrets.token_hex(8), **extra}, detached=False)
    cert = grantee.public_bytes(serialization.Encoding.PEM).decode() if grantee else None
    return {"request": base64.b64encode(cms).decode(), "cert": cert}


def open_request(cms: bytes, issuer: x509.Certificate, *, node: str,
                 grantee_pem: str | None = None) -> tuple[SignedOperator,
                                                          x509.Certificate | None, bytes]:
    """A signed request as the daemon receives it: (the operator, the grantee's certificate
    if one came, the digest that identifies the request for replay checks: of what was
    signed, so that a second signature over the same request is the same request)."""
    signer, content, payload = open_signed(cms, issuer, "signed request", code="bad-signature")
    if payload.get("node") != node:
        raise ReceiptError(f"the request is addressed to node {payload.get('node')!r}",
                           code="bad-request")
    grantee = None
    if grantee_pem:
        try:
            grantee = x509.load_pem_x509_certificate(grantee_pem.encode())
        except ValueError as e:
            raise ReceiptError(f"the grantee's certificate cannot be read: {e}",
                               code="bad-request") from None
        if format(grantee.serial_number, "x") != payload.get("holder_serial"):
            raise ReceiptError("the certificate sent is not the one the request names",
                               code="bad-request")
    return SignedOperator(signer, content, cms), grantee, hashlib.sha256(content).digest()
