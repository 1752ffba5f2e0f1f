"""PEC receipt parsing: receipts per second on one core, with and without signature checks.

    .venv/bin/python benchmarks/pec_parse.py [--receipts 2000] [--json]

The receipts are the project's fixtures (``tests/fixtures/pec``: Aruba-, Poste- and
Sogei-like layouts of every kind), signed at start-up by a throw-away CA with RSA-2048
provider keys (Poste-like sha1, the others sha-256), cycled to ``--receipts`` messages of
3–5 KB each. Per receipt the product reads the headers, walks the MIME tree, parses
daticert.xml and the headers of postacert.eml, and (signed) checks the S/MIME signature:
message digest, RSA signature, chain to the trust anchor (``recapito.pec.receipts``).

The baseline is what a straightforward implementation does: ``email.message_from_bytes``
with the default policy on the whole receipt, ``walk()`` for the daticert attachment,
``xml.dom.minidom`` on it, and (signed) the same signature check over the signed part as
serialised by ``email`` (``as_bytes``; it may not reproduce the signed bytes exactly, which
only makes the baseline cheaper): the ratio line compares like with like.

Single thread, timed in thread CPU time (per core); best of three runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email
import email.policy
import json
import sys
import time
import xml.dom.minidom
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from recapito.pec import smime
from recapito.pec.receipts import parse_receipt

FIXTURES = Path(__file__).parents[1] / "tests" / "fixtures" / "pec"
TARGET_SIGNED = 500.0
TARGET_UNSIGNED = 2000.0


def _cert(cn: str, key: Any, issuer: x509.Certificate | None, issuer_key: Any) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(issuer_key or key, hashes.SHA256())
    )


def corpus(n: int) -> tuple[list[bytes], smime.TrustStore]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("bench CA", ca_key, None, None)
    signers = {}
    for provider in ("aruba", "poste", "sogei"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        signers[provider] = (_cert(provider, key, ca, ca_key), key)
    base = []
    for path in sorted(FIXTURES.glob("*.eml")):
        provider = path.name.split("-")[0]
        if provider not in signers:
            continue
        cert, key = signers[provider]
        digest = "sha1" if provider == "poste" else "sha256"
        base.append(smime.sign_message(path.read_bytes(), cert, key, digest=digest))
    return [base[i % len(base)] for i in range(n)], smime.TrustStore([ca])


def naive(raw: bytes, trust: smime.TrustStore | None) -> tuple[str, str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    kind = str(msg.get("X-Ricevuta") or msg.get("X-Trasporto") or "not-pec")
    tipo = ""
    for part in msg.walk():
        if part.get_filename() == "daticert.xml":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                root = xml.dom.minidom.parseString(payload).documentElement
                tipo = root.getAttribute("tipo") if root is not None else ""
    if trust is not None and msg.get_content_type() == "multipart/signed":
        parts: Any = msg.get_payload()
        signed = parts[0].as_bytes(policy=email.policy.SMTP)
        der = parts[1].get_payload(decode=True)
        smime.verify(signed, bytes(der), trust)
    return kind, tipo


def timed(fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receipts", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    messages, trust = corpus(args.receipts)
    n = len(messages)
    checks = [parse_receipt(m, trust) for m in messages[: len(set(messages))]]
    if any(r.signature.status != "valid" for r in checks):
        print("signature check failed on the corpus", file=sys.stderr)
        return 1

    def ours_signed() -> None:
        for raw in messages:
            parse_receipt(raw, trust, True)

    def ours_unsigned() -> None:
        for raw in messages:
            parse_receipt(raw, None, False)

    def base_signed() -> None:
        for raw in messages:
            naive(raw, trust)

    def base_unsigned() -> None:
        for raw in messages:
            naive(raw, None)

    signed = n / timed(ours_signed)
    unsigned = n / timed(ours_unsigned)
    baseline_signed = n / timed(base_signed)
    baseline_unsigned = n / timed(base_unsigned)
    size = sum(map(len, messages)) / n
    result = {
        "receipts": n,
        "mean_bytes": round(size),
        "receipts_per_s_signed": round(signed, 1),
        "receipts_per_s_unsigned": round(unsigned, 1),
        "baseline_receipts_per_s_signed": round(baseline_signed, 1),
        "baseline_receipts_per_s_unsigned": round(baseline_unsigned, 1),
        "ratio_signed": round(signed / baseline_signed, 2),
        "ratio_unsigned": round(unsigned / baseline_unsigned, 2),
        "target_signed": TARGET_SIGNED,
        "target_unsigned": TARGET_UNSIGNED,
        "targets_met": signed >= TARGET_SIGNED and unsigned >= TARGET_UNSIGNED,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{n} receipts ({size / 1024:.1f} KB mean), one core (thread CPU time), best of 3")
    print(
        f"signed (S/MIME checked):   {signed:8.0f} receipts/s  (target {TARGET_SIGNED:.0f})  "
        f"baseline {baseline_signed:7.0f}/s  ratio {signed / baseline_signed:.2f}x"
    )
    print(
        f"unsigned (no check):       {unsigned:8.0f} receipts/s  (target {TARGET_UNSIGNED:.0f}) "
        f"baseline {baseline_unsigned:7.0f}/s  ratio {unsigned / baseline_unsigned:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
