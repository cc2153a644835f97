"""RFC 7512 URIs and PIN sources: pure logic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exchanged.errors import ExchangedError
from exchanged.pki.pin import PinSource
from exchanged.pki.uri import parse


def test_round_trip_with_binary_id_and_escapes() -> None:
    u = parse("pkcs11:token=My%20Token;object=node%3Bkey;type=private;id=%01%FF"
              "?module-path=/usr/lib/softhsm/libsofthsm2.so")
    assert u.token == "My Token" and u.object == "node;key" and u.id == b"\x01\xff"
    assert u.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert parse(str(u)) == u


def test_rfc7512_examples() -> None:
    u = parse("pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
              "manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;"
              "id=%69%95%3E%5C%F4%BD%EC%91;serial=")
    assert u.token == "The Software PKCS#11 Softtoken"
    assert u.attrs["manufacturer"] == "Snake Oil, Inc."
    assert u.id == bytes.fromhex("69953e5cf4bdec91")
    assert parse("pkcs11:").attrs == {}


@pytest.mark.parametrize("bad", ["file:x", "pkcs11:tokn=x", "pkcs11:token=a;token=b",
                                 "pkcs11:type=weird", "pkcs11:token", "pkcs11:?pin=1"])
def test_bad_uris(bad: str) -> None:
    with pytest.raises(ExchangedError):
        parse(bad)


def test_public_form_drops_pin_source() -> None:
    u = parse("pkcs11:token=a;object=k?pin-source=file:/tmp/p&module-path=/m.so")
    assert "pin" not in str(u.public()) and "module-path=/m.so" in str(u.public())


def test_pin_precedence_file_then_uri_then_env(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    f1, f2 = tmp_path / "a", tmp_path / "b"
    f1.write_text("1111\n")
    f2.write_text("2222\n")
    os.chmod(f1, 0o600)
    os.chmod(f2, 0o600)
    monkeypatch.setenv("T_PIN", "3333")
    assert PinSource("t", "T_PIN", str(f1)).read(f"file:{f2}") == "1111"
    assert PinSource("t", "T_PIN").read(f"file:{f2}") == "2222"
    assert PinSource("t", "T_PIN").read(None) == "3333"
    monkeypatch.delenv("T_PIN")
    with pytest.raises(ExchangedError, match="no PIN for the t token"):
        PinSource("t", "T_PIN").read(None)
    with pytest.raises(ExchangedError, match="pin-value"):
        PinSource("t", "T_PIN").read(None, uri_pin_value=True)


def test_pin_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ExchangedError, match="cannot read"):
        PinSource("t", "T", str(tmp_path / "missing")).read()
    empty = tmp_path / "e"
    empty.write_text("")
    empty.chmod(0o600)
    with pytest.raises(ExchangedError, match="empty"):
        PinSource("t", "T", str(empty)).read()
    world = tmp_path / "w"
    world.write_text("1234")
    world.chmod(0o644)
    with pytest.raises(ExchangedError, match="chmod"):
        PinSource("t", "T", str(world)).read()
