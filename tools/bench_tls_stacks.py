#!/usr/bin/env python3
"""Where a new TLS connection's time goes: the same handshake served by five stacks.

Every server holds office's node key on the same SoftHSM token (the pkcs11 engine through
`exchanged.transport.tlskey`, or openssl's own for s_server) and answers one small HTTP GET;
the client is `openssl s_time -new -www` with a software key, as in tools/bench-exchange:

  s_server    openssl s_server -WWW (C, one process): the reference
  blocking    Python's ssl.SSLSocket, blocking, one connection after another
  trio-socket trio waiting on a non-blocking ssl.SSLSocket (wait_readable / wait_writable)
  trio-stream trio.SSLStream (memory BIOs): what `exchanged serve` uses
  exchanged   the daemon itself (trio.SSLStream, peer check, HTTP/1.1, the pong)

s_server and the daemon check the client against the CA's (empty) CRL, as in
tools/bench-exchange; the three Python servers only verify the chain (OpenSSL, no CRL).

For each: connections/s by wall clock, and the server's and the client's CPU milliseconds per
connection. The rounds are interleaved (a shared machine's speed drifts). Nothing here is
used by the daemon; the three Python servers exist to show which layer costs what.

Usage: tools/bench-tls-stacks [--seconds S (5)] [--rounds N (2)]
(internally: bench_tls_stacks.py --serve KIND WORKDIR PORT runs one of the Python servers)
"""

from __future__ import annotations

import argparse
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\n"
          + b"x" * 100)  # about the daemon's pong
KINDS = ("s_server", "blocking", "trio-socket", "trio-stream", "exchanged")


def context(work: Path) -> ssl.SSLContext:
    from exchanged.pki.pin import PinSource
    from exchanged.transport.tlskey import make_context
    return make_context(server=True, key_uri="pkcs11:token=office-node;object=me",
                        pin=PinSource("node", "EXCHANGED_BENCH_PIN",
                                      str(work / "tokens" / "office-node.pin")),
                        cert_chain=work / "office-node.pem", trusted=work / "ca" / "ca.pem")


def serve_blocking(ctx: ssl.SSLContext, port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    while True:
        raw, _ = listener.accept()
        try:
            with ctx.wrap_socket(raw, server_side=True) as s:
                request = b""
                while b"\r\n\r\n" not in request:
                    data = s.recv(65536)
                    if not data:
                        break
                    request += data
                s.sendall(ANSWER)
        except OSError:  # ssl.SSLError among them: the next connection
            raw.close()


def serve_trio(ctx: ssl.SSLContext, port: int, kind: str) -> None:
    import trio

    async def retry(sock: ssl.SSLSocket, fn: Any, *args: Any) -> Any:
        while True:
            try:
                return fn(*args)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(sock)

    async def on_socket(raw: socket.socket) -> None:
        raw.setblocking(False)
        s = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        try:
            await retry(s, s.do_handshake)
            request = b""
            while b"\r\n\r\n" not in request:
                data = await retry(s, s.recv, 65536)
                if not data:
                    return
                request += data
            await retry(s, s.send, ANSWER)  # one record: written whole or not at all
        except OSError:
            pass
        finally:
            s.close()

    async def on_stream(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake()
            request = b""
            while b"\r\n\r\n" not in request:
                data = await tls.receive_some(65536)
                if not data:
                    return
                request += data
            await tls.send_all(ANSWER)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(tls)

    async def main() -> None:
        if kind == "trio-stream":
            await trio.serve_tcp(on_stream, port, host="127.0.0.1")
            return
        listener = trio.socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind(("127.0.0.1", port))
        listener.listen(128)
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(on_socket, socket.socket(fileno=conn.detach()))

    trio.run(main)


def serve(kind: str, work: Path, port: int) -> None:
    ctx = context(work)
    if kind == "blocking":
        serve_blocking(ctx, port)
    else:
        serve_trio(ctx, port, kind)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--serve", nargs=3, metavar=("KIND", "WORKDIR", "PORT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve[0], Path(a.serve[1]), int(a.serve[2]))
        return 0

    import bench_exchange as be
    work = Path(tempfile.mkdtemp(prefix="bench-tls-stacks-"))
    b = be.Bench(argparse.Namespace(seconds=a.seconds), work)
    try:
        print(f"bench-tls-stacks: `openssl s_time -new -www`, {a.seconds} s per round, "
              f"{a.rounds} round(s) interleaved; setting up...", flush=True)
        with be.contextlib.redirect_stdout(be.io.StringIO()):
            b.setup()
        ports = {"exchanged": b.pb}
        pids = {"exchanged": b.d.daemons["office"].pid}
        for kind in KINDS[1:4]:  # stopped with s_server by Bench.stop()
            ports[kind] = be.free_port()
            b.servers.append(subprocess.Popen(
                [sys.executable, __file__, "--serve", kind, str(work), str(ports[kind])],
                env=b.d.env, stdin=subprocess.DEVNULL))
            pids[kind] = b.servers[-1].pid
            deadline = time.monotonic() + 30
            while not be.listening(ports[kind]):
                if time.monotonic() > deadline or b.servers[-1].poll() is not None:
                    raise SystemExit(f"bench-tls-stacks: the {kind} server did not start")
                time.sleep(0.1)
        ports["s_server"] = be.free_port()
        pids["s_server"] = b.s_server(ports["s_server"], "-WWW", "-crl_check", "-CRLform",
                                      "DER", "-CRL", str(work / "ca" / "ca.crl")).pid
        runs: dict[str, list[tuple[float, int, int, float, float]]] = {k: [] for k in KINDS}
        for _ in range(a.rounds):
            for kind in KINDS:
                path = "/v1/ping" if kind == "exchanged" else "/ping"
                runs[kind].append(b.s_time(ports[kind], path, pids[kind]))
        ref = max(runs["s_server"])[0]
        print(f"\n{'server':12} {'conn/s':>8} {'/ s_server':>10} {'server CPU':>11} "
              f"{'client CPU':>11}   (best round; ms per connection)")
        for kind in KINDS:
            rate, _, _, server_ms, client_ms = max(runs[kind])
            print(f"{kind:12} {rate:8.1f} {rate / ref:10.2f} {server_ms:9.2f} ms "
                  f"{client_ms:8.2f} ms   (rounds: "
                  f"{', '.join(f'{r[0]:.0f}' for r in runs[kind])})")
    finally:
        with be.contextlib.redirect_stdout(be.io.StringIO()):
            b.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
