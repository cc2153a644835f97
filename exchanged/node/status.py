"""What `exchanged status` shows: the running node's state in one dictionary, and the problems
in it someone must act on.

Also the certificate-expiry rule (warnings at 30, 7 and 1 days before notAfter), which the
service applies to the node's certificate and to the persons' certificates last used here.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any

from cryptography import x509

from exchanged.common import stamp
from exchanged.node.base import Node
from exchanged.node.outbound import Outbound

EXPIRY_WARNINGS = (30, 7, 1)  # days before notAfter


def expiry_warning(not_after: dt.datetime, now: dt.datetime) -> int | None:
    """The smallest of EXPIRY_WARNINGS (days) that notAfter is within, or None; 0 once it
    has expired."""
    left = not_after - now
    if left <= dt.timedelta(0):
        return 0
    hit = [d for d in EXPIRY_WARNINGS if left <= dt.timedelta(days=d)]
    return min(hit) if hit else None


def cert_expiry(cert: x509.Certificate, now: dt.datetime) -> dict[str, Any]:
    left = cert.not_valid_after_utc - now
    return {"subject": cert.subject.rfc4514_string(), "serial": format(cert.serial_number, "x"),
            "not_after": stamp(cert.not_valid_after_utc),
            "days_left": round(left.total_seconds() / 86400, 1),
            "warning_days": expiry_warning(cert.not_valid_after_utc, now)}


def stamp_epoch(epoch: float | None) -> str | None:
    return None if epoch is None else stamp(dt.datetime.fromtimestamp(epoch, dt.UTC))


def _ago(epoch: float | None) -> int | None:
    return None if epoch is None else max(0, int(time.time() - epoch))


async def gather(node: Node, outbound: Outbound) -> dict[str, Any]:
    """The node's state; `problems` lists what needs someone's attention (empty: all well)."""
    now = dt.datetime.now(dt.UTC)
    c = node.config
    queues = await node.db(node.store.queues)
    persons = await node.db(node.store.persons_seen)
    head = await node.db(node.store.audit.head)
    statistics = await node.db(node.store.statistics)
    free = node.disk_free()
    problems: list[str] = []

    peers = []
    for unit, peer in sorted(c.peers.items()):
        q = queues.get(unit, {})
        seen = outbound.peer_state.get(unit, {})
        peers.append({"unit": unit, "address": f"{peer.host}:{peer.port}",
                      "queued": q.get("queued", 0), "receipts_owed": q.get("receipts_owed", 0),
                      "oldest_queued_doc": q.get("oldest_doc_id"),
                      "oldest_queued_seconds": _ago(q.get("oldest_queued_at")),
                      "last_success": seen.get("last_success"),
                      "last_error": seen.get("last_error"),
                      "last_error_at": seen.get("last_error_at"),
                      "connections": outbound.open_links[unit],
                      "tls_handshakes": dict(node.handshakes.get(unit, {})),
                      "direct_failed_since": stamp_epoch(outbound.relays.down_since.get(unit))})
        if seen.get("last_error") and (seen.get("last_error_at") or "") > \
                (seen.get("last_success") or ""):
            problems.append(f"peer {unit}: {seen['last_error']}")
    oldest = min((p for p in peers if p["oldest_queued_seconds"] is not None),
                 key=lambda p: -p["oldest_queued_seconds"], default=None)

    crls = node.crls.status(now)
    for row in crls:
        if row["number"] is None:
            problems.append(f"no CRL of {row['ca']}: peers cannot be checked for revocation")
        elif row["stale"]:
            problems.append(f"the CRL of {row['ca']} (number {row['number']}) is stale since "
                            f"{row['next_update']} (stale_crl = {c.stale_crl})")

    certificate = cert_expiry(node.cert, now)
    if certificate["warning_days"] is not None:
        problems.append(_expiry_problem("the node certificate", certificate))
    people = []
    for person, seen_cert in persons.items():
        not_after = dt.datetime.fromisoformat(seen_cert["not_after"].replace("Z", "+00:00"))
        warn = expiry_warning(not_after, now)
        row = {"person": person, **seen_cert, "warning_days": warn,
               "days_left": round((not_after - now).total_seconds() / 86400, 1)}
        people.append(row)
        if warn is not None:
            problems.append(_expiry_problem(f"{person}'s certificate", row))

    if free < c.limits.disk_reserve_bytes:
        problems.append(f"the disk holding {c.data_dir} has {free} bytes free, below the "
                        f"reserve of {c.limits.disk_reserve_bytes}: peers hear 'busy'")
    if not node.token_present:
        problems.append(f"the node's token is not present ({node.token_problem}): connections "
                        "needing its key are refused and documents wait")
    return {
        "unit": c.unit, "up": True, "pid": os.getpid(), "version": _version(),
        "started": stamp(node.started), "listen": f"{c.listen_host}:{node.port}",
        "peers": peers, "oldest_queued": None if oldest is None else {
            "unit": oldest["unit"], "doc_id": oldest["oldest_queued_doc"],
            "seconds": oldest["oldest_queued_seconds"]},
        "crls": crls, "crl_fetch": node.crls.last_fetch,
        "crl_taken": node.crls.last_taken, "crl_url": node.crls.publication_point(),
        "stale_crl": c.stale_crl, "certificate": certificate, "persons": people,
        "token": {"present": node.token_present, "problem": node.token_problem,
                  "uri": c.key},
        "disk": {"free_bytes": free, "reserve_bytes": c.limits.disk_reserve_bytes},
        "audit": {"seq": head[0], "hash": head[1]},
        "store": statistics, "active_transfers": node.active_transfers,
        "group_commit": dict(node.commit_stats),  # changes > commits: some shared a COMMIT
        "peer_check": node.peers.statistics(),
        "relay": {"through": list(c.relay.through), "for": list(c.relay.serves),
                  "after": c.relay.after},  # what we carry: store.relay
        "problems": problems,
    }


def _expiry_problem(what: str, row: dict[str, Any]) -> str:
    if row["warning_days"] == 0:
        return f"{what} ({row['serial']}) expired at {row['not_after']}"
    return f"{what} ({row['serial']}) expires at {row['not_after']}, in {row['days_left']} " \
           "days: renew it (exchanged renew)"


def _version() -> str:
    from exchanged import __version__
    return __version__
