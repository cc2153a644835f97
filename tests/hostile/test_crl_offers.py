"""CRLs handed over by a peer that may be hostile (a stolen node certificate of our CA): a CRL is
held only if the CA signed it and it is newer than the one held; whoever brings it, nothing else
about the node changes. Through office's real daemon, with a test peer speaking our protocol."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from exchanged.transport import protocol as proto
from hostile.conftest import Net, tls_context


def exchange(net: Net, unit: str, *requests: Any, as_: str = "finance") -> list[Any]:
    """Requests on one connection to `unit` as the test peer `as_`; the answers."""
    async def go() -> list[Any]:
        stream = await trio.open_tcp_stream("127.0.0.1", net.port(unit))
        tls = trio.SSLStream(stream, tls_context(net, as_, server=False),
                             server_hostname="peer")
        conn = proto.ClientConnection("peer")
        answers: list[Any] = []
        try:
            for req in requests:
                await tls.send_all(conn.send(req))
                while True:
                    event = conn.next_event()
                    if event is proto.NEED_DATA:
                        with trio.fail_after(20):
                            conn.receive_data(await tls.receive_some(65536))
                        continue
                    answers.append(event)
                    break
                if conn.state is not proto.State.IDLE:
                    break
        finally:
            await trio.aclose_forcefully(tls)
        return answers

    return trio.run(go)


def held(net: Net, unit: str = "office") -> int:
    [pong] = exchange(net, unit, proto.Ping())
    assert isinstance(pong, proto.Pong)
    assert pong.crl_number is not None
    return pong.crl_number


def forged(number: int, ca: x509.Certificate) -> bytes:
    """A CRL with our CA's name and a high number, signed by some other key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
            .last_update(now - dt.timedelta(minutes=1)).next_update(now + dt.timedelta(days=1))
            .add_extension(x509.CRLNumber(number), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def test_a_forged_or_junk_crl_is_refused_and_recorded(healthy: Net) -> None:
    net = healthy
    ca = x509.load_pem_x509_certificate((net.d.work / "ca" / "ca.pem").read_bytes())
    before = held(net)
    answers = exchange(net, "office", proto.OfferCrl(forged(before + 1000, ca)),
                       proto.OfferCrl(b"\x30\x03\x02\x01\x00"))
    assert [type(a) for a in answers] == [proto.Reject, proto.Reject], answers
    assert answers[0].code == "bad-crl" and "not signed by" in answers[0].message
    assert answers[1].code == "bad-crl" and "DER" in answers[1].message
    assert held(net) == before
    refused = net.sql("office", "SELECT object, details FROM audit WHERE action = 'crl-refused'")
    assert len(refused) >= 2 and all(obj == "finance" for obj, _ in refused[-2:])


def test_an_older_crl_changes_nothing_and_a_newer_one_is_taken_from_anyone(
        healthy: Net) -> None:
    net = healthy
    d = net.d
    crl_dir = d.work / "ca" / "crl"
    before = held(net)
    oldest = min(crl_dir.glob("*.crl"), key=lambda p: int(p.stem))
    installs = len(net.sql("office", "SELECT 1 FROM audit WHERE action = 'crl-installed'"))
    [answer] = exchange(net, "office", proto.OfferCrl(oldest.read_bytes()))
    assert isinstance(answer, proto.CrlAccepted)  # no news is not an offence
    assert held(net) == before
    # The CA signs a newer CRL; an insider's connection brings it: it is the CA's word.
    out = d.x("ca", "crl", "--dir", "ca", "--ca-pin-file", d.pin("ca"), quiet=True)
    number = int(re.search(r"CRL number (\d+)", out).group(1))  # type: ignore[union-attr]
    assert number > before
    [answer] = exchange(net, "office", proto.OfferCrl((d.work / "ca" / "ca.crl").read_bytes()))
    assert isinstance(answer, proto.CrlAccepted)
    assert held(net) == number
    rows = net.sql("office", "SELECT object, details FROM audit WHERE action = 'crl-installed'")
    assert len(rows) == installs + 1 and rows[-1][0] == str(number)
    assert json.loads(rows[-1][1])["source"] == "peer finance"
    # And office hands it back to whoever asks.
    [crl] = exchange(net, "office", proto.FetchCrl())
    assert isinstance(crl, proto.CrlFile)
    assert crl.crl == (d.work / "ca" / "ca.crl").read_bytes()


def test_an_oversized_crl_offer_is_cut_short(healthy: Net) -> None:
    net = healthy

    async def go() -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", net.port("office"))
        tls = trio.SSLStream(stream, tls_context(net, "finance", server=False),
                             server_hostname="peer")
        await tls.send_all(b"POST /v1/crl HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"application/pkix-crl\r\nContent-Length: 999999999999\r\n\r\n")
        got = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in got:
                data = await tls.receive_some(65536)
                if not data:
                    break
                got += data
        await trio.aclose_forcefully(tls)
        return got

    assert trio.run(go).startswith(b"HTTP/1.1 413 ")
