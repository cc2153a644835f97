"""The node's configuration: one typed `Config`, read from TOML (see conf/exchanged.toml)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exchanged.box import BoxError, BoxSettings, OfficeHours, check_number_format
from exchanged.errors import ExchangedError
from exchanged.transport.peers import Peer

UNIT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def config_option(parser: argparse.ArgumentParser) -> None:
    """`--config/-c`, the node's configuration file, as every node command takes it."""
    parser.add_argument("--config", "-c", default=os.environ.get(
        "EXCHANGED_CONFIG", "/etc/exchanged/exchanged.toml"),
        help="the node's configuration (default: $EXCHANGED_CONFIG or "
             "/etc/exchanged/exchanged.toml)")


class ConfigError(ExchangedError):
    code = "config"


@dataclass(frozen=True)
class Limits:
    """What one peer, or anyone who can reach the port, may cost this node (conf/exchanged.toml
    explains each)."""

    max_document_bytes: int = 2 * 1024**3
    read_timeout: float = 30.0
    handshake_timeout: float = 15.0  # counted from the moment a connection is accepted
    drain_timeout: float = 20.0
    max_connections: int = 64  # authenticated peer connections at once
    max_connections_per_peer: int = 8  # ... of them from one peer unit
    max_unauthenticated: int = 128  # connections still in their TLS handshake, in all
    max_unauthenticated_per_source: int = 8  # ... from one source address
    peer_quota_bytes: int = 8 * 1024**3  # a peer's documents here not yet signed for
    disk_reserve_bytes: int = 256 * 1024**2  # below this much free space: "busy"
    refusal_audit_interval: float = 60.0  # refused connections: one entry per source and kind
    max_crl_bytes: int = 64 * 1024**2  # a CRL fetched or handed over by a peer
    # Our connections to a peer stay open between rounds: pinged after `keepalive` seconds
    # without traffic (kept below the peer's read_timeout: at most half of ours), closed after
    # `idle_timeout` seconds with nothing to send; up to `connections_per_peer` at once, each
    # carrying its share of the documents due.
    keepalive: float = 10.0
    idle_timeout: float = 60.0
    connections_per_peer: int = 2

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) <= 0:
                raise ConfigError(f"limits.{name} must be positive, not {getattr(self, name)}")


@dataclass(frozen=True)
class RelaySettings:
    """A12: when the direct path to a unit has failed for `after` seconds, its documents go
    through a neighbouring node that relays for both ends (A13: both sides approve).

    `through`: the configured peers this unit may relay through -- it hands them documents for
    a unit it cannot reach, and takes documents (and receipts) they relay to it. `serves`
    (``for`` in the file): the units this node relays for, as senders and as recipients;
    empty, it is not a relay."""

    through: tuple[str, ...] = ()
    serves: tuple[str, ...] = ()
    after: float = 60.0


@dataclass(frozen=True)
class Config:
    unit: str
    name: str
    data_dir: Path
    listen_host: str
    listen_port: int
    module: str | None
    key: str  # pkcs11: URI of the node key
    cert: Path  # the node certificate (+ intermediates), PEM
    pin_file: str | None
    ca: tuple[Path, ...]
    crls: tuple[Path, ...]
    peers: dict[str, Peer] = field(default_factory=dict)
    limits: Limits = Limits()
    alert_command: tuple[str, ...] = ()
    control_socket: Path | None = None
    source: Path | None = None
    # The node's first administrator and auditor (person ids), declared once (A8).
    roles: dict[str, str] = field(default_factory=dict)
    # The peer that keeps a copy of this node's signed audit checkpoints, and the peers whose
    # checkpoints this node keeps (both sides configure it).
    witness: str | None = None
    witness_for: tuple[str, ...] = ()
    box: BoxSettings = BoxSettings()
    # Revocation without a human: where the CA publishes its CRL (None: the http URL in the
    # node certificate's CRL distribution point, if any), how often it is fetched, how often
    # each peer is asked for a newer one, and what a CRL past its nextUpdate means.
    crl_url: str | None = None
    crl_refresh: float = 900.0
    crl_gossip: float = 600.0
    stale_crl: str = "refuse"
    # Prometheus metrics (GET /metrics) on this address, off when None; log lines as JSON.
    metrics_listen: tuple[str, int] | None = None
    log_format: str = "text"
    relay: RelaySettings = RelaySettings()

    @property
    def socket_path(self) -> Path:
        return self.control_socket or self.data_dir / "control.sock"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Config:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no configuration file {p}") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read {p}: {e}") from None
        try:
            return cls.from_dict(data, base=p.parent, source=p)
        except BoxError as e:
            raise ConfigError(f"{p}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{p}: bad, unknown or missing setting: {e}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: Path, source: Path | None = None
                  ) -> Config:
        node, p11, trust = data["node"], data["pkcs11"], data["trust"]
        unit = str(node["unit"])
        if not UNIT_RE.match(unit):
            raise ConfigError(f"unit id {unit!r}: lower-case letters, digits and '-' only")
        host, port = parse_address(str(node["listen"]))
        peers = {}
        for peer_unit, spec in data.get("peers", {}).items():
            if not UNIT_RE.match(peer_unit):
                raise ConfigError(f"peer unit id {peer_unit!r}: lower-case letters, digits, '-'")
            phost, pport = parse_address(str(spec["address"]))
            peers[peer_unit] = Peer(peer_unit, phost, pport, str(spec["name"]), str(spec["org"]))
        lim = data.get("limits", {})
        limits = Limits(**{k: type(getattr(Limits, k))(v) for k, v in lim.items()})

        def path(v: str) -> Path:
            return (base / v).resolve()

        alert = node.get("alert_command", [])
        witness = node.get("witness")
        witness_for = tuple(str(u) for u in node.get("witness_for", []))
        for w in ([str(witness)] if witness else []) + list(witness_for):
            if w not in peers:
                raise ConfigError(f"witness {w!r} is not a configured peer: add [peers.{w}]")
        box = _box(data.get("box", {}), data.get("office_hours", {}), data.get("reminders", {}))
        log_format = str(node.get("log_format", "text"))
        if log_format not in ("text", "json"):
            raise ConfigError(f'node.log_format must be "text" or "json", not {log_format!r}')
        stale_crl = str(trust.get("stale_crl", "refuse"))
        if stale_crl not in ("refuse", "warn"):
            raise ConfigError(f'trust.stale_crl must be "refuse" or "warn", not {stale_crl!r}')
        crl_url = str(trust["crl_url"]) if trust.get("crl_url") else None
        if crl_url is not None and not crl_url.startswith("http://"):
            raise ConfigError(f"trust.crl_url {crl_url!r}: an http:// URL (a CRL is signed; "
                              "it needs no TLS)")
        timing = {k: float(trust.get(k, getattr(cls, k))) for k in ("crl_refresh", "crl_gossip")}
        for k, v in timing.items():
            if v <= 0:
                raise ConfigError(f"trust.{k} must be positive (seconds), not {v}")
        for m in box.manages:
            if m not in peers:
                raise ConfigError(f"managed unit {m!r} is not a configured peer: add [peers.{m}]")
        relay = _relay(data.get("relay", {}), unit, peers)
        return cls(
            box=box, relay=relay,
            unit=unit, name=str(node.get("name", unit)), data_dir=path(node["data_dir"]),
            listen_host=host, listen_port=port, module=p11.get("module"), key=str(p11["key"]),
            cert=path(p11["cert"]), pin_file=str(path(p11["pin_file"])) if p11.get("pin_file")
            else None, ca=tuple(path(c) for c in trust["ca"]),
            crls=tuple(path(c) for c in trust.get("crls", [])), peers=peers, limits=limits,
            alert_command=tuple(str(a) for a in alert),
            control_socket=path(node["control_socket"]) if node.get("control_socket") else None,
            source=source, roles={str(k): str(v) for k, v in data.get("roles", {}).items()},
            witness=str(witness) if witness else None, witness_for=witness_for,
            crl_url=crl_url, stale_crl=stale_crl, **timing,
            metrics_listen=parse_address(str(data["metrics"]["listen"]))
            if data.get("metrics", {}).get("listen") else None,
            log_format=log_format)


def _relay(spec: dict[str, Any], unit: str, peers: dict[str, Peer]) -> RelaySettings:
    """[relay] (see conf/exchanged.toml): every unit named is a configured peer (the node
    must know who it is and reach it), never this unit itself."""
    unknown = set(spec) - {"through", "for", "after"}
    if unknown:
        raise ConfigError(f"[relay] has no setting {', '.join(sorted(unknown))} (through, "
                          "for, after)")
    lists = {}
    for key in ("through", "for"):
        names = spec.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"relay.{key} must be a list of unit ids")
        for n in names:
            if n == unit:
                raise ConfigError(f"relay.{key} names this unit ({unit}) itself")
            if n not in peers:
                raise ConfigError(f"relay.{key} names {n!r}, which is not a configured peer: "
                                  f"add [peers.{n}]")
        lists[key] = tuple(dict.fromkeys(names))
    after = float(spec.get("after", RelaySettings.after))
    if after <= 0:
        raise ConfigError(f"relay.after must be positive (seconds), not {after}")
    return RelaySettings(through=lists["through"], serves=lists["for"], after=after)


def _box(box: dict[str, Any], hours: dict[str, Any], reminders: dict[str, Any]) -> BoxSettings:
    """[box], [office_hours] and [reminders] (see conf/exchanged.toml)."""
    default = BoxSettings()
    oh = default.office_hours
    try:
        office = OfficeHours(
            days=tuple(int(d) for d in hours.get("days", oh.days)),
            start=_clock(hours.get("start"), oh.start), end=_clock(hours.get("end"), oh.end),
            holidays=frozenset(dt.date.fromisoformat(str(d))
                               for d in hours.get("holidays", [])),
            utc_offset=_offset(hours.get("utc_offset"), oh.utc_offset))
        if not set(office.days) <= set(range(1, 8)):
            raise ValueError("office_hours.days are ISO weekdays, 1 (Monday) to 7")
        divisions = tuple(str(d) for d in box.get("divisions", []))
        if len(set(divisions)) != len(divisions) or any(not d.strip() for d in divisions):
            raise ValueError("box.divisions must be distinct, non-empty names")
        return BoxSettings(
            divisions=divisions,
            incoming_number=check_number_format(str(box.get("incoming_number",
                                                            default.incoming_number)),
                                                "incoming"),
            outgoing_number=check_number_format(str(box.get("outgoing_number",
                                                            default.outgoing_number)),
                                                "outgoing"),
            manages=tuple(str(u) for u in box.get("manages", [])), office_hours=office,
            urgent_reminder_minutes=int(reminders.get("urgent_every_minutes",
                                                      default.urgent_reminder_minutes)),
            reminder_times=tuple(_clock(t, dt.time(0)) for t in reminders.get(
                "times", [t.strftime("%H:%M") for t in default.reminder_times])))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the exchange box's settings: {e}") from None


def _clock(text: object, default: dt.time) -> dt.time:
    if text is None:
        return default
    return dt.time.fromisoformat(str(text))


def _offset(text: object, default: dt.timedelta) -> dt.timedelta:
    """"+08:00" -> 8 hours."""
    if text is None:
        return default
    m = re.fullmatch(r"([+-])(\d{2}):(\d{2})", str(text))
    if not m:
        raise ValueError(f"utc_offset {text!r}: expected +HH:MM")
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    return dt.timedelta(minutes=-minutes if m.group(1) == "-" else minutes)


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"address {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)
