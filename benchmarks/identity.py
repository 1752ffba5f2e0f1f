"""Per-message cost of the sender identity: signed VERP return path and DKIM signatures.

    .venv/bin/python benchmarks/identity.py [--messages 500] [--json]

Renders the demo template (the sandbox's bank statement notice) and times, per message:
rendering alone (the baseline), the VERP return path, and DKIM signing with an RSA-2048 key,
an Ed25519 key and both (the sandbox's dual signing). Also dkimpy's own ``dkim.sign`` with
RSA-2048, whose private-key operation is pure Python, for comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim

import recapito.sandbox
from recapito.identity.dkim import DkimKey, DkimSigner, generate_private_key_pem
from recapito.identity.verp import VerpKeyring, verp_address
from recapito.render.template import load_template, message_id_for
from recapito.sandbox.world import SENDER_DOMAIN

SENDER = f"comunicazioni@{SENDER_DOMAIN}"


def per_message_ms(n: int, fn: Callable[[int], object], repeats: int = 3) -> float:
    """Milliseconds per call: the best of ``repeats`` runs of ``n`` calls (a busy machine
    only ever adds time)."""
    fn(0)  # warm caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - start) / n * 1000)
    return best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n = args.messages

    template = load_template(Path(recapito.sandbox.__file__).parent / "demo_template")
    context = {
        "nome": "Maria",
        "cognome": "Rossi",
        "citta": "Milano",
        "provincia": "MI",
        "segmento": "retail",
    }

    def render(i: int) -> bytes:
        return template.render(
            {**context, "email": f"u{i}@mailitalia.test"},
            sender=SENDER,
            recipient=f"u{i}@mailitalia.test",
            message_id=message_id_for("bench", i, SENDER_DOMAIN),
        ).data

    message = render(1)
    rsa_pem = generate_private_key_pem("rsa-sha256")
    rsa_key = DkimKey.from_bytes(rsa_pem, SENDER_DOMAIN, "rsa")
    ed_key = DkimKey.from_bytes(generate_private_key_pem("ed25519-sha256"), SENDER_DOMAIN, "ed")
    signers = {
        "rsa": DkimSigner([rsa_key]),
        "ed25519": DkimSigner([ed_key]),
        "rsa+ed25519": DkimSigner([rsa_key, ed_key]),
    }
    ring = VerpKeyring.parse("k1:benchmark-secret-0123456789")
    results: dict[str, Any] = {"message_bytes": len(message), "messages": n}
    results["render_ms"] = per_message_ms(n, render)
    results["verp_ms"] = per_message_ms(n, lambda i: verp_address(i, ring, SENDER_DOMAIN))
    for name, signer in signers.items():
        results[f"dkim_{name}_ms"] = per_message_ms(
            n, lambda i, s=signer: s.sign(message, SENDER_DOMAIN)
        )
    results["dkimpy_sign_rsa_ms"] = per_message_ms(
        max(20, n // 10),
        lambda i: dkim.sign(
            message,
            b"rsa",
            SENDER_DOMAIN.encode(),
            rsa_pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        ),
    )
    # a ~20 KB message (DESIGN §11's delivery benchmark size): the demo message, padded
    line = b'<p style=3D"margin:0">Gentile cliente, il tuo estratto conto =C3=A8 pronto.</p>\r\n'
    big = message + line * ((20_000 - len(message)) // len(line))
    results["big_message_bytes"] = len(big)
    for name, signer in signers.items():
        results[f"dkim_{name}_20k_ms"] = per_message_ms(
            n, lambda i, s=signer: s.sign(big, SENDER_DOMAIN)
        )
    dual = results["dkim_rsa+ed25519_ms"]
    results["dual_signing_vs_render"] = dual / results["render_ms"]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"message {results['message_bytes']:,} bytes, {n} messages")
    print(f"render (baseline)        {results['render_ms']:.3f} ms/message")
    print(f"VERP return path         {results['verp_ms']:.4f} ms/message")
    for name in signers:
        print(f"DKIM {name:<19} {results[f'dkim_{name}_ms']:.3f} ms/message")
    print(f"a {results['big_message_bytes']:,}-byte message:")
    for name in signers:
        print(f"DKIM {name:<19} {results[f'dkim_{name}_20k_ms']:.3f} ms/message")
    print(f"dkimpy dkim.sign RSA     {results['dkimpy_sign_rsa_ms']:.3f} ms/message (pure Python)")
    print(f"dual signing / render    {results['dual_signing_vs_render']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
