"""The benchmark scripts still run (on small inputs): a benchmark that rots is no benchmark.
They print figures; nothing here asserts a speed."""

import datetime as dt
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "tools" / script), *args],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


def test_bench_crl_runs() -> None:
    out = run("bench_crl.py", "3000", "1")
    assert "openssl ca -gencrl" in out and "ratio exchanged/openssl" in out
    assert "validate a certificate against it" in out


def test_bench_audit_runs() -> None:
    out = run("bench_audit.py", "20000")
    assert "verify 20,000 entries" in out


def test_pkits_tool_runs_on_a_pkits_shaped_directory(tmp_path: Path) -> None:
    """tools/pkits on a tiny directory laid out as PKITS' (made here: PKITS itself is not
    vendored and the suite stays offline): one valid and one invalid test of section 4.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID
    from test_verify import DAY, NOW, crl, issue

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    root = issue(name("Trust Anchor"), None, ca=True, not_before=NOW - 365 * DAY,
                 not_after=dt.datetime.now(dt.UTC) + 365 * DAY)
    good = issue(name("Good CA"), root, ca=True, not_after=dt.datetime.now(dt.UTC) + 300 * DAY)
    later = dt.datetime.now(dt.UTC) + 100 * DAY
    files = {
        "certs/TrustAnchorRootCertificate.crt": root.cert,
        "certs/GoodCACert.crt": good.cert,
        "certs/ValidCertificatePathTest1EE.crt": issue("ee1", good, not_after=later).cert,
        "certs/InvalidEESignatureTest3EE.crt": issue("ee3", good, not_after=later,
                                                     signing_key=root.key).cert,
        "crls/TrustAnchorRootCRL.crl": crl(root, next_update=later),
        "crls/GoodCACRL.crl": crl(good, next_update=later),
    }
    for rel, obj in files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(obj.public_bytes(serialization.Encoding.DER))
    out = run("pkits.py", str(tmp_path), "--jobs", "2")
    assert "4.1     signature verification               2          2        2     2" in out
    assert "wrong accepts by exchanged: 0" in out
