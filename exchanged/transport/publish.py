"""The CA's publication point over plain HTTP: the server (`exchanged ca serve`) and the
fetch a node makes.

CRLs and CA certificates are signed objects, so they travel over plain HTTP (RFC 5280
4.2.1.13, RFC 2585): whoever serves them cannot forge them, and every node checks a fetched
CRL against its CA before it holds it (`exchanged.pki.verify.check_crl`). Any static web
server can therefore serve the CA directory's ``ca.crl`` just as well; this one exists so
that a unit needs nothing else, and it serves only these files of the CA directory:

=====================  ==================================  =============================
path                   file                                content type
=====================  ==================================  =============================
``/ca.crl``            ``ca.crl`` (the newest CRL)         ``application/pkix-crl``
``/crl/N.crl``         ``crl/N.crl`` (CRL number N)        ``application/pkix-crl``
``/ca.pem``            ``ca.pem`` (the CA certificate)     ``application/x-pem-file``
=====================  ==================================  =============================

Everything else is 404; methods other than GET and HEAD are 405. A connection carries one
request (``Connection: close``), must send its request head within `REQUEST_SECONDS`, and at
most `MAX_CONNECTIONS` are served at once (more wait in the listen backlog).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

from exchanged.errors import ExchangedError

log = logging.getLogger("exchanged")

REQUEST_SECONDS: Final = 10.0
MAX_CONNECTIONS: Final = 64
MAX_HEAD: Final = 8192
CRL_TYPE: Final = "application/pkix-crl"
_CRL_PATH = re.compile(rb"/crl/([1-9][0-9]{0,30})\.crl")


class FetchError(ExchangedError):
    code = "crl-fetch"


# A route: the request target -> (status, content type, body), or None for 404.
Route = Callable[[bytes], Awaitable[tuple[int, str, bytes] | None]]


def ca_files(ca_dir: Path) -> Route:
    """The publication point's routes over a CA directory."""
    async def route(target: bytes) -> tuple[int, str, bytes] | None:
        path = target.split(b"?", 1)[0]
        m = _CRL_PATH.fullmatch(path)
        if path == b"/ca.crl":
            file, ctype = ca_dir / "ca.crl", CRL_TYPE
        elif path == b"/ca.pem":
            file, ctype = ca_dir / "ca.pem", "application/x-pem-file"
        elif m:
            file, ctype = ca_dir / "crl" / f"{int(m.group(1))}.crl", CRL_TYPE
        else:
            return None
        try:
            return 200, ctype, await trio.Path(file).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("cannot read %s: %s", file, e)
            return 500, "text/plain", b"cannot read the file\n"
    return route


async def _answer(stream: trio.abc.Stream, route: Route) -> tuple[str, int]:
    """Read one request, send one response: (the request line for the log, the status)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    request: h11.Request | None = None
    with trio.move_on_after(REQUEST_SECONDS):
        while request is None:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(MAX_HEAD)))
            elif isinstance(event, h11.Request):
                request = event
            else:  # ConnectionClosed before a request
                return "-", 0
    if request is None:
        return "- (no request in time)", 408
    line = f"{request.method.decode('ascii', 'replace')} " \
           f"{request.target.decode('ascii', 'replace')[:200]}"
    headers = [(b"Connection", b"close"), (b"Server", b"exchanged")]
    body = b""
    if request.method not in (b"GET", b"HEAD"):
        status, headers = 405, headers + [(b"Allow", b"GET, HEAD")]
    else:
        found = await route(request.target)
        if found is None:
            status = 404
        else:
            status, ctype, body = found
            headers.append((b"Content-Type", ctype.encode()))
    headers.append((b"Content-Length", str(len(body)).encode()))
    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if request.method == b"GET" and body:
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    with trio.move_on_after(REQUEST_SECONDS):
        await stream.send_all(out)
    return line, status


async def serve_get(route: Route, host: str, port: int, *, quiet: bool = False,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A read-only HTTP server (GET and HEAD, one request a connection) answering with
    `route` until cancelled; task_status gets the port (useful with port 0). `quiet`: no log
    line per request."""
    slots = trio.CapacityLimiter(MAX_CONNECTIONS)
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def one(stream: trio.SocketStream) -> None:
        async with slots:
            try:
                line, status = await _answer(stream, route)
                if status and not quiet:
                    log.info("%s %s -> %d", _peer(stream), line, status)
            except (h11.RemoteProtocolError, trio.BrokenResourceError, OSError) as e:
                log.info("%s: bad request (%s)", _peer(stream), e)
            finally:
                await trio.aclose_forcefully(stream)

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(one, listeners)


async def serve(ca_dir: Path, host: str, port: int, *,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the CA directory's publication files until cancelled."""
    await serve_get(ca_files(ca_dir), host, port, task_status=task_status)


def _peer(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"


async def fetch(url: str, *, max_size: int, seconds: float = 30.0) -> bytes:
    """GET an http:// URL, all of it within `seconds`: the body of a 200 answer of at most
    `max_size` bytes, or FetchError saying what went wrong."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise FetchError(f"{url!r}: only http:// publication points are fetched (a CRL is "
                         "signed; it needs no TLS)")
    try:
        port = parts.port or 80
    except ValueError:
        raise FetchError(f"{url!r}: bad port") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname
    try:
        with trio.fail_after(seconds):
            stream = await trio.open_tcp_stream(host, port)
            try:
                return await _get(stream, parts.netloc, target, max_size)
            finally:
                await trio.aclose_forcefully(stream)
    except trio.TooSlowError:
        raise FetchError(f"{url}: no complete answer within {seconds:g} s") from None
    except OSError as e:
        raise FetchError(f"{url}: {_why(e)}") from None
    except h11.ProtocolError as e:
        raise FetchError(f"{url}: the server broke HTTP ({e})") from None
    except FetchError as e:
        raise FetchError(f"{url}: {e}") from None


def _why(e: BaseException) -> str:
    """trio's "all attempts to connect ... failed" hides the reason in its cause (a group)."""
    cause: BaseException | None = e.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    text = getattr(e, "strerror", None) or str(e)
    return f"{text}: {getattr(cause, 'strerror', None) or cause}" if cause is not None else text


async def _get(stream: trio.abc.Stream, netloc: str, target: str, max_size: int) -> bytes:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    await stream.send_all(conn.send(h11.Request(
        method="GET", target=target, headers=[("Host", netloc), ("User-Agent", "exchanged"),
                                              ("Connection", "close")])) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    body = bytearray()
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            status = event.status_code
            if status != 200:
                raise FetchError(f"the server answered {status} "
                                 f"{event.reason.decode('ascii', 'replace')}")
            length = dict(event.headers).get(b"content-length")
            if length is not None and int(length) > max_size:
                raise FetchError(f"the file is {int(length)} bytes, over the limit of "
                                 f"{max_size}")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_size:
                raise FetchError(f"the file is over the limit of {max_size} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise FetchError("the server closed the connection before the whole answer")
        # InformationalResponse: wait for the real one
