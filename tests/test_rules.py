"""Unit tests of exchanged.roles' logic on a real SQLite file, with certificates made in memory
(the paths through tokens, the CLI and the daemon are tested in test_roles.py and
test_daemon.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from exchanged.common import canonical
from exchanged.pki.operator import SignedOperator
from exchanged.roles import MAY, RoleError, Roles, act, check_ceremony, refuse_self_review
from exchanged.store.audit import AuditLog
from exchanged.store.db import Transaction, connect
from exchanged.store.roledb import RoleStore


def person_cert(name: str, unit: str = "General Office", person: str = "") -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, unit),
                         *([x509.NameAttribute(NameOID.SERIAL_NUMBER, person)] if person
                           else []),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    db = connect(tmp_path / "t.db")
    AuditLog.create(db)
    RoleStore.create(db)
    return AuditLog(db)


def test_a_presigned_request_not_in_canonical_form_is_refused(log: AuditLog) -> None:
    """Regression: an `assert` compared the client's bytes with their canonical form (gone
    under python -O, and an AssertionError for a hostile client). Now a clear refusal, and
    nothing is written."""
    cert = person_cert("Zhang Wei")
    body = {"action": "person-suspend", "object": "CN=X,O=Y", "at": "2026-12-01T00:00:00Z"}
    spaced = b'{"action": "person-suspend", "at": "2026-12-01T00:00:00Z", "object": "CN=X,O=Y"}'
    assert spaced != canonical(body)
    op = SignedOperator(cert, spaced, b"cms")
    with Transaction(log.db), pytest.raises(RoleError, match="not canonical JSON") as e:
        act(log, op, "administrator", "person-suspend", "CN=X,O=Y")
    assert e.value.code == "bad-request"
    assert log.head()[0] == 0


def test_every_act_of_the_table_names_known_roles() -> None:
    from exchanged.roles import ROLES
    assert MAY and all(set(roles) <= set(ROLES) for roles in MAY.values())


PERSON = "P-0123456789ABCDEF"


def test_require_reads_the_table(log: AuditLog) -> None:
    """The same person is allowed what their role may do and refused the rest; a certificate
    with the same name but no registered person id is no one."""
    roles = Roles(RoleStore(log.db), log, lambda c: None)
    with Transaction(log.db):
        roles.store.add(person=PERSON, holder_serial="1", holder_subject="",
                        role="deputy-receiver", division="Registry", status="active",
                        granted_by=None, granted_at="t", grant_seq=0)
    body = canonical({"action": "x", "object": "y", "at": "t"})
    op = SignedOperator(person_cert("Liu Yang", person=PERSON), body, b"")
    assert roles.require(op, "document-sign-for") == "deputy-receiver"
    with pytest.raises(RoleError, match="not an active auditor"):
        roles.require(op, "audit-read")
    namesake = SignedOperator(person_cert("Liu Yang"), body, b"")
    with pytest.raises(RoleError, match="names no registered person"):
        roles.require(namesake, "document-sign-for")
    other = SignedOperator(person_cert("Liu Yang", person="P-FEDCBA9876543210"), body, b"")
    with pytest.raises(RoleError, match="not an active"):
        roles.require(other, "document-sign-for")


def test_ceremony_needs_three_persons_on_three_tokens() -> None:
    ok = {"administrator": ("admin", "A", "U"), "security-officer": ("off", "B", "U"),
          "auditor": ("aud", "C", "U")}
    check_ceremony("ca", ok)
    with pytest.raises(RoleError, match="token of their own"):
        check_ceremony("ca", {**ok, "auditor": ("ca", "C", "U")})
    with pytest.raises(RoleError, match="three different persons"):
        check_ceremony("ca", {**ok, "auditor": ("aud", "A", "U")})


def test_self_review_is_matched_by_person_name_and_approval() -> None:
    officer = person_cert("Wang Fang", person=PERSON)
    op = SignedOperator(officer, canonical({}), b"")
    refuse_self_review(op, what="7", name="Someone Else", unit="U", key="00",
                       their_serials=["abc"], their_persons=["P-1111111111111111"])
    with pytest.raises(RoleError, match="is the applicant of request 7"):
        refuse_self_review(op, what="7", name="Someone Else", unit="U", key="00",
                           their_serials=["abc"], their_persons=[PERSON])
    with pytest.raises(RoleError, match="is the applicant of request 7"):  # folded names
        refuse_self_review(op, what="7", name="ｗａｎｇ  fang", unit="general office",
                           key="00", their_serials=[], their_persons=[])
    with pytest.raises(RoleError, match="approved request 7 already"):
        refuse_self_review(op, what="7", name="Someone Else", unit="U", key="00",
                           their_serials=[], their_persons=[], approved_by=[PERSON])
