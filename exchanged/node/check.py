"""`exchanged config check`: is this node configuration one the daemon can start with, and
work with? Answered without starting the daemon and without stopping it.

`check_config(path)` returns one `Finding` per check, in the order a reader follows: the file
(through `Config.load`, whose error is reported as it is), the paths it names (data
directory, certificate, CA files, CRL files, PIN file, PKCS#11 module), the token (opened as the
daemon opens it, read-only: the PIN from `pin_file`, the key URI's pin-source or
$EXCHANGED_PIN; the key `pkcs11.key` names, that the certificate certifies it, one test
signature), the certificate's path to the configured CA with the CRLs in force (the configured
files and those learned in DATA_DIR/crls/), every CRL file against the CA, where fresh CRLs come
from, the peers and the declared roles.

Nothing is changed: no mode, no file, no store (the data directory is looked at, never
opened). The PIN is read only by `PinSource`, handed to the token and never kept, shown or
written; a wrong one costs the token one try (as a start of the daemon would), and on its
last try the check does not log in at all.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import stat
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pkcs11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from exchanged.common import stamp
from exchanged.errors import ExchangedError
from exchanged.node.config import Config
from exchanged.node.crls import LEARNED_DIR, distribution_point
from exchanged.pki import verify
from exchanged.pki.keys import UnsupportedKey, spki_der, verify_signature
from exchanged.pki.names import PERSON_ID_RE, organization, person_of
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token, TokenKey, default_module, find_token, load_module
from exchanged.pki.uri import Pkcs11Uri, parse
from exchanged.roles import ADMIN, AUDITOR

OK, WARNING, PROBLEM = "ok", "warning", "problem"
EXPIRY_WARNING = dt.timedelta(days=30)
SUN_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path is 108 with its NUL)
PIN_ENV = "EXCHANGED_PIN"


@dataclass(frozen=True)
class Finding:
    """One check's outcome: `status` is "ok", "warning" (the daemon works, but look) or
    "problem" (the daemon will not start, or will not do its work); `detail` says what was
    found and, for a problem, what to do."""

    check: str
    status: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "detail": self.detail}


def has_problems(findings: list[Finding]) -> bool:
    return any(f.status == PROBLEM for f in findings)


def check_config(path: str | os.PathLike[str], *, at: dt.datetime | None = None
                 ) -> list[Finding]:
    """Every check of the configuration at `path` (`at`: the time certificates and CRLs are
    judged at, default now)."""
    return _Check(Path(path), at or dt.datetime.now(dt.UTC)).run()


class _Check:
    def __init__(self, path: Path, at: dt.datetime) -> None:
        self.path, self.at = path, at
        self.out: list[Finding] = []
        self.chain: list[x509.Certificate] | None = None  # the node certificate (+ chain)
        self.trusted: list[x509.Certificate] = []
        self.crls: list[Path] = []  # the CRL files in force that parse

    def add(self, check: str, status: str, detail: str) -> None:
        self.out.append(Finding(check, status, " ".join(detail.split())))

    @contextmanager
    def guard(self, check: str) -> Iterator[None]:
        """A check that breaks in a way not foreseen is a problem of its own, never the end
        of the others."""
        try:
            yield
        except Exception as e:  # reported, then the other checks go on
            self.add(check, PROBLEM, f"the check itself failed: {type(e).__name__}: {e}")

    def run(self) -> list[Finding]:
        config = self.config()
        if config is None:
            return self.out
        steps: list[tuple[str, Callable[[Config], None]]] = [
            ("listen", self.listen), ("data-dir", self.data_dir),
            ("control-socket", self.control_socket), ("certificate", self.certificate),
            ("ca-file", self.ca_files), ("crl-file", self.crl_files),
            ("pin-file", self.pin_file), ("pkcs11-module", self.module),
            ("token", self.token), ("chain", self.chain_to_ca), ("crl-source", self.crl_source),
            ("peer", self.peers), ("roles", self.roles)]
        for name, step in steps:
            with self.guard(name):
                step(config)
        return self.out

    # -- the file -------------------------------------------------------------------------

    def config(self) -> Config | None:
        try:
            config = Config.load(self.path)
        except ExchangedError as e:
            if not self.path.is_file():
                self.add("config", PROBLEM, f"{e}: give the configuration's path (the "
                         "default is $EXCHANGED_CONFIG, then /etc/exchanged/exchanged.toml)")
            else:
                where = "" if str(self.path) in str(e) else f"{self.path}: "
                self.add("config", PROBLEM, f"{where}{e}{self._locate(str(e))}: the daemon "
                         "would not start; correct the file and run the check again")
            return None
        self.add("config", OK, f"{self.path} parses: unit {config.unit!r}, "
                 f"{len(config.peers)} peer(s)")
        return config

    def _locate(self, error: str) -> str:
        """Where in the file an error Config.load gave without a place stands."""
        try:
            data = tomllib.loads(self.path.read_text())
        except (OSError, ValueError):
            return ""
        m = re.search(r"address '([^']*)'", error)
        if m:
            node, peers = data.get("node"), data.get("peers")
            if isinstance(node, dict) and str(node.get("listen")) == m.group(1):
                return " (in [node] listen)"
            for unit, spec in (peers.items() if isinstance(peers, dict) else ()):
                if isinstance(spec, dict) and str(spec.get("address")) == m.group(1):
                    return f" (in [peers.{unit}] address)"
        if "missing setting" in error:
            return (" (required: [node] unit, data_dir, listen; [pkcs11] key, cert; "
                    "[trust] ca; in each [peers.UNIT] address, name, org)")
        return ""

    def listen(self, c: Config) -> None:
        where = f"{c.listen_host}:{c.listen_port}"
        if not 0 < c.listen_port < 65536:
            self.add("listen", PROBLEM, f"[node] listen {where!r}: the port must be 1-65535")
        else:
            self.add("listen", OK, f"listens on {where}")

    # -- paths ----------------------------------------------------------------------------

    def data_dir(self, c: Config) -> None:
        p, euid = c.data_dir, os.geteuid()
        if not p.exists():
            anc = p.parent
            while not anc.exists() and anc != anc.parent:
                anc = anc.parent
            if not anc.is_dir():
                self.add("data-dir", PROBLEM, f"the data directory {p} cannot be created: {anc} "
                         "is not a directory; set [node] data_dir to a directory")
            elif not os.access(anc, os.W_OK | os.X_OK):
                self.add("data-dir", PROBLEM, f"the data directory {p} does not exist and uid "
                         f"{euid} cannot create it ({anc} is not writable): create it for the "
                         f"service's user: install -d -m 700 -o USER {p}")
            else:
                self.add("data-dir", OK, f"the data directory {p} does not exist yet; the "
                         "daemon creates it (mode 700) at its first start")
            return
        if not p.is_dir():
            self.add("data-dir", PROBLEM, f"the data directory {p} is not a directory: set "
                     "[node] data_dir to a directory, or move what is there")
            return
        st = p.stat()
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != euid:
            self.add("data-dir", PROBLEM, f"the data directory {p} belongs to uid {st.st_uid}, "
                     f"not to uid {euid} running this check: the daemon refuses a data "
                     "directory that is not its own; run the check as the service's user "
                     f"(sudo -u USER exchanged config check {self.path}), or chown it")
        elif mode & 0o022:
            self.add("data-dir", PROBLEM, f"the data directory {p} is writable by its group or "
                     f"by others (mode {mode:o}): the daemon refuses to start; someone may have "
                     f"changed the store: check it, then chmod 700 {p}")
        elif not os.access(p, os.W_OK | os.X_OK):
            self.add("data-dir", PROBLEM, f"the data directory {p} is not writable by uid "
                     f"{euid} (mode {mode:o}): chmod 700 {p}")
        else:
            note = ("; the daemon takes its group's and others' read access away at start"
                    if mode & 0o077 else "")
            store = "holds a store" if (p / "node.db").exists() else "holds no store yet"
            self.add("data-dir", OK, f"the data directory {p} is the service's (mode {mode:o}) "
                     f"and {store}{note}")

    def control_socket(self, c: Config) -> None:
        sock = c.socket_path
        size = len(os.fsencode(sock))
        if size > SUN_PATH_MAX:
            self.add("control-socket", PROBLEM, f"the control socket {sock} is {size} bytes "
                     f"long; a Unix socket's path must be at most {SUN_PATH_MAX}: set [node] "
                     "control_socket to a shorter path (or move data_dir)")
        elif c.control_socket is not None and not sock.parent.is_dir():
            self.add("control-socket", PROBLEM, f"the control socket's directory {sock.parent} "
                     "does not exist: create it (mode 700, the service's user) or change [node] "
                     "control_socket")
        else:
            self.add("control-socket", OK, f"the control socket is {sock}")

    def certificate(self, c: Config) -> None:
        p = c.cert
        try:
            data = p.read_bytes()
        except OSError as e:
            self.add("certificate", PROBLEM, f"cannot read the node certificate {p} ([pkcs11] "
                     f"cert): {e.strerror}: put the node's certificate (PEM) there")
            return
        try:
            chain = x509.load_pem_x509_certificates(data)
        except ValueError as e:
            self.add("certificate", PROBLEM, f"{p} ([pkcs11] cert) holds no PEM certificate "
                     f"({e}): the daemon reads the node certificate, then any intermediates, "
                     "in PEM")
            return
        self.chain = chain
        cert = chain[0]
        self.add("certificate", OK, f"{p}: {cert.subject.rfc4514_string()}, serial "
                 f"{cert.serial_number:x}, valid until {stamp(cert.not_valid_after_utc)}"
                 + (f", with {len(chain) - 1} intermediate(s)" if len(chain) > 1 else ""))
        if person_of(cert.subject):
            self.add("certificate", PROBLEM, f"{p} is a person's certificate (person id "
                     f"{person_of(cert.subject)}), not a node's: install the node certificate")
        if organization(cert) and organization(cert) != c.name:
            self.add("certificate", WARNING, f"[node] name {c.name!r} is not the certificate's "
                     f"O {organization(cert)!r}: peers know this node by the certificate; set "
                     "name to it so that messages and status agree")

    def ca_files(self, c: Config) -> None:
        if not c.ca:
            self.add("ca-file", PROBLEM, "[trust] ca names no CA certificate: name the CA's "
                     "certificate (ca.pem)")
            return
        for p in c.ca:
            try:
                cert = x509.load_pem_x509_certificate(p.read_bytes())
            except OSError as e:
                self.add("ca-file", PROBLEM, f"cannot read the CA certificate {p} ([trust] ca): "
                         f"{e.strerror}: copy the CA's ca.pem there")
                continue
            except ValueError as e:
                self.add("ca-file", PROBLEM, f"{p} ([trust] ca) is not a PEM certificate ({e}): "
                         "copy the CA's ca.pem there")
                continue
            try:
                is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except (x509.ExtensionNotFound, ValueError):
                is_ca = False
            if not is_ca:
                self.add("ca-file", PROBLEM, f"{p} ([trust] ca) holds "
                         f"{cert.subject.rfc4514_string()}, which is not a CA certificate: "
                         "name the CA's certificate (ca.pem)")
                continue
            self.trusted.append(cert)
            self.add("ca-file", OK, f"{p}: CA {cert.subject.rfc4514_string()}, valid until "
                     f"{stamp(cert.not_valid_after_utc)}")

    def crl_files(self, c: Config) -> None:
        """Every CRL file the daemon reads (the configured ones, which must be readable for it
        to start, then the learned ones), each checked against the CA as a CRL a peer hands
        over is; a stale one only matters if nothing newer of its CA is held."""
        learned_dir = c.data_dir / LEARNED_DIR
        learned: list[Path] = []
        if learned_dir.is_dir():
            try:
                learned = sorted(learned_dir.glob("*.crl"))
            except OSError as e:
                self.add("crl-file", PROBLEM, f"cannot list the learned CRLs in {learned_dir}: "
                         f"{e.strerror}: run the check as the service's user")
        checked: list[tuple[Path, verify.CrlInfo]] = []
        for p in [*c.crls, *learned]:
            what = "[trust] crls" if p in c.crls else "learned"
            try:
                data = p.read_bytes()
            except OSError as e:
                self.add("crl-file", PROBLEM, f"cannot read the CRL file {p} ({what}): "
                         f"{e.strerror}: the daemon does not start without it; copy the CA's "
                         "ca.crl there, or remove it from [trust] crls (fresh CRLs also come "
                         "from the CA's publication point and from peers)")
                continue
            try:
                ders = [verify.crl_der(data, str(p))]
            except verify.ValidationError:
                try:  # a PEM file of several CRLs, which the daemon also reads
                    ders = [crl.public_bytes(serialization.Encoding.DER)
                            for crl in verify.CrlSet.load([p])]
                except ExchangedError as e:
                    self.add("crl-file", PROBLEM, f"{e} ({what}): the daemon does not start "
                             "with it; put the CA's CRL (DER or PEM) there")
                    continue
            self.crls.append(p)
            if not self.trusted:
                self.add("crl-file", WARNING, f"{p} ({what}) holds a CRL, not checked: no CA "
                         "certificate could be read")
                continue
            for i, der in enumerate(ders):
                source = str(p) if i == 0 else f"{p} #{i + 1}"
                try:
                    info = verify.check_crl(der, self.trusted, at=self.at, source=source)
                except verify.ValidationError as e:
                    todo = ("it was signed by another key than the CA's: a forgery, or the CRL "
                            "of another CA of the same name; replace it with the CA's ca.crl"
                            if e.code == "bad-signature" else
                            "replace it with the CRL of the CA in [trust] ca")
                    self.add("crl-file", PROBLEM, f"{e} ({what}): {todo}")
                    continue
                checked.append((Path(source), info))
        for p, info in checked:
            newest = max((i.number for _, i in checked if i.issuer == info.issuer), default=0)
            what = (f"CRL number {info.number} of {info.issuer.rfc4514_string()}, "
                    f"{info.entries} entr{'y' if info.entries == 1 else 'ies'}, next update "
                    f"{stamp(info.next_update) if info.next_update else '-'}")
            if info.number < newest:
                self.add("crl-file", OK, f"{p}: {what} (superseded by number {newest})")
            elif info.stale(self.at):
                self.add("crl-file", WARNING, f"{p}: {what}: STALE (past its next update); "
                         f"with stale_crl = {c.stale_crl!r} "
                         + ("no documents pass" if c.stale_crl == "refuse" else
                            "documents still pass") + " until a fresh CRL comes (from the "
                         "publication point or a peer); have the CA sign one (exchanged ca "
                         "crl) and publish it")
            else:
                self.add("crl-file", OK, f"{p}: {what}; verifies against the CA")
        if not c.crls and not learned:
            self.add("crl-file", WARNING, "no CRL file ([trust] crls) and none learned yet: "
                     "until one is fetched from the publication point or handed over by a "
                     "peer, peers are admitted for CRLs only")

    def pin_file(self, c: Config) -> None:
        path, where = self._pin_path(c)
        if path is None:
            if os.environ.get(PIN_ENV):
                self.add("pin-file", OK, f"no PIN file: the PIN comes from ${PIN_ENV} (set "
                         "here; the daemon's environment must set it too)")
            else:
                self.add("pin-file", PROBLEM, f"no PIN source: [pkcs11] has no pin_file and "
                         f"${PIN_ENV} is not set, so the daemon (without a terminal) has no PIN "
                         "for its token: set pin_file to a file of mode 600 holding the PIN (if "
                         f"the service's environment sets ${PIN_ENV}, set it for this check "
                         "too)")
            return
        try:
            st = os.stat(path)
        except OSError as e:
            self.add("pin-file", PROBLEM, f"cannot read the PIN file {path} ({where}): "
                     f"{e.strerror}: write the token's PIN there (one line, mode 600, owned by "
                     "the service's user)")
            return
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            self.add("pin-file", PROBLEM, f"the PIN file {path} ({where}) is not a regular "
                     "file: write the token's PIN into a file (mode 600)")
        elif st.st_mode & 0o077:
            self.add("pin-file", PROBLEM, f"the PIN file {path} ({where}) is open to others "
                     f"than its owner (mode {mode:o}): the daemon refuses it; chmod 600 {path} "
                     "(and, since others could read it, consider changing the token's PIN)")
        elif not os.access(path, os.R_OK):
            self.add("pin-file", PROBLEM, f"the PIN file {path} ({where}) is not readable by "
                     f"uid {os.geteuid()} (owner uid {st.st_uid}): chown it to the service's "
                     "user, and run the check as that user")
        elif st.st_uid != os.geteuid():
            self.add("pin-file", WARNING, f"the PIN file {path} ({where}) belongs to uid "
                     f"{st.st_uid}, not to uid {os.geteuid()} running this check: make it the "
                     "service's user's (mode 600)")
        else:
            self.add("pin-file", OK, f"the PIN file {path} ({where}): mode {mode:o}, owner uid "
                     f"{st.st_uid}")

    @staticmethod
    def _pin_path(c: Config) -> tuple[str | None, str]:
        """Where the daemon reads the PIN from, as PinSource does: pin_file, else the key
        URI's pin-source, else the environment."""
        if c.pin_file:
            return c.pin_file, "[pkcs11] pin_file"
        try:
            source = parse(c.key).pin_source
        except ExchangedError:
            return None, ""
        if source:
            path = source[len("file:"):] if source.startswith("file:") else source
            return path[2:] if path.startswith("//") else path, "pin-source in [pkcs11] key"
        return None, ""

    def _module_path(self, c: Config, uri: Pkcs11Uri | None) -> str:
        return (uri.module_path if uri else None) or c.module or default_module()

    def module(self, c: Config) -> None:
        try:
            uri: Pkcs11Uri | None = parse(c.key)
        except ExchangedError:
            uri = None  # the token check says what is wrong with the URI
        path = self._module_path(c, uri)
        where = ("module-path in [pkcs11] key" if uri and uri.module_path else
                 "[pkcs11] module" if c.module else
                 "$EXCHANGED_PKCS11_MODULE" if os.environ.get("EXCHANGED_PKCS11_MODULE") else
                 "the default, SoftHSM")
        if os.path.isfile(path):
            self.add("pkcs11-module", OK, f"the PKCS#11 module {path} ({where})")
        else:
            self.add("pkcs11-module", PROBLEM, f"the PKCS#11 module {path} ({where}) "
                     f"{'is not a file' if os.path.exists(path) else 'does not exist'}: "
                     "install it (opensc for cards, softhsm2 for tests) or set [pkcs11] module "
                     "to its path")

    # -- the token ------------------------------------------------------------------------

    def token(self, c: Config) -> None:
        if any(f.status == PROBLEM and f.check in ("pin-file", "pkcs11-module")
               for f in self.out):
            self.add("token", PROBLEM, "not opened: the PIN source or the PKCS#11 module is "
                     "not usable (above)")
            return
        try:
            uri = parse(c.key)
        except ExchangedError as e:
            self.add("token", PROBLEM, f"[pkcs11] key {c.key!r} is not a pkcs11: URI: {e}; "
                     "write it as pkcs11:token=LABEL;object=KEYLABEL")
            return
        if uri.object is None and uri.id is None:
            self.add("token", PROBLEM, f"[pkcs11] key {c.key!r} names no key: add "
                     "object=LABEL (or id=)")
            return
        module = self._module_path(c, uri)
        try:
            lib = load_module(module)
        except ExchangedError as e:
            self.add("token", PROBLEM, f"{e}: install the module for this token (opensc for "
                     "cards) or set [pkcs11] module to it")
            return
        try:
            found = find_token(lib, uri)
        except ExchangedError as e:
            self.add("token", PROBLEM, f"{e}: check token= in [pkcs11] key, and that the card "
                     "or key is inserted")
            return
        flags = pkcs11.TokenFlag(found.flags)
        if flags & pkcs11.TokenFlag.USER_PIN_LOCKED:
            self.add("token", PROBLEM, f"token {found.label!r} is locked after too many wrong "
                     "PINs: the security officer must unblock it (set a new user PIN with the "
                     "SO PIN)")
            return
        if flags & pkcs11.TokenFlag.USER_PIN_FINAL_TRY:
            self.add("token", PROBLEM, f"token {found.label!r} has one PIN try left (one more "
                     "wrong PIN locks it): the check does not log in; make sure the PIN file "
                     "holds the right PIN, then log in once (the daemon's start does), which "
                     "resets the count")
            return
        pin = PinSource(role="node", env=PIN_ENV, file=c.pin_file)
        try:
            token = Token.open(uri, pin, module=c.module, rw=False)
        except ExchangedError as e:
            if e.code == "wrong-pin":
                path, where = self._pin_path(c)
                source = f"the PIN in {path} ({where})" if path else f"${PIN_ENV}"
                low = (" It was already low on tries before this check." if
                       flags & pkcs11.TokenFlag.USER_PIN_COUNT_LOW else "")
                self.add("token", PROBLEM, f"{e}: {source} is not this token's PIN: put the "
                         "right one there; this check used one try, as each start of the "
                         f"daemon would.{low}")
            else:
                self.add("token", PROBLEM, f"cannot log in to the node's token: {e}")
            return
        try:
            self.add("token", OK, f"logged in to token {token.label!r} (module {module})")
            self.token_key(c, token, uri)
        finally:
            token.close()

    def token_key(self, c: Config, token: Token, uri: Pkcs11Uri) -> None:
        name = uri.object if uri.object is not None else (uri.id or b"").hex()
        try:
            named: TokenKey | None = token.key_from_uri(uri)
        except ExchangedError as e:
            if e.code != "no-key":
                self.add("key", PROBLEM, f"{e}")
                return
            named = None
        if self.chain is None:
            if named is None:
                self.add("key", PROBLEM, f"token {token.label!r} holds no private key "
                         f"{name!r}: set object= in [pkcs11] key to the node key's label "
                         "(exchanged token list URI shows them)")
            else:
                self.add("key", WARNING, f"key {named.label!r} found on token "
                         f"{token.label!r}; not compared: the certificate could not be read")
            return
        cert = self.chain[0]
        want = spki_der(cert.public_key())
        key = named if named is not None and spki_der(named.public_key) == want else None
        if key is None:
            key = next((k for k in token.keys() if spki_der(k.public_key) == want), None)
            if key is None:
                got = (f"key {named.label!r} is another key" if named is not None else
                       f"token {token.label!r} holds no private key {name!r}")
                self.add("key", PROBLEM, f"the certificate {c.cert} (serial "
                         f"{cert.serial_number:x}) certifies no key on token {token.label!r} "
                         f"({got}): the certificate belongs to another key; install the "
                         "certificate issued for this token's key, or point [pkcs11] key at "
                         "the token holding its key")
                return
            self.add("key", WARNING, f"[pkcs11] key names {name!r}"
                     f"{'' if named is not None else ', which is not on the token'}, but the "
                     f"certificate certifies key {key.label!r} on token {token.label!r} (a "
                     f"renewal?): the daemon uses {key.label!r}; set object={key.label} in "
                     "[pkcs11] key to say so")
        else:
            self.add("key", OK, f"key {key.label!r} on token {token.label!r} is the one the "
                     "certificate certifies (same public key)")
        message = b"exchanged config check " + secrets.token_bytes(16)
        try:
            signature = key.sign(message)
            verify_signature(cert.public_key(), signature, message)
        except ExchangedError as e:
            self.add("signature", PROBLEM, f"the token could not sign: {e}")
        except (InvalidSignature, UnsupportedKey) as e:
            self.add("signature", PROBLEM, f"a signature made with key {key.label!r} does not "
                     f"verify with the certificate ({type(e).__name__}): the token's key and "
                     "its public half disagree; have the token checked or replaced")
        else:
            self.add("signature", OK, f"a test signature made on the token verifies with the "
                     f"certificate ({key.key_type.upper()})")

    # -- the certificate's standing -------------------------------------------------------

    def chain_to_ca(self, c: Config) -> None:
        if self.chain is None or not self.trusted:
            self.add("chain", PROBLEM, "not checked: the certificate or no CA certificate "
                     "could be read (above)")
            return
        leaf, *intermediates = self.chain
        crls = verify.CrlSet.load(self.crls)  # as the daemon reads them
        stale_ok = c.stale_crl == "warn"
        note = ""
        try:
            path = verify.validate(leaf, trusted=self.trusted, untrusted=intermediates,
                                   crls=crls, at=self.at, purpose="node", stale_ok=stale_ok)
        except verify.ValidationError as e:
            if e.code not in ("crl-stale", "crl-missing"):
                self.add("chain", PROBLEM, f"{e}: {self._todo(e, leaf)}")
                return
            # Judged as the daemon would go on: on the stale CRL, or without one.
            try:
                path = verify.validate(leaf, trusted=self.trusted, untrusted=intermediates,
                                       crls=crls, at=self.at, purpose="node", stale_ok=True,
                                       check_revocation=e.code == "crl-stale")
            except verify.ValidationError as e2:
                self.add("chain", PROBLEM, f"{e2}: {self._todo(e2, leaf)}")
                return
            note = (f"; but {e} — revocations reach this node only once a fresh CRL comes "
                    "(from the publication point or a peer)")
        self.add("chain", WARNING if note else OK, "the certificate chains to "
                 f"{path[-1].subject.rfc4514_string()} for a node (keyUsage, EKU serverAuth and "
                 f"clientAuth){' and is not revoked' if not note else ''}{note}")
        for cert in path:
            left = cert.not_valid_after_utc - self.at
            if left < EXPIRY_WARNING:
                whose = "the node certificate" if cert is leaf else f"the CA certificate " \
                    f"{cert.subject.rfc4514_string()}"
                todo = (f"renew it now: exchanged renew --config {self.path} --operator "
                        "ADMIN, then renew --install CERT" if cert is leaf else
                        "the CA must be renewed, and every node given its new certificate")
                self.add("expiry", WARNING, f"{whose} expires {stamp(cert.not_valid_after_utc)}"
                         f", in {left.days} day(s): {todo}")

    @staticmethod
    def _todo(e: verify.ValidationError, leaf: x509.Certificate) -> str:
        return {
            "revoked": "this certificate is revoked: peers refuse it; have a new certificate "
                       "issued (exchanged renew) and install it",
            "suspended": "this certificate is on hold: ask the CA's security officer to release "
                         "it, or have a new one issued",
            "expired": "renew it: exchanged renew, then renew --install",
            "not-yet-valid": "check this host's clock, or wait until it is valid",
            "unknown-issuer": f"it is issued by {leaf.issuer.rfc4514_string()}, which no "
                              "certificate in [trust] ca is: name that CA's certificate in "
                              "[trust] ca (or install a certificate issued by the configured CA)",
            "bad-signature": "the certificate or the CRL was not signed by the configured CA's "
                             "key: install the CA's own certificate and CRL",
            "wrong-key-usage": "this is not a node certificate: have one issued with the node "
                               "profile (exchanged csr --profile node)",
        }.get(e.code, "install a certificate of the configured CA for this node")

    def crl_source(self, c: Config) -> None:
        if c.crl_url:
            self.add("crl-source", OK, f"fresh CRLs are fetched from {c.crl_url} ([trust] "
                     f"crl_url) every {c.crl_refresh:g} s")
            return
        if self.chain is None:
            self.add("crl-source", WARNING, "[trust] crl_url is not set and the certificate "
                     "(which may name a CRL distribution point) could not be read (above)")
            return
        url = distribution_point(self.chain[0])
        if url:
            self.add("crl-source", OK, f"fresh CRLs are fetched from {url} (the certificate's "
                     f"CRL distribution point) every {c.crl_refresh:g} s")
        else:
            self.add("crl-source", WARNING, "no publication point: [trust] crl_url is not set "
                     "and the certificate has no http:// CRL distribution point, so revocations "
                     "come only from peers and CRL files; set crl_url to the CA's (exchanged ca "
                     "serve) http://HOST:PORT/ca.crl")

    # -- peers and roles ------------------------------------------------------------------

    def peers(self, c: Config) -> None:
        if not c.peers:
            self.add("peer", WARNING, "no [peers.UNIT]: this node exchanges with no one")
        for unit, peer in sorted(c.peers.items()):
            wrong = []
            if not 0 < peer.port < 65536:
                wrong.append(f"address {peer.host}:{peer.port}: the port must be 1-65535")
            if not peer.host.strip():
                wrong.append("address: no host")
            if not peer.name.strip():
                wrong.append("name is empty (it must be the CN of the peer's node certificate)")
            if not peer.org.strip():
                wrong.append("org is empty (it must be the O of the peer's node certificate)")
            if unit == c.unit:
                wrong.append("it is this node's own unit")
            if wrong:
                self.add("peer", PROBLEM, f"[peers.{unit}]: " + "; ".join(wrong))
            else:
                self.add("peer", OK, f"{unit} at {peer.host}:{peer.port} (CN {peer.name!r}, O "
                         f"{peer.org!r})")

    def roles(self, c: Config) -> None:
        if not c.roles:
            self.add("roles", WARNING, "no [roles]: the node's first administrator and auditor "
                     "are not declared; a new node needs them (by person id) at its first "
                     "start, or no one can grant roles there")
            return
        wrong = []
        for role, person in sorted(c.roles.items()):
            if role not in (ADMIN, AUDITOR):
                wrong.append(f"{role!r} is not declared here: only {ADMIN} and {AUDITOR} are; "
                             "other roles are granted with exchanged role grant")
            elif not PERSON_ID_RE.fullmatch(person):
                wrong.append(f"the {role} {person!r} is not a person id (P- and 16 upper-case "
                             "hex digits: exchanged ca list shows it)")
        if len(set(c.roles.values())) != len(c.roles):
            wrong.append("the administrator and the auditor must be different persons (A5)")
        if wrong:
            self.add("roles", PROBLEM, "[roles]: " + "; ".join(wrong))
        else:
            self.add("roles", OK, ", ".join(f"{r} {p}" for r, p in sorted(c.roles.items())))


def text(findings: list[Finding]) -> str:
    """One line per check, then a summary line."""
    label = {OK: "ok", WARNING: "warning", PROBLEM: "PROBLEM"}
    lines = [f"{label[f.status]:<8}{f.check}: {f.detail}" for f in findings]
    problems = sum(f.status == PROBLEM for f in findings)
    warnings = sum(f.status == WARNING for f in findings)
    lines.append(f"{problems} problem(s), {warnings} warning(s)")
    return "\n".join(lines)
