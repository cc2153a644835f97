"""The exchange box: what a unit's people do with a document once it has arrived (A11, A15, A16,
A17, A19, A20, A24, A35, N2, N4).

A document arrives in the **unit's box** — the archives section's (the secretariat's, A15) —
or, when the sender addressed it to one of our divisions, in that **division's box**. The
registrar (the archives section) signs for what is in the unit's box, **registers** it under
a register number (per unit and year, gap-free), and **distributes** it to one or more
divisions, each of which signs for its copy (its receiver or deputy, A11, A35); a division's
box is its receiver's and deputy's. A document for a unit we manage is **forwarded** to it
(A15), carrying the original package untouched and a signed custody record; a division passes
a document that needs registering to the unit's box (A19). A document in the wrong form goes
back to its sender with the reason (**return**, N4). Urgent documents have a handling time
limit and are reminded (A16, A35); sending one outside office hours needs a phone call first
(A20). A paper original may follow (N2, A17).

Every act here is a person's, signed on their token (the command line holds it) and checked by
`exchanged.roles` (`MAY`), and lands in the node's audit log in the same transaction as its
rows (`exchanged.store.boxdb`). What travels back to the sender (signed-for receipts, a return
notice) is queued in the same transaction too.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any

from exchanged import receipts
from exchanged.errors import ExchangedError
from exchanged.pki.operator import SignedOperator
from exchanged.roles import Roles, act
from exchanged.store.boxdb import BoxStore
from exchanged.store.nodedb import NodeStore

NUMBER_FIELDS = {"unit", "year", "seq"}
URGENT = ("urgent", "extra-urgent")
DUE_SOON = dt.timedelta(hours=24)  # what `due` calls due soon
FINISHED = ("registered", "distributed", "returned", "forwarded")


class BoxError(ExchangedError):
    code = "box"


def check_number_format(fmt: str, what: str) -> str:
    """A number format: Python format fields among {unit}, {year}, {seq}, and {seq} in it."""
    try:
        names = {m.group(1).split(":")[0].split("!")[0]
                 for m in re.finditer(r"\{([^{}]*)\}", fmt)}
        fmt.format(unit="u", year=2026, seq=1)
    except (ValueError, KeyError, IndexError) as e:
        raise BoxError(f"{what} number format {fmt!r}: {e}", code="config") from None
    if "seq" not in names or names - NUMBER_FIELDS:
        raise BoxError(f"{what} number format {fmt!r}: use {{seq}} and only {{unit}}, {{year}}, "
                       "{seq} (e.g. 收文〔{year}〕{seq:04d})", code="config")
    return fmt


@dataclass(frozen=True)
class OfficeHours:
    """When the unit is at work (A20): ISO weekdays, a daily span, holidays, in local time."""

    days: tuple[int, ...] = (1, 2, 3, 4, 5)
    start: dt.time = dt.time(8, 30)
    end: dt.time = dt.time(17, 30)
    holidays: frozenset[dt.date] = frozenset()
    utc_offset: dt.timedelta = dt.timedelta(hours=8)

    def local(self, t: dt.datetime) -> dt.datetime:
        return t.astimezone(dt.timezone(self.utc_offset))

    def open_at(self, t: dt.datetime) -> bool:
        """At work at `t`: a working day, not a holiday, from `start` until before `end`
        (an `end` of 00:00 means midnight: the rest of the day)."""
        here = self.local(t)
        return (here.isoweekday() in self.days and here.date() not in self.holidays
                and self.start <= here.time() and (self.end == dt.time(0)
                                                  or here.time() < self.end))


@dataclass(frozen=True)
class BoxSettings:
    """A node's exchange box, as configured ([box], [office_hours], [reminders])."""

    divisions: tuple[str, ...] = ()
    incoming_number: str = "收文〔{year}〕{seq:04d}"
    outgoing_number: str = "{unit}发〔{year}〕{seq:04d}"
    manages: tuple[str, ...] = ()  # units whose documents we forward to them (A15)
    office_hours: OfficeHours = field(default_factory=OfficeHours)
    urgent_reminder_minutes: int = 30  # an unsigned urgent document alerts this often
    reminder_times: tuple[dt.time, ...] = (dt.time(9, 0), dt.time(14, 30))  # anything pending


def number(fmt: str, unit: str, year: int, seq: int) -> str:
    return fmt.format(unit=unit, year=year, seq=seq)


class Box:
    """The exchange box of one node: its store, its roles, its settings."""

    def __init__(self, store: NodeStore, roles: Roles, unit: str, settings: BoxSettings,
                 issuer: Any) -> None:
        self.store = store
        self.rows = BoxStore(store.db)
        self.roles = roles
        self.unit = unit
        self.settings = settings
        self.issuer = issuer  # the CA certificate: receipts and notices are checked against it

    # -- who acts on which box ----------------------------------------------------------------

    def _require(self, op: SignedOperator, unit_act: str, division_act: str, box: str) -> str:
        """The unit's box is the registrar's; a division's, its receiver's or deputy's."""
        if box:
            return self.roles.require(op, division_act, division=box)
        return self.roles.require(op, unit_act)

    def _division(self, division: str) -> str:
        if division not in self.settings.divisions:
            raise BoxError(f"{self.unit} has no division {division!r} (one of "
                           f"{', '.join(self.settings.divisions) or 'none configured'})",
                           code="no-division")
        return division

    # -- sign for -----------------------------------------------------------------------------

    def sign_for(self, op: SignedOperator, doc_id: str, payload: dict[str, Any],
                 division: str = "") -> str:
        """A signed-for receipt, made on the signer's token: for the unit's or a division's
        box (the document), or for the copy `division` was given. Queued back to the sender
        with the act. Returns the role the signer acted in."""
        assert op.presigned is not None
        receipt = op.presigned[1]
        with self.store.transaction():
            row = self.rows.item(doc_id)
            receipts.check_signed_for(payload, doc_id=doc_id, sha256=row["package_sha256"],
                                      sender=row["sender"], recipient=self.unit,
                                      division=division)
            if division and division != row["box"]:
                role = self.roles.require(op, "document-sign-for", division=division)
                copy = self.rows.copy(row, division)
                self.rows.sign_copy(copy, receipt, op.serial)
                self.store.queue_receipt(row["sender"], doc_id, "signed-for", receipt)
            else:
                role = self._require(op, "box-sign-for", "document-sign-for", row["box"])
                self.store.mark_in_signed_for(doc_id, receipt, op.serial,
                                              sender=row["sender"])
            self.store.audit.append(action="document-signed-for", obj=doc_id, actor=op.serial,
                                    actor_subject=op.cert.subject.rfc4514_string(), role=role,
                                    details=payload, signature=receipt)
        return role

    # -- register, distribute -----------------------------------------------------------------

    def register(self, op: SignedOperator, doc_id: str, digest: bytes) -> str:
        """The registrar registers a document of the unit's box it signed for: its register
        number, per unit and year, taken in this very transaction (gap-free, unique)."""
        with self.store.transaction():
            self.roles.accept_request(op, digest)
            role = self.roles.require(op, "document-register")
            row = self.rows.item(doc_id)
            year = self.settings.office_hours.local(dt.datetime.now(dt.UTC)).year
            # Taken in this transaction: if anything below refuses, the number is not used.
            text = number(self.settings.incoming_number, self.unit, year,
                          self.rows.take_number("incoming", year))
            self.rows.register(row, text, op.serial)
            self._act(op, role, "document-register", doc_id, {})
            self.store.audit.append(action="document-numbered", obj=doc_id,
                                    details={"number": text, "sequence": "incoming",
                                             "year": year})
        return text

    def distribute(self, op: SignedOperator, doc_id: str, divisions: list[str],
                   digest: bytes) -> None:
        """The registrar passes a registered document to one or more divisions: a copy each,
        which the division's receiver or deputy signs for in its own box."""
        if not divisions:
            raise BoxError("distribute to at least one division (--division)", code="usage")
        wanted = [self._division(d) for d in dict.fromkeys(divisions)]
        self._check_signed(op, {"divisions": wanted})
        with self.store.transaction():
            self.roles.accept_request(op, digest)
            role = self.roles.require(op, "document-distribute")
            row = self.rows.item(doc_id)
            self._act(op, role, "document-distribute", doc_id, {"divisions": wanted})
            self.rows.distribute(row, wanted, op.serial)

    def to_registrar(self, op: SignedOperator, doc_id: str, digest: bytes) -> None:
        """A division passes a document it signed for in its own box to the unit's box, for
        office-level registration (A19)."""
        with self.store.transaction():
            self.roles.accept_request(op, digest)
            row = self.rows.item(doc_id)
            if not row["box"]:
                raise BoxError(f"document {doc_id} is in the unit's box already",
                               code="bad-state")
            role = self.roles.require(op, "document-to-registrar", division=row["box"])
            self._act(op, role, "document-to-registrar", doc_id, {})
            self.rows.pass_to(row, "")

    # -- forward, return --------------------------------------------------------------------

    def forward(self, op: SignedOperator, doc_id: str, to: str, digest: bytes) -> list[str]:
        """The registrar forwards a document to a unit this one manages (A15): the original
        package, untouched, queued to that unit with the custody records it came with and this
        forward's, which is the registrar's signed request itself. A classified document is
        never forwarded outside the unit (A38). Returns the custody records."""
        if to not in self.settings.manages:
            raise BoxError(f"{self.unit} forwards only to the units it manages (manages = "
                           f"{list(self.settings.manages)}), not to {to}", code="not-managed")
        with self.store.transaction():
            self.roles.accept_request(op, digest)
            role = self.roles.require(op, "document-forward")
            row = self.rows.item(doc_id)
            meta = self.store.in_item(doc_id, sender=row["sender"])["metadata"]
            if meta.get("classification") in ("secret", "confidential", "top-secret"):
                raise BoxError(f"{doc_id} is {meta['classification']}: a classified document "
                               "is never forwarded outside the unit (A38)", code="classified")
            receipts.check_forward(op.request, doc_id=doc_id, sha256=row["package_sha256"],
                                   from_unit=self.unit, to_unit=to)
            # The record vouches for the origin: who first sent it, and the node certificate
            # that signed it (which the first forwarder saw come from its configured peer).
            self._check_signed(op, {"origin": row["origin"],
                                    "origin_signer": row["signer_sha256"]})
            custody = [*self.store.in_item(doc_id, sender=row["sender"])["custody"],
                       base64.b64encode(op.presigned[1] if op.presigned else b"").decode()]
            if len(custody) > MAX_HOPS:
                raise BoxError(f"{doc_id} was forwarded {len(custody) - 1} times already; "
                               f"at most {MAX_HOPS} forwards", code="too-many-hops")
            self._act(op, role, "document-forward", doc_id, {"to": to})
            self.rows.close(row, "forwarded", ("signed-for", "registered"), op.serial,
                            f"to {to}: {op.request.get('note') or ''}".rstrip(": "))
            self.store.enqueue(doc_id=doc_id, recipient=to, metadata=meta,
                               package_sha256=row["package_sha256"], size=row["size"],
                               custody=custody)
        return custody

    def return_(self, op: SignedOperator, doc_id: str, payload: dict[str, Any]) -> str:
        """A document in the wrong form goes back to its sender with the reason (N4): the
        return notice, signed on the returner's token, is the act and travels back."""
        assert op.presigned is not None
        notice = op.presigned[1]
        with self.store.transaction():
            row = self.rows.item(doc_id)
            reason = receipts.check_return(payload, doc_id=doc_id, sha256=row["package_sha256"],
                                           sender=row["sender"], recipient=self.unit)
            role = self._require(op, "box-return", "document-return", row["box"])
            self.rows.close(row, "returned", ("received", "signed-for"), op.serial, reason)
            self.store.queue_receipt(row["sender"], doc_id, "return", notice)
            self.store.audit.append(action="document-returned", obj=doc_id, actor=op.serial,
                                    actor_subject=op.cert.subject.rfc4514_string(), role=role,
                                    details=payload, signature=notice)
        return reason

    def paper_received(self, op: SignedOperator, doc_id: str, digest: bytes) -> None:
        """The paper original of a dual-track document has arrived (N2, A17)."""
        with self.store.transaction():
            self.roles.accept_request(op, digest)
            row = self.rows.item(doc_id)
            meta = self.store.in_item(doc_id, sender=row["sender"])["metadata"]
            if not meta.get("paper_original"):
                raise BoxError(f"{doc_id} has no paper original to wait for", code="bad-state")
            role = self._require(op, "box-paper-received", "document-paper-received",
                                 row["box"])
            self._act(op, role, "document-paper-received", doc_id, {})
            self.rows.paper_received(row, op.serial)

    # -- what is due ----------------------------------------------------------------------------

    def due(self, now: dt.datetime, division: str | None = None) -> list[dict[str, Any]]:
        """What someone must still act on, with its deadline: overdue first, then due soon,
        urgent first within each; `division` narrows it to one division's box."""
        out = []
        for r in self.rows.open_items():
            if division is not None and r["waiting_in"] != division:
                continue
            meta = json.loads(r["metadata"])
            deadline = _deadline(meta.get("deadline"), self.settings.office_hours)
            status = ("overdue" if deadline is not None and deadline < now else
                      "due-soon" if deadline is not None and deadline < now + DUE_SOON else
                      "urgent" if meta.get("urgency") in URGENT else "pending")
            out.append({"doc_id": r["doc_id"], "sender": r["sender"], "title": meta["title"],
                        "urgency": meta.get("urgency"), "deadline": meta.get("deadline"),
                        "box": r["waiting_in"] or "(unit)", "waiting_for": r["waiting_for"],
                        "status": status, "received_at": r["received_at"],
                        "paper_original": bool(meta.get("paper_original")),
                        "_order": (("overdue", "due-soon", "urgent", "pending").index(status),
                                   r["urgency"], r["received_at"])})
        out.sort(key=lambda d: d.pop("_order"))
        return out

    def reminders(self, now: dt.datetime, since: dt.datetime) -> tuple[list[dict[str, Any]],
                                                                       int]:
        """What to remind of now (A16, A35): urgent documents nobody has signed for, each
        again after `urgent_reminder_minutes` (marked reminded here); and, if a reminder
        time of day passed since `since`, how many documents are pending at all."""
        every = dt.timedelta(minutes=self.settings.urgent_reminder_minutes).total_seconds()
        urgent = []
        with self.store.transaction():
            for item in self.due(now):
                if item["urgency"] not in URGENT or item["waiting_for"] != "sign-for":
                    continue
                row = self.rows.item(item["doc_id"])
                if row["reminded_at"] is None or now.timestamp() - row["reminded_at"] >= every:
                    self.rows.reminded(row["id"], now.timestamp())
                    urgent.append(item)
        passed = reminder_time_passed(since, now, self.settings.reminder_times,
                                      self.settings.office_hours)
        return urgent, len(self.due(now)) if passed else 0

    # -- helpers ------------------------------------------------------------------------------

    def _act(self, op: SignedOperator, role: str, action: str, doc_id: str,
             extra: dict[str, Any]) -> None:
        self._check_signed(op, extra)
        act(self.store.audit, op, role, action, doc_id)

    @staticmethod
    def _check_signed(op: SignedOperator, want: dict[str, Any]) -> None:
        """What the act does is what its signer signed (the divisions, the destination...)."""
        for k, v in want.items():
            if op.request.get(k) != v:
                raise BoxError(f"the signed request says {k} = {op.request.get(k)!r}, not "
                               f"{v!r}", code="bad-request")


MAX_HOPS = 3  # forwards one document may travel (custody records ride in a bounded header)


def reminder_time_passed(since: dt.datetime, now: dt.datetime, times: tuple[dt.time, ...],
                         hours: OfficeHours) -> bool:
    """A reminder time of day (local) fell in (since, now]."""
    a, b = hours.local(since), hours.local(now)
    days = {a.date() + dt.timedelta(days=n) for n in range((b.date() - a.date()).days + 1)}
    return any(a < dt.datetime.combine(day, t, tzinfo=b.tzinfo) <= b
               for day in days for t in times)


def _deadline(value: object, hours: OfficeHours) -> dt.datetime | None:
    """A deadline as a moment: a date means the end of that day, local time."""
    if not isinstance(value, str):
        return None
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            return dt.datetime.combine(day, dt.time(23, 59, 59),
                                       tzinfo=dt.timezone(hours.utc_offset))
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


__all__ = ["Box", "BoxError", "BoxSettings", "OfficeHours", "check_number_format", "number"]
