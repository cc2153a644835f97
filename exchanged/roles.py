"""Who may do what: the roles of A5/A11 and their separation, in one place.

Roles: administrator, security officer, auditor, business liaison, and per division a receiver
and a deputy receiver. The rules, enforced here both when a role is granted and whenever it is
used (`require`):

- the auditor is never also the administrator or the security officer (A5);
- a role granted by an administrator takes effect only after an auditor approves it (A7);
- no one grants a role to themselves, and no one reviews a grant that concerns them or that
  they made — persons, not certificates, are compared, so a second certificate of the same
  person does not help;
- suspending a person's rights (A39) takes effect at once for every role they hold; only an
  auditor who is not that person lifts it;
- an operator acts only with a good certificate (not held, not revoked, not expired), checked
  by the caller's `cert_status` at every use;
- every grant, review, refusal, suspension and resumption is signed on the acting operator's
  token and lands in the audit log in the same transaction as the change.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from exchanged.errors import ExchangedError
from exchanged.pki.operator import Operator, attr, person_of
from exchanged.store.audit import AuditLog, canonical

ADMIN, OFFICER, AUDITOR, LIAISON = "administrator", "security-officer", "auditor", "liaison"
RECEIVER, DEPUTY = "receiver", "deputy-receiver"
ROLES = (ADMIN, OFFICER, AUDITOR, LIAISON, RECEIVER, DEPUTY)
PER_DIVISION = (RECEIVER, DEPUTY)
# Pairs no one person may hold together (A5).
INCOMPATIBLE = frozenset({frozenset({AUDITOR, ADMIN}), frozenset({AUDITOR, OFFICER})})

SCHEMA = """
CREATE TABLE IF NOT EXISTS roles (
    id INTEGER PRIMARY KEY, person TEXT NOT NULL, holder_serial TEXT NOT NULL,
    holder_subject TEXT NOT NULL, role TEXT NOT NULL, division TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'rejected', 'revoked')),
    granted_by TEXT, granted_at TEXT NOT NULL, grant_seq INTEGER,
    reviewed_by TEXT, reviewed_at TEXT, review_seq INTEGER, review_reason TEXT,
    revoked_by TEXT, revoked_at TEXT, revoke_seq INTEGER);
CREATE INDEX IF NOT EXISTS roles_person ON roles(person, status);
CREATE TABLE IF NOT EXISTS role_requests (
    sha256 BLOB PRIMARY KEY, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS suspensions (
    person TEXT PRIMARY KEY, since TEXT NOT NULL, by TEXT NOT NULL, seq INTEGER NOT NULL,
    reason TEXT NOT NULL);
"""


class RoleError(ExchangedError):
    code = "forbidden"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def act(audit: AuditLog, op: Operator, role: str | None, action: str, obj: str,
        extra: dict[str, Any] | None = None, *, outcome: str = "ok") -> int:
    """Sign an act on the operator's token and append it to the audit log (inside the caller's
    transaction). The entry's `details` are exactly the bytes signed, so
    `openssl cms -verify -content details` checks them."""
    presigned = getattr(op, "presigned", None)
    if presigned is not None:  # signed elsewhere (the operator's own machine), checked here
        payload, cms = presigned
        details = json.loads(payload)
        if details.get("action") != action or details.get("object") != obj:
            raise RoleError(f"the signed request is for {details.get('action')} of "
                            f"{details.get('object')!r}, not {action} of {obj!r}",
                            code="bad-request")
        at = str(details["at"])
    else:
        at = _now()
        payload, cms = op.sign({"action": action, "object": obj, "at": at,
                                "actor": op.serial, "role": role, **(extra or {})})
        details = json.loads(payload)
    # The log stores canonical JSON too, so the stored details are byte for byte what was signed.
    assert canonical(details) == payload
    return audit.append(action=action, obj=obj, actor=op.serial,
                        actor_subject=op.cert.subject.rfc4514_string(), role=role,
                        outcome=outcome, details=details, signature=cms, at=at)


class SignedOperator:
    """An operator who signed a request on their own machine (the CLI holds their token; the
    daemon holds the database): their certificate, and the request exactly as signed.
    `act()` records that signature instead of making one."""

    def __init__(self, cert: x509.Certificate, payload: bytes, cms: bytes) -> None:
        self.cert = cert
        self.serial = format(cert.serial_number, "x")
        self.person = person_of(cert.subject)
        self.name = attr(cert.subject, NameOID.COMMON_NAME)
        self.presigned = (payload, cms)
        self.request: dict[str, Any] = json.loads(payload)


class Roles:
    """The role table of one database (the CA's or a node's) and the rules over it."""

    def __init__(self, db: Any, audit: AuditLog,
                 cert_status: Callable[[x509.Certificate], None]) -> None:
        self.db = db
        self.audit = audit
        self.cert_status = cert_status

    @staticmethod
    def create(db: Any) -> None:
        db.conn.executescript(SCHEMA)

    # -- reading ----------------------------------------------------------------------------

    def held(self, person: str, statuses: tuple[str, ...] = ("active",)) -> list[dict[str, Any]]:
        marks = ",".join("?" * len(statuses))
        cur = self.db.execute(f"SELECT * FROM roles WHERE person = ? AND status IN ({marks}) "
                              "ORDER BY id", [person, *statuses])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur]

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT id, person, role, division, status, holder_serial, granted_by, "
               "granted_at, reviewed_by, reviewed_at FROM roles")
        params: list[Any] = []
        if status:
            sql += " WHERE status = ?"
            params.append(status)
        cur = self.db.execute(sql + " ORDER BY id", params)
        names = [d[0] for d in cur.description]
        out = [dict(zip(names, r, strict=True)) for r in cur]
        suspended = {r[0] for r in self.db.execute("SELECT person FROM suspensions")}
        for r in out:
            r["suspended"] = r["person"] in suspended
        return out

    def suspended(self, person: str) -> bool:
        return self.db.execute("SELECT 1 FROM suspensions WHERE person = ?",
                               [person]).fetchone() is not None

    # -- use --------------------------------------------------------------------------------

    def require(self, op: Operator, *roles: str, division: str | None = None) -> str:
        """The operator may act in one of `roles` now; returns the role they act in."""
        self.cert_status(op.cert)
        if self.suspended(op.person):
            raise RoleError(f"{op.name}'s rights are suspended (A39); an auditor must lift the "
                            "suspension first", code="suspended")
        for row in self.held(op.person):
            if row["role"] in roles and (division is None or row["role"] not in PER_DIVISION
                                         or row["division"] == division):
                return str(row["role"])
        wanted = " or ".join(roles) + (f" of {division}" if division else "")
        raise RoleError(f"{op.name} is not an active {wanted}", code="no-role")

    # -- change -----------------------------------------------------------------------------

    def bootstrap(self, people: dict[str, Operator]) -> None:
        """The ceremony's first holders (administrator, security officer, auditor): three
        different persons, each signing their own acceptance. Only when no role exists yet."""
        if self.db.execute("SELECT 1 FROM roles LIMIT 1").fetchone():
            raise RoleError("roles already exist; use `exchanged role grant`", code="exists")
        persons = {op.person for op in people.values()}
        if len(persons) != len(people):
            raise RoleError("the administrator, the security officer and the auditor must be "
                            "three different persons (A5)", code="separation")
        for role, op in people.items():
            seq = act(self.audit, op, role, "role-bootstrap", op.person, {"grant": role})
            self.db["roles"].insert({
                "person": op.person, "holder_serial": op.serial,
                "holder_subject": op.cert.subject.rfc4514_string(), "role": role,
                "division": "", "status": "active", "granted_by": None, "granted_at": _now(),
                "grant_seq": seq, "reviewed_by": None, "reviewed_at": None})

    def bootstrap_declared(self, people: dict[str, str], source: str) -> bool:
        """A node's first administrator and auditor, declared by whoever installed it (A8) in
        its configuration: persons ("CN=...,O=..."), applied once, while no role exists.
        Unsigned (there is no one to sign yet) but audited; everything after goes through
        grant and review."""
        if self.db.execute("SELECT 1 FROM roles LIMIT 1").fetchone() or not people:
            return False
        if set(people) - {ADMIN, AUDITOR}:
            raise RoleError("only the administrator and the auditor are declared; other "
                            "roles are granted and reviewed", code="bad-role")
        if len(set(people.values())) != len(people):
            raise RoleError("the administrator and the auditor must be different persons (A5)",
                            code="separation")
        for role, person in people.items():
            seq = self.audit.append(action="role-bootstrap", obj=person, role=role,
                                    details={"grant": role, "source": source})
            self.db["roles"].insert({
                "person": person, "holder_serial": "", "holder_subject": person, "role": role,
                "division": "", "status": "active", "granted_by": None, "granted_at": _now(),
                "grant_seq": seq, "reviewed_by": None, "reviewed_at": None})
        return True

    def grant(self, admin: Operator, grantee: x509.Certificate, role: str,
              division: str = "") -> int:
        """An administrator proposes a role; it is pending until an auditor approves it."""
        acting = self.require(admin, ADMIN)
        if role not in ROLES:
            raise RoleError(f"unknown role {role!r} (one of {', '.join(ROLES)})",
                            code="bad-role")
        if (role in PER_DIVISION) != bool(division):
            raise RoleError(f"the {role} role {'needs' if role in PER_DIVISION else 'takes no'} "
                            "--division", code="bad-role")
        person = person_of(grantee.subject)
        if person == admin.person:
            raise RoleError(f"{admin.name} cannot grant a role to themselves",
                            code="self-grant")
        self.cert_status(grantee)
        current = self.held(person, ("active", "pending"))
        for row in current:
            if row["role"] == role and row["division"] == division:
                raise RoleError(f"{person} already holds or awaits the {role} role",
                                code="exists")
            if frozenset({row["role"], role}) in INCOMPATIBLE:
                raise RoleError(f"{person} holds the {row['role']} role; the {role} role may "
                                "never be held with it (A5)", code="separation")
        seq = act(self.audit, admin, acting, "role-grant", person,
                  {"role": role, "division": division, "holder_serial":
                   format(grantee.serial_number, "x")})
        return int(self.db["roles"].insert({
            "person": person, "holder_serial": format(grantee.serial_number, "x"),
            "holder_subject": grantee.subject.rfc4514_string(), "role": role,
            "division": division, "status": "pending", "granted_by": admin.person,
            "granted_at": _now(), "grant_seq": seq}).last_pk)

    def review(self, auditor: Operator, role_id: int, approve: bool, reason: str) -> None:
        """An auditor approves or refuses a pending grant (A7)."""
        acting = self.require(auditor, AUDITOR)
        row = self._row(role_id)
        if row["status"] != "pending":
            raise RoleError(f"role grant {role_id} is {row['status']}, not pending",
                            code="bad-state")
        if auditor.person in (row["person"], row["granted_by"]):
            raise RoleError(f"{auditor.name} may not review a grant they made or that concerns "
                            "them", code="self-review")
        if approve:  # the grantee's situation may have changed since the grant
            for other in self.held(row["person"]):
                if frozenset({other["role"], row["role"]}) in INCOMPATIBLE:
                    raise RoleError(f"{row['person']} now holds the {other['role']} role; the "
                                    f"{row['role']} role may never be held with it (A5)",
                                    code="separation")
        if not reason.strip() and not approve:
            raise RoleError("a refusal needs a reason", code="no-reason")
        seq = act(self.audit, auditor, acting, "role-approve" if approve else "role-refuse",
                  str(role_id), {"person": row["person"], "role": row["role"],
                                 "reason": reason})
        self.db["roles"].update(role_id, {"status": "active" if approve else "rejected",
                                          "reviewed_by": auditor.person,
                                          "reviewed_at": _now(), "review_seq": seq,
                                          "review_reason": reason})

    def revoke(self, admin: Operator, role_id: int, reason: str) -> None:
        """Take a role away: at once (removing rights needs no second opinion)."""
        acting = self.require(admin, ADMIN)
        row = self._row(role_id)
        if row["status"] not in ("active", "pending"):
            raise RoleError(f"role {role_id} is {row['status']}", code="bad-state")
        seq = act(self.audit, admin, acting, "role-revoke", str(role_id),
                  {"person": row["person"], "role": row["role"], "reason": reason})
        self.db["roles"].update(role_id, {"status": "revoked", "revoked_by": admin.person,
                                          "revoked_at": _now(), "revoke_seq": seq})

    def suspend(self, actor: Operator, person: str, reason: str) -> None:
        """Suspend every right of a person at once (A39): by an administrator or auditor."""
        acting = self.require(actor, ADMIN, AUDITOR)
        if not reason.strip():
            raise RoleError("a suspension needs a reason", code="no-reason")
        if person == actor.person:
            raise RoleError("no one suspends themselves", code="self-grant")
        if self.suspended(person):
            raise RoleError(f"{person} is already suspended", code="bad-state")
        seq = act(self.audit, actor, acting, "person-suspend", person, {"reason": reason})
        self.db["suspensions"].insert({"person": person, "since": _now(), "by": actor.person,
                                       "seq": seq, "reason": reason})

    def resume(self, auditor: Operator, person: str, reason: str) -> None:
        """Lift a suspension: only an auditor who is not that person."""
        acting = self.require(auditor, AUDITOR)
        if person == auditor.person:
            raise RoleError("no one lifts their own suspension", code="self-review")
        if not self.suspended(person):
            raise RoleError(f"{person} is not suspended", code="bad-state")
        act(self.audit, auditor, acting, "person-resume", person, {"reason": reason})
        self.db.execute("DELETE FROM suspensions WHERE person = ?", [person])

    def _row(self, role_id: int) -> dict[str, Any]:
        cur = self.db.execute("SELECT * FROM roles WHERE id = ?", [role_id])
        names = [d[0] for d in cur.description]
        found = cur.fetchone()
        if found is None:
            raise RoleError(f"no role grant {role_id}", code="not-found")
        return dict(zip(names, found, strict=True))
