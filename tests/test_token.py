"""Tokens through a real SoftHSM: keys made on the token stay there; signatures verify."""

from __future__ import annotations

import os
from pathlib import Path

import pkcs11
import pytest
from conftest import TOKEN_LABELS, Tokens, uid
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from pkcs11 import Attribute, ObjectClass

from exchanged.errors import ExchangedError
from exchanged.pki.pin import PinSource
from exchanged.pki.token import OPENSC_PATHS, Token, find_token, load_module
from exchanged.pki.uri import parse


def open_token(tokens: Tokens, label: str) -> Token:
    return Token.open(parse(f"pkcs11:token={label}"),
                      PinSource("test", "EXCHANGED_TEST_PIN", tokens.pin(label)))


def test_ec_key_signs_and_verifies(tokens: Tokens) -> None:
    with open_token(tokens, "other") as t:
        key = t.generate_keypair(f"ec-{uid()}")
        assert key.key_type == "ec" and key.public_key.curve.name == "secp256r1"
        sig = key.sign(b"document")
        key.public_key.verify(sig, b"document", ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            key.public_key.verify(sig, b"documenT", ec.ECDSA(hashes.SHA256()))


def test_rsa_3072_key_signs_pkcs1_and_pss(tokens: Tokens) -> None:
    with open_token(tokens, "other") as t:
        key = t.generate_keypair(f"rsa-{uid()}", key_type="rsa", bits=3072)
        assert key.public_key.key_size == 3072
        key.public_key.verify(key.sign(b"x"), b"x", padding.PKCS1v15(), hashes.SHA256())
        key.public_key.verify(key.sign(b"x", pss=True), b"x",
                              padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())


def test_weak_rsa_and_unknown_type_refused(tokens: Tokens) -> None:
    with open_token(tokens, "other") as t:
        with pytest.raises(ExchangedError, match="at least 2048"):
            t.generate_keypair(f"weak-{uid()}", key_type="rsa", bits=1024)
        with pytest.raises(ExchangedError, match="unknown key type"):
            t.generate_keypair(f"dsa-{uid()}", key_type="dsa")


def test_duplicate_label_refused(tokens: Tokens) -> None:
    label = f"dup-{uid()}"
    with open_token(tokens, "other") as t:
        t.generate_keypair(label)
        with pytest.raises(ExchangedError, match="already holds a key"):
            t.generate_keypair(label)


def test_signer_refuses_export(tokens: Tokens) -> None:
    with open_token(tokens, "other") as t:
        signer = t.generate_keypair(f"exp-{uid()}").signer()
        with pytest.raises(ExchangedError, match="cannot be exported"):
            signer.private_numbers()
        with pytest.raises(ExchangedError, match="cannot be exported"):
            signer.private_bytes()  # type: ignore[call-arg]


def test_every_private_key_on_every_token_is_sensitive_and_never_extractable(
        tokens: Tokens) -> None:
    """Runs through python-pkcs11 directly (not our code) so it judges what we made."""
    with open_token(tokens, "other") as t:  # make sure there is at least one of each kind
        t.generate_keypair(f"chk-ec-{uid()}")
        t.generate_keypair(f"chk-rsa-{uid()}", key_type="rsa", bits=2048)
    lib = load_module()
    seen = 0
    for label in TOKEN_LABELS:
        tok = lib.get_token(token_label=label)
        with tok.open(user_pin=Path(tokens.pin(label)).read_text().strip()) as s:
            for key in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
                assert key[Attribute.SENSITIVE] is True
                assert key[Attribute.EXTRACTABLE] is False
                assert key[Attribute.NEVER_EXTRACTABLE] is True
                assert key[Attribute.ALWAYS_SENSITIVE] is True
                with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                    key[Attribute.VALUE if key.key_type == pkcs11.KeyType.EC
                        else Attribute.PRIVATE_EXPONENT]
                seen += 1
    assert seen >= 2


def test_wrong_pin_and_unknown_token(tokens: Tokens, tmp_path: Path) -> None:
    wrong = tmp_path / "pin"
    wrong.write_text("99999999\n")
    wrong.chmod(0o600)
    with pytest.raises(ExchangedError, match="wrong PIN") as e:
        Token.open(parse("pkcs11:token=other"), PinSource("t", "X", str(wrong)))
    assert e.value.code == "wrong-pin"
    with pytest.raises(ExchangedError, match="no token matches") as e2:
        Token.open(parse("pkcs11:token=missing"), PinSource("t", "X", str(wrong)))
    assert e2.value.code == "no-token"


def test_pin_from_environment(tokens: Tokens, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXCHANGED_TEST_PIN", Path(tokens.pin("other")).read_text().strip())
    with Token.open(parse("pkcs11:token=other"), PinSource("t", "EXCHANGED_TEST_PIN")) as t:
        assert t.label == "other"


def test_store_certificate_beside_its_key(tokens: Tokens) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.x509.oid import NameOID
    with open_token(tokens, "other") as t:
        key = t.generate_keypair(f"cert-{uid()}")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self")])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
                .sign(key.signer(), hashes.SHA256()))
        cert.verify_directly_issued_by(cert)
        stored = t.store_certificate(cert)
        assert stored.id == key.id
        assert t.certificate(id=key.id) == cert
        with pytest.raises(ExchangedError, match="already holds a certificate"):
            t.store_certificate(cert)
        kinds = {(o.kind, o.label) for o in t.list_objects()}
        assert ("cert", key.label) in kinds and ("private", key.label) in kinds


def test_opensc_module_loads_through_the_same_code() -> None:
    """OpenSC's module (no reader attached here) goes through load_module/find_token too."""
    path = next((p for p in OPENSC_PATHS if os.path.exists(p)), None)
    assert path is not None, "opensc is not installed (tools/setup installs it)"
    lib = load_module(path)
    with pytest.raises(ExchangedError) as e:
        find_token(lib, parse("pkcs11:token=card"))
    assert e.value.code == "no-token"
