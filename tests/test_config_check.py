"""`exchanged config check`: the demo's node configurations through real SoftHSM tokens and
real files, each broken in one way, checked by the real command line (a separate process,
PINs only in files or the environment)."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from exchanged.cli import build_parser
from exchanged.node.check import PROBLEM, WARNING, check_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from demo_network import Demo  # noqa: E402
from demo_pki import setup  # noqa: E402  (demo_network.setup, its PKI made once per run)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = Demo(tmp_path_factory.mktemp("check"))
    with contextlib.redirect_stdout(io.StringIO()):
        paths = setup(d)
    yield d, paths
    with contextlib.redirect_stdout(io.StringIO()):
        d.stop()


@pytest.fixture
def demo(net):  # type: ignore[no-untyped-def]
    d, paths = net
    yield d, paths
    with contextlib.redirect_stdout(io.StringIO()):
        d.stop()
    d.daemons.clear()


def run_check(d: Demo, cfg: Path | str, *, json_out: bool = True,
              env: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """`exchanged config check CFG` as a user runs it: (exit status, findings or text, all it
    printed)."""
    argv = [sys.executable, "-m", "exchanged", "config", "check", str(cfg)]
    argv += ["--json"] if json_out else []
    assert not any("pin" in a.lower() and not a.endswith(".toml") for a in argv[3:]), argv
    p = subprocess.run(argv, cwd=d.work, env=env or d.env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    assert not p.stderr, p.stderr
    return p.returncode, json.loads(p.stdout) if json_out else p.stdout, p.stdout + p.stderr


def of(findings: list[dict[str, str]], status: str, check: str | None = None) -> list[str]:
    return [f["detail"] for f in findings
            if f["status"] == status and (check is None or f["check"] == check)]


def variant(d: Demo, tmp: Path, unit: str = "finance",
            edit: Callable[[str], str] | None = None) -> Path:
    """A copy of a unit's configuration (its paths are absolute), edited."""
    text = (d.work / unit / "exchanged.toml").read_text()
    edited = edit(text) if edit else text
    assert edit is None or edited != text, "the edit changed nothing"
    out = tmp / f"{unit}-{secrets.token_hex(4)}.toml"
    out.write_text(edited)
    return out


def pins(d: Demo) -> list[str]:
    return [p.read_text().strip() for p in d.tok.glob("*.pin")]


def no_pin_in(d: Demo, output: str, *extra: str) -> None:
    for pin in [*pins(d), *extra]:
        assert len(pin) >= 8 and pin not in output


def software_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def crl_by(issuer: x509.Name, key: ec.EllipticCurvePrivateKey, number: int = 99) -> bytes:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateRevocationListBuilder().issuer_name(issuer)
            .last_update(now - dt.timedelta(minutes=1))
            .next_update(now + dt.timedelta(days=1))
            .add_extension(x509.CRLNumber(number), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


# -- the good configuration ------------------------------------------------------------------


def test_the_demo_configuration_passes(demo) -> None:  # type: ignore[no-untyped-def]
    d, paths = demo
    for unit in ("finance", "office"):
        rc, out, printed = run_check(d, paths[unit], json_out=False)
        assert rc == 0, out
        lines = out.splitlines()
        assert lines[-1] == "0 problem(s), 0 warning(s)", out
        assert all(line.startswith("ok      ") for line in lines[:-1]), out
        for what in ("config:", "data-dir:", "certificate:", "ca-file:", "crl-file:",
                     "pin-file:", "pkcs11-module:", "token:", "key:", "signature:", "chain:",
                     "crl-source:", "peer:", "roles:"):
            assert f"ok      {what}" in out, (what, out)
        no_pin_in(d, printed)
    rc, findings, printed = run_check(d, paths["finance"])
    assert rc == 0 and {f["status"] for f in findings} == {"ok"}
    assert all(set(f) == {"check", "status", "detail"} for f in findings)
    assert any(f["check"] == "signature" and "verifies with the certificate" in f["detail"]
               for f in findings)
    no_pin_in(d, printed)


def test_it_checks_a_running_node_without_stopping_it(demo) -> None:  # type: ignore[no-untyped-def]
    d, paths = demo
    with contextlib.redirect_stdout(io.StringIO()):
        d.start("finance")
    rc, findings, printed = run_check(d, paths["finance"])
    assert rc == 0, findings
    assert "holds a store" in of(findings, "ok", "data-dir")[0]
    assert d.daemons["finance"].poll() is None  # still running
    no_pin_in(d, printed)


def test_the_pin_never_comes_from_the_command_line() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a.choices, dict))
    config = sub.choices["config"]  # type: ignore[index]
    check = next(a for a in config._actions if isinstance(a.choices, dict)).choices["check"]
    options = {s for a in check._actions for s in a.option_strings}
    assert options == {"-h", "--help", "--json"}


# -- the token: PIN, key, signature ------------------------------------------------------------


def test_a_wrong_pin_is_a_precise_problem_and_never_shown(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    wrong = secrets.token_hex(8)
    pin = tmp_path / "wrong.pin"
    pin.write_text(wrong + "\n")
    pin.chmod(0o600)
    cfg = variant(d, tmp_path, edit=lambda t: t.replace(d.pin("finance-node"), str(pin)))
    rc, findings, printed = run_check(d, cfg)
    assert rc == 1
    (problem,) = of(findings, PROBLEM)
    assert "wrong PIN for token 'finance-node'" in problem and str(pin) in problem, problem
    assert "is not this token's PIN" in problem
    assert not any(f["check"] in ("key", "signature") for f in findings)
    no_pin_in(d, printed, wrong)
    rc, out, printed = run_check(d, cfg, json_out=False)
    assert rc == 1 and "PROBLEM token: wrong PIN" in out
    no_pin_in(d, printed, wrong)
    # The right PIN afterwards: the token is not locked, the count reset.
    assert run_check(d, variant(d, tmp_path))[0] == 0


def test_a_pin_file_open_to_others_is_a_problem(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    pin = tmp_path / "open.pin"
    shutil.copy(d.pin("finance-node"), pin)
    pin.chmod(0o644)
    cfg = variant(d, tmp_path, edit=lambda t: t.replace(d.pin("finance-node"), str(pin)))
    rc, findings, printed = run_check(d, cfg)
    assert rc == 1
    (problem,) = of(findings, PROBLEM, "pin-file")
    assert "mode 644" in problem and f"chmod 600 {pin}" in problem, problem
    assert oct(pin.stat().st_mode & 0o777) == "0o644"  # reported, not changed
    assert "not opened" in of(findings, PROBLEM, "token")[0]
    no_pin_in(d, printed)


def test_the_pin_from_the_environment_or_from_nowhere(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    cfg = variant(d, tmp_path, edit=lambda t: "\n".join(
        line for line in t.splitlines() if not line.startswith("pin_file")) + "\n")
    pin = Path(d.pin("finance-node")).read_text().strip()
    rc, findings, printed = run_check(d, cfg, env={**d.env, "EXCHANGED_PIN": pin})
    assert rc == 0, findings
    assert "$EXCHANGED_PIN" in of(findings, "ok", "pin-file")[0]
    no_pin_in(d, printed)
    rc, findings, printed = run_check(d, cfg)
    assert rc == 1
    assert "no PIN source" in of(findings, PROBLEM, "pin-file")[0]


def test_a_certificate_of_another_key_is_a_problem(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    other = str(d.work / "office-node.pem")
    cfg = variant(d, tmp_path, edit=lambda t: t.replace(str(d.work / "finance-node.pem"),
                                                        other))
    rc, findings, printed = run_check(d, cfg)
    assert rc == 1
    (problem,) = of(findings, PROBLEM)
    assert problem.startswith(f"the certificate {other} (serial ") and \
        "certifies no key on token 'finance-node'" in problem and \
        "key 'me' is another key" in problem and \
        "the certificate belongs to another key" in problem, problem
    assert not any(f["check"] == "signature" for f in findings)
    # and the node's name is not the certificate's O
    assert "is not the certificate's O 'General Office Archives'" in \
        of(findings, WARNING, "certificate")[0]
    no_pin_in(d, printed)


def test_a_key_uri_naming_another_key_than_the_certified_one(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """After a renewal the certificate says which key is the node's (the daemon takes it):
    a warning; a key URI naming no key at all, with no key the certificate certifies either,
    is covered by the other-key test."""
    d, _ = demo
    label = f"spare-{secrets.token_hex(3)}"
    d.x("token", "keygen", f"pkcs11:token=finance-node;object={label}", "--pin-file",
        d.pin("finance-node"), quiet=True)
    for name, said in ((label, f"[pkcs11] key names {label!r}, but"),
                       ("absent", "[pkcs11] key names 'absent', which is not on the token")):
        cfg = variant(d, tmp_path, edit=lambda t, name=name: t.replace(
            "pkcs11:token=finance-node;object=me", f"pkcs11:token=finance-node;object={name}"))
        rc, findings, printed = run_check(d, cfg)
        assert rc == 0, findings
        (warning,) = of(findings, WARNING)
        assert warning.startswith(said) and "the daemon uses 'me'" in warning, warning
        assert of(findings, "ok", "signature")
        no_pin_in(d, printed)


# -- the CA and the CRLs -----------------------------------------------------------------------


def test_a_ca_file_that_is_not_the_issuer_is_a_problem(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    other, _ = software_ca("Another Root CA")
    ca = tmp_path / "other-ca.pem"
    ca.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    cfg = variant(d, tmp_path, edit=lambda t: t.replace(str(d.work / "ca" / "ca.pem"),
                                                        str(ca)))
    rc, findings, _ = run_check(d, cfg)
    assert rc == 1
    assert "CA CN=Another Root CA" in of(findings, "ok", "ca-file")[0]
    (chain,) = of(findings, PROBLEM, "chain")
    assert "it is issued by CN=Demo Root CA, which no certificate in [trust] ca is" in chain
    (crl,) = of(findings, PROBLEM, "crl-file")
    assert "issued by CN=Demo Root CA, which is not a CA we trust" in crl, crl
    # A file that is no CA certificate at all:
    cfg = variant(d, tmp_path, edit=lambda t: t.replace(str(d.work / "ca" / "ca.pem"),
                                                        str(d.work / "finance-node.pem")))
    rc, findings, _ = run_check(d, cfg)
    assert rc == 1 and "which is not a CA certificate" in of(findings, PROBLEM, "ca-file")[0]


def test_crl_files_missing_unreadable_or_signed_by_another_ca(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    crl = str(d.work / "finance" / "ca.crl")
    missing, a_dir = tmp_path / "missing.crl", tmp_path / "a-directory.crl"
    a_dir.mkdir()
    ca = x509.load_pem_x509_certificate((d.work / "ca" / "ca.pem").read_bytes())
    _, impostor = software_ca("Demo Root CA")
    forged = tmp_path / "forged.crl"  # the right issuer's name, another key
    forged.write_bytes(crl_by(ca.subject, impostor))
    foreign_ca, foreign_key = software_ca("Another Root CA")
    foreign = tmp_path / "foreign.crl"
    foreign.write_bytes(crl_by(foreign_ca.subject, foreign_key))
    garbage = tmp_path / "garbage.crl"
    garbage.write_bytes(b"not a CRL\n")
    pem = tmp_path / "good.pem"  # the CA's own CRL in PEM: fine
    pem.write_bytes(x509.load_der_x509_crl(Path(crl).read_bytes()).public_bytes(
        serialization.Encoding.PEM))
    files = [missing, a_dir, forged, foreign, garbage, pem]
    cfg = variant(d, tmp_path, edit=lambda t: t.replace(
        f'crls = ["{crl}"]', f"crls = {json.dumps([crl, *map(str, files)])}"))
    rc, findings, _ = run_check(d, cfg)
    assert rc == 1
    problems = of(findings, PROBLEM, "crl-file")
    assert len(problems) == 5, problems
    assert problems[0].startswith(f"cannot read the CRL file {missing} ([trust] crls): No such "
                                  "file or directory: the daemon does not start without it")
    assert problems[1].startswith(f"cannot read the CRL file {a_dir} ([trust] crls): Is a "
                                  "directory")
    assert f"({forged})" in problems[2] and "is not signed by" in problems[2] and \
        "signed by another key than the CA's" in problems[2], problems[2]
    assert f"the CRL from {foreign}" not in problems[3] and str(foreign) in problems[3] and \
        "issued by CN=Another Root CA, which is not a CA we trust" in problems[3], problems[3]
    assert str(garbage) in problems[4] and "is not a CRL" in problems[4], problems[4]
    good = of(findings, "ok", "crl-file")
    assert len(good) == 2 and all("verifies against the CA" in g for g in good), good
    assert good[1].startswith(f"{pem}: CRL number 1 of CN=Demo Root CA")


def test_a_revoked_certificate_is_a_problem(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, paths = demo
    d.x("ca", "revoke", "--dir", "ca", paths["office_serial"], "--reason", "keyCompromise",
        *d.op("officer"), quiet=True)
    d.x("ca", "crl", "--dir", "ca", "--ca-pin-file", d.pin("ca"), quiet=True)
    revoked = tmp_path / "revoked.crl"
    shutil.copy(d.work / "ca" / "ca.crl", revoked)
    cfg = variant(d, tmp_path, "office", edit=lambda t: t.replace(
        str(d.work / "office" / "ca.crl"), str(revoked)))
    rc, findings, _ = run_check(d, cfg)
    assert rc == 1
    (problem,) = of(findings, PROBLEM)
    assert "is revoked (keyCompromise)" in problem and f"({revoked})" in problem, problem
    assert "peers refuse it; have a new certificate issued (exchanged renew)" in problem
    # The same CRL learned by the node (DATA_DIR/crls/, as a peer or the publication point
    # would have given it) counts as well; the configured file is then superseded.
    data = tmp_path / "data"
    (data / "crls").mkdir(parents=True, mode=0o700)
    data.chmod(0o700)
    shutil.copy(revoked, data / "crls" / "0123456789abcdef.crl")
    cfg = variant(d, tmp_path, "office", edit=lambda t: t.replace(
        str(d.work / "office" / "data"), str(data)))
    rc, findings, _ = run_check(d, cfg)
    assert rc == 1
    (problem,) = of(findings, PROBLEM)
    assert "is revoked (keyCompromise)" in problem and "0123456789abcdef.crl" in problem
    configured, learned = of(findings, "ok", "crl-file")
    assert "CRL number 1 " in configured and "(superseded by number 2)" in configured
    assert "CRL number 2 " in learned and "verifies against the CA" in learned


def test_time_expiring_expired_and_a_stale_crl(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """In-process, at other times (no token needed: its PIN file is left out)."""
    d, paths = demo
    cfg = Path(paths["finance"])
    nopin = tmp_path / "nopin.toml"
    nopin.write_text(cfg.read_text().replace(d.pin("finance-node"), "/nonexistent/pin"))
    cert = x509.load_pem_x509_certificate((d.work / "finance-node.pem").read_bytes())
    crl = x509.load_der_x509_crl((d.work / "finance" / "ca.crl").read_bytes())
    assert crl.next_update_utc is not None

    soon = check_config(nopin, at=cert.not_valid_after_utc - dt.timedelta(days=10))
    (expiry,) = [f.detail for f in soon if f.check == "expiry"]
    assert expiry.startswith("the node certificate expires") and "in 10 day(s)" in expiry, expiry
    assert "exchanged renew" in expiry

    late = check_config(nopin, at=cert.not_valid_after_utc + dt.timedelta(days=1))
    (chain,) = [f for f in late if f.check == "chain"]
    assert chain.status == PROBLEM and "expired" in chain.detail and "renew" in chain.detail

    stale = check_config(nopin, at=crl.next_update_utc + dt.timedelta(hours=1))
    (crlf,) = [f for f in stale if f.check == "crl-file"]
    assert crlf.status == WARNING and "STALE" in crlf.detail and "no documents pass" in crlf.detail
    (chain,) = [f for f in stale if f.check == "chain"]
    assert chain.status == WARNING and "crl-stale" not in chain.detail and "fresh CRL" in \
        chain.detail, chain.detail


# -- peers, roles, the file itself -------------------------------------------------------------


def test_bad_peer_addresses(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    text = (d.work / "finance" / "exchanged.toml").read_text()
    address = next(line for line in text.splitlines() if line.startswith("address = "))
    cfg = variant(d, tmp_path, edit=lambda t: t.replace(address, 'address = "127.0.0.1:99999"')
                  .replace('name = "node-office"', 'name = " "'))
    rc, findings, _ = run_check(d, cfg)
    assert rc == 1
    (problem,) = of(findings, PROBLEM)
    assert problem.startswith("[peers.office]: address 127.0.0.1:99999: the port must be "
                              "1-65535; name is empty"), problem

    cfg = variant(d, tmp_path, edit=lambda t: t.replace(address, 'address = "nonsense"'))
    rc, findings, _ = run_check(d, cfg)
    assert rc == 1 and len(findings) == 1  # Config.load's own error, located
    assert findings[0]["check"] == "config"
    assert "address 'nonsense': expected HOST:PORT (in [peers.office] address)" in \
        findings[0]["detail"], findings

    cfg = variant(d, tmp_path, edit=lambda t: t.replace("[peers.office]", "[peers.Office]"))
    rc, findings, _ = run_check(d, cfg)
    assert rc == 1 and "peer unit id 'Office'" in of(findings, PROBLEM, "config")[0]


def test_roles_must_name_persons(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    cfg = variant(d, tmp_path, edit=lambda t: t.replace('administrator = "P-',
                                                        'administrator = "Zhang Wei P-'))
    rc, findings, _ = run_check(d, cfg)
    assert rc == 1
    (problem,) = of(findings, PROBLEM)
    assert problem.startswith("[roles]: the administrator 'Zhang Wei P-") and \
        "is not a person id" in problem, problem


def test_a_file_that_does_not_parse(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nunit = "x"\nlisten = \n')
    (f,) = check_config(bad)
    assert f.check == "config" and f.status == PROBLEM
    assert f"cannot read {bad}" in f.detail and "line 3" in f.detail, f.detail
    missing = check_config(tmp_path / "none.toml")
    assert "no configuration file" in missing[0].detail and "$EXCHANGED_CONFIG" in \
        missing[0].detail
    (f,) = check_config(_write(tmp_path / "partial.toml", '[node]\nunit = "x"\n'))
    assert "missing setting" in f.detail and "required: [node] unit, data_dir" in f.detail


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_annotated_example_parses() -> None:
    """conf/exchanged.toml is read as the daemon reads it; what fails is only that the files
    it names are not on this machine."""
    findings = check_config(ROOT / "conf" / "exchanged.toml")
    assert findings[0].check == "config" and findings[0].status == "ok", findings[0]
    problems = {f.check: f.detail for f in findings if f.status == PROBLEM}
    for check in ("certificate", "ca-file", "crl-file", "pin-file"):
        assert "No such file or directory" in problems.pop(check), check
    assert problems.pop("token").startswith("not opened")
    assert problems.pop("chain").startswith("not checked")
    if os.geteuid() != 0 and "data-dir" in problems:  # /var/lib is root's
        assert "cannot create it" in problems.pop("data-dir")
    assert problems == {}
    assert any(f.check == "roles" and f.status == "ok" for f in findings)
    assert any(f.check == "peer" and f.status == "ok" for f in findings)
