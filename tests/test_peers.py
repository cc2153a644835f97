"""The peer check both sides of a connection run after the TLS handshake: the refusal matrix."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from exchanged.pki import profiles
from exchanged.transport.peers import Peer, PeerCheck, PeerRefused

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
PEERS = {"office": Peer("office", "127.0.0.1", 1, "node-office", "General Office")}


def make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = profiles.ca_root(name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
                            public_key=key.public_key(), not_before=NOW - dt.timedelta(days=30),
                            days=3650).sign(key, hashes.SHA256())
    return key, cert


CA_KEY, CA = make_ca("Test CA")


def issue(profile: str = "node", name: str = "node-office", unit: str = "General Office",
          start: dt.datetime = NOW - dt.timedelta(days=1), days: int = 30,
          ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] = (CA_KEY, CA)
          ) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    form = profiles.Form(name=name, unit=unit, division="Archives")
    return profiles.end_entity(profile, form=form, public_key=key.public_key(), ca_cert=ca[1],
                               serial=profiles.random_serial(), not_before=start, days=days,
                               crl_url=None).sign(ca[0], hashes.SHA256())


def crl_file(path: Path, number: int, entries: list[tuple[x509.Certificate, str]]) -> Path:
    from exchanged.pki import crl

    class Key:  # the CRL encoder signs through a token key's interface
        public_key = CA_KEY.public_key()

        def sign(self, data: bytes, hash_name: str) -> bytes:
            return CA_KEY.sign(data, ec.ECDSA(hashes.SHA256()))

    der = crl.build(key=Key(), issuer=CA,  # type: ignore[arg-type]
                    entries=[crl.Entry(c.serial_number, NOW - dt.timedelta(minutes=5), r)
                             for c, r in entries],
                    number=number, this_update=NOW - dt.timedelta(minutes=1),
                    next_update=NOW + dt.timedelta(days=1))
    path.write_bytes(der)
    return path


def check(tmp_path: Path, cert: x509.Certificate,
          entries: list[tuple[x509.Certificate, str]] = ()) -> Peer:  # type: ignore[assignment]
    pc = PeerCheck([CA], [crl_file(tmp_path / "ca.crl", 1, list(entries))], PEERS)
    return pc.check([cert])


def refused(tmp_path: Path, cert: x509.Certificate, code: str, *words: str,
            entries: list[tuple[x509.Certificate, str]] = ()) -> None:  # type: ignore[assignment]
    with pytest.raises(PeerRefused) as e:
        check(tmp_path, cert, entries)
    assert e.value.code == code, (e.value.code, str(e.value))
    for w in words:
        assert w in str(e.value)


def test_good_configured_peer_is_accepted(tmp_path: Path) -> None:
    assert check(tmp_path, issue()).unit == "office"


def test_revoked(tmp_path: Path) -> None:
    c = issue()
    refused(tmp_path, c, "peer-revoked", "keyCompromise", entries=[(c, "keyCompromise")])


def test_held(tmp_path: Path) -> None:
    c = issue()
    refused(tmp_path, c, "peer-suspended", entries=[(c, "certificateHold")])


def test_released_after_a_hold_is_accepted_again(tmp_path: Path) -> None:
    c = issue()
    path = crl_file(tmp_path / "ca.crl", 1, [(c, "certificateHold")])
    pc = PeerCheck([CA], [path], PEERS)
    with pytest.raises(PeerRefused):
        pc.check([c])
    crl_file(path, 2, [])  # the newer CRL drops the hold
    assert pc.reload(force=True)
    assert pc.check([c]).unit == "office"


def test_expired_and_not_yet_valid(tmp_path: Path) -> None:
    refused(tmp_path, issue(start=NOW - dt.timedelta(days=10), days=1), "peer-expired")
    refused(tmp_path, issue(start=NOW + dt.timedelta(days=1)), "peer-not-yet-valid")


def test_another_ca(tmp_path: Path) -> None:
    refused(tmp_path, issue(ca=make_ca("Test CA")), "peer-bad-signature")
    refused(tmp_path, issue(ca=make_ca("Other CA")), "peer-unknown-issuer")


def test_wrong_key_usage(tmp_path: Path) -> None:
    refused(tmp_path, issue(profile="person"), "peer-wrong-key-usage")


def test_valid_certificate_of_an_unconfigured_unit(tmp_path: Path) -> None:
    refused(tmp_path, issue(name="node-elsewhere", unit="Elsewhere"), "peer-unknown", "A13")
    # Same CN, other unit: still not the configured peer.
    refused(tmp_path, issue(unit="Another Office"), "peer-unknown")


def test_expected_unit_on_the_connecting_side(tmp_path: Path) -> None:
    pc = PeerCheck([CA], [crl_file(tmp_path / "ca.crl", 1, [])],
                   {**PEERS, "finance": Peer("finance", "h", 1, "node-finance", "Finance")})
    with pytest.raises(PeerRefused, match="expected finance"):
        pc.check([issue()], expect="finance")


def test_verdicts_are_cached_until_a_crl_changes(tmp_path: Path) -> None:
    c = issue()
    path = crl_file(tmp_path / "ca.crl", 1, [])
    pc = PeerCheck([CA], [path], PEERS)
    pc.check([c])
    assert pc.statistics()["cached_peers"] == 1
    assert not pc.reload()  # nothing changed on disk: the cache stays
    assert pc.statistics()["cached_peers"] == 1
    crl_file(path, 2, [(c, "keyCompromise")])
    assert pc.reload()
    assert pc.statistics()["cached_peers"] == 0
    with pytest.raises(PeerRefused, match="revoked"):
        pc.check([c])


def test_the_cache_alone_answers_only_what_was_judged(tmp_path: Path) -> None:
    """admit_cached (the handshake's path without a thread hop) says nothing it has not
    judged, says what admit says once it has, and forgets on a CRL change or a peer table
    change (the connections kept open are judged again: node/base.readmit)."""
    c = issue()
    der = [c.public_bytes(serialization.Encoding.DER)]
    path = crl_file(tmp_path / "ca.crl", 1, [])
    pc = PeerCheck([CA], [path], PEERS)
    assert pc.admit_cached(der) is None
    assert pc.admit_cached(der) is None  # asking does not judge
    assert pc.admit(der) == pc.admit_cached(der) and pc.admit_cached(der) is not None
    with pytest.raises(PeerRefused, match="expected finance"):
        pc.admit_cached(der, expect="finance")
    generation = pc.generation
    pc.reload(peers=dict(PEERS))
    assert pc.generation > generation and pc.admit_cached(der) is None
    crl_file(path, 2, [(c, "keyCompromise")])
    pc.admit(der)
    assert pc.reload() and pc.admit_cached(der) is None
    with pytest.raises(PeerRefused, match="revoked"):
        pc.admit(der)
    with pytest.raises(PeerRefused, match="revoked"):  # a cached refusal is a refusal
        pc.admit_cached(der)


def test_a_missing_crl_refuses(tmp_path: Path) -> None:
    pc = PeerCheck([CA], [], PEERS)
    with pytest.raises(PeerRefused) as e:
        pc.check([issue()])
    assert e.value.code == "peer-crl-missing"


def test_a_verdict_judged_against_replaced_crls_is_not_cached(tmp_path: Path) -> None:
    """Regression: a reload landing while a chain was being judged against the old CRLs let
    that stale verdict into the fresh cache, accepting a revoked peer for minutes."""
    c = issue()
    path = crl_file(tmp_path / "ca.crl", 1, [])
    pc = PeerCheck([CA], [path], PEERS)
    judge = pc._judge

    def judge_then_revoke(chain, now):  # type: ignore[no-untyped-def]
        verdict = judge(chain, now)  # judged good against CRL 1...
        crl_file(path, 2, [(c, "keyCompromise")])
        pc.reload()  # ...while CRL 2 revokes it
        return verdict

    pc._judge = judge_then_revoke  # type: ignore[method-assign]
    assert pc.check([c]).unit == "office"  # this one call still saw the old CRLs
    pc._judge = judge  # type: ignore[method-assign]
    with pytest.raises(PeerRefused, match="revoked"):
        pc.check([c])  # the stale verdict was not kept


def test_a_cached_refusal_does_not_grow(tmp_path: Path) -> None:
    """Regression: re-raising one cached exception object extended its traceback each time."""
    import traceback
    c = issue()
    pc = PeerCheck([CA], [crl_file(tmp_path / "ca.crl", 1, [(c, "keyCompromise")])], PEERS)
    lengths = []
    for _ in range(50):
        try:
            pc.check([c])
        except PeerRefused as e:
            lengths.append(len(traceback.extract_tb(e.__traceback__)))
    assert lengths[0] == lengths[-1]
