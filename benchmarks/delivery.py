"""Delivery throughput: the recapito engine vs. Postfix and vs. a naive smtplib loop.

    .venv/bin/python benchmarks/delivery.py [--messages 3000] [--naive-messages 600]
                                            [--connections 20]
                                            [--sink auto|smtp-sink|aiosmtpd] [--json]

Each message is a ~20 KB HTML campaign message rendered from a template. Three comparisons,
in one run (Postfix is installed with apt-get if missing; see ``postfix_baseline.py``):

(a) plain: the engine → the plain sink (Postfix ``smtp-sink`` by default), vs. a private
    Postfix instance delivering the same messages from its queue to the same sink. (With
    ``--sink aiosmtpd`` the sink offers STARTTLS, which the engine uses and Postfix,
    at its default level ``none``, does not: compare on ``smtp-sink``.)
(b) TLS: the engine → a TLS sink (Postfix ``smtpd`` offering STARTTLS, TLS 1.3 only, a
    certificate from a private CA the engine trusts via ``extra_ca_file``, proxying every
    transaction into the plain sink), vs. Postfix delivering to that sink with
    ``smtp_tls_security_level = secure`` and ``smtp_tls_connection_reuse = yes``.
(c) naive: smtplib, a new connection and STARTTLS per message, to the TLS sink.
(d) WAN: (b)'s engine and (c)'s naive loop again, through a proxy that adds a round-trip
    time (``--rtt-ms``, default 40 ms, a typical path to a remote MX; 0 skips it). On
    loopback a new TLS connection costs about a millisecond, so (c) measures CPU only;
    across a real network every command the naive loop waits for costs one round trip,
    which pooling and pipelining save.

The engine path is the product's and is timed from claim to the last ledger commit: MX
lookup over a real DNS server (127.0.0.1), rendering, claims and one ledger commit per
reply (SQLite, WAL), pooled connections. Postfix is timed from releasing its hold queue
(messages already rendered and queued) to its log showing every delivery as sent; the
engine and Postfix use the same number of parallel connections (``--connections``).
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

from postfix_baseline import PostfixRelay, TLSSink, ensure_postfix, wait_banner

from recapito.delivery.dns import MXResolver
from recapito.delivery.engine import DeliveryOptions, DeliveryRun
from recapito.ledger import Claim, Ledger, PlannedDelivery
from recapito.render.template import load_template, message_id_for
from recapito.sandbox import world
from recapito.sandbox.certs import ensure_certificates
from recapito.sandbox.dns import AuthoritativeServer, Zone, ZoneRecord

DOMAIN = "bench.test"
MX_HOST = "mx.bench.test"
SENDER = "news@banca-esempio.test"
TLS_DOMAIN = "tls.bench.test"  # Postfix's route to the TLS sink; the engine uses MX_HOST


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def run_engine(
    n: int,
    tpl_path: Path,
    port: int,
    dns_port: int,
    workdir: Path,
    connections: int,
    extra_ca_file: Path | None = None,
    name: str = "bench",
) -> tuple[float, dict[str, object]]:
    """Messages per second, and what the run saw (connections, TLS versions, levels)."""
    template = load_template(tpl_path)
    ledger = Ledger(f"sqlite:///{workdir / f'{name}.db'}")
    camp = ledger.ensure_campaign(name, sender=SENDER, template_hash=template.digest, params={})
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
        sender=SENDER,
        helo_name="bench.banca-esempio.test",
        mx_port=port,
        extra_ca_file=extra_ca_file,
        connections_per_host=connections,
        max_connections=max(connections, DeliveryOptions.max_connections),
    )
    started = time.perf_counter()
    claims = ledger.claim_chunk(camp.id, 0, worker="bench")
    run = DeliveryRun(ledger, options, render, MXResolver(("127.0.0.1", dns_port)))
    stats = asyncio.run(run.run(claims))
    elapsed = time.perf_counter() - started
    accepted = ledger.state_counts(camp.id).get("accepted", 0)
    levels = ledger.level_mix(camp.id)
    ledger.close()
    if accepted != n:
        raise SystemExit(f"engine: only {accepted} of {n} accepted: {stats.as_dict()}")
    seen: dict[str, object] = {
        "connections": stats.connections,
        "tls": dict(stats.tls),
        "levels": levels,
    }
    return n / elapsed, seen


def run_naive(n: int, tpl_path: Path, port: int, ca_file: Path) -> tuple[float, dict[str, int]]:
    """smtplib, one connection and one STARTTLS per message; chain verified against the CA
    (by IP, so without the host name check). Returns msgs/s and TLS versions seen."""
    template = load_template(tpl_path)
    ctx = contexts(n)
    tls = ssl.create_default_context(cafile=str(ca_file))
    tls.check_hostname = False
    versions: dict[str, int] = {}
    started = time.perf_counter()
    for i in range(n):
        msg = template.render(
            ctx[i], sender=SENDER, recipient=f"u{i}@{DOMAIN}", message_id=f"<{i}@bench>"
        )
        with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.banca-esempio.test") as smtp:
            smtp.ehlo()
            version = "none"
            if smtp.has_extn("starttls"):
                smtp.starttls(context=tls)
                version = str(getattr(smtp.sock, "version", lambda: "?")())
                smtp.ehlo()
            smtp.sendmail(SENDER, [f"u{i}@{DOMAIN}"], msg.data)
        versions[version] = versions.get(version, 0) + 1
    return n / (time.perf_counter() - started), versions


def run_wan(
    args: argparse.Namespace,
    tpl: Path,
    tls_port: int,
    dns_port: int,
    workdir: Path,
    ca_file: Path,
) -> dict[str, float]:
    """(d): engine and naive loop to the TLS sink through a latency proxy."""
    proxy_port = free_port()
    proxy = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("latency_proxy.py")),
            str(proxy_port),
            str(tls_port),
            str(args.rtt_ms),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proxy.stdout is not None
        if proxy.stdout.readline().strip() != b"ready":
            raise SystemExit("latency proxy did not start")
        engine, seen = run_engine(
            args.wan_messages,
            tpl,
            proxy_port,
            dns_port,
            workdir,
            args.connections,
            ca_file,
            "bench-wan",
        )
        if seen["tls"] != {"TLSv1.3": args.wan_messages}:
            raise SystemExit(f"engine over the WAN proxy did not use TLS 1.3: {seen}")
        naive, _ = run_naive(args.wan_naive_messages, tpl, proxy_port, ca_file)
    finally:
        proxy.terminate()
        proxy.wait(10)
    return {
        "wan_rtt_ms": args.rtt_ms,
        "wan_engine_msgs_per_s": round(engine, 1),
        "wan_naive_msgs_per_s": round(naive, 2),
        "wan_ratio_vs_naive": ratio(engine, naive),
    }


def postfix_messages(tpl_path: Path, n: int, domain: str) -> list[tuple[str, str, bytes]]:
    """The engine's messages, rendered up front, for Postfix's queue."""
    template = load_template(tpl_path)
    return [
        (
            SENDER,
            f"u{i}@{domain}",
            template.render(
                c,
                sender=SENDER,
                recipient=f"u{i}@{domain}",
                message_id=message_id_for("postfix", i, "banca-esempio.test"),
            ).data,
        )
        for i, c in enumerate(contexts(n))
    ]


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--naive-messages", type=int, default=600)
    parser.add_argument(
        "--connections",
        type=int,
        default=20,
        help="parallel connections to the sink, for the engine and for Postfix (default 20)",
    )
    parser.add_argument("--rtt-ms", type=float, default=40.0, help="(d) round trip; 0 skips")
    parser.add_argument("--wan-messages", type=int, default=1000)
    parser.add_argument("--wan-naive-messages", type=int, default=30)
    parser.add_argument("--sink", choices=["auto", "smtp-sink", "aiosmtpd"], default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n = args.messages
    ensure_postfix()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # Postfix's unprivileged daemons read config and CA under it
        port, dns_port, tls_port, submit_port = free_port(), free_port(), free_port(), free_port()
        sink, kind = start_sink(args.sink, port, workdir)
        zone = Zone()
        zone.add(ZoneRecord(DOMAIN, "MX", f"10 {MX_HOST}."))
        zone.add(ZoneRecord(MX_HOST, "A", "127.0.0.1"))
        dns = AuthoritativeServer(zone, "127.0.0.1", dns_port)
        pki = ensure_certificates(workdir / "pki", [world.MXServer(MX_HOST, "127.0.0.1", "tls13")])
        leaf = pki.leaves[MX_HOST]
        tls_sink = TLSSink(workdir / "tlssink", tls_port, port, leaf.cert, leaf.key)
        relay = PostfixRelay(
            workdir / "postfix",
            submit_port,
            {DOMAIN: f"smtp:[127.0.0.1]:{port}", TLS_DOMAIN: f"smtptls:[127.0.0.1]:{tls_port}"},
            pki.ca_file,
            args.connections,
            MX_HOST,
        )
        dns.start()
        try:
            tls_sink.start()
            relay.start()
            tpl = make_template(workdir)
            size = len(
                load_template(tpl)
                .render(contexts(1)[0], sender=SENDER, recipient="u@x.test", message_id="<1@b>")
                .data
            )
            # (a) plain
            engine, engine_seen = run_engine(n, tpl, port, dns_port, workdir, args.connections)
            relay.inject(postfix_messages(tpl, n, DOMAIN))
            postfix = relay.deliver_held(n)
            # (b) TLS
            mark = tls_sink.log_offset()
            tls_engine, tls_engine_seen = run_engine(
                n, tpl, tls_port, dns_port, workdir, args.connections, pki.ca_file, "bench-tls"
            )
            time.sleep(0.5)  # the sink's log is written asynchronously (postlogd)
            sink_engine_tls = tls_sink.tls_versions(mark)
            if tls_engine_seen["tls"] != {"TLSv1.3": n}:
                raise SystemExit(f"engine → TLS sink did not use TLS 1.3: {tls_engine_seen}")
            relay.inject(postfix_messages(tpl, n, TLS_DOMAIN))
            mark = tls_sink.log_offset()
            tls_postfix = relay.deliver_held(n)
            time.sleep(0.5)
            sink_postfix_tls = tls_sink.tls_versions(mark)
            if not tls_postfix.tls or set(tls_postfix.tls) != {"Verified TLSv1.3"}:
                raise SystemExit(f"Postfix → TLS sink: unexpected TLS {tls_postfix.tls}")
            # (c) naive
            mark = tls_sink.log_offset()
            naive, naive_tls = run_naive(args.naive_messages, tpl, tls_port, pki.ca_file)
            time.sleep(0.5)
            sink_naive_tls = tls_sink.tls_versions(mark)
            # (d) the same over a simulated wide-area round trip
            wan: dict[str, float] = {}
            if args.rtt_ms > 0:
                wan = run_wan(args, tpl, tls_port, dns_port, workdir, pki.ca_file)
        finally:
            relay.stop()
            tls_sink.stop()
            dns.stop()
            sink.terminate()
            sink.wait(10)
    figures = {
        "engine_msgs_per_s": round(engine, 1),
        "postfix_msgs_per_s": round(postfix.msgs_per_s, 1),
        "ratio_vs_postfix": ratio(engine, postfix.msgs_per_s),
        "tls_engine_msgs_per_s": round(tls_engine, 1),
        "tls_postfix_msgs_per_s": round(tls_postfix.msgs_per_s, 1),
        "tls_ratio_vs_postfix": ratio(tls_engine, tls_postfix.msgs_per_s),
        "naive_msgs_per_s": round(naive, 1),
        "ratio_vs_naive": ratio(tls_engine, naive),
        "messages": n,
        "naive_messages": args.naive_messages,
        "connections": args.connections,
        "message_bytes": size,
        "sink": kind,
        "tls_sink": "postfix smtpd (STARTTLS, TLS 1.3 only) -> smtpd_proxy_filter -> " + kind,
        "engine_connections": engine_seen["connections"],
        "tls_engine_connections": tls_engine_seen["connections"],
        "tls_engine_levels": tls_engine_seen["levels"],
        "tls_sink_handshakes": {
            "engine": sink_engine_tls,
            "postfix": sink_postfix_tls,
            "naive": sink_naive_tls,
        },
        "tls_postfix_handshakes": tls_postfix.tls,
        "naive_tls": naive_tls,
        **wan,
    }
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"message size {size:,} bytes; {n} messages; {args.connections} connections")
    print(f"(a) plain sink: {kind}")
    print(
        f"  engine        {engine:8.1f} msgs/s  (ledger commits included; "
        f"{engine_seen['connections']} connections)"
    )
    print(
        f"  postfix       {postfix.msgs_per_s:8.1f} msgs/s  (queue → sink, {postfix.seconds:.2f} s)"
    )
    print(f"  engine/postfix {figures['ratio_vs_postfix']:7.2f}x")
    print(f"(b) TLS sink: {figures['tls_sink']}")
    print(
        f"  engine        {tls_engine:8.1f} msgs/s  (verified: {tls_engine_seen['levels']}; "
        f"sink saw {sink_engine_tls} handshakes)"
    )
    print(
        f"  postfix       {tls_postfix.msgs_per_s:8.1f} msgs/s  (secure, connection reuse; "
        f"sink saw {sink_postfix_tls} handshakes)"
    )
    print(f"  engine/postfix {figures['tls_ratio_vs_postfix']:7.2f}x")
    print(
        f"(c) naive       {naive:8.1f} msgs/s  ({args.naive_messages} messages, smtplib, "
        f"new connection + STARTTLS each; sink saw {sink_naive_tls} handshakes)"
    )
    print(f"  TLS engine/naive {figures['ratio_vs_naive']:6.2f}x")
    if wan:
        print(f"(d) through a {args.rtt_ms:g} ms round trip (TLS sink behind a latency proxy)")
        print(
            f"  engine        {wan['wan_engine_msgs_per_s']:8.1f} msgs/s  "
            f"({args.wan_messages} messages, {args.connections} connections)"
        )
        print(
            f"  naive         {wan['wan_naive_msgs_per_s']:8.1f} msgs/s  "
            f"({args.wan_naive_messages} messages)"
        )
        print(f"  engine/naive  {wan['wan_ratio_vs_naive']:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
