"""A CRL handed to a node, before it is held (`verify.check_crl`), the node's keeper of CRLs
(`node.crls`), a peer admitted for the CRL exchange alone, and the publication point over real
sockets (`transport.publish`), with openssl as the judge of what we serve."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_peers import CA, CA_KEY, NOW, PEERS, issue, make_ca

from exchanged.node.config import Config, Limits
from exchanged.node.crls import CrlKeeper, distribution_point
from exchanged.pki import crl as crlmod
from exchanged.pki import profiles, verify
from exchanged.transport import publish
from exchanged.transport.peers import PeerRefused


class _Key:
    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self.key = key
        self.public_key = key.public_key()

    def sign(self, data: bytes, hash_name: str) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def make_crl(number: int, *, revoked: list[x509.Certificate] = (),  # type: ignore[assignment]
             this_update: dt.datetime | None = None, next_update: dt.datetime | None = None,
             ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] = (CA_KEY, CA)) -> bytes:
    this_update = this_update or NOW - dt.timedelta(minutes=1)
    return crlmod.build(key=_Key(ca[0]), issuer=ca[1],  # type: ignore[arg-type]
                        entries=[crlmod.Entry(c.serial_number, this_update, "keyCompromise")
                                 for c in revoked],
                        number=number, this_update=this_update,
                        next_update=next_update or this_update + dt.timedelta(days=1))


def builder_crl(**extensions: Any) -> bytes:
    b = (x509.CertificateRevocationListBuilder().issuer_name(CA.subject)
         .last_update(NOW - dt.timedelta(minutes=1)).next_update(NOW + dt.timedelta(days=1)))
    if extensions.get("number", True):
        b = b.add_extension(x509.CRLNumber(7), critical=False)
    if extensions.get("delta"):
        b = b.add_extension(x509.DeltaCRLIndicator(6), critical=True)
    if extensions.get("idp"):
        b = b.add_extension(x509.IssuingDistributionPoint(
            full_name=[x509.UniformResourceIdentifier("http://x/part1.crl")], relative_name=None,
            only_contains_user_certs=True, only_contains_ca_certs=False, only_some_reasons=None,
            indirect_crl=False, only_contains_attribute_certs=False), critical=True)
    return b.sign(CA_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------------------------------------
# check_crl: what may be held


def test_a_good_crl_is_described() -> None:
    revoked = issue()
    info = verify.check_crl(make_crl(5, revoked=[revoked]), [CA])
    assert (info.number, info.entries, info.issuer) == (5, 1, CA.subject)
    assert not info.stale(NOW)
    assert info.stale(NOW + dt.timedelta(days=2))


@pytest.mark.parametrize("der,code,words", [
    (b"\x30\x03\x02\x01\x00", "crl-invalid", "not a CRL in DER"),
    (b"", "crl-invalid", "not a CRL in DER"),
    (make_crl(3, ca=make_ca("Test CA")), "bad-signature", "not signed by"),  # same name, other key
    (make_crl(3, ca=make_ca("Other CA")), "crl-invalid", "not a CA we trust"),
    (builder_crl(delta=True), "crl-invalid", "delta or partitioned"),
    (builder_crl(idp=True), "crl-invalid", "delta or partitioned"),
    (builder_crl(number=False), "crl-invalid", "no cRLNumber"),
    (make_crl(3, this_update=NOW + dt.timedelta(hours=1)), "crl-invalid", "this node's clock"),
], ids=["junk", "empty", "forged", "foreign", "delta", "partitioned", "unnumbered", "future"])
def test_a_crl_that_may_not_be_held_says_why(der: bytes, code: str, words: str) -> None:
    with pytest.raises(verify.ValidationError) as e:
        verify.check_crl(der, [CA], at=NOW)
    assert e.value.code == code and words in str(e.value), str(e.value)


def test_a_crl_with_trailing_bytes_or_in_ber_is_refused() -> None:
    der = make_crl(3)
    with pytest.raises(verify.ValidationError, match="DER"):
        verify.check_crl(der + b"\x00", [CA])
    # The outer SEQUENCE with a long-form length that DER forbids (0x81 for a short value is
    # fine only above 127 bytes; use a non-minimal 0x82 encoding of the same length).
    body = der[4:] if der[1] == 0x82 else der[3:]
    ber = b"\x30\x83" + len(body).to_bytes(3, "big") + body
    with pytest.raises(verify.ValidationError, match="DER"):
        verify.check_crl(ber, [CA])


def test_a_stale_crl_may_still_be_checked_and_the_validator_may_use_it() -> None:
    """stale_ok: the newest revocations known still apply (policy "warn")."""
    revoked, good = issue(), issue()
    der = make_crl(4, revoked=[revoked], this_update=NOW - dt.timedelta(days=3),
                   next_update=NOW - dt.timedelta(days=2))
    verify.check_crl(der, [CA])  # a stale CRL is still a CRL: newer than none
    crl = x509.load_der_x509_crl(der)
    with pytest.raises(verify.ValidationError) as e:
        verify.validate(good, trusted=[CA], crls=[crl], purpose="node")
    assert e.value.code == "crl-stale"
    verify.validate(good, trusted=[CA], crls=[crl], purpose="node", stale_ok=True)
    with pytest.raises(verify.ValidationError) as e:
        verify.validate(revoked, trusted=[CA], crls=[crl], purpose="node", stale_ok=True)
    assert e.value.code == "revoked"


def test_an_older_current_crl_does_not_stand_in_for_a_newer_stale_one() -> None:
    """Regression: with CRL 1 (current, nothing listed) and CRL 2 (newer, lists a revocation,
    past its nextUpdate: e.g. `ca crl --hours 1` an hour ago), the validator fell back to CRL
    1 and accepted the revoked certificate."""
    revoked, good = issue(), issue()
    older = x509.load_der_x509_crl(make_crl(1, next_update=NOW + dt.timedelta(days=7)))
    newer = x509.load_der_x509_crl(make_crl(2, revoked=[revoked],
                                            this_update=NOW - dt.timedelta(hours=2),
                                            next_update=NOW - dt.timedelta(hours=1)))
    for cert, code in ((revoked, "revoked"), (good, "crl-stale")):
        with pytest.raises(verify.ValidationError) as e:
            verify.validate(cert, trusted=[CA], crls=[older, newer], purpose="node")
        assert e.value.code == code, str(e.value)
    verify.validate(good, trusted=[CA], crls=[older, newer], purpose="node", stale_ok=True)
    with pytest.raises(verify.ValidationError) as e:
        verify.validate(revoked, trusted=[CA], crls=[older, newer], purpose="node",
                        stale_ok=True)
    assert e.value.code == "revoked"


def test_crl_der_takes_pem_or_der_and_one_crl_only() -> None:
    der = make_crl(2)
    pem = b"-----BEGIN X509 CRL-----\n" + __import__("base64").encodebytes(der) + \
        b"-----END X509 CRL-----\n"
    assert verify.crl_der(der) == der
    assert verify.crl_der(pem) == der
    with pytest.raises(verify.ValidationError, match="holds 2 CRLs"):
        verify.crl_der(pem + pem)
    with pytest.raises(verify.ValidationError, match="not a CRL"):
        verify.crl_der(b"hello")


# ---------------------------------------------------------------------------------------------
# The keeper: hold the newest, say what is held


def keeper(tmp_path: Path, *configured: bytes, stale_crl: str = "refuse") -> CrlKeeper:
    files = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i, der in enumerate(configured):
        files.append(tmp_path / f"configured-{i}.crl")
        files[-1].write_bytes(der)
    config = Config(unit="finance", name="Finance", data_dir=tmp_path / "data",
                    listen_host="127.0.0.1", listen_port=0, module=None, key="pkcs11:token=x",
                    cert=tmp_path / "node.pem", pin_file=None, ca=(), crls=tuple(files),
                    peers=PEERS, limits=Limits(max_crl_bytes=100_000), stale_crl=stale_crl)
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    recorded: list[tuple[str, str, dict[str, Any]]] = []
    k = CrlKeeper(config, [CA], issue(), lambda a, o, details: recorded.append((a, o, details)))
    k.recorded = recorded  # type: ignore[attr-defined]
    return k


def take(k: CrlKeeper, der: bytes, source: str = "peer office") -> bool:
    return k.install(der, k.check(der, source), source)


def test_the_keeper_holds_only_newer_crls_and_records_each(tmp_path: Path) -> None:
    office = issue()
    k = keeper(tmp_path, make_crl(3))
    assert k.number() == 3 and k.peers.check([office]).unit == "office"
    assert not take(k, make_crl(2, revoked=[office]))  # older: no news, nothing changes
    assert not take(k, make_crl(3, revoked=[office]))  # the same number: no news either
    assert k.peers.check([office]).unit == "office"
    assert take(k, make_crl(4, revoked=[office]))
    assert k.number() == 4
    with pytest.raises(PeerRefused) as e:
        k.peers.check([office])
    assert e.value.code == "peer-revoked"
    [(action, obj, details)] = k.recorded  # type: ignore[attr-defined]
    assert (action, obj, details["previous"], details["source"]) == \
        ("crl-installed", "4", 3, "peer office")
    held = k.path_for(CA.subject)
    assert held.read_bytes() == k.der()
    # A new keeper (the daemon restarted) holds what was learned.
    again = keeper(tmp_path, make_crl(3))
    assert again.number() == 4


def test_the_keeper_refuses_what_does_not_verify_or_is_too_large(tmp_path: Path) -> None:
    k = keeper(tmp_path, make_crl(3))
    with pytest.raises(verify.ValidationError, match="not signed by"):
        k.check(make_crl(9, ca=make_ca("Test CA")), "peer office")
    with pytest.raises(verify.ValidationError, match="max_crl_bytes"):
        k.check(b"\x30" * 100_001, "peer office")
    assert k.number() == 3 and not k.dir.exists()


def test_the_keeper_says_what_is_held_and_whether_it_is_stale(tmp_path: Path) -> None:
    k = keeper(tmp_path)
    [row] = k.status()
    assert row["number"] is None and row["stale"]
    take(k, make_crl(8, this_update=NOW - dt.timedelta(days=2),
                     next_update=NOW - dt.timedelta(days=1)))
    [row] = k.status()
    assert (row["number"], row["stale"]) == (8, True)
    assert row["age_seconds"] >= 2 * 86400 - 120
    assert k.stale() is not None
    take(k, make_crl(9))
    assert k.stale() is None and not k.status()[0]["stale"]


def test_a_peer_is_admitted_for_crls_only_while_ours_is_stale_or_missing(tmp_path: Path) -> None:
    office, revoked = issue(), issue()
    stale = make_crl(2, revoked=[revoked], this_update=NOW - dt.timedelta(days=3),
                     next_update=NOW - dt.timedelta(days=2))
    for configured in ([stale], []):
        k = keeper(tmp_path / str(len(configured)), *configured)
        peer, limited = k.peers.admit([office])
        assert peer.unit == "office" and limited is not None
        with pytest.raises(PeerRefused) as e:
            k.peers.check([office])
        assert e.value.code in ("peer-crl-stale", "peer-crl-missing")
    # A peer revoked per the stale CRL is not admitted even for CRLs.
    k = keeper(tmp_path / "r", stale)
    with pytest.raises(PeerRefused) as e:
        k.peers.admit([revoked])
    assert e.value.code == "peer-revoked"
    # With a fresh CRL the same peer is fully admitted.
    take(k, make_crl(3, revoked=[revoked]))
    assert k.peers.admit([office]) == (k.peers.check([office]), None)
    # Policy "warn": the stale CRL decides; documents go on.
    k = keeper(tmp_path / "w", stale, stale_crl="warn")
    assert k.peers.admit([office])[1] is None
    with pytest.raises(PeerRefused) as e:
        k.peers.check([revoked])
    assert e.value.code == "peer-revoked"


def test_the_distribution_point_is_the_first_http_url() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    form = profiles.Form(name="node-x", unit="X", division="IT")
    cert = profiles.end_entity("node", form=form, public_key=key.public_key(), ca_cert=CA,
                               serial=profiles.random_serial(), not_before=NOW, days=1,
                               crl_url="http://ca.example:8090/ca.crl").sign(CA_KEY,
                                                                           hashes.SHA256())
    assert distribution_point(cert) == "http://ca.example:8090/ca.crl"
    assert distribution_point(issue()) is None


# ---------------------------------------------------------------------------------------------
# The publication point, over real sockets


def serve_and(ca_dir: Path, client: Any) -> Any:
    """Run `exchanged ca serve`'s server on 127.0.0.1 and `client(port)` against it."""
    result: list[Any] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            port = await n.start(publish.serve, ca_dir, "127.0.0.1", 0)
            result.append(await client(port))
            n.cancel_scope.cancel()

    trio.run(main)
    return result[0]


def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    (d / "crl").mkdir(parents=True)
    (d / "ca.pem").write_bytes(CA.public_bytes(serialization.Encoding.PEM))
    (d / "ca.crl").write_bytes(make_crl(2))
    (d / "crl" / "1.crl").write_bytes(make_crl(1))
    (d / "ca.db").write_bytes(b"secret")  # never served
    return d


def test_fetch_from_the_publication_point(tmp_path: Path) -> None:
    d = ca_dir(tmp_path)

    async def client(port: int) -> list[Any]:
        out: list[Any] = []
        for path in ("/ca.crl", "/crl/1.crl", "/ca.pem"):
            out.append(await publish.fetch(f"http://127.0.0.1:{port}{path}", max_size=10**6))
        for path, limit in (("/ca.db", 10**6), ("/crl/../ca.db", 10**6), ("/crl/7.crl", 10**6),
                            ("/ca.crl", 10)):
            try:
                await publish.fetch(f"http://127.0.0.1:{port}{path}", max_size=limit)
                out.append("fetched")
            except publish.FetchError as e:
                out.append(str(e))
        return out

    crl2, crl1, pem, db, dotdot, missing, big = serve_and(d, client)
    assert (crl2, crl1, pem) == ((d / "ca.crl").read_bytes(), (d / "crl/1.crl").read_bytes(),
                                 (d / "ca.pem").read_bytes())
    assert "404" in db and "404" in dotdot and "404" in missing
    assert "over the limit of 10" in big


def test_the_publication_point_answers_curl_and_openssl_reads_what_it_serves(
        tmp_path: Path) -> None:
    d = ca_dir(tmp_path)

    async def client(port: int) -> list[subprocess.CompletedProcess[bytes]]:
        url = f"http://127.0.0.1:{port}"
        out = []
        for argv in (["curl", "-sS", "-D", "-", "-o", str(tmp_path / "got.crl"), f"{url}/ca.crl"],
                     ["curl", "-sS", "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}",
                      f"{url}/ca.crl"],
                     ["curl", "-sS", "-I", f"{url}/ca.crl"]):
            out.append(await trio.run_process(argv, capture_stdout=True, check=False))
        return out

    got, post, head = serve_and(d, client)
    assert b"200" in got.stdout.split(b"\r\n")[0], got
    assert b"application/pkix-crl" in got.stdout
    assert post.stdout == b"405"
    assert b"Content-Length: " + str(len(make_crl(2))).encode() in head.stdout or \
        b"200" in head.stdout
    verified = subprocess.run(["openssl", "crl", "-inform", "DER", "-in",
                               str(tmp_path / "got.crl"), "-CAfile", str(d / "ca.pem"),
                               "-noout"], capture_output=True, text=True)
    assert verified.returncode == 0 and "verify OK" in verified.stderr + verified.stdout


def test_fetch_says_what_went_wrong(tmp_path: Path) -> None:
    async def main() -> list[str]:
        out = []
        for url in ("https://127.0.0.1/ca.crl", "http://127.0.0.1:1/ca.crl", "ftp://x/ca.crl"):
            try:
                await publish.fetch(url, max_size=100, seconds=2)
            except publish.FetchError as e:
                out.append(str(e))
        # A server that accepts and never answers.
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        try:
            await publish.fetch(f"http://127.0.0.1:{port}/ca.crl", max_size=100, seconds=0.5)
        except publish.FetchError as e:
            out.append(str(e))
        finally:
            await listeners[0].aclose()
        return out

    tls, refused, ftp, silent = trio.run(main)
    assert "only http://" in tls and "only http://" in ftp
    assert "refused" in refused.lower()
    assert "within 0.5 s" in silent
