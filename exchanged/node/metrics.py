"""The node's figures for Prometheus (prometheus_client's text format), served on a local
address when `[metrics] listen` is set (off by default).

Counters are counted where things happen (`inbound`, `outbound`, `local`); gauges are read
from the node just before each scrape (queues, CRLs, certificates, token, store, disk). The
endpoint is read-only, answers GET /metrics only, and shows no document content: unit ids,
reason codes and numbers. Bind it to 127.0.0.1 (or the monitoring network) — it has no
authentication, like every node exporter.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from exchanged.common import parse_time


class Metrics:
    """One registry per node (never the global one: tests run several nodes in a process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sent = Counter("exchanged_documents_sent", "Documents delivered to a peer (a "
                            "delivery receipt proves each)", ["peer"], registry=r)
        self.received = Counter("exchanged_documents_received", "Documents received from a "
                                "peer, stored and acknowledged", ["peer"], registry=r)
        self.refused = Counter("exchanged_documents_refused", "Documents this node refused, "
                               "by reason code", ["peer", "code"], registry=r)
        self.rejected = Counter("exchanged_documents_rejected_by_peer", "Documents a peer "
                                "refused for good, by reason code", ["peer", "code"], registry=r)
        self.returned = Counter("exchanged_documents_returned", "Documents returned (N4): "
                                "'out' sent back by this unit, 'in' sent back to it",
                                ["direction"], registry=r)
        self.handshake_failures = Counter("exchanged_handshake_failures", "Connections refused "
                                          "before any request, by reason", ["reason"],
                                          registry=r)
        self.handshakes = Counter("exchanged_tls_handshakes", "TLS handshakes completed, by "
                                  "side and whether a session was resumed (no token "
                                  "signature)", ["side", "resumed"], registry=r)
        self.crls_taken = Counter("exchanged_crls_taken", "Newer CRLs held, by where they came "
                                  "from (peer, publication point, operator)", ["source"],
                                  registry=r)
        self.queue = Gauge("exchanged_queue_documents", "Documents waiting to go to a peer",
                           ["peer"], registry=r)
        self.oldest = Gauge("exchanged_queue_oldest_seconds", "Age of the oldest document "
                            "waiting to go to a peer", ["peer"], registry=r)
        self.crl_age = Gauge("exchanged_crl_age_seconds", "Age of the newest CRL held (since "
                             "its thisUpdate)", ["ca"], registry=r)
        self.crl_next = Gauge("exchanged_crl_next_update_seconds", "Seconds until the CRL held "
                              "is due (negative: stale)", ["ca"], registry=r)
        self.crl_number = Gauge("exchanged_crl_number", "Number of the newest CRL held", ["ca"],
                                registry=r)
        self.cert_expiry = Gauge("exchanged_certificate_expiry_seconds", "Seconds until a "
                                 "certificate expires: the node's, and each person's last used "
                                 "here", ["kind", "serial"], registry=r)
        self.token = Gauge("exchanged_token_present", "1 if the node's token answers",
                           registry=r)
        self.store_bytes = Gauge("exchanged_store_bytes", "Bytes of the packages the store "
                                 "holds", registry=r)
        self.store_documents = Gauge("exchanged_store_documents", "Documents in the store, by "
                                     "box and state", ["box", "state"], registry=r)
        self.disk_free = Gauge("exchanged_disk_free_bytes", "Free space where the store is",
                               registry=r)
        self.audit_head = Gauge("exchanged_audit_entries", "Entries in the audit log",
                                registry=r)

    def refused_connection(self, code: str) -> None:
        self.handshake_failures.labels(reason=code).inc()

    def update(self, status: dict[str, Any]) -> None:
        """The gauges, from the node's status as `exchanged.node.status.gather` reads it."""
        now = dt.datetime.now(dt.UTC)
        self.queue.clear()
        self.oldest.clear()
        for peer in status["peers"]:
            self.queue.labels(peer=peer["unit"]).set(peer["queued"])
            self.oldest.labels(peer=peer["unit"]).set(peer["oldest_queued_seconds"] or 0)
        for row in status["crls"]:
            if row["number"] is None:
                continue
            self.crl_number.labels(ca=row["ca"]).set(row["number"])
            self.crl_age.labels(ca=row["ca"]).set(row["age_seconds"])
            if row.get("next_update"):
                left = parse_time(row["next_update"]) - now
                self.crl_next.labels(ca=row["ca"]).set(left.total_seconds())
        self.cert_expiry.clear()
        for kind, rows in (("node", [status["certificate"]]), ("person", status["persons"])):
            for row in rows:
                self.cert_expiry.labels(kind=kind, serial=row["serial"]).set(
                    (parse_time(row["not_after"]) - now).total_seconds())
        self.token.set(1 if status["token"]["present"] else 0)
        self.store_bytes.set(status["store"]["blob_bytes"])
        for box in ("outbox", "inbox"):
            for state, n in status["store"][box].items():
                self.store_documents.labels(box=box, state=state).set(n)
        self.disk_free.set(status["disk"]["free_bytes"])
        self.audit_head.set(status["audit"]["seq"])

    def exposition(self) -> tuple[str, bytes]:
        """(content type, body) of a scrape."""
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)
