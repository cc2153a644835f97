"""The certificate authority: init ceremony, requests and review, issue, hold/release/revoke, CRLs.

The CA's key lives on a token; so does every officer's. An officer acts with their own token:
each decision is canonical JSON signed on the officer's token (detached CMS, verifiable with
`openssl cms -verify`) and lands in the audit log in the same transaction as the change it
authorises. Who may act is decided by `exchanged.roles`. Every check runs before anything is
written, so a refused operation leaves the CA's state as it was (the refusal itself is audited).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from exchanged.errors import ExchangedError
from exchanged.pki import crl as crlmod
from exchanged.pki import csr as csrmod
from exchanged.pki import profiles
from exchanged.pki.operator import Operator, attr, person_of
from exchanged.pki.token import TokenKey, spki_der
from exchanged.roles import ADMIN, AUDITOR, OFFICER, Roles, act
from exchanged.store import cadb
from exchanged.store.audit import AuditLog
from exchanged.store.cadb import Transaction, one, rows
from exchanged.store.files import write_atomic

CONFIG = "ca.toml"
DB = "ca.db"
CA_CERT = "ca.pem"
CRL_DIR = "crl"
LATEST_CRL = "ca.crl"
REVOKE_REASONS = tuple(r for r in crlmod.REASONS if r not in ("certificateHold", "removeFromCRL"))


class CaError(ExchangedError):
    code = "ca"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(s: str) -> dt.datetime:
    # fromisoformat (C, accepts "Z" since 3.11) is ~30x faster than strptime: 100k CRL entries.
    return dt.datetime.fromisoformat(s)


def serial_hex(serial: int) -> str:
    return format(serial, "x")


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


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


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
        self.audit = AuditLog(self.db)
        self.roles = Roles(self.db, self.audit, self.cert_status)

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
        if set(people) != {ADMIN, OFFICER, AUDITOR}:
            raise CaError("the ceremony needs an administrator, a security officer and an "
                          "auditor")
        labels = [key.token.label for key, _ in people.values()]
        if ca_key.token.label in labels or len(set(labels)) != len(labels):
            raise CaError("each person needs a token of their own, apart from the CA's",
                          code="separation")
        if len({(f.name, f.unit) for _, f in people.values()}) != len(people):
            raise CaError("the administrator, the security officer and the auditor must be "
                          "three different persons (A5)", code="separation")
        for key, form in people.values():
            form.check("person")
            if key.token.certificate(id=key.id) is not None:
                raise CaError(f"token {key.token.label!r} already holds a certificate for key "
                              f"{key.label!r}; use a fresh key", code="exists")
        start = now()
        root = profiles.ca_root(name=name, public_key=ca_key.public_key, not_before=start,
                                days=days).sign(ca_key.signer(), hashes.SHA256())
        issued: dict[str, tuple[Operator, x509.CertificateSigningRequest, profiles.Form]] = {}
        for role, (key, form) in people.items():
            req = csrmod.build(key, "person", form)
            csrmod.check(req, f"the {role}'s CSR")
            cert = profiles.end_entity(
                "person", form=form, public_key=req.public_key(), ca_cert=root,
                serial=profiles.random_serial(), not_before=start, days=cert_days,
                crl_url=crl_url).sign(ca_key.signer(), hashes.SHA256())
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
        audit = AuditLog(db)
        at = _iso(start)
        with Transaction(db):
            audit.checkpoint(lambda m: ca_key.sign(m), root)  # the genesis anchor
            audit.append(action="ca-init", obj=root.subject.rfc4514_string(),
                         actor_subject=root.subject.rfc4514_string(),
                         details={"sha256": root.fingerprint(hashes.SHA256()).hex(),
                                  "key": str(ca_key.uri.public())})
            db["meta"].insert_all([
                {"key": "ca_subject", "value": root.subject.rfc4514_string()},
                {"key": "ca_sha256", "value": root.fingerprint(hashes.SHA256()).hex()}],
                pk="key", replace=True)
            for role, (op, req, form) in issued.items():
                rid = db["requests"].insert({
                    "submitted_at": at, "profile": "person", "name": form.name,
                    "unit": form.unit, "division": form.division, "post": form.post,
                    "reason": form.reason or f"CA initialisation: first {role}",
                    "csr_pem": req.public_bytes(serialization.Encoding.PEM).decode(),
                    "key_sha256": _key_sha256(req.public_key()), "status": "issued",
                    "decided_at": at, "decision_reason": "CA initialisation ceremony",
                    "cert_serial": op.serial}).last_pk
                seq = audit.append(action="certificate-issue", obj=op.serial,
                                   actor_subject=root.subject.rfc4514_string(),
                                   details={"request": rid, "ceremony": role})
                _insert_cert(db, op.cert, rid, "person", at, None, seq)
            Roles(db, audit, lambda cert: None).bootstrap(
                {role: op for role, (op, _, _) in issued.items()})
            audit.checkpoint(lambda m: ca_key.sign(m), root)
        db.conn.close()
        ca = cls(d)
        ca.make_crl(ca_key)
        return ca

    # -- who acts ---------------------------------------------------------------------------

    def cert_status(self, cert: x509.Certificate, at: dt.datetime | None = None) -> None:
        """An operator's certificate must be this CA's, in its records, good and current."""
        at = at or now()
        who = attr(cert.subject, NameOID.COMMON_NAME) or cert.subject.rfc4514_string()
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            raise CaError(f"{who}'s certificate was not issued by this CA",
                          code="not-ours") from None
        row = one(self.db, "SELECT status, reason FROM certificates WHERE serial = ?",
                  [serial_hex(cert.serial_number)])
        if row is None:
            raise CaError(f"{who}'s certificate is not in this CA's records", code="not-ours")
        if row["status"] != "good":
            raise CaError(f"{who}'s certificate is {row['status']} ({row['reason']}); a held or "
                          "revoked certificate cannot act", code="cert-" + row["status"])
        if not (cert.not_valid_before_utc <= at <= cert.not_valid_after_utc):
            raise CaError(f"{who}'s certificate is not valid now", code="cert-expired")

    def person_for(self, serial: str) -> tuple[str, x509.Certificate]:
        cert = self.certificate(serial)
        return person_of(cert.subject), cert

    def checkpoint(self, ca_key: TokenKey) -> int:
        """Sign the head of the audit log on the CA token."""
        self._check_ca_key(ca_key)
        with Transaction(self.db):
            return self.audit.checkpoint(lambda m: ca_key.sign(m), self.cert)

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
        profiles.sans(form, req) if profile == "node" else None  # refuses odd SAN types now
        at = _iso(now())
        with Transaction(self.db):
            rid = self.db["requests"].insert({
                "submitted_at": at, "profile": profile, "name": form.name, "unit": form.unit,
                "division": form.division, "post": form.post, "reason": form.reason,
                "dns": json.dumps(list(form.dns)), "ip": json.dumps(list(form.ip)),
                "csr_pem": req.public_bytes(serialization.Encoding.PEM).decode(),
                "key_sha256": _key_sha256(req.public_key()), "status": "pending",
                "applicant_serial": applicant.serial if applicant else None}).last_pk
            if applicant is not None:
                seq = act(self.audit, applicant, None, "request-submit", str(rid),
                          {"profile": profile, "form": _form_dict(form),
                           "key_sha256": _key_sha256(req.public_key())})
            else:
                seq = self.audit.append(action="request-submit", obj=str(rid),
                                        details={"profile": profile, "form": _form_dict(form),
                                                 "key_sha256": _key_sha256(req.public_key())})
            self.db["requests"].update(rid, {"submit_seq": seq})
        return int(rid)

    def requests(self, status: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT id, submitted_at, profile, name, unit, division, post, status, "
               "decided_by, cert_serial FROM requests")
        if status:
            return rows(self.db, sql + " WHERE status = ? ORDER BY id", [status])
        return rows(self.db, sql + " ORDER BY id")

    def request(self, rid: int) -> dict[str, Any]:
        row = one(self.db, "SELECT * FROM requests WHERE id = ?", [rid])
        if row is None:
            raise CaError(f"no request {rid}", code="not-found")
        row["dns"], row["ip"] = json.loads(row["dns"]), json.loads(row["ip"])
        return row

    def approve(self, rid: int, op: Operator, reason: str = "") -> None:
        self._decide(rid, op, "approved", reason)

    def reject(self, rid: int, op: Operator, reason: str) -> None:
        if not reason.strip():
            raise CaError("a rejection needs a reason the applicant can read",
                          code="no-reason")
        self._decide(rid, op, "rejected", reason)

    def _decide(self, rid: int, op: Operator, outcome: str, reason: str) -> None:
        role = self.roles.require(op, OFFICER)
        req = self.request(rid)
        if req["status"] != "pending":
            raise CaError(f"request {rid} is {req['status']}, not pending", code="bad-state")
        self._refuse_self_review(req, op)
        action = "request-approve" if outcome == "approved" else "request-reject"
        with Transaction(self.db):
            self._still(rid, "pending")  # another officer may have decided meanwhile
            seq = act(self.audit, op, role, action, str(rid),
                      {"reason": reason, "key_sha256": req["key_sha256"],
                       "profile": req["profile"]})
            self.db["requests"].update(rid, {"status": outcome, "decided_by": op.serial,
                                             "decided_at": _iso(now()),
                                             "decision_reason": reason,
                                             "decision_seq": seq})

    def _refuse_self_review(self, req: dict[str, Any], op: Operator,
                            holder_serial: str | None = None) -> None:
        """No officer reviews their own request: matched by the applicant's certificate, the
        certificate being replaced, the name and unit on the form, or the key."""
        mine = (op.serial in (req["applicant_serial"], holder_serial)
                or (req["name"] == op.name
                    and req["unit"] == attr(op.cert.subject, NameOID.ORGANIZATION_NAME))
                or req["key_sha256"] == _key_sha256(op.cert.public_key()))
        for serial in (req["applicant_serial"], holder_serial):  # another certificate of theirs
            if serial and not mine:
                row = one(self.db, "SELECT subject FROM certificates WHERE serial = ?", [serial])
                mine = row is not None and person_of(x509.Name.from_rfc4514_string(
                    row["subject"])) == op.person
        if mine:
            raise CaError(f"{op.name} is the applicant of request {req['id']}; another "
                          "security officer must review it", code="self-review")

    # -- issuing ----------------------------------------------------------------------------

    def issue(self, rid: int, ca_key: TokenKey, op: Operator) -> x509.Certificate:
        """Issue the certificate of an approved request."""
        self.roles.require(op, OFFICER)
        self._check_ca_key(ca_key)
        req = self.request(rid)
        if req["status"] != "approved":
            raise CaError(f"request {rid} is {req['status']}; only an approved request is "
                          "issued", code="not-approved")
        return self._issue(req, ca_key, op)

    def _issue(self, req: dict[str, Any], ca_key: TokenKey, op: Operator,
               supersede: str | None = None) -> x509.Certificate:
        csr = x509.load_pem_x509_csr(req["csr_pem"].encode())
        form = profiles.Form(name=req["name"], unit=req["unit"], division=req["division"],
                             post=req["post"], reason=req["reason"], dns=req["dns"],
                             ip=req["ip"])
        serial = self._fresh_serial()
        start = now()
        cert = profiles.end_entity(
            req["profile"], form=form, public_key=csr.public_key(), ca_cert=self.cert,
            serial=serial, not_before=start, days=self.config.cert_days,
            crl_url=self.config.crl_url, csr=csr).sign(ca_key.signer(), hashes.SHA256())
        at = _iso(start)
        with Transaction(self.db):
            self._still(req["id"], "approved")  # issued once, even by two officers at once
            seq = act(self.audit, op, OFFICER, "certificate-issue", serial_hex(serial),
                      {"request": req["id"], "sha256": cert.fingerprint(hashes.SHA256()).hex()})
            _insert_cert(self.db, cert, req["id"], req["profile"], at, op.serial, seq)
            self.db["requests"].update(req["id"], {"status": "issued",
                                                   "cert_serial": serial_hex(serial)})
            if supersede:
                self._set_status(supersede, op, "revoke", "superseded", at)
            self.audit.checkpoint(lambda m: ca_key.sign(m), self.cert)
        return cert

    def reissue(self, serial: str, csr_data: bytes, ca_key: TokenKey, op: Operator, *,
                post: str | None = None, division: str | None = None,
                reason: str = "change of post", source: str = "CSR") -> x509.Certificate:
        """A change of post (A29): a new certificate with the new form fields, the old one
        revoked as superseded, in one transaction. The reviewing officer is not the holder."""
        self.roles.require(op, OFFICER)
        self._check_ca_key(ca_key)
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
        # The holder must not approve their own re-issue.
        self._refuse_self_review({"id": f"re-issue of {serial}", "name": form.name,
                                  "unit": form.unit,
                                  "applicant_serial": prev["applicant_serial"],
                                  "key_sha256": _key_sha256(req_csr.public_key())},
                                 op, holder_serial=serial)
        at = _iso(now())
        with Transaction(self.db):
            seq = act(self.audit, op, OFFICER, "request-approve", f"reissue:{serial}",
                      {"supersedes": serial, "form": _form_dict(form),
                       "key_sha256": _key_sha256(req_csr.public_key())})
            rid = self.db["requests"].insert({
                "submitted_at": at, "profile": prev["profile"], "name": form.name,
                "unit": form.unit, "division": form.division, "post": form.post,
                "reason": reason, "dns": json.dumps(list(form.dns)),
                "ip": json.dumps(list(form.ip)),
                "csr_pem": req_csr.public_bytes(serialization.Encoding.PEM).decode(),
                "key_sha256": _key_sha256(req_csr.public_key()), "status": "approved",
                "applicant_serial": prev["applicant_serial"], "decided_by": op.serial,
                "decided_at": at, "decision_reason": reason, "decision_seq": seq,
                "supersedes": serial}).last_pk
        return self._issue(self.request(int(rid)), ca_key, op, supersede=serial)

    def _still(self, rid: int, status: str) -> None:
        """Inside a transaction: the request is still in `status` (no race with a peer)."""
        row = one(self.db, "SELECT status FROM requests WHERE id = ?", [rid])
        if row is None or row["status"] != status:
            raise CaError(f"request {rid} is {row['status'] if row else 'gone'} now, not "
                          f"{status}: another officer acted first", code="bad-state")

    def _fresh_serial(self) -> int:
        while True:
            s = profiles.random_serial()
            if one(self.db, "SELECT 1 AS x FROM certificates WHERE serial = ?",
                   [serial_hex(s)]) is None:
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
        self.roles.require(op, OFFICER)
        serial = parse_serial(serial)
        with Transaction(self.db):
            self._set_status(serial, op, action, reason, _iso(now()), note=note)

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
        new = {"hold": ("held", at, reason), "release": ("good", None, None),
               "revoke": ("revoked", at, reason)}[action]
        self.db["certificates"].update(serial, {"status": new[0], "revoked_at": new[1],
                                                "reason": new[2]})
        self.db["status_changes"].insert({"serial": serial, "action": action, "reason": reason,
                                          "at": at, "officer_serial": op.serial,
                                          "seq": seq})

    def _cert_row(self, serial: str) -> dict[str, Any]:
        row = one(self.db, "SELECT * FROM certificates WHERE serial = ?", [serial])
        if row is None:
            raise CaError(f"no certificate with serial {serial} in this CA", code="not-found")
        return row

    def certificates(self, status: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT serial, profile, subject, not_before, not_after, status, reason, "
               "revoked_at, request_id FROM certificates")
        if status:
            return rows(self.db, sql + " WHERE status = ? ORDER BY issued_at", [status])
        return rows(self.db, sql + " ORDER BY issued_at")

    def certificate(self, serial: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(
            self._cert_row(parse_serial(serial))["pem"].encode())

    # -- CRLs -------------------------------------------------------------------------------

    def crl_entries(self) -> Iterator[crlmod.Entry]:
        cur = self.db.execute("SELECT serial, revoked_at, reason FROM certificates "
                              "WHERE status IN ('held', 'revoked')")
        for serial, at, reason in cur:
            yield crlmod.Entry(int(serial, 16), _parse_iso(at), reason)

    def make_crl(self, ca_key: TokenKey, hours: int | None = None) -> tuple[int, Path]:
        """Sign a new CRL with the next number; write it to crl/N.crl and ca.crl (DER)."""
        self._check_ca_key(ca_key)
        hours = hours or self.config.crl_hours
        if hours <= 0:
            raise CaError("the CRL validity must be positive")
        this_update = now()
        next_update = this_update + dt.timedelta(hours=hours)
        with Transaction(self.db):  # one snapshot of the entries, one number, no race
            last = one(self.db, "SELECT max(number) AS n FROM crls")
            number = (last["n"] if last and last["n"] else 0) + 1
            entries = list(self.crl_entries())
            der = crlmod.build(key=ca_key, issuer=self.cert, entries=entries, number=number,
                               this_update=this_update, next_update=next_update)
            path = self.dir / CRL_DIR / f"{number}.crl"
            write_atomic(path, der)
            self.db["crls"].insert({"number": number, "this_update": _iso(this_update),
                                    "next_update": _iso(next_update), "entries": len(entries),
                                    "path": path.name, "sha256": hashlib.sha256(der).hexdigest()})
            self.audit.append(action="crl-publish", obj=str(number),
                              actor_subject=self.cert.subject.rfc4514_string(),
                              details={"entries": len(entries), "next_update":
                                       _iso(next_update)})
            self.audit.checkpoint(lambda m: ca_key.sign(m), self.cert)
        write_atomic(self.dir / LATEST_CRL, der)
        return number, path


def _insert_cert(db: Any, cert: x509.Certificate, rid: int | None, profile: str, at: str,
                 by: str | None, seq: int | None) -> None:
    db["certificates"].insert({
        "serial": serial_hex(cert.serial_number), "request_id": rid, "profile": profile,
        "subject": cert.subject.rfc4514_string(), "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc), "pem": pem(cert), "status": "good",
        "issued_at": at, "issued_by": by, "issue_seq": seq})


def _form_dict(form: profiles.Form) -> dict[str, Any]:
    return {"name": form.name, "unit": form.unit, "division": form.division, "post": form.post,
            "reason": form.reason, "dns": list(form.dns), "ip": list(form.ip)}


def _key_sha256(key: Any) -> str:
    return hashlib.sha256(spki_der(key)).hexdigest()
