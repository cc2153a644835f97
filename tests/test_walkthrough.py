"""The README's demo: the whole certificate walk-through on fresh SoftHSM tokens."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_walkthrough_runs_end_to_end(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "walkthrough.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    out = p.stdout
    assert "walkthrough: all steps behaved as expected" in out
    # The refusals the issue names, each seen with its reason:
    assert "another security officer must review it" in out
    assert "only an approved request is issued" in out
    assert out.count("certificate revoked") == 2  # openssl: held, then revoked
    assert "suspended" in out and "keyCompromise" in out
    assert out.count("verify OK") >= 4  # every CRL (4) and the CSRs verified by openssl
