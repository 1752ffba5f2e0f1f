"""Delivery throughput: the recapito engine vs. a naive smtplib loop, to one local sink.

    .venv/bin/python benchmarks/delivery.py [--messages 3000] [--naive-messages 600]
                                            [--sink auto|smtp-sink|aiosmtpd] [--json]

The sink is Postfix's ``smtp-sink`` when installed (fast, no STARTTLS), otherwise an
aiosmtpd server in its own process offering STARTTLS. Each message is a ~20 KB HTML
campaign message rendered from a template. The engine path is the product's: MX lookup
over a real DNS server (127.0.0.1), claims and one ledger commit per reply (SQLite,
WAL), pooled connections. The naive baseline renders the same messages and sends each
over its own smtplib connection, as generic integrations do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from recapito.delivery.dns import MXResolver
from recapito.delivery.engine import DeliveryOptions, DeliveryRun
from recapito.ledger import Claim, Ledger, PlannedDelivery
from recapito.render.template import load_template, message_id_for
from recapito.sandbox.dns import AuthoritativeServer, Zone, ZoneRecord

DOMAIN = "bench.test"
MX_HOST = "mx.bench.test"
SENDER = "news@banca-esempio.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_banner(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"sink on port {port} did not answer")


AIOSMTPD_SINK = textwrap.dedent(
    """
    import asyncio, ssl, sys, datetime
    from aiosmtpd.controller import Controller
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.bench.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.bench.test")]), False)
            .sign(key, hashes.SHA256()))
    d = sys.argv[2]
    open(d + "/c.pem", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
    open(d + "/k.pem", "wb").write(key.private_bytes(serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(d + "/c.pem", d + "/k.pem")
    class Sink:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 Ok"
    c = Controller(Sink(), hostname="127.0.0.1", port=int(sys.argv[1]), tls_context=ctx,
                   require_starttls=False, data_size_limit=50_000_000)
    c.start()
    sys.stdin.read()
    """
)


def start_sink(kind: str, port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    if kind == "auto":
        kind = "smtp-sink" if shutil.which("smtp-sink") else "aiosmtpd"
    if kind == "smtp-sink":
        exe = shutil.which("smtp-sink")
        if exe is None:
            raise SystemExit("smtp-sink is not installed (apt-get install postfix)")
        # -c counts, 256 = listen backlog; as root it must drop privileges with -u
        cmd = [exe, "-u", "nobody", f"127.0.0.1:{port}", "256"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    else:
        proc = subprocess.Popen(
            [sys.executable, "-c", AIOSMTPD_SINK, str(port), str(workdir)], stdin=subprocess.PIPE
        )
    wait_banner(port)
    return proc, kind


def make_template(root: Path) -> Path:
    """A realistic ~20 KB newsletter: table layout, inline styles, several blocks."""
    tpl = root / "tpl"
    tpl.mkdir()
    (tpl / "template.toml").write_text(
        'subject = "{{ nome }}, le novità di dicembre"\nfrom_name = "Banca Esempio"\n'
    )
    block = (
        '<tr><td style="padding:16px 24px;font-family:Arial,sans-serif;font-size:15px;'
        'line-height:22px;color:#1d2939">'
        '<h2 style="margin:0 0 8px 0;font-size:18px">{{ titolo }} {{ loop.index }}</h2>'
        '<p style="margin:0">Gentile {{ nome }} {{ cognome }}, '
        + "testo del blocco "
        * 40
        + '</p><p><a href="https://www.banca-esempio.test/offerta/{{ loop.index }}" '
        'style="color:#0b3d91">Scopri di più</a></p></td></tr>\n'
    )
    html = (
        '<!doctype html><html><body style="margin:0;background:#f2f4f7">'
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="0">'
        "{% for _ in range(11) %}" + block + "{% endfor %}</table></body></html>"
    )
    (tpl / "body.html").write_text(html)
    return tpl


def contexts(n: int) -> list[dict[str, str]]:
    return [
        {"nome": f"Nome{i}", "cognome": f"Cognome{i}", "titolo": "Offerta", "email": f"u{i}@x"}
        for i in range(n)
    ]


def run_engine(n: int, tpl_path: Path, port: int, dns_port: int, workdir: Path) -> float:
    template = load_template(tpl_path)
    ledger = Ledger(f"sqlite:///{workdir / 'bench.db'}")
    camp = ledger.ensure_campaign("bench", sender=SENDER, template_hash=template.digest, params={})
    ledger.plan(
        camp.id,
        (PlannedDelivery(f"C{i}", f"u{i}@{DOMAIN}", DOMAIN, 0) for i in range(n)),
    )
    ctx = contexts(n)
    by_contact = {f"C{i}": ctx[i] for i in range(n)}

    def render(claim: Claim):  # type: ignore[no-untyped-def]
        return template.render(
            by_contact[claim.contact_id],
            sender=SENDER,
            recipient=claim.address,
            message_id=message_id_for("bench", claim.delivery_id, "banca-esempio.test"),
            headers={"X-Recapito-Delivery": str(claim.delivery_id)},
        )

    options = DeliveryOptions(
        sender=SENDER, helo_name="bench.banca-esempio.test", mx_port=port, connections_per_host=4
    )
    started = time.perf_counter()
    claims = ledger.claim_chunk(camp.id, 0, worker="bench")
    run = DeliveryRun(ledger, options, render, MXResolver(("127.0.0.1", dns_port)))
    stats = asyncio.run(run.run(claims))
    elapsed = time.perf_counter() - started
    accepted = ledger.state_counts(camp.id).get("accepted", 0)
    ledger.close()
    if accepted != n:
        raise SystemExit(f"engine: only {accepted} of {n} accepted: {stats.as_dict()}")
    return n / elapsed


def run_naive(n: int, tpl_path: Path, port: int) -> float:
    template = load_template(tpl_path)
    ctx = contexts(n)
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    started = time.perf_counter()
    for i in range(n):
        msg = template.render(
            ctx[i], sender=SENDER, recipient=f"u{i}@{DOMAIN}", message_id=f"<{i}@bench>"
        )
        with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.banca-esempio.test") as smtp:
            smtp.ehlo()
            if smtp.has_extn("starttls"):
                smtp.starttls(context=tls)
                smtp.ehlo()
            smtp.sendmail(SENDER, [f"u{i}@{DOMAIN}"], msg.data)
    return n / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--naive-messages", type=int, default=600)
    parser.add_argument("--sink", choices=["auto", "smtp-sink", "aiosmtpd"], default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        port, dns_port = free_port(), free_port()
        sink, kind = start_sink(args.sink, port, workdir)
        zone = Zone()
        zone.add(ZoneRecord(DOMAIN, "MX", f"10 {MX_HOST}."))
        zone.add(ZoneRecord(MX_HOST, "A", "127.0.0.1"))
        dns = AuthoritativeServer(zone, "127.0.0.1", dns_port)
        dns.start()
        try:
            tpl = make_template(workdir)
            size = len(
                load_template(tpl)
                .render(contexts(1)[0], sender=SENDER, recipient="u@x.test", message_id="<1@b>")
                .data
            )
            engine = run_engine(args.messages, tpl, port, dns_port, workdir)
            naive = run_naive(args.naive_messages, tpl, port)
        finally:
            dns.stop()
            sink.terminate()
            sink.wait(10)
    figures = {
        "engine_msgs_per_s": round(engine, 1),
        "naive_msgs_per_s": round(naive, 1),
        "ratio_vs_naive": round(engine / naive, 2),
        "messages": args.messages,
        "naive_messages": args.naive_messages,
        "message_bytes": size,
        "sink": kind,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"sink: {kind}; message size {size:,} bytes")
        print(f"engine  {engine:8.1f} msgs/s  ({args.messages} messages, ledger commits included)")
        print(
            f"naive   {naive:8.1f} msgs/s  ({args.naive_messages} messages, smtplib, "
            "one connection each)"
        )
        print(f"ratio   {engine / naive:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
