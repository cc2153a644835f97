#!/usr/bin/env python3
"""Benchmark: produce and sign a CRL of N entries (default 100,000) on a SoftHSM token,
beside `openssl ca -gencrl` on the same entries with the same token key (through the OpenSSL
pkcs11 engine), in the same run; then load the CRL and look up a serial.

Run it with tools/bench-crl [N] [ROUNDS]. Prints the best of ROUNDS (default 3) for each.
All three producers sign with the same key on the same token, so the figures compare
the list handling, not the signature.

Entries carry the reasons keyCompromise, superseded, affiliationChanged,
cessationOfOperation or none; not certificateHold, because `openssl ca` adds a
holdInstructionCode extension to each held entry, and the entries would no longer be the same.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from exchanged import ca as camod  # noqa: E402
from exchanged.pki import crl, profiles  # noqa: E402
from exchanged.pki.pin import PinSource  # noqa: E402
from exchanged.pki.token import Token  # noqa: E402
from exchanged.pki.uri import parse  # noqa: E402
from exchanged.transport.tlskey import openssl_cli_engine  # noqa: E402

REASONS = [None, "keyCompromise", "superseded", "affiliationChanged", "cessationOfOperation"]


def best(fn, rounds: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    times, result = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    work = Path(tempfile.mkdtemp(prefix="bench-crl-"))
    out = subprocess.run(["bash", str(ROOT / "softhsm-setup.sh"), str(work / "tokens"),
                          "bench-ca", "bench-admin", "bench-secur", "bench-audit"],
                         capture_output=True, text=True, check=True).stdout
    os.environ["SOFTHSM2_CONF"] = re.search(r"SOFTHSM2_CONF=(\S+)", out).group(1)  # type: ignore[union-attr]
    pin_file = work / "tokens" / "bench-ca.pin"

    ca_token = Token.open(parse("pkcs11:token=bench-ca"), PinSource("CA", "X", str(pin_file)))
    key = ca_token.generate_keypair("ca")
    people, tokens = {}, [ca_token]
    for role in ("administrator", "security-officer", "auditor"):
        label = f"bench-{role[:5]}"
        tokens.append(Token.open(parse(f"pkcs11:token={label}"),
                                 PinSource(role, "X", str(work / "tokens" / f"{label}.pin"))))
        people[role] = (tokens[-1].generate_keypair("me"),
                        profiles.Form(name=f"Bench {role}", unit="Bench", division="Security"))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench CA")])
    ca = camod.CA.init(work / "ca", ca_key=key, name=name, people=people)
    cert = ca.cert

    rng = random.Random(1)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    entries = [crl.Entry(serial=rng.getrandbits(150) | (1 << 150),
                         revoked_at=now - dt.timedelta(seconds=rng.randrange(86400 * 365)),
                         reason=REASONS[i % len(REASONS)]) for i in range(n)]
    # The same entries in the CA database, as `exchanged ca crl` reads them.
    db = sqlite3.connect(str(work / "ca" / "ca.db"))
    db.executemany(
        "INSERT INTO certificates (serial, profile, subject, not_before, not_after, pem, status,"
        " issued_at, revoked_at, reason) VALUES (?, 'node', 'CN=x', '', '', '', 'revoked', '',"
        " ?, ?)",
        [(format(e.serial, "x"), e.revoked_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
          e.reason or "unspecified") for e in entries])
    db.commit()
    db.close()

    print(f"CRL with {n:,} entries, signed on a SoftHSM token (EC P-256), best of {rounds}")
    t_build, der = best(lambda: crl.build(key=key, issuer=cert, entries=entries, number=2,
                                          this_update=now,
                                          next_update=now + dt.timedelta(days=7)), rounds)
    t_ca, _ = best(lambda: ca.make_crl(key), rounds)

    # openssl ca -gencrl on the same entries, same token key through the pkcs11 engine.
    ossl = work / "openssl"
    ossl.mkdir()
    (ossl / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    exp = (now + dt.timedelta(days=365)).strftime("%y%m%d%H%M%SZ")
    with open(ossl / "index.txt", "w") as f:
        for e in entries:
            rev = e.revoked_at.strftime("%y%m%d%H%M%SZ") + (f",{e.reason}" if e.reason else "")
            f.write(f"R\t{exp}\t{rev}\t{format(e.serial, 'X')}\tunknown\t/CN=x{e.serial}\n")
    (ossl / "index.txt.attr").write_text("unique_subject = no\n")
    (ossl / "crlnumber").write_text("02\n")
    engine_conf, engine_pin = openssl_cli_engine(ossl, pin_file)
    (ossl / "openssl.cnf").write_text(engine_conf.read_text() + f"""
[ca]
default_ca = bench
[bench]
database = {ossl}/index.txt
crlnumber = {ossl}/crlnumber
certificate = {ossl}/ca.pem
default_md = sha256
default_crl_days = 7
crl_extensions = crl_ext
[crl_ext]
authorityKeyIdentifier = keyid:always
""")
    key_uri = f"pkcs11:token=bench-ca;object=ca;type=private?pin-source={engine_pin}"
    env = {**os.environ, "OPENSSL_CONF": str(ossl / "openssl.cnf")}

    def openssl_gencrl() -> None:
        subprocess.run(["openssl", "ca", "-gencrl", "-config", str(ossl / "openssl.cnf"),
                        "-engine", "pkcs11", "-keyform", "engine", "-keyfile", key_uri,
                        "-out", str(ossl / "o.crl")], env=env, check=True,
                       capture_output=True)

    t_ossl, _ = best(openssl_gencrl, rounds)
    theirs = x509.load_pem_x509_crl((ossl / "o.crl").read_bytes())
    ours = x509.load_der_x509_crl(der)  # type: ignore[arg-type]
    assert len(theirs) == len(ours) == n, (len(theirs), len(ours))
    assert ours.is_signature_valid(cert.public_key())  # type: ignore[arg-type]

    print(f"  exchanged crl.build (encode + sign)       {t_build:8.3f} s   "
          f"{len(der):,} bytes")  # type: ignore[arg-type]
    print(f"  exchanged ca crl (SQLite -> file)         {t_ca:8.3f} s")
    print(f"  openssl ca -gencrl (same entries, token)  {t_ossl:8.3f} s")
    print(f"  ratio exchanged/openssl                   {t_build / t_ossl:8.2f} (build), "
          f"{t_ca / t_ossl:.2f} (ca crl)")

    path = work / "ours.crl"
    path.write_bytes(der)  # type: ignore[arg-type]
    leaf = ca.certificate(ca.certificates("good")[0]["serial"])  # an officer, not a filler row
    _bench_lookup(path, work / "ca" / "crl" / "1.crl", ca, leaf, rounds)
    for t in tokens:
        t.close()
    return 0


def _bench_lookup(path: Path, empty_path: Path, ca: camod.CA, leaf: x509.Certificate,
                  rounds: int) -> None:
    from exchanged.pki import verify

    empty = verify.CrlSet.load([empty_path])
    t_load, crls = best(lambda: verify.CrlSet.load([path]), rounds)
    print(f"  load + index the CRL (CrlSet.load)        {t_load:8.3f} s")
    calls = 1000
    t_val, _ = best(lambda: [verify.validate(leaf, trusted=[ca.cert], crls=crls)  # type: ignore[arg-type]
                             for _ in range(calls)], rounds)
    print(f"  validate a certificate against it         {t_val / calls * 1e3:8.3f} ms "
          "(path + CRL lookup, CrlSet reused)")
    t_empty, _ = best(lambda: [verify.validate(leaf, trusted=[ca.cert], crls=empty)
                               for _ in range(calls)], rounds)
    print(f"  ... the same with an empty CRL            {t_empty / calls * 1e3:8.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
