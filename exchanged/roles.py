"""Who may do what: the roles of A5/A11, their separation, and every check of them, in one place.

Roles: administrator, security officer, auditor, business liaison, the registrar (the unit's
archives section, A15), and per division a receiver and a deputy receiver (A11, A35). `MAY` is
the one table of which role may do which act; `Roles.require` is the one check of it, made at
every use. The rules, enforced here:

- the auditor is never also the administrator or the security officer (A5);
- the CA's ceremony names three different persons, each at a token of their own;
- a role granted by an administrator takes effect only after an auditor approves it (A7);
- a person is an identity, not a name: only a certificate that carries a registered person id
  (issued by the CA, `exchanged.pki.names`) acts, and roles belong to that id;
- no one grants a role to themselves, and no one reviews a grant that concerns them or that
  they made — persons are compared (a second certificate of the same person does not help),
  and so are names and units (nor does a certificate for a namesake);
- no security officer reviews an issuance request of their own (`refuse_self_review`), and a
  request flagged for dual control needs two who are not its applicant;
- suspending a person's rights (A39) takes effect at once for every role they hold; only an
  auditor who is not that person lifts it;
- an operator acts only with a good certificate (not held, not revoked, not expired), checked
  by the caller's `cert_status` at every use;
- a signed role request sent to a node is fresh and applied once (`Roles.apply_request`);
- a signed-for receipt from another unit is signed by a person of that unit;
- every grant, review, refusal, suspension and resumption is signed on the acting operator's
  token and lands in the audit log in the same transaction as the change (`act`).

The role tables themselves are `exchanged.store.roledb`; this module holds no SQL.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from exchanged.common import canonical, parse_time, stamp
from exchanged.errors import ExchangedError
from exchanged.pki.keys import key_sha256
from exchanged.pki.names import (
    PERSON_ID_RE,
    attr,
    common_name,
    organization,
    person_of,
    same_name,
)
from exchanged.pki.operator import Actor, SignedOperator
from exchanged.store.audit import AuditLog
from exchanged.store.roledb import RoleStore

ADMIN, OFFICER, AUDITOR, LIAISON = "administrator", "security-officer", "auditor", "liaison"
RECEIVER, DEPUTY, REGISTRAR = "receiver", "deputy-receiver", "registrar"
ROLES = (ADMIN, OFFICER, AUDITOR, LIAISON, REGISTRAR, RECEIVER, DEPUTY)
PER_DIVISION = (RECEIVER, DEPUTY)
# Pairs no one person may hold together (A5).
INCOMPATIBLE = frozenset({frozenset({AUDITOR, ADMIN}), frozenset({AUDITOR, OFFICER})})

#: Who may do what: an act -> the roles that may do it (checked by `Roles.require`).
MAY: dict[str, tuple[str, ...]] = {
    # the certificate authority
    "request-decide": (OFFICER,),  # approve or reject an issuance request
    "certificate-issue": (OFFICER,),  # issue, and re-issue on a change of post (A29)
    "certificate-status": (OFFICER,),  # hold, release, revoke (A30)
    # roles, at the CA and at every node
    "role-grant": (ADMIN,),
    "role-review": (AUDITOR,),
    "role-revoke": (ADMIN,),
    "person-suspend": (ADMIN, AUDITOR),
    "person-resume": (AUDITOR,),
    # the audit log: show, verify, export
    "audit-read": (AUDITOR,),
    # a node's exchange box (exchanged.box): the unit's box is the archives section's
    # (A15), a division's box its receiver's and deputy's (A11, A35)
    "box-sign-for": (REGISTRAR,),  # sign for what is in the unit's box
    "document-sign-for": (RECEIVER, DEPUTY),  # sign for what is in a division's box
    "document-register": (REGISTRAR,),
    "document-distribute": (REGISTRAR,),
    "document-forward": (REGISTRAR,),  # to a unit this one manages (A15)
    "document-to-registrar": (RECEIVER, DEPUTY),  # a division passes it on (A19)
    "box-return": (REGISTRAR,),  # send back what is in the unit's box (N4)
    "document-return": (RECEIVER, DEPUTY),  # ... or in a division's box
    "box-paper-received": (REGISTRAR,),
    "document-paper-received": (RECEIVER, DEPUTY),
    "archive-export": (REGISTRAR, AUDITOR),
    # a node's operation
    "node-backup": (ADMIN,),  # a consistent backup of the running node (exchanged backup)
    "node-renew": (ADMIN,),  # a new key on the node's token and a CSR for it (exchanged renew)
}

REQUEST_MAX_AGE = 300  # seconds: a signed role request older than this is refused
CLOCK_SKEW = 30  # seconds a request may seem to come from the future (clocks differ)


class RoleError(ExchangedError):
    code = "forbidden"


def act(audit: AuditLog, op: Actor, role: str | None, action: str, obj: str,
        extra: dict[str, Any] | None = None, *, outcome: str = "ok") -> int:
    """Sign an act on the operator's token and append it to the audit log (inside the caller's
    transaction). The entry's `details` are exactly the bytes signed, so
    `openssl cms -verify -content details` checks them."""
    if op.presigned is not None:  # signed elsewhere (the operator's own machine), checked here
        payload, cms = op.presigned
        details = json.loads(payload)
        if details.get("action") != action or details.get("object") != obj:
            raise RoleError(f"the signed request is for {details.get('action')} of "
                            f"{details.get('object')!r}, not {action} of {obj!r}",
                            code="bad-request")
        if canonical(details) != payload:  # the log keeps canonical JSON: it must be what
            raise RoleError("the signed request is not canonical JSON; sign it with "  # was
                            "`exchanged role`", code="bad-request")  # signed, byte for byte
        at = str(details["at"])
    else:
        at = stamp()
        payload, cms = op.sign({"action": action, "object": obj, "at": at,
                                "actor": op.serial, "role": role, **(extra or {})})
        details = json.loads(payload)
    return audit.append(action=action, obj=obj, actor=op.serial,
                        actor_subject=op.cert.subject.rfc4514_string(), role=role,
                        outcome=outcome, details=details, signature=cms, at=at)


# -- separation rules that need no table ------------------------------------------------------

def _distinct_persons(persons: Iterable[Any], count: int) -> None:
    if len(set(persons)) != count:
        raise RoleError("the administrator, the security officer and the auditor must be "
                        "three different persons (A5)", code="separation")


def check_ceremony(ca_token: str, people: dict[str, tuple[str, str, str]]) -> None:
    """The CA's ceremony: `people` maps each first role to (token label, name, unit). An
    administrator, a security officer and an auditor: three persons, three tokens of their
    own, none of them the CA's."""
    if set(people) != {ADMIN, OFFICER, AUDITOR}:
        raise RoleError("the ceremony needs an administrator, a security officer and an "
                        "auditor", code="ceremony")
    labels = [label for label, _, _ in people.values()]
    if ca_token in labels or len(set(labels)) != len(labels):
        raise RoleError("each person needs a token of their own, apart from the CA's",
                        code="separation")
    _distinct_persons(((name, unit) for _, name, unit in people.values()), len(people))


def refuse_self_review(op: Actor, *, what: str, name: str, unit: str, key: str,
                       their_serials: Iterable[str | None], their_persons: Iterable[str],
                       approved_by: Iterable[str] = ()) -> None:
    """No officer reviews their own request (A28): matched by the applicant's, the submitting
    officer's or the replaced certificate (`their_serials`), the persons those certificates
    name and the person the request is for (`their_persons`), the name and unit on the form,
    or the key (`key`, its SHA-256). Under dual control, the second approval is another
    person's than the first (`approved_by`)."""
    if (op.serial in set(their_serials) or op.person in set(their_persons)
            or (same_name(name, op.name) and same_name(unit, organization(op.cert)))
            or key == key_sha256(op.cert.public_key())):
        raise RoleError(f"{op.name} is the applicant of request {what}; another security "
                        "officer must review it", code="self-review")
    if op.person in set(approved_by):
        raise RoleError(f"{op.name} approved request {what} already; under dual control "
                        "another security officer must approve it too", code="dual-control")


def _namesakes(a: x509.Certificate | x509.Name, b: x509.Certificate) -> bool:
    """Two certificates naming the same name in the same unit (whoever holds them)."""
    subject = a.subject if isinstance(a, x509.Certificate) else a
    return same_name(attr(subject, NameOID.COMMON_NAME), common_name(b)) and \
        same_name(attr(subject, NameOID.ORGANIZATION_NAME), organization(b))


def check_remote_receiver(signer: x509.Certificate, unit_org: str) -> None:
    """A signed-for receipt from another unit is signed by a person of that unit (who holds
    the receiver role there is that unit's node's to enforce, under these same rules)."""
    if organization(signer) != unit_org:
        raise RoleError(f"the receipt is signed by {signer.subject.rfc4514_string()}, not by "
                        f"someone of {unit_org}", code="wrong-unit")


# -- the role table and its rules -------------------------------------------------------------

class Roles:
    """The role table of one database (the CA's or a node's) and the rules over it."""

    def __init__(self, store: RoleStore, audit: AuditLog,
                 cert_status: Callable[[x509.Certificate], None],
                 divisions: tuple[str, ...] | None = None) -> None:
        self.store = store
        self.audit = audit
        self.cert_status = cert_status
        self.divisions = divisions  # a node's configured divisions (None: any, at the CA)

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        return self.store.list(status)

    # -- use --------------------------------------------------------------------------------

    def require(self, op: Actor, action: str, *, division: str | None = None) -> str:
        """The operator may do `action` (a key of MAY) now; returns the role they act in."""
        allowed = MAY[action]
        self.cert_status(op.cert)
        if not op.person:
            raise RoleError(f"{op.name}'s certificate names no registered person (no person id): "
                            "only a person certificate of this CA acts", code="no-person")
        if self.store.suspended(op.person):
            raise RoleError(f"{op.name}'s rights are suspended (A39); an auditor must lift the "
                            "suspension first", code="suspended")
        for row in self.store.held(op.person):
            if row["role"] in allowed and (division is None or row["role"] not in PER_DIVISION
                                           or row["division"] == division):
                return str(row["role"])
        wanted = " or ".join(allowed) + (f" of {division}" if division else "")
        raise RoleError(f"{op.name} is not an active {wanted}", code="no-role")

    # -- change -----------------------------------------------------------------------------

    def bootstrap(self, people: dict[str, Actor]) -> None:
        """The ceremony's first holders (administrator, security officer, auditor): three
        different persons, each signing their own acceptance. Only when no role exists yet."""
        if not self.store.empty():
            raise RoleError("roles already exist; use `exchanged role grant`", code="exists")
        _distinct_persons((op.person for op in people.values() if op.person), len(people))
        for role, op in people.items():
            seq = act(self.audit, op, role, "role-bootstrap", op.person, {"grant": role})
            self.store.add(person=op.person, holder_serial=op.serial,
                           holder_subject=op.cert.subject.rfc4514_string(), role=role,
                           division="", status="active", granted_by=None, granted_at=stamp(),
                           grant_seq=seq)

    def bootstrap_declared(self, people: dict[str, str], source: str) -> bool:
        """A node's first administrator and auditor, declared by whoever installed it (A8) in
        its configuration: persons ("CN=...,O=..."), applied once, while no role exists.
        Unsigned (there is no one to sign yet) but audited; everything after goes through
        grant and review."""
        if not self.store.empty() or not people:
            return False
        if set(people) - {ADMIN, AUDITOR}:
            raise RoleError("only the administrator and the auditor are declared; other "
                            "roles are granted and reviewed", code="bad-role")
        for role, person in people.items():
            if not PERSON_ID_RE.fullmatch(person):
                raise RoleError(f"the {role} is declared as {person!r}: declare a person by "
                                "their person id (P- and 16 hex digits: `exchanged ca list` "
                                "shows it)", code="bad-role")
        if len(set(people.values())) != len(people):
            raise RoleError("the administrator and the auditor must be different persons (A5)",
                            code="separation")
        for role, person in people.items():
            seq = self.audit.append(action="role-bootstrap", obj=person, role=role,
                                    details={"grant": role, "source": source})
            self.store.add(person=person, holder_serial="", holder_subject=person, role=role,
                           division="", status="active", granted_by=None, granted_at=stamp(),
                           grant_seq=seq)
        return True

    def grant(self, admin: Actor, grantee: x509.Certificate, role: str,
              division: str = "") -> int:
        """An administrator proposes a role; it is pending until an auditor approves it."""
        acting = self.require(admin, "role-grant")
        if role not in ROLES:
            raise RoleError(f"unknown role {role!r} (one of {', '.join(ROLES)})",
                            code="bad-role")
        if (role in PER_DIVISION) != bool(division):
            raise RoleError(f"the {role} role {'needs' if role in PER_DIVISION else 'takes no'} "
                            "--division", code="bad-role")
        if division and self.divisions is not None and division not in self.divisions:
            raise RoleError(f"there is no division {division!r} here (one of "
                            f"{', '.join(self.divisions) or 'none configured'})",
                            code="bad-role")
        person = person_of(grantee.subject)
        if not person:
            raise RoleError(f"{grantee.subject.rfc4514_string()} names no registered person: "
                            "roles are for person certificates of this CA", code="no-person")
        if person == admin.person or _namesakes(grantee, admin.cert):
            raise RoleError(f"{admin.name} cannot grant a role to themselves (nor to a "
                            "certificate with their own name and unit)", code="self-grant")
        self.cert_status(grantee)
        for row in self.store.held(person, ("active", "pending")):
            if row["role"] == role and row["division"] == division:
                raise RoleError(f"{person} already holds or awaits the {role} role",
                                code="exists")
            if frozenset({row["role"], role}) in INCOMPATIBLE:
                raise RoleError(f"{person} holds the {row['role']} role; the {role} role may "
                                "never be held with it (A5)", code="separation")
        serial = format(grantee.serial_number, "x")
        seq = act(self.audit, admin, acting, "role-grant", person,
                  {"role": role, "division": division, "holder_serial": serial})
        return self.store.add(person=person, holder_serial=serial,
                              holder_subject=grantee.subject.rfc4514_string(), role=role,
                              division=division, status="pending", granted_by=admin.person,
                              granted_at=stamp(), grant_seq=seq)

    def review(self, auditor: Actor, role_id: int, approve: bool, reason: str) -> None:
        """An auditor approves or refuses a pending grant (A7)."""
        acting = self.require(auditor, "role-review")
        row = self._row(role_id)
        if row["status"] != "pending":
            raise RoleError(f"role grant {role_id} is {row['status']}, not pending",
                            code="bad-state")
        if auditor.person in (row["person"], row["granted_by"]) or _namesakes(
                x509.Name.from_rfc4514_string(row["holder_subject"]), auditor.cert):
            raise RoleError(f"{auditor.name} may not review a grant they made or that concerns "
                            "them", code="self-review")
        if approve:  # the grantee's situation may have changed since the grant
            for other in self.store.held(row["person"]):
                if frozenset({other["role"], row["role"]}) in INCOMPATIBLE:
                    raise RoleError(f"{row['person']} now holds the {other['role']} role; the "
                                    f"{row['role']} role may never be held with it (A5)",
                                    code="separation")
        if not reason.strip() and not approve:
            raise RoleError("a refusal needs a reason", code="no-reason")
        seq = act(self.audit, auditor, acting, "role-approve" if approve else "role-refuse",
                  str(role_id), {"person": row["person"], "role": row["role"],
                                 "reason": reason})
        self.store.set(role_id, status="active" if approve else "rejected",
                       reviewed_by=auditor.person, reviewed_at=stamp(), review_seq=seq,
                       review_reason=reason)

    def revoke(self, admin: Actor, role_id: int, reason: str) -> None:
        """Take a role away: at once (removing rights needs no second opinion)."""
        acting = self.require(admin, "role-revoke")
        row = self._row(role_id)
        if row["status"] not in ("active", "pending"):
            raise RoleError(f"role {role_id} is {row['status']}", code="bad-state")
        seq = act(self.audit, admin, acting, "role-revoke", str(role_id),
                  {"person": row["person"], "role": row["role"], "reason": reason})
        self.store.set(role_id, status="revoked", revoked_by=admin.person, revoked_at=stamp(),
                       revoke_seq=seq)

    def suspend(self, actor: Actor, person: str, reason: str) -> None:
        """Suspend every right of a person at once (A39): by an administrator or auditor."""
        acting = self.require(actor, "person-suspend")
        if not reason.strip():
            raise RoleError("a suspension needs a reason", code="no-reason")
        if person == actor.person:
            raise RoleError("no one suspends themselves", code="self-grant")
        if self.store.suspended(person):
            raise RoleError(f"{person} is already suspended", code="bad-state")
        seq = act(self.audit, actor, acting, "person-suspend", person, {"reason": reason})
        self.store.suspend(person=person, since=stamp(), by=actor.person, seq=seq,
                           reason=reason)

    def resume(self, auditor: Actor, person: str, reason: str) -> None:
        """Lift a suspension: only an auditor who is not that person."""
        acting = self.require(auditor, "person-resume")
        if person == auditor.person:
            raise RoleError("no one lifts their own suspension", code="self-review")
        if not self.store.suspended(person):
            raise RoleError(f"{person} is not suspended", code="bad-state")
        act(self.audit, auditor, acting, "person-resume", person, {"reason": reason})
        self.store.resume(person)

    def accept_request(self, op: SignedOperator, digest: bytes,
                       now: dt.datetime | None = None) -> None:
        """An act signed on the operator's own machine and sent to a node (a role change, an
        act on the exchange box) is fresh and not applied before (a replay, say of an old
        resume after a new suspension, is refused). Inside the caller's transaction, so the
        record of `digest` commits with the act."""
        p = op.request
        try:
            age = ((now or dt.datetime.now(dt.UTC)) - parse_time(str(p["at"]))).total_seconds()
        except (KeyError, ValueError) as e:
            raise RoleError(f"the signed request has no usable time: {e}",
                            code="bad-request") from None
        if not -CLOCK_SKEW <= age <= REQUEST_MAX_AGE:
            raise RoleError("the signed request is stale (or from the future): sign it again",
                            code="stale")
        if self.store.request_seen(digest):
            raise RoleError("this signed request was already applied: sign a new one",
                            code="replay")
        self.store.remember_request(digest, str(p["at"]))

    def apply_request(self, op: SignedOperator, grantee: x509.Certificate | None,
                      digest: bytes, now: dt.datetime | None = None) -> int | str:
        """A role change signed on the operator's own machine and sent to a node: accepted
        (`accept_request`), then checked and applied like any other. Inside the caller's
        transaction. Returns the new grant's id, or the object acted on."""
        self.accept_request(op, digest, now)
        p = op.request
        action, obj, reason = p["action"], p["object"], str(p.get("reason") or "")
        if action == "role-grant":
            if grantee is None or not obj or person_of(grantee.subject) != obj:
                raise RoleError("a grant carries the grantee's certificate", code="bad-request")
            return self.grant(op, grantee, p["grant"], p.get("division") or "")
        if action in ("role-approve", "role-refuse"):
            self.review(op, int(obj), action == "role-approve", reason)
        elif action == "role-revoke":
            self.revoke(op, int(obj), reason)
        elif action == "person-suspend":
            self.suspend(op, obj, reason)
        elif action == "person-resume":
            self.resume(op, obj, reason)
        else:
            raise RoleError(f"unknown role action {action!r}", code="bad-request")
        return str(obj)

    def _row(self, role_id: int) -> dict[str, Any]:
        found = self.store.row(role_id)
        if found is None:
            raise RoleError(f"no role grant {role_id}", code="not-found")
        return found
