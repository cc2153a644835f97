"""The certificate authority: init ceremony, requests and review, issue, hold/release/revoke, CRLs.

The CA's key lives on a token; so does every officer's. An officer acts with their own token:
each decision is canonical JSON signed on the officer's token (detached CMS, verifiable with
`openssl cms -verify`) and lands in the audit log in the same transaction as the change it
authorises. Who may act is decided by `exchanged.roles`; the rows live in
`exchanged.store.cadb`; certificates and CRLs are made by `exchanged.pki`. Every check runs
before anything is written, so a refused operation leaves the CA's state as it was (the
refusal itself is audited).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from exchanged.common import parse_time, stamp, utc_now
from exchanged.errors import ExchangedError
from exchanged.pki import crl as crlmod
from exchanged.pki import csr as csrmod
from exchanged.pki import profiles
from exchanged.pki.keys import key_sha256, spki_der
from exchanged.pki.names import common_name, new_person_id, person_of, same_name
from exchanged.pki.operator import Actor, Operator
from exchanged.pki.token import TokenKey
from exchanged.roles import OFFICER, Roles, act, check_ceremony, refuse_self_review
from exchanged.store import cadb, evidence
from exchanged.store.audit import MIRROR, AuditLog, Report
from exchanged.store.cadb import CaStore, pem, serial_hex
from exchanged.store.db import Transaction
from exchanged.store.files import write_atomic
from exchanged.store.roledb import RoleStore

CONFIG = "ca.toml"
DB = "ca.db"
CA_CERT = "ca.pem"
CRL_DIR = "crl"
LATEST_CRL = "ca.crl"
REVOKE_REASONS = tuple(r for r in crlmod.REASONS if r not in ("certificateHold", "removeFromCRL"))
AUDIT_FILTERS = ("actor", "action", "object", "since", "until")

__all__ = ["CA", "CaError", "Config", "parse_serial", "pem", "serial_hex"]


class CaError(ExchangedError):
    code = "ca"


def parse_serial(text: str) -> str:
    """Accept a serial as hex (optionally 0x-prefixed, with colons) and normalise it."""
    t = text.strip().lower().replace(":", "")
    if t.startswith("0x"):
        t = t[2:]
    try:
        return serial_hex(int(t, 16))
    except ValueError:
        raise CaError(f"not a certificate serial (hex expected): {text!r}",
                      code="bad-serial") from None


def maybe_serial(text: str) -> str:
    """`text` as a normalised serial if it is one, else as it is."""
    try:
        return parse_serial(text)
    except ExchangedError:
        return text


@dataclass
class Config:
    key: str  # pkcs11: URI of the CA key (no PIN)
    module: str | None = None
    crl_url: str | None = None
    crl_hours: int = 168
    cert_days: int = 730

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise CaError(f"no CA configuration at {path}: run `exchanged ca init`, or give "
                          "the right --dir", code="no-ca") from None
        except (tomllib.TOMLDecodeError, OSError) as e:
            raise CaError(f"cannot read {path}: {e}") from None
        ca = data.get("ca", {})
        try:
            return cls(key=str(ca["key"]), module=ca.get("module"), crl_url=ca.get("crl_url"),
                       crl_hours=int(ca.get("crl_hours", 168)),
                       cert_days=int(ca.get("cert_days", 730)))
        except (KeyError, ValueError) as e:
            raise CaError(f"{path}: bad or missing setting {e}") from None

    def dump(self) -> str:
        lines = ["# exchanged CA configuration (written by `exchanged ca init`).",
                 "# The CA key stays on its token; this names it. No PIN belongs here.", "[ca]",
                 f"key = {json.dumps(self.key)}"]
        if self.module:
            lines.append(f"module = {json.dumps(self.module)}")
        if self.crl_url:
            lines.append(f"crl_url = {json.dumps(self.crl_url)}")
        lines += [f"crl_hours = {self.crl_hours}", f"cert_days = {self.cert_days}"]
        return "\n".join(lines) + "\n"


class CA:
    """A CA directory: ca.toml, ca.db, ca.pem and the published CRLs."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.config = Config.load(self.dir / CONFIG)
        self.db = cadb.open_db(self.dir / DB)
        try:
            self.cert = x509.load_pem_x509_certificate((self.dir / CA_CERT).read_bytes())
        except (OSError, ValueError) as e:
            raise CaError(f"cannot read the CA certificate {self.dir / CA_CERT}: {e}") from None
        self.store = CaStore(self.db)
        self.audit = AuditLog(self.db)
        self.roles = Roles(RoleStore(self.db), self.audit, self.cert_status)

    def close(self) -> None:
        self.db.conn.close()

    # -- the ceremony -----------------------------------------------------------------------

    @classmethod
    def init(cls, directory: str | os.PathLike[str], *, ca_key: TokenKey, name: x509.Name,
             people: dict[str, tuple[TokenKey, profiles.Form]], days: int = 7300,
             crl_url: str | None = None, crl_hours: int = 168, cert_days: int = 730,
             module: str | None = None) -> CA:
        """The ceremony: a self-signed root on `ca_key`; for each of the first administrator,
        security officer and auditor (three different persons, each at their own token) a
        certificate issued from a CSR made on their token and stored there; their roles, each
        accepted with a signature; the audit log, anchored by a checkpoint signed on the CA
        token; and the first CRL."""
        d = Path(directory)
        if (d / DB).exists() or (d / CA_CERT).exists():
            raise CaError(f"{d} already holds a CA; choose an empty directory", code="exists")
        check_ceremony(ca_key.token.label, {role: (key.token.label, form.name, form.unit)
                                            for role, (key, form) in people.items()})
        for key, form in people.values():
            form.check("person")
            if key.token.certificate(id=key.id) is not None:
                raise CaError(f"token {key.token.label!r} already holds a certificate for key "
                              f"{key.label!r}; use a fresh key", code="exists")
        start = utc_now()
        root = profiles.ca_root(name=name, public_key=ca_key.public_key, not_before=start,
                                days=days).sign(ca_key.signer(), hashes.SHA256())
        issued: dict[str, tuple[Operator, x509.CertificateSigningRequest, profiles.Form]] = {}
        for role, (key, form) in people.items():
            req = csrmod.build(key, "person", form)
            csrmod.check(req, f"the {role}'s CSR")
            cert = profiles.end_entity(
                "person", form=form, public_key=req.public_key(), ca_cert=root,
                serial=profiles.random_serial(), not_before=start, days=cert_days,
                crl_url=crl_url, person_id=new_person_id()).sign(ca_key.signer(),
                                                                 hashes.SHA256())
            issued[role] = (Operator(key, cert), req, form)
        for op, _, _ in issued.values():
            op.key.token.store_certificate(op.cert)

        d.mkdir(parents=True, exist_ok=True)
        (d / CRL_DIR).mkdir(exist_ok=True)
        config = Config(key=str(ca_key.uri.public()), module=module, crl_url=crl_url,
                        crl_hours=crl_hours, cert_days=cert_days)
        write_atomic(d / CONFIG, config.dump().encode())
        write_atomic(d / CA_CERT, pem(root).encode())
        db = cadb.open_db(d / DB, create=True)
        store, audit = CaStore(db), AuditLog(db)
        at = stamp(start)
        with Transaction(db):
            audit.checkpoint(ca_key.sign, root)  # the genesis anchor
            audit.append(action="ca-init", obj=root.subject.rfc4514_string(),
                         actor_subject=root.subject.rfc4514_string(),
                         details={"sha256": root.fingerprint(hashes.SHA256()).hex(),
                                  "key": str(ca_key.uri.public())})
            store.set_meta({"ca_subject": root.subject.rfc4514_string(),
                            "ca_sha256": root.fingerprint(hashes.SHA256()).hex()})
            for role, (op, req, form) in issued.items():
                rid = store.add_request(
                    profile="person", form=_form_dict(form, reason=form.reason or
                                                      f"CA initialisation: first {role}"),
                    csr=req, key_sha256=key_sha256(req.public_key()), status="issued", at=at,
                    decided_at=at, decision_reason="CA initialisation ceremony",
                    cert_serial=op.serial)
                seq = audit.append(action="certificate-issue", obj=op.serial,
                                   actor_subject=root.subject.rfc4514_string(),
                                   details={"request": rid, "ceremony": role,
                                            "person": op.person})
                store.add_person(person_id=op.person, name=form.name, unit=form.unit, at=at,
                                 request_id=rid)
                store.add_certificate(op.cert, request_id=rid, profile="person", at=at, by=None,
                                      seq=seq, person_id=op.person)
                store.set_current(op.person, op.serial)
            Roles(RoleStore(db), audit, lambda cert: None).bootstrap(
                {role: op for role, (op, _, _) in issued.items()})
            audit.checkpoint(ca_key.sign, root)
        audit.mirror_checkpoints(d / MIRROR)
        db.conn.close()
        ca = cls(d)
        ca.make_crl(ca_key)
        return ca

    # -- who acts ---------------------------------------------------------------------------

    def cert_status(self, cert: x509.Certificate, at: dt.datetime | None = None) -> None:
        """An operator's certificate must be this CA's, in its records, good and current."""
        at = at or utc_now()
        who = common_name(cert) or cert.subject.rfc4514_string()
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            raise CaError(f"{who}'s certificate was not issued by this CA",
                          code="not-ours") from None
        row = self.store.certificate(serial_hex(cert.serial_number))
        if row is None:
            raise CaError(f"{who}'s certificate is not in this CA's records", code="not-ours")
        if row["status"] != "good":
            raise CaError(f"{who}'s certificate is {row['status']} ({row['reason']}); a held or "
                          "revoked certificate cannot act", code="cert-" + row["status"])
        if not (cert.not_valid_before_utc <= at <= cert.not_valid_after_utc):
            raise CaError(f"{who}'s certificate is not valid now", code="cert-expired")
        person = person_of(cert.subject)
        if person:  # a person's: registered, and this is the certificate they act with now
            registered = self.store.person(person)
            if registered is None or registered["current_serial"] != row["serial"]:
                raise CaError(f"{who}'s certificate is not the current certificate of a "
                              "registered person", code="not-current")

    def person_for(self, serial: str) -> tuple[str, x509.Certificate]:
        cert = self.certificate(serial)
        return person_of(cert.subject), cert

    def checkpoint(self, ca_key: TokenKey) -> int:
        """Sign the head of the audit log on the CA token."""
        self._check_ca_key(ca_key)
        with Transaction(self.db):
            seq = self.audit.checkpoint(ca_key.sign, self.cert)
        self.audit.mirror_checkpoints(self.dir / MIRROR)
        return seq

    def record_refusal(self, action: str, error: ExchangedError, *, obj: str = "",
                       actor: str | None = None) -> None:
        """Audit a refused or failed operation (wrong PIN, forbidden act, bad input)."""
        with Transaction(self.db):
            self.audit.append(action=action, obj=obj, actor_subject=actor,
                              outcome="refused", details={"code": error.code,
                                                          "error": str(error)})

    # -- requests ---------------------------------------------------------------------------

    def submit(self, csr_data: bytes, profile: str, form: profiles.Form, *,
               applicant: Operator | None = None, source: str = "CSR") -> int:
        form.check(profile)
        if applicant is not None:
            self.cert_status(applicant.cert)
        req = csrmod.load(csr_data, source)
        csrmod.check(req, source)
        if profile == "node":
            profiles.sans(form, req)  # refuses odd SAN types now
        key = key_sha256(req.public_key())
        with Transaction(self.db):
            flags = self._flags(form) if profile == "person" else []
            rid = self.store.add_request(
                profile=profile, form=_form_dict(form), csr=req, key_sha256=key,
                status="pending", at=stamp(), applicant_serial=applicant.serial if applicant
                else None, flags=json.dumps(flags), approvals_needed=2 if flags else 1)
            details = {"profile": profile, "form": _form_dict(form), "key_sha256": key}
            if applicant is not None:
                seq = act(self.audit, applicant, None, "request-submit", str(rid), details)
            else:
                seq = self.audit.append(action="request-submit", obj=str(rid), details=details)
            self.store.update_request(rid, submit_seq=seq)
            self._flag(rid, flags)
        return rid

    def _flags(self, form: profiles.Form, person: str | None = None) -> list[str]:
        """Why a request for a person needs two officers (dual control), if it does: a new
        person with the name and unit of a registered one (a namesake, or someone trying to
        become them), or a re-issue for a person who holds a role."""
        flags = []
        for p in self.store.persons():
            if p["id"] != person and same_name(p["name"], form.name) and \
                    same_name(p["unit"], form.unit):
                held = [r["role"] for r in self.roles.store.held(p["id"])]
                flags.append(f"the name and unit of registered person {p['id']}"
                             + (f", who holds the role(s) {', '.join(held)}" if held else ""))
        if person:
            held = [r["role"] for r in self.roles.store.held(person)]
            if held:
                flags.append(f"a new certificate for {person}, who holds the role(s) "
                             f"{', '.join(held)}")
        return flags

    def _flag(self, rid: int, flags: list[str]) -> None:
        """A request under dual control is flagged to the auditor: an entry of its own."""
        if flags:
            self.audit.append(action="request-flagged", obj=str(rid),
                              details={"flags": flags, "approvals_needed": 2})

    def requests(self, status: str | None = None) -> list[dict[str, Any]]:
        return self.store.requests(status)

    def request(self, rid: int) -> dict[str, Any]:
        row = self.store.request(rid)
        if row is None:
            raise CaError(f"no request {rid}", code="not-found")
        return row

    def approve(self, rid: int, op: Operator, reason: str = "") -> int:
        """Returns how many more approvals the request needs before it can be issued."""
        return self._decide(rid, op, "approved", reason)

    def reject(self, rid: int, op: Operator, reason: str) -> None:
        if not reason.strip():
            raise CaError("a rejection needs a reason the applicant can read",
                          code="no-reason")
        self._decide(rid, op, "rejected", reason)

    def _decide(self, rid: int, op: Operator, outcome: str, reason: str) -> int:
        """An officer's decision; returns how many more approvals the request needs (dual
        control: a flagged request is approved by two officers, neither its applicant). A
        rejection by one is final."""
        role = self.roles.require(op, "request-decide")
        req = self.request(rid)
        if req["status"] != "pending":
            raise CaError(f"request {rid} is {req['status']}, not pending", code="bad-state")
        self._refuse_self_review(op, req, str(rid), holder_serial=req["supersedes"])
        action = "request-approve" if outcome == "approved" else "request-reject"
        with Transaction(self.db):
            self._still(rid, "pending")  # another officer may have decided meanwhile
            approvals = self.store.approvals(rid)
            if op.person in {a["person"] for a in approvals}:
                raise CaError(f"{op.name} approved request {rid} already; under dual control "
                              "another security officer must approve it too",
                              code="dual-control")
            seq = act(self.audit, op, role, action, str(rid),
                      {"reason": reason, "key_sha256": req["key_sha256"],
                       "profile": req["profile"], "flags": req["flags"]})
            at = stamp()
            left = 0
            if outcome == "approved":
                self.store.add_approval(request_id=rid, person=op.person,
                                        officer_serial=op.serial, seq=seq, at=at)
                left = req["approvals_needed"] - len(approvals) - 1
            if left <= 0:
                self.store.update_request(rid, status=outcome, decided_by=op.serial,
                                          decided_at=at, decision_reason=reason,
                                          decision_seq=seq)
        return max(left, 0)

    def _refuse_self_review(self, op: Actor, req: dict[str, Any], what: str,
                            holder_serial: str | None = None) -> None:
        """The roles' self-review rule, given what this CA knows of the request: the
        applicant's and the submitting officer's certificates, the one being replaced, the
        persons they name, and the person the request is for."""
        serials = [s for s in (req.get("applicant_serial"), req.get("submitted_by"),
                               holder_serial) if s]
        persons = [req["person_id"]] if req.get("person_id") else []
        for serial in serials:
            row = self.store.certificate(serial)
            if row is not None and row["person_id"]:
                persons.append(row["person_id"])
        refuse_self_review(op, what=what, name=req["name"], unit=req["unit"],
                           key=req["key_sha256"], their_serials=serials, their_persons=persons)

    # -- issuing ----------------------------------------------------------------------------

    def issue(self, rid: int, ca_key: TokenKey, op: Operator) -> x509.Certificate:
        """Issue the certificate of an approved request: a new person is registered under a
        new person id; a re-issue keeps the person's id and revokes the old certificate
        (superseded) in the same transaction."""
        self.roles.require(op, "certificate-issue")
        self._check_ca_key(ca_key)
        req = self.request(rid)
        if req["status"] != "approved":
            left = req["approvals_needed"] - len(self.store.approvals(rid))
            more = (f"; it needs {left} more approval(s) by another security officer (dual "
                    "control)") if req["status"] == "pending" and left > 0 else ""
            raise CaError(f"request {rid} is {req['status']}; only an approved request is "
                          f"issued{more}", code="not-approved")
        return self._issue(req, ca_key, op, supersede=req["supersedes"])

    def _issue(self, req: dict[str, Any], ca_key: TokenKey, op: Operator,
               supersede: str | None = None) -> x509.Certificate:
        csr = x509.load_pem_x509_csr(req["csr_pem"].encode())
        person = ""
        if req["profile"] == "person":
            person = req["person_id"] or new_person_id()
        form = profiles.Form(name=req["name"], unit=req["unit"], division=req["division"],
                             post=req["post"], reason=req["reason"], dns=req["dns"],
                             ip=req["ip"])
        serial = self._fresh_serial()
        start = utc_now()
        cert = profiles.end_entity(
            req["profile"], form=form, public_key=csr.public_key(), ca_cert=self.cert,
            serial=serial, not_before=start, days=self.config.cert_days,
            crl_url=self.config.crl_url, csr=csr, person_id=person).sign(ca_key.signer(),
                                                                         hashes.SHA256())
        at = stamp(start)
        with Transaction(self.db):
            self._still(req["id"], "approved")  # issued once, even by two officers at once
            seq = act(self.audit, op, OFFICER, "certificate-issue", serial_hex(serial),
                      {"request": req["id"], "sha256": cert.fingerprint(hashes.SHA256()).hex(),
                       "person": person})
            if person and not req["person_id"]:
                self.store.add_person(person_id=person, name=form.name, unit=form.unit, at=at,
                                      request_id=req["id"])
            self.store.add_certificate(cert, request_id=req["id"], profile=req["profile"],
                                       at=at, by=op.serial, seq=seq, person_id=person)
            if person:  # the person acts with this certificate now, and their roles go with it
                self.store.set_current(person, serial_hex(serial))
                self.roles.store.rebind(person, serial_hex(serial),
                                        cert.subject.rfc4514_string())
            self.store.update_request(req["id"], status="issued",
                                      cert_serial=serial_hex(serial))
            if supersede:
                self._set_status(supersede, op, "revoke", "superseded", at)
            self.audit.checkpoint(ca_key.sign, self.cert)
        self.audit.mirror_checkpoints(self.dir / MIRROR)
        return cert

    def reissue(self, serial: str, csr_data: bytes, op: Operator, *, post: str | None = None,
                division: str | None = None, reason: str = "change of post",
                source: str = "CSR") -> int:
        """A change of post (A29): a request for a new certificate of the same person (the
        same person id), with the new form fields. Like any request it is reviewed by another
        security officer than the one who submits it (two, if the person holds a role), then
        issued; the old certificate is revoked as superseded when the new one is issued.
        Returns the request's id."""
        self.roles.require(op, "certificate-issue")
        serial = parse_serial(serial)
        old = self._cert_row(serial)
        if old["status"] == "revoked":
            raise CaError(f"certificate {serial} is revoked; submit a new request instead",
                          code="bad-state")
        if old["request_id"] is None:
            raise CaError(f"certificate {serial} has no request to re-issue from")
        prev = self.request(old["request_id"])
        form = profiles.Form(name=prev["name"], unit=prev["unit"],
                             division=division if division is not None else prev["division"],
                             post=post if post is not None else prev["post"], reason=reason,
                             dns=prev["dns"], ip=prev["ip"])
        form.check(prev["profile"])
        req_csr = csrmod.load(csr_data, source)
        csrmod.check(req_csr, source)
        if prev["profile"] == "node":
            profiles.sans(form, req_csr)  # refuses odd names now, before anything is written
        key = key_sha256(req_csr.public_key())
        person = old["person_id"] or None
        # The holder does not submit their own re-issue (nor, later, approve it).
        self._refuse_self_review(op, {"name": form.name, "unit": form.unit, "key_sha256": key,
                                      "applicant_serial": prev["applicant_serial"],
                                      "person_id": person}, f"re-issue of {serial}",
                                 holder_serial=serial)
        at = stamp()
        with Transaction(self.db):
            flags = self._flags(form, person) if person else []
            rid = self.store.add_request(
                profile=prev["profile"], form=_form_dict(form), csr=req_csr, key_sha256=key,
                status="pending", at=at, applicant_serial=prev["applicant_serial"],
                supersedes=serial, person_id=person, submitted_by=op.serial,
                flags=json.dumps(flags), approvals_needed=2 if flags else 1)
            seq = act(self.audit, op, OFFICER, "request-submit", str(rid),
                      {"supersedes": serial, "form": _form_dict(form), "key_sha256": key,
                       "person": person, "flags": flags})
            self.store.update_request(rid, submit_seq=seq)
            self._flag(rid, flags)
        return rid

    def _still(self, rid: int, status: str) -> None:
        """Inside a transaction: the request is still in `status` (no race with a peer)."""
        now = self.store.request_status(rid)
        if now != status:
            raise CaError(f"request {rid} is {now or 'gone'} now, not {status}: another "
                          "officer acted first", code="bad-state")

    def _fresh_serial(self) -> int:
        while True:
            s = profiles.random_serial()
            if not self.store.serial_taken(serial_hex(s)):
                return s

    def _check_ca_key(self, ca_key: TokenKey) -> None:
        if spki_der(ca_key.public_key) != spki_der(self.cert.public_key()):
            raise CaError(f"key {ca_key.label!r} on token {ca_key.token.label!r} is not this "
                          "CA's key", code="wrong-ca-key")

    # -- status -----------------------------------------------------------------------------

    def hold(self, serial: str, op: Operator, note: str = "") -> None:
        self._change(serial, op, "hold", "certificateHold", note)

    def release(self, serial: str, op: Operator, note: str = "") -> None:
        self._change(serial, op, "release", None, note)

    def revoke(self, serial: str, op: Operator, reason: str, note: str = "") -> None:
        if reason not in REVOKE_REASONS:
            raise CaError(f"unknown revocation reason {reason!r} (one of "
                          f"{', '.join(REVOKE_REASONS)})", code="bad-reason")
        self._change(serial, op, "revoke", reason, note)

    def _change(self, serial: str, op: Operator, action: str, reason: str | None,
                note: str) -> None:
        self.roles.require(op, "certificate-status")
        serial = parse_serial(serial)
        with Transaction(self.db):
            self._set_status(serial, op, action, reason, stamp(), note=note)

    def _set_status(self, serial: str, op: Operator, action: str, reason: str | None, at: str,
                    note: str = "") -> None:
        """Inside the caller's transaction: check the transition, sign it, apply it."""
        row = self._cert_row(serial)
        status = row["status"]
        if status == "revoked":
            raise CaError(f"certificate {serial} is already revoked ({row['reason']}); a "
                          "revocation is final", code="already-revoked")
        if action == "hold" and status == "held":
            raise CaError(f"certificate {serial} is already on hold", code="bad-state")
        if action == "release" and status != "held":
            raise CaError(f"certificate {serial} is not on hold; only a held certificate is "
                          "released", code="bad-state")
        seq = act(self.audit, op, OFFICER, f"certificate-{action}", serial,
                  {"reason": reason, "note": note})
        new, since, why = {"hold": ("held", at, reason), "release": ("good", None, None),
                           "revoke": ("revoked", at, reason)}[action]
        self.store.set_status(serial, action=action, status=new, at=at, revoked_at=since,
                              reason=why, officer=op.serial, seq=seq)

    def _cert_row(self, serial: str) -> dict[str, Any]:
        row = self.store.certificate(serial)
        if row is None:
            raise CaError(f"no certificate with serial {serial} in this CA", code="not-found")
        return row

    def certificates(self, status: str | None = None) -> list[dict[str, Any]]:
        return self.store.certificates(status)

    def certificate(self, serial: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(
            self._cert_row(parse_serial(serial))["pem"].encode())

    # -- CRLs -------------------------------------------------------------------------------

    def crl_entries(self) -> Iterator[crlmod.Entry]:
        for serial, at, reason in self.store.listed():
            yield crlmod.Entry(int(serial, 16), parse_time(at), reason)

    def make_crl(self, ca_key: TokenKey, hours: int | None = None) -> tuple[int, Path]:
        """Sign a new CRL with the next number; write it to crl/N.crl and ca.crl (DER)."""
        self._check_ca_key(ca_key)
        hours = hours or self.config.crl_hours
        if hours <= 0:
            raise CaError("the CRL validity must be positive")
        this_update = utc_now()
        next_update = this_update + dt.timedelta(hours=hours)
        with Transaction(self.db):  # one snapshot of the entries, one number, no race
            number = self.store.next_crl_number()
            entries = list(self.crl_entries())
            der = crlmod.build(key=ca_key, issuer=self.cert, entries=entries, number=number,
                               this_update=this_update, next_update=next_update)
            path = self.dir / CRL_DIR / f"{number}.crl"
            write_atomic(path, der)
            self.store.add_crl(number=number, this_update=stamp(this_update),
                               next_update=stamp(next_update), entries=len(entries),
                               path=path.name, sha256=hashlib.sha256(der).hexdigest())
            self.audit.append(action="crl-publish", obj=str(number),
                              actor_subject=self.cert.subject.rfc4514_string(),
                              details={"entries": len(entries), "next_update":
                                       stamp(next_update)})
            self.audit.checkpoint(ca_key.sign, self.cert)
        self.audit.mirror_checkpoints(self.dir / MIRROR)
        write_atomic(self.dir / LATEST_CRL, der)
        return number, path

    # -- roles ------------------------------------------------------------------------------

    def grant_role(self, op: Operator, serial: str, role: str, division: str = "") -> int:
        _, cert = self.person_for(serial)
        with Transaction(self.db):
            return self.roles.grant(op, cert, role, division)

    def review_role(self, op: Operator, role_id: int, approve: bool, reason: str) -> None:
        with Transaction(self.db):
            self.roles.review(op, role_id, approve, reason)

    def revoke_role(self, op: Operator, role_id: int, reason: str) -> None:
        with Transaction(self.db):
            self.roles.revoke(op, role_id, reason)

    def suspend_person(self, op: Operator, serial: str, reason: str, *,
                       resume: bool = False) -> str:
        """Suspend (or with `resume`, restore) every right of the person certificate
        `serial` names; returns the person."""
        person, _ = self.person_for(serial)
        with Transaction(self.db):
            (self.roles.resume if resume else self.roles.suspend)(op, person, reason)
        return person

    # -- the audit log (auditors only) ------------------------------------------------------

    def audit_access(self, op: Operator, what: str, query: dict[str, Any]) -> None:
        """An auditor reads the log (`what`: audit-show, audit-verify, audit-export): allowed
        by the roles, and itself a signed entry."""
        role = self.roles.require(op, "audit-read")
        with Transaction(self.db):
            act(self.audit, op, role, what, "", {"query": query})

    def audit_rows(self, query: dict[str, Any], limit: int | None = None
                   ) -> list[dict[str, Any]]:
        """Entries matching `query` (actor, action, object, since, until); a serial matches
        however it is written (openssl prints upper case)."""
        match = {k: [query[k], maybe_serial(query[k])] for k in ("actor", "action", "object")
                 if query.get(k)}
        return self.audit.query(match, since=_time(query.get("since")),
                                until=_time(query.get("until")), limit=limit)

    def verify_audit(self, trusted: x509.Certificate | None = None,
                     copies: Iterable[Path] = ()) -> Report:
        """The whole chain, checked against `trusted` (the auditor's own copy of the CA
        certificate) or ca.pem, with the checkpoints' copy beside the database and any other
        `copies`."""
        ca = trusted or self.cert
        return self.audit.verify(ca, issuer=ca, mirrors=[self.dir / MIRROR, *copies])

    def export_evidence(self, query: dict[str, Any], out: Path,
                        limit: int | None = None) -> dict[str, Any]:
        """An evidence bundle for the entries matching `query` (see store/evidence.py)."""
        matter = self.audit_rows(query, limit)
        certs = {}
        for r in matter:
            if r["actor"] and r["actor"] not in certs:
                try:
                    certs[r["actor"]] = self.certificate(r["actor"])
                except ExchangedError:
                    pass
        return evidence.export(self.audit, matter, out, signer=self.cert, certs=certs,
                               crls=[self.dir / LATEST_CRL], query=query)


def _time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError:
        raise CaError(f"not an ISO 8601 time: {text!r} (e.g. 2026-11-25T12:00:00Z)",
                      code="usage") from None


def _form_dict(form: profiles.Form, *, reason: str | None = None) -> dict[str, Any]:
    return {"name": form.name, "unit": form.unit, "division": form.division, "post": form.post,
            "reason": form.reason if reason is None else reason, "dns": list(form.dns),
            "ip": list(form.ip)}
