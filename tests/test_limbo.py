"""x509-limbo conformance of exchanged.pki.verify.validate().

The corpus is C2SP/x509-limbo compiled to one JSON file, vendored with its licence in
tests/data/x509-limbo/ ($EXCHANGED_LIMBO names another copy). Its README says which cases
concern a validator of peer chains with CRLs; those that depend on a hostname or on the web
PKI's server rules do not apply to us. Each applicable case is one test; KNOWN_DIFFERENCES
lists the cases where we deliberately disagree with the expected result, and the test checks
that we still do, so the list cannot go stale. `pytest -s -k summary` prints the tally.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from exchanged.pki.verify import REASON_CODES, ValidationError, validate

LIMBO = Path(os.environ.get("EXCHANGED_LIMBO") or
             Path(__file__).resolve().parent / "data/x509-limbo/limbo.json")

# README: crl::*, rfc5280::validity::*, rfc5280::{aki,ski,serial}::*, rfc5280::unknown-critical-*,
# pathlen::*, pathological::* (must terminate), cve::*, and the basic-constraints and key-usage
# cases listed below.
_APPLICABLE_PREFIXES = re.compile(
    r"^(crl::|rfc5280::validity::|rfc5280::(aki|ski|serial)::|rfc5280::unknown-critical-"
    r"|pathlen::|pathological::|cve::)")
_BASIC_CONSTRAINTS_AND_KEY_USAGE = frozenset({
    "rfc5280::intermediate-ca-without-ca-bit",
    "rfc5280::intermediate-ca-missing-basic-constraints",
    "rfc5280::root-missing-basic-constraints",
    "rfc5280::root-non-critical-basic-constraints",
    "rfc5280::root-inconsistent-ca-extensions",
    "rfc5280::ica-ku-keycertsign",
    "rfc5280::leaf-ku-keycertsign",
    "rfc5280::no-keyusage",
    "rfc5280::no-basicconstraints",
    "rfc5280::ca-as-leaf",  # (not ca-as-leaf-wrong-san: that one is about the hostname)
    # Extended key usage without a server EKU being asked for (ee-wrong-eku asks for one).
    "rfc5280::eku::ee-without-eku",
    "rfc5280::eku::ee-eku-empty",
})

# case id -> why we differ. Each entry is asserted to still disagree with the corpus.
KNOWN_DIFFERENCES = {
    "rfc5280::aki::cross-signed-root-missing-aki":
        "a trust anchor is exempt from the AKI requirement (it is trusted by configuration, "
        "not through its issuer); the opposite choice fails cve::cve-2024-0567, whose trusted "
        "cross-signed root also lacks an AKI. The case is marked pedantic-rfc5280.",
}


def applies(case: dict[str, Any]) -> bool:
    cid = case["id"]
    if cid.startswith(("webpki::", "online::")):
        return False
    if "serverAuth" in (case.get("extended_key_usage") or []):
        return False  # asks for a TLS server EKU
    return bool(_APPLICABLE_PREFIXES.match(cid)) or cid in _BASIC_CONSTRAINTS_AND_KEY_USAGE


def _load() -> tuple[list[dict[str, Any]], str | None]:
    if not LIMBO.is_file():
        return [], (f"x509-limbo corpus not found at {LIMBO}: put it at "
                    "tests/data/x509-limbo/limbo.json (vendored) or set EXCHANGED_LIMBO")
    cases = json.loads(LIMBO.read_text())["testcases"]
    return [c for c in cases if applies(c)], None


CASES, MISSING = _load()
_BY_ID = {c["id"]: c for c in CASES}


def _certs(pems: list[str]) -> list[x509.Certificate]:
    # Some cases hold certificates with zero or negative serials on purpose; cryptography warns
    # when parsing them, and pytest turns warnings into errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


@functools.cache
def run_case(case_id: str) -> tuple[str, str]:
    """("SUCCESS" | "FAILURE", detail) of validate() on one case."""
    case = _BY_ID[case_id]
    leaf = _certs([case["peer_certificate"]])[0]
    crls = [x509.load_pem_x509_crl(p.encode()) for p in case.get("crls") or []]
    at = dt.datetime.fromisoformat(case["validation_time"]) if case["validation_time"] else None
    try:
        chain = validate(leaf, trusted=_certs(case["trusted_certs"]),
                         untrusted=_certs(case["untrusted_intermediates"]), crls=crls, at=at,
                         # Cases without CRLs do not expect revocation checking.
                         check_revocation=bool(crls), max_chain_depth=case["max_chain_depth"])
    except ValidationError as e:
        assert e.code in REASON_CODES
        return "FAILURE", f"{e.code}: {e}"
    assert chain[0] == leaf
    return "SUCCESS", f"chain of {len(chain)}"


def tally() -> dict[str, int]:
    passed = known = 0
    for cid, case in _BY_ID.items():
        result, _ = run_case(cid)
        if cid in KNOWN_DIFFERENCES:
            known += result != case["expected_result"]
        else:
            passed += result == case["expected_result"]
    return {"applicable": len(CASES), "pass": passed, "known": known}


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES] or ["corpus-missing"])
def test_case(case_id: str) -> None:
    if MISSING:
        pytest.fail(MISSING, pytrace=False)
    case = _BY_ID[case_id]
    result, detail = run_case(case_id)
    if case_id in KNOWN_DIFFERENCES:
        assert result != case["expected_result"], (
            f"{case_id} now agrees with x509-limbo: drop it from KNOWN_DIFFERENCES")
    else:
        assert result == case["expected_result"], f"{case_id}: {detail}\n{case['description']}"


def test_known_differences_are_applicable_cases() -> None:
    if MISSING:
        pytest.fail(MISSING, pytrace=False)
    assert set(KNOWN_DIFFERENCES) <= set(_BY_ID)


def test_summary() -> None:
    if MISSING:
        pytest.fail(MISSING, pytrace=False)
    t = tally()
    print(f"\nx509-limbo: {t['applicable']} applicable, {t['pass']} pass, "
          f"{t['known']} known differences")
    assert t["pass"] + t["known"] == t["applicable"]
    assert t["applicable"] > 50  # the corpus was found and the selection did not go empty
