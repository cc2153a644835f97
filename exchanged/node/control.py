"""The daemon's side of the local control socket: framing and dispatch, nothing else.

Local commands (`exchanged send`, `outbox`, `inbox`, `role --config`...) ask the daemon over a
Unix socket in its data directory (mode 600, in a directory of mode 700: only the service's own
user reaches it); the daemon is the only writer of its store. One JSON object per line each
way; binary values (receipts) travel as base64. A request is {"cmd": ..., ...}; an answer is
{"ok": true, ...} or {"ok": false, "code": ..., "error": ...}.

What each command does is not this module's business: `serve()` is given a table of
handlers (`exchanged.node.local`). The client side is `exchanged.client`; the message format
is `exchanged.node.wire`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from exchanged.errors import ExchangedError
from exchanged.node.wire import MAX_LINE, ControlError, encode_line

IDLE_TIMEOUT = 600  # seconds a local client may stay silent
log = logging.getLogger("exchanged")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def serve(path: Path, handlers: Mapping[str, Handler], *,
                task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `path` and answer each request line with its handler's result."""
    await trio.to_thread.run_sync(_clear, path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    # Born owner-only: the daemon's umask is 077 (node/base.Node.open) and the directory 700.
    # (This used to set umask 177 around the bind; the umask is the process's, and the bind
    # awaits: any other task or thread creating a directory meanwhile made it 600, unusable.)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started(path)

    async def client(stream: trio.SocketStream) -> None:
        try:
            await _converse(handlers, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the local command went away (Ctrl-C): nothing to answer

    try:
        await trio.serve_listeners(client, [listener])
    finally:
        path.unlink(missing_ok=True)  # noqa: ASYNC240 — on the way out, nothing to wait for


def _clear(path: Path) -> None:
    """The socket's directory exists (mode 700), and no old socket is in the way."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        path.unlink()


async def _converse(handlers: Mapping[str, Handler], stream: trio.SocketStream) -> None:
    buf = b""
    async with stream:
        while True:
            try:
                with trio.fail_after(IDLE_TIMEOUT):
                    data = await stream.receive_some(65536)
            except (trio.TooSlowError, trio.BrokenResourceError):
                return
            if not data:
                return
            buf += data
            if len(buf) > MAX_LINE:
                await stream.send_all(encode_line({"ok": False, "code": "too-large",
                                                   "error": "request too large"}))
                return
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                answer = await dispatch(handlers, line)
                await stream.send_all(encode_line(answer))


async def dispatch(handlers: Mapping[str, Handler], line: bytes) -> dict[str, Any]:
    """One request line to its answer; never raises (a local request must never take the
    daemon down)."""
    try:
        req = json.loads(line)
        if not isinstance(req, dict):
            raise ControlError("a request is a JSON object", code="bad-request")
        cmd = req.get("cmd")
        handler = handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            raise ControlError(f"unknown command {cmd!r}", code="bad-request")
        return {"ok": True, **(await handler(req))}
    except ExchangedError as e:
        return {"ok": False, "code": e.code, "error": str(e)}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        return {"ok": False, "code": "bad-request", "error": f"bad request: {e}"}
    except Exception as e:
        log.exception("control request failed")
        return {"ok": False, "code": "internal-error", "error": f"{type(e).__name__}: {e}"}
