#!/usr/bin/env python3
"""Measure `exchanged cert verify` on NIST PKITS (the non-policy sections), beside openssl.

Usage: tools/pkits [PKITS_DATA_DIR] [--jobs N] [--section 4.13] [--verbose]

PKITS_DATA_DIR is PKITS' data directory (with certs/ and crls/), for instance
cryptography_vectors/x509/PKITS_data from the cryptography_vectors wheel. Without it the
wheel is fetched once with `pip download --no-deps cryptography_vectors` into
~/.cache/exchanged-pkits and unpacked there.

Sections run: 4.1-4.7 and 4.13-4.16 (signatures, validity periods, name chaining, basic CRLs,
self-issued certificates, basic constraints, key usage, name constraints, distribution points,
delta CRLs, private extensions). The policy sections 4.8-4.12 are left out.

Each test is named by its end-entity certificate, <Valid|Invalid><name>Test<N>EE.crt: the prefix
is the expected result, <name> says which section it belongs to. Like a relying party with
PKITS' directory, each test is given the trust anchor (TrustAnchorRootCertificate), as
candidate intermediates the CA certificates reachable from the end entity by issuer name (and
by cRLIssuer names of distribution points, for indirect CRLs), and the CRLs issued under all
those names. The same inputs go to `exchanged cert verify` and to
`openssl verify -crl_check_all -x509_strict`, whose score is printed as the reference.

This is a measuring instrument, not a test: nothing here is in the test suite, and PKITS is
not vendored. Prints per section right/wrong, the wrong accepts by name, and the totals.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "exchanged-pkits"

# (section, title, name patterns): <name> of <Valid|Invalid><name>Test<N>EE.crt -> section.
SECTIONS: list[tuple[str, str, tuple[str, ...]]] = [
    ("4.1", "signature verification",
     ("CertificatePath", "CASignature", "EESignature", "DSASignatures",
      "DSAParameterInheritance", "DSASignature")),
    ("4.2", "validity periods", ("notBeforeDate", "notAfterDate")),
    ("4.3", "verifying name chaining",
     ("NameChaining", "NameUIDs", "RFC3280MandatoryAttributeTypes",
      "RFC3280OptionalAttributeTypes", "UTF8String", "RolloverfromPrintableString")),
    ("4.4", "basic certificate revocation",
     ("MissingCRL", "RevokedCA", "RevokedEE", "BadCRLSignature", "BadCRLIssuerName",
      "WrongCRL", "TwoCRLs", "UnknownCRLEntryExtension", "UnknownCRLExtension",
      "CRLnextUpdate", "NegativeSerialNumber", "LongSerialNumber",
      "SeparateCertificateandCRLKeys")),
    ("4.5", "self-issued certificates", ("BasicSelfIssued",)),
    ("4.6", "basic constraints",
     ("MissingbasicConstraints", "cAFalse", "basicConstraintsNotCritical",
      "pathLenConstraint")),
    ("4.7", "key usage", ("keyUsage",)),
    ("4.13", "name constraints", ("nameConstraints",)),
    ("4.14", "distribution points",
     ("distributionPoint", "NoissuingDistributionPoint", "onlyContains", "onlySomeReasons",
      "IDPwithindirectCRL", "cRLIssuer")),
    ("4.15", "delta CRLs", ("deltaCRL",)),
    ("4.16", "private certificate extensions", ("CertificateExtension",)),
]

OPENSSL_FLAGS = ("-crl_check_all", "-x509_strict")
# openssl's optional CRL features: indirect CRLs and CRL scopes, delta CRLs
OPENSSL_EXTENDED = ("-extended_crl", "-use_deltas")

_EE = re.compile(r"^(Valid|Invalid)(.+?)Test(\d+)EE\.crt$")
# Names of policy tests that would otherwise match a pattern above (4.8-4.12 are not run).
_POLICY = re.compile(r"Polic|inhibit|requireExplicit|UserNotice|CPSPointer")


@dataclass
class Test:
    section: str
    number: int
    name: str
    valid: bool
    ee: Path
    untrusted: list[Path] = field(default_factory=list)
    crls: list[Path] = field(default_factory=list)
    ours: str = ""
    ours_ok: bool | None = None
    ossl: str = ""
    ossl_ok: bool | None = None
    ossl_ext_ok: bool | None = None


def fetch() -> Path:
    """PKITS_data from the cryptography_vectors wheel, cached under ~/.cache."""
    data = CACHE / "cryptography_vectors" / "x509" / "PKITS_data"
    if data.is_dir():
        return data
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("cryptography_vectors-*.whl"))
    if not wheels:
        print(f"pkits: downloading the cryptography_vectors wheel into {CACHE}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(CACHE), "cryptography_vectors"], check=True)
        wheels = sorted(CACHE.glob("cryptography_vectors-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(CACHE, [n for n in z.namelist() if "/PKITS_data/" in n])
    return data


def section_of(name: str) -> str | None:
    if _POLICY.search(name):
        return None
    for section, _title, patterns in SECTIONS:
        if any(p in name for p in patterns):
            return section
    return None


def _norm(name: Any) -> str:
    """A name key for gathering candidates, by asn1crypto's RFC 5280 7.1 comparison (the
    validators compare names themselves)."""
    return str(name.hashable)


class Directory:
    """PKITS' certificates and CRLs, indexed by subject / issuer name."""

    def __init__(self, data: Path) -> None:
        from asn1crypto import crl as acrl
        from asn1crypto import x509 as ax
        self.data = data
        self.subjects: dict[str, list[Path]] = {}
        self.issuer_of: dict[Path, str] = {}
        self.crl_issuers_of: dict[Path, list[str]] = {}
        self.crls: dict[str, list[Path]] = {}
        for p in sorted((data / "certs").glob("*.crt")):
            cert = ax.Certificate.load(p.read_bytes())
            tbs = cert["tbs_certificate"]
            self.issuer_of[p] = _norm(tbs["issuer"])
            names: list[str] = []
            for ext in tbs["extensions"] or ():
                if ext["extn_id"].native == "crl_distribution_points":
                    for dp in ext["extn_value"].parsed:
                        for gn in dp["crl_issuer"] or ():
                            if gn.name == "directory_name":
                                names.append(_norm(gn.chosen))
            self.crl_issuers_of[p] = names
            if not _EE.match(p.name):
                self.subjects.setdefault(_norm(tbs["subject"]), []).append(p)
        for p in sorted((data / "crls").glob("*.crl")):
            c = acrl.CertificateList.load(p.read_bytes())
            self.crls.setdefault(_norm(c["tbs_cert_list"]["issuer"]),
                                 []).append(p)
        self.anchor = data / "certs" / "TrustAnchorRootCertificate.crt"

    def gather(self, ee: Path) -> tuple[list[Path], list[Path]]:
        """(candidate intermediates, CRLs) for the path from `ee`."""
        names: set[str] = set()
        certs: list[Path] = []
        todo = [self.issuer_of[ee], *self.crl_issuers_of[ee]]
        while todo:
            n = todo.pop()
            if n in names:
                continue
            names.add(n)
            for c in self.subjects.get(n, ()):
                if c not in certs and c != self.anchor:
                    certs.append(c)
                    todo += [self.issuer_of[c], *self.crl_issuers_of[c]]
        crls = [c for n in sorted(names) for c in self.crls.get(n, ())]
        return certs, crls


def tests(data: Path, sections: Iterable[str] | None) -> list[Test]:
    d = Directory(data)
    wanted = set(sections) if sections else None
    found = []
    for p in sorted((data / "certs").glob("*EE.crt")):
        m = _EE.match(p.name)
        if m is None:
            continue
        section = section_of(m.group(2))
        if section is None or (wanted is not None and section not in wanted):
            continue
        untrusted, crls = d.gather(p)
        found.append(Test(section, int(m.group(3)), p.name.removesuffix("EE.crt"),
                          m.group(1) == "Valid", p, untrusted, crls))
    found.sort(key=lambda t: ([int(x) for x in t.section.split(".")], t.number))
    return found


def run_ours(t: Test, anchor: Path, python: str) -> None:
    cmd = [python, "-m", "exchanged", "cert", "verify", str(t.ee), "--ca", str(anchor)]
    for u in t.untrusted:
        cmd += ["--untrusted", str(u)]
    for c in t.crls:
        cmd += ["--crl", str(c)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    t.ours_ok = p.returncode == 0
    t.ours = (p.stdout + p.stderr).strip().splitlines()[-1] if (p.stdout + p.stderr).strip() \
        else f"exit {p.returncode}"


def _pem(paths: Iterable[Path], kind: str, out: Path) -> None:
    with out.open("w") as f:
        for p in paths:
            pem = subprocess.run(["openssl", kind, "-inform", "DER", "-in", str(p)],
                                 capture_output=True, text=True)
            f.write(pem.stdout)


def run_openssl(t: Test, anchor: Path, tmp: Path, extended: bool = False) -> None:
    work = tmp / f"{t.section}-{t.number}{'-ext' if extended else ''}"
    work.mkdir()
    _pem([anchor], "x509", work / "ca.pem")
    _pem([t.ee], "x509", work / "ee.pem")
    cmd = ["openssl", "verify", *OPENSSL_FLAGS, *(OPENSSL_EXTENDED if extended else ()),
           "-CAfile", str(work / "ca.pem")]
    if t.untrusted:
        _pem(t.untrusted, "x509", work / "untrusted.pem")
        cmd += ["-untrusted", str(work / "untrusted.pem")]
    if t.crls:
        _pem(t.crls, "crl", work / "crls.pem")
        cmd += ["-CRLfile", str(work / "crls.pem")]
    p = subprocess.run([*cmd, str(work / "ee.pem")], capture_output=True, text=True,
                       timeout=120)
    if extended:
        t.ossl_ext_ok = p.returncode == 0
        return
    t.ossl_ok = p.returncode == 0
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    t.ossl = next((ln for ln in lines if "error" in ln), lines[-1] if lines else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("data", nargs="?", type=Path,
                    help="PKITS_data directory (default: fetch cryptography_vectors)")
    ap.add_argument("--jobs", type=int, default=4, help="tests run at once (default 4)")
    ap.add_argument("--section", action="append", help="only this section (repeatable)")
    ap.add_argument("--no-openssl", action="store_true", help="skip the openssl reference")
    ap.add_argument("--verbose", "-v", action="store_true",
                    help="print every test with both verdicts, not only the wrong ones")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter that runs `-m exchanged` (default: this one)")
    args = ap.parse_args()
    data = args.data or fetch()
    if not (data / "certs").is_dir() or not (data / "crls").is_dir():
        ap.error(f"{data} has no certs/ and crls/: not a PKITS_data directory")
    todo = tests(data, args.section)
    anchor = data / "certs" / "TrustAnchorRootCertificate.crt"
    with tempfile.TemporaryDirectory(prefix="pkits-") as tmp, \
            ThreadPoolExecutor(max(1, args.jobs)) as pool:
        jobs = [pool.submit(run_ours, t, anchor, args.python) for t in todo]
        if not args.no_openssl:
            jobs += [pool.submit(run_openssl, t, anchor, Path(tmp)) for t in todo]
            jobs += [pool.submit(run_openssl, t, anchor, Path(tmp), True) for t in todo]
        for j in jobs:
            j.result()

    print(f"PKITS ({data}), {len(todo)} tests: `exchanged cert verify` beside "
          f"`openssl verify {' '.join(OPENSSL_FLAGS)}` (openssl) and with "
          f"{' '.join(OPENSSL_EXTENDED)} added (+ext)")
    print(f"{'section':<8}{'title':<32}{'tests':>6}{'exchanged':>11}{'openssl':>9}{'+ext':>6}")
    totals = [0, 0, 0, 0]
    for section, title, _ in SECTIONS:
        ts = [t for t in todo if t.section == section]
        if not ts:
            continue
        ours = sum(t.ours_ok == t.valid for t in ts)
        ossl = sum(t.ossl_ok == t.valid for t in ts)
        ext = sum(t.ossl_ext_ok == t.valid for t in ts)
        totals[0] += len(ts)
        totals[1] += ours
        totals[2] += ossl
        totals[3] += ext
        print(f"{section:<8}{title:<32}{len(ts):>6}{ours:>11}"
              f"{'-' if args.no_openssl else ossl:>9}{'-' if args.no_openssl else ext:>6}")
    print(f"{'total':<40}{totals[0]:>6}{totals[1]:>11}"
          f"{'-' if args.no_openssl else totals[2]:>9}"
          f"{'-' if args.no_openssl else totals[3]:>6}")
    wrong_accepts = [t for t in todo if t.ours_ok and not t.valid]
    print(f"\nwrong accepts by exchanged: {len(wrong_accepts)}"
          + "".join(f"\n  {t.section}.{t.number} {t.name}" for t in wrong_accepts))
    if not args.no_openssl:
        for label, attr in (("openssl", "ossl_ok"), ("openssl +ext", "ossl_ext_ok")):
            wa = [t for t in todo if getattr(t, attr) and not t.valid]
            print(f"wrong accepts by {label}: {len(wa)}"
                  + "".join(f"\n  {t.section}.{t.number} {t.name}" for t in wa))
    print("\ntests exchanged gets wrong:" if totals[1] < totals[0] else "")
    for t in todo:
        if args.verbose or t.ours_ok != t.valid:
            mark = "ok " if t.ours_ok == t.valid else "BAD"
            print(f"  {mark} {t.section}.{t.number} {t.name} (expected "
                  f"{'valid' if t.valid else 'invalid'})\n      exchanged: {t.ours[:300]}"
                  + ("" if args.no_openssl else f"\n      openssl:   {t.ossl[:200]}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
