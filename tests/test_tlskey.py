"""Mutual TLS with token-held keys: real SoftHSM tokens, real sockets on 127.0.0.1, openssl as
the independent client."""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import ROOT, Tokens, uid
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute

from exchanged.errors import ExchangedError
from exchanged.pki import profiles
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token
from exchanged.pki.uri import parse
from exchanged.transport import tlskey
from exchanged.transport.tlskey import (
    SESSION_SECONDS,
    make_context,
    openssl_cli_engine,
    peer_certificate_chain,
)

TIMEOUT = 10


def pin(tokens: Tokens, label: str) -> PinSource:
    return PinSource(label, "EXCHANGED_TEST_PIN", tokens.pin(label))


def open_token(tokens: Tokens, label: str) -> Token:
    return Token.open(parse(f"pkcs11:token={label}"), pin(tokens, label))


def pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass
class Pki:
    dir: Path
    tokens: Tokens
    ca: x509.Certificate
    node_uri: str  # pkcs11: URI of the server's key (token "node")
    node_cert: x509.Certificate
    other_uri: str  # the client's key (token "other")
    other_cert: x509.Certificate
    openssl_conf: Path  # loads libp11's engine for `openssl s_client`
    other_pin_nonl: Path  # the PIN without newline, for libp11's pin-source
    server: ssl.SSLContext = field(init=False)
    client: ssl.SSLContext = field(init=False)

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def other_cert_file(self) -> Path:
        return self.dir / "other.pem"


def _node_cert(ca_key: Any, ca_cert: x509.Certificate, public_key: object,
               name: str) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    return profiles.end_entity(
        "node", form=profiles.Form(name=name, unit="Finance Bureau", ip=("127.0.0.1",)),
        public_key=public_key, ca_cert=ca_cert, serial=profiles.random_serial(),
        not_before=now, days=30, crl_url=None).sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tokens: Tokens, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA on token "ca", node keys on tokens "node" and "other", and the two TLS contexts."""
    d = tmp_path_factory.mktemp("tls")
    tag = uid()
    with open_token(tokens, "ca") as ca_tok, open_token(tokens, "node") as node_tok, \
            open_token(tokens, "other") as other_tok:
        ca_key = ca_tok.generate_keypair(f"tls-ca-{tag}")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"TLS Test CA {tag}")])
        ca = profiles.ca_root(name=name, public_key=ca_key.public_key,
                              not_before=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
                              days=30).sign(ca_key.signer(), hashes.SHA256())
        node_key = node_tok.generate_keypair(f"tls-node-{tag}")
        other_key = other_tok.generate_keypair(f"tls-other-{tag}")
        node_cert = _node_cert(ca_key.signer(), ca, node_key.public_key, "node-a")
        other_cert = _node_cert(ca_key.signer(), ca, other_key.public_key, "node-b")
        node_uri, other_uri = str(node_key.uri), str(other_key.uri)
    (d / "ca.pem").write_bytes(pem([ca]))
    (d / "other.pem").write_bytes(pem([other_cert]))
    conf, nonl = openssl_cli_engine(d / "engine", tokens.pin("other"))
    p = Pki(d, tokens, ca, node_uri, node_cert, other_uri, other_cert, conf, nonl)
    p.server = make_context(server=True, key_uri=node_uri, pin=pin(tokens, "node"),
                            cert_chain=[node_cert], trusted=[ca])
    p.client = make_context(server=False, key_uri=other_uri, pin=pin(tokens, "other"),
                            cert_chain=[other_cert], trusted=d / "ca.pem")
    return p


@dataclass
class Seen:
    """What the server saw of one connection."""

    version: str | None = None
    peer: list[x509.Certificate] = field(default_factory=list)
    error: BaseException | None = None


@asynccontextmanager
async def serve(context: ssl.SSLContext) -> AsyncIterator[tuple[int, list[Seen]]]:
    """A TLS echo server on 127.0.0.1 (one message per connection); yields (port, seen)."""
    seen: list[Seen] = []

    async def handler(tcp: trio.SocketStream) -> None:
        s = Seen()
        seen.append(s)
        stream = trio.SSLStream(tcp, context, server_side=True)
        try:
            await stream.do_handshake()
            s.version = stream.version()
            s.peer = peer_certificate_chain(stream)
            data = await stream.receive_some(1024)
            if data:
                await stream.send_all(data)
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError,
                ExchangedError) as e:
            s.error = e.__cause__ or e
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], seen
        nursery.cancel_scope.cancel()


async def connect(context: ssl.SSLContext, port: int) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname=None)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def s_client(pki: Pki, port: int, *args: str,
                   key: bool = True) -> subprocess.CompletedProcess[bytes]:
    """openssl s_client, the client key on the token through libp11's engine (own process)."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(pki.ca_file),
           "-verify_return_error", "-brief", "-ign_eof", *args]
    if key:
        cmd += ["-cert", str(pki.other_cert_file), "-engine", "pkcs11", "-keyform", "engine",
                "-key", f"{pki.other_uri}?pin-source={pki.other_pin_nonl}"]
    env = {**os.environ, "OPENSSL_CONF": str(pki.openssl_conf)}
    return await trio.run_process(cmd, stdin=b"ping\n", capture_stdout=True, capture_stderr=True,
                                  check=False, env=env)


# -- handshakes ---------------------------------------------------------------------------------

async def test_mutual_tls_with_token_keys(pki: Pki) -> None:
    with trio.fail_after(TIMEOUT):
        async with serve(pki.server) as (port, seen):
            stream = await connect(pki.client, port)
            await stream.send_all(b"hello over TLS")
            assert await stream.receive_some(100) == b"hello over TLS"
            assert stream.version() == "TLSv1.3"
            assert stream.cipher()[0] in ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
                                          "TLS_AES_128_GCM_SHA256")
            server_chain = peer_certificate_chain(stream)
            assert server_chain[0] == pki.node_cert
            assert peer_certificate_chain(stream, verified=True)[-1] == pki.ca
            await stream.aclose()
    assert seen[0].error is None and seen[0].version == "TLSv1.3"
    assert seen[0].peer[0] == pki.other_cert  # the server saw the client's certificate
    # What make_context attached to the context, for logs: no PIN anywhere.
    info = pki.server.exchanged_token_key  # type: ignore[attr-defined]
    assert info.key_uri == pki.node_uri and info.certificate == pki.node_cert and info.isolated
    assert "pin" not in info.key_uri


async def test_a_session_resumes_within_its_lifetime(pki: Pki) -> None:
    """The server's ticket is good for SESSION_SECONDS (OpenSSL's default was 7200 s); a
    second connection given the first one's session resumes it, and the server still knows
    the client's certificate (from the session). (That a resumed handshake signs nothing on
    either token is counted by tools/bench-exchange through pkcs11-spy.)"""
    with trio.fail_after(TIMEOUT):
        async with serve(pki.server) as (port, seen):
            first = await connect(pki.client, port)
            await first.send_all(b"one")
            assert await first.receive_some(100) == b"one"  # the ticket came before it
            session = first.session
            await first.aclose()
            assert session is not None and session.has_ticket
            assert session.ticket_lifetime_hint == SESSION_SECONDS
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            second = trio.SSLStream(tcp, pki.client, server_hostname=None)
            second.session = session
            await second.do_handshake()
            assert second.session_reused
            assert peer_certificate_chain(second)[0] == pki.node_cert
            await second.send_all(b"two")
            assert await second.receive_some(100) == b"two"
            await second.aclose()
    assert [s.error for s in seen] == [None, None]
    assert seen[1].peer[0] == pki.other_cert


async def test_key_stays_non_extractable_while_handshakes_succeed(pki: Pki) -> None:
    """python-pkcs11 opens the same token in the same process, before, during and after."""
    with trio.fail_after(TIMEOUT):
        async with serve(pki.server) as (port, seen):
            with open_token(pki.tokens, "node") as tok:
                key = tok.key_from_uri(parse(pki.node_uri))
                for _ in range(3):
                    stream = await connect(pki.client, port)
                    await stream.send_all(b"x")
                    assert await stream.receive_some(10) == b"x"
                    await stream.aclose()
                    assert key.attribute(Attribute.SENSITIVE) is True
                    assert key.attribute(Attribute.EXTRACTABLE) is False
                    assert key.attribute(Attribute.NEVER_EXTRACTABLE) is True
                    assert key.attribute(Attribute.ALWAYS_SENSITIVE) is True
                    assert key.public_key == pki.node_cert.public_key()
            # Token.close() logged python-pkcs11 out: the engine's own instance is unaffected.
            stream = await connect(pki.client, port)
            await stream.aclose()
    assert all(s.error is None for s in seen) and len(seen) == 4


async def test_openssl_s_client_with_engine_key_connects(pki: Pki) -> None:
    with trio.fail_after(TIMEOUT):
        async with serve(pki.server) as (port, seen):
            r = await s_client(pki, port)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, out
    assert "Protocol version: TLSv1.3" in out and "ping" in r.stdout.decode()
    assert seen[0].error is None and seen[0].peer[0] == pki.other_cert


async def test_openssl_s_client_tls12_gets_ecdhe_aead_only(pki: Pki) -> None:
    with trio.fail_after(TIMEOUT):
        async with serve(pki.server) as (port, seen):
            ok = await s_client(pki, port, "-tls1_2")
            cbc = await s_client(pki, port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA")
    out = (ok.stdout + ok.stderr).decode(errors="replace")
    assert ok.returncode == 0, out
    assert "Protocol version: TLSv1.2" in out
    assert "Ciphersuite: ECDHE-ECDSA-AES256-GCM-SHA384" in out
    assert cbc.returncode != 0
    assert seen[0].error is None and seen[1].error is not None


async def test_client_without_certificate_is_refused(pki: Pki) -> None:
    with trio.fail_after(TIMEOUT):
        async with serve(pki.server) as (port, seen):
            r = await s_client(pki, port, key=False)
    assert "ping" not in r.stdout.decode(errors="replace")
    assert seen[0].peer == [] and seen[0].error is not None
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(seen[0].error)


async def test_tls11_client_is_refused(pki: Pki) -> None:
    with trio.fail_after(TIMEOUT):
        async with serve(pki.server) as (port, seen):
            # SECLEVEL=0 lets this openssl offer TLS 1.1 at all; our server must still refuse.
            r = await s_client(pki, port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert r.returncode != 0
    assert seen[0].error is not None and "UNSUPPORTED_PROTOCOL" in str(seen[0].error)


async def test_client_from_another_ca_is_refused(pki: Pki) -> None:
    foreign_key = ec.generate_private_key(ec.SECP256R1())  # a software key: another world
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign CA")])
    foreign_ca = profiles.ca_root(name=name, public_key=foreign_key.public_key(),
                                  not_before=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
                                  days=30).sign(foreign_key, hashes.SHA256())
    client_key = ec.generate_private_key(ec.SECP256R1())
    cert = _node_cert(foreign_key, foreign_ca, client_key.public_key(), "impostor")
    (pki.dir / "impostor.pem").write_bytes(pem([cert]) + client_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(pki.ca_file)
    client.load_cert_chain(pki.dir / "impostor.pem")
    with trio.fail_after(TIMEOUT):
        async with serve(pki.server) as (port, seen):
            stream = await connect(client, port)  # TLS 1.3: the alert comes after Finished
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"let me in")
                await stream.receive_some(10)
            await trio.aclose_forcefully(stream)
    assert seen[0].error is not None and "CERTIFICATE_VERIFY_FAILED" in str(seen[0].error)
    assert seen[0].peer == []


async def test_server_from_another_ca_is_refused_by_client(pki: Pki) -> None:
    with pytest.raises(ExchangedError):  # sanity: a CA file that is not PEM is refused
        make_context(server=False, key_uri=pki.other_uri, pin=pin(pki.tokens, "other"),
                     cert_chain=[pki.other_cert], trusted=pki.dir / "other.pin")
    foreign_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign CA 2")])
    foreign_ca = profiles.ca_root(name=name, public_key=foreign_key.public_key(),
                                  not_before=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
                                  days=30).sign(foreign_key, hashes.SHA256())
    # The client trusts only the foreign CA: our token-key server is a stranger to it.
    client = make_context(server=False, key_uri=pki.other_uri, pin=pin(pki.tokens, "other"),
                          cert_chain=[pki.other_cert], trusted=[foreign_ca])
    with trio.fail_after(TIMEOUT):
        async with serve(pki.server) as (port, _seen):
            with pytest.raises(trio.BrokenResourceError) as e:
                await connect(client, port)
    assert "CERTIFICATE_VERIFY_FAILED" in str(e.value.__cause__)


async def test_a_renewed_engine_makes_working_contexts(pki: Pki) -> None:
    """After the card came back the node forgets the engine (its module instance is dead) and
    makes new contexts from a new engine object; contexts of the old engine are untouched
    (with SoftHSM here its instance is alive: both must work)."""
    from exchanged.transport import tlskey
    before = tlskey._engine_cache
    tlskey.renew_engine()
    server = make_context(server=True, key_uri=pki.node_uri, pin=pin(pki.tokens, "node"),
                          cert_chain=[pki.node_cert], trusted=[pki.ca])
    assert tlskey._engine_cache is not None and tlskey._engine_cache is not before
    assert tlskey._engine_cache.pointer != getattr(before, "pointer", None)
    with trio.fail_after(TIMEOUT):
        for ctx in (server, pki.server):
            async with serve(ctx) as (port, seen):
                stream = await connect(pki.client, port)
                await stream.aclose()
            assert seen[0].error is None and seen[0].peer


# -- errors -------------------------------------------------------------------------------------

def test_wrong_pin_is_one_clear_error(pki: Pki, tokens: Tokens, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pin"
    bad.write_text("not-the-pin\n")
    bad.chmod(0o600)
    # Token "person": the engine has not logged in to it in this process, so the PIN is checked.
    with pytest.raises(ExchangedError) as e:
        make_context(server=True, key_uri=f"pkcs11:token=person;object=tls-{uid()}",
                     pin=PinSource("person", "EXCHANGED_TEST_PIN", str(bad)),
                     cert_chain=[pki.node_cert], trusted=[pki.ca])
    assert e.value.code == "wrong-pin" and "wrong PIN for token 'person'" in str(e.value)
    assert "not-the-pin" not in str(e.value)


def test_missing_key_token_and_mismatch_are_clear_errors(pki: Pki, tokens: Tokens) -> None:
    common = dict(server=True, trusted=[pki.ca])
    with pytest.raises(ExchangedError) as e:
        make_context(key_uri=f"pkcs11:token=node;object=absent-{uid()}", pin=pin(tokens, "node"),
                     cert_chain=[pki.node_cert], **common)  # type: ignore[arg-type]
    assert e.value.code == "no-key" and "exchanged token list" in str(e.value)
    with pytest.raises(ExchangedError) as e:
        make_context(key_uri="pkcs11:token=no-such-token;object=x", pin=pin(tokens, "node"),
                     cert_chain=[pki.node_cert], **common)  # type: ignore[arg-type]
    assert e.value.code == "no-token"
    with pytest.raises(ExchangedError) as e:  # the node's key with the other node's certificate
        make_context(key_uri=pki.node_uri, pin=pin(tokens, "node"),
                     cert_chain=[pki.other_cert], **common)  # type: ignore[arg-type]
    assert e.value.code == "key-mismatch" and "certificate issued for this key" in str(e.value)
    with pytest.raises(ExchangedError) as e:
        make_context(key_uri=pki.node_uri + "?pin-value=1234", pin=pin(tokens, "node"),
                     cert_chain=[pki.node_cert], **common)  # type: ignore[arg-type]
    assert e.value.code == "pin-in-argv"


def test_missing_engine_is_a_clear_error() -> None:
    with pytest.raises(ExchangedError) as e:
        tlskey._load_engine(tlskey._libs(), "no-such-engine")
    assert e.value.code == "no-engine" and "libengine-pkcs11-openssl" in str(e.value)


# -- the self-check on the SSL_CTX pointer ------------------------------------------------------

def test_self_check_refuses_a_pointer_that_is_not_the_contexts(pki: Pki) -> None:
    a = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    b = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ptr_a = tlskey.ssl_ctx_pointer(a)
    ptr_b = tlskey.ssl_ctx_pointer(b)
    assert ptr_a != ptr_b
    options = a.options
    # Another live SSL_CTX with the very same settings: only the flip test tells them apart.
    with pytest.raises(ExchangedError, match="self-check failed") as e:
        tlskey._check_ctx_pointer(a, ptr_b)
    assert e.value.code == "self-check" and a.options == options  # the flip was undone
    # Readable memory that is no SSL_CTX, unmapped memory, NULL, a misaligned address.
    junk = ctypes.create_string_buffer(4096)
    for bogus in (ctypes.addressof(junk), 0x1000, 0, ptr_a + 1):
        with pytest.raises(ExchangedError, match="self-check failed"):
            tlskey._check_ctx_pointer(a, bogus)
    with pytest.raises(ExchangedError, match="not an ssl.SSLContext"):
        tlskey.ssl_ctx_pointer(object())  # type: ignore[arg-type]
    tlskey._check_ctx_pointer(pki.server, tlskey.ssl_ctx_pointer(pki.server))


def test_context_settings(pki: Pki) -> None:
    for ctx in (pki.server, pki.client):
        assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
        tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12 and all(n.startswith("ECDHE-") and ("GCM" in n or "CHACHA20" in n)
                             for n in tls12)


# -- sharing python-pkcs11's module instance (the fragile mode), in a process of its own --------

SHARED = """
import functools, sys, trio
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token
from exchanged.pki.uri import parse
from exchanged.transport.tlskey import make_context
node_uri, other_uri, node_pin, other_pin, node_pem, other_pem, ca_pem = sys.argv[1:]
# python-pkcs11 opens the node token first and keeps it open, as the daemon's own signer would.
tok = Token.open(parse(node_uri), PinSource("node", "X", node_pin))
key = tok.key_from_uri(parse(node_uri))
server = make_context(server=True, key_uri=node_uri, pin=PinSource("node", "X", node_pin),
                      cert_chain=node_pem, trusted=ca_pem, isolate_module=False)
client = make_context(server=False, key_uri=other_uri, pin=PinSource("o", "X", other_pin),
                      cert_chain=other_pem, trusted=ca_pem, isolate_module=False)

async def main():
    async def handler(tcp):
        s = trio.SSLStream(tcp, server, server_side=True)
        await s.send_all(await s.receive_some(10))
        await s.aclose()
    async with trio.open_nursery() as n:
        ls = await n.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = ls[0].socket.getsockname()[1]
        for _ in range(3):
            s = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client)
            await s.send_all(b"hi")
            assert await s.receive_some(10) == b"hi"
            await s.aclose()
            assert len(key.sign(b"python-pkcs11 signs in between")) > 0
        n.cancel_scope.cancel()
async def run():
    with trio.fail_after(10):
        await main()
trio.run(run)
print("SHARED-OK")
"""


def test_shared_module_instance_with_python_pkcs11_open(pki: Pki, tmp_path: Path) -> None:
    """isolate_module=False: python-pkcs11 opened the token first; handshakes still work."""
    (pki.dir / "node.pem").write_bytes(pem([pki.node_cert]))
    r = subprocess.run(
        [sys.executable, "-c", SHARED, pki.node_uri, pki.other_uri, pki.tokens.pin("node"),
         pki.tokens.pin("other"), str(pki.dir / "node.pem"), str(pki.other_cert_file),
         str(pki.ca_file)], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "SHARED-OK" in r.stdout, r.stderr
