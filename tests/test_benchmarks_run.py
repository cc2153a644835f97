"""The benchmark scripts still run (on small inputs): a benchmark that rots is no benchmark.
They print figures; nothing here asserts a speed."""

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
