"""The sandbox mail world against real clients: dnspython for DNS, aiosmtplib for SMTP.

Everything runs on 127.0.0.0/8 with free ports; the servers are the sandbox's own processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest
from cryptography import x509

from recapito.config import Settings
from recapito.sandbox import world
from recapito.sandbox.certs import WRONG_NAME, ensure_certificates
from recapito.sandbox.dns import (
    AuthoritativeServer,
    DNSProcessSpec,
    build_zone,
    tlsa_record,
    txt_record,
)
from recapito.sandbox.maildir import (
    MaildirWriter,
    StoredMessage,
    domain_dir_name,
    iter_maildirs,
)
from recapito.sandbox.runtime import (
    Sandbox,
    SandboxError,
    free_dns_port,
    pid_alive,
    probe_mx,
    read_state,
)
from recapito.sandbox.servers import SandboxHandler, SandboxSMTP

SENDER = "campagne@banca-esempio.test"


# -- helpers --------------------------------------------------------------------------------


def resolver_for(port: int) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    resolver.lifetime = 3.0
    return resolver


def ask(port: int, name: str, rtype: str, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rtype)
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, timeout=3.0)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=3.0)


def unique(local: str = "u") -> str:
    return f"{local}-{uuid.uuid4().hex[:12]}"


def message_bytes(rcpts: list[str], subject: str = "prova", body: str = "Buongiorno.\r\n") -> bytes:
    delivery = uuid.uuid4().hex
    return (
        f"From: {SENDER}\r\n"
        f"To: {', '.join(rcpts)}\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{delivery}@banca-esempio.test>\r\n"
        f"X-Recapito-Delivery: {delivery}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"{body}"
    ).encode()


def stored_for(box: Sandbox, recipient: str) -> list[StoredMessage]:
    root = box.maildir_root
    return [
        m
        for m in iter_maildirs(root)
        if m.domain == domain_dir_name(recipient) and m.delivered_to == recipient
    ]


def verifying_context(box: Sandbox) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(box.ca_file))


def permissive_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def connect(box: Sandbox, server: world.MXServer) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(
        hostname=server.address,
        port=box.mx_port,
        start_tls=False,
        local_hostname="client.banca-esempio.test",
        timeout=10,
    )
    await client.connect()
    await client.ehlo()
    return client


async def send_over(
    box: Sandbox,
    server: world.MXServer,
    rcpts: list[str],
    data: bytes,
    tls: ssl.SSLContext | None,
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    client = await connect(box, server)
    try:
        if tls is not None:
            await client.starttls(tls_context=tls, server_hostname=server.host)
            await client.ehlo()
        errors, _ = await client.sendmail(SENDER, rcpts, data)
        return errors, "none" if tls is None else str(
            client.get_transport_info("ssl_object").version()
        )
    finally:
        client.close()


# -- certificates ---------------------------------------------------------------------------


def test_certificates_match_postures_and_are_reused(tmp_path: Path) -> None:
    pki = ensure_certificates(tmp_path)
    assert pki.ca_file == tmp_path / "ca.pem"
    ca = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    now = dt.datetime.now(dt.UTC)
    for server in world.MX_SERVERS:
        cert = x509.load_pem_x509_certificate(pki.leaves[server.host].cert.read_bytes())
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
        assert names == [WRONG_NAME if server.posture == "wrongname" else server.host]
        if server.posture == "selfsigned":
            assert cert.issuer == cert.subject
            cert.verify_directly_issued_by(cert)
        else:
            assert cert.issuer == ca.subject
            cert.verify_directly_issued_by(ca)
        expired = cert.not_valid_after_utc < now
        assert expired == (server.posture == "expired")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.pem")}
    ensure_certificates(tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.pem")} == before
    # A damaged leaf is regenerated; the CA (and so every other leaf) stays.
    broken = pki.leaves[world.MX_SERVERS[0].host].cert
    broken.write_text("garbage")
    ensure_certificates(tmp_path)
    assert pki.ca_file.read_bytes() == before[pki.ca_file]
    assert broken.read_bytes() != b"garbage"


# -- DNS ------------------------------------------------------------------------------------


def test_dns_mx_a_nullmx_nxdomain(sandbox: Sandbox) -> None:
    resolver = resolver_for(sandbox.dns_port)
    mx = sorted((r.preference, str(r.exchange)) for r in resolver.resolve("postaveloce.test", "MX"))
    assert mx == [(10, "mx.tls13.sandbox.test."), (20, "mx.tls12.sandbox.test.")]
    doppio = sorted(
        (r.preference, str(r.exchange)) for r in resolver.resolve("doppio-mx.test", "MX")
    )
    assert doppio == [(10, f"{world.DEAD_MX.host}."), (20, "mx.tls13.sandbox.test.")]
    for server in (*world.MX_SERVERS, world.DEAD_MX):
        assert [r.address for r in resolver.resolve(server.host, "A")] == [server.address]
    null = list(resolver.resolve("nessuna-posta.test", "MX"))
    assert [(r.preference, str(r.exchange)) for r in null] == [(0, ".")]
    # implicit MX: an A record and no MX
    assert [r.address for r in resolver.resolve("solo-a.test", "A")] == [
        world.IMPLICIT_MX_TARGET.address
    ]
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("solo-a.test", "MX")
    for name in ("dominio-inesistente.test", "no-such-domain.example", "x.postaveloce.test"):
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolver.resolve(name, "MX")
    # an ordinary mail domain has no A record: NODATA, not NXDOMAIN
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("mailitalia.test", "A")
    txt = resolver.resolve("sandbox.test", "TXT")
    assert "recapito sandbox" in b"".join(next(iter(txt)).strings).decode()


def test_dns_flags_tcp_and_case(sandbox: Sandbox) -> None:
    port = sandbox.dns_port
    answer = ask(port, "MailItalia.TEST", "MX")
    assert answer.flags & dns.flags.AA
    assert answer.rcode() == dns.rcode.NOERROR
    assert [str(r.exchange) for r in answer.answer[0]] == ["mx.tls13.sandbox.test."]
    missing = ask(port, "dominio-inesistente.test", "A", tcp=True)
    assert missing.flags & dns.flags.AA
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert missing.authority and missing.authority[0].rdtype == dns.rdatatype.SOA
    nodata = ask(port, "solo-a.test", "MX", tcp=True)
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.flags & dns.flags.AA


def test_dns_catch_all_and_extra_records() -> None:
    digest = bytes(range(32))
    zone = build_zone(
        catch_all=True,
        extra=[
            txt_record("_mta-sts.mailitalia.test", "v=STSv1; id=20260101"),
            tlsa_record("_25._tcp.mx.tls13.sandbox.test", 3, 1, 1, digest),
        ],
    )
    port = free_dns_port()
    server = AuthoritativeServer(zone, "127.0.0.1", port)
    server.start()
    try:
        resolver = resolver_for(port)
        for name in ("gmail.com", "libero.it", "pec.azienda.it"):
            expected = world.catch_all_posture(name).host
            assert [str(r.exchange) for r in resolver.resolve(name, "MX")] == [f"{expected}."]
            assert expected != world.MX_BY_POSTURE["rejecting"].host
            with pytest.raises(dns.resolver.NoAnswer):  # no A records for outside names
                resolver.resolve(name, "A")
        # names the zone knows answer as without catch-all
        assert [str(r.exchange) for r in resolver.resolve("casella.test", "MX")] == [
            "mx.tls12.sandbox.test."
        ]
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolver.resolve("dominio-inesistente.test", "MX")
        with pytest.raises(dns.resolver.NoAnswer):
            resolver.resolve("nessuna-posta.test", "A")
        sts = resolver.resolve("_mta-sts.mailitalia.test", "TXT")
        assert [b"".join(r.strings) for r in sts] == [b"v=STSv1; id=20260101"]
        tlsa = list(resolver.resolve("_25._tcp.mx.tls13.sandbox.test", "TLSA"))
        assert [(r.usage, r.selector, r.mtype, r.cert) for r in tlsa] == [(3, 1, 1, digest)]
    finally:
        server.stop()


def test_dns_process_spec_carries_extra_records() -> None:
    records = [
        txt_record("_mta-sts.casella.test", 'v=STSv1; id="quoted"'),
        tlsa_record("_25._tcp.mx.tls12.sandbox.test", 3, 1, 1, b"\x01" * 32),
    ]
    spec = DNSProcessSpec(
        "127.0.0.1",
        5353,
        1,
        catch_all=True,
        extra=tuple((r.name, r.rtype, r.value, r.ttl) for r in records),
    )
    again = DNSProcessSpec.from_json(spec.to_json())
    assert again == spec and again.records() == records
    zone = build_zone(extra=again.records())
    [txt] = zone.records("_mta-sts.casella.test")
    assert b"".join(txt.rdata.data) == b'v=STSv1; id="quoted"'


# -- MX postures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("posture", "domain", "version"),
    [("tls13", "mailitalia.test", "TLSv1.3"), ("tls12", "casella.test", "TLSv1.2")],
)
def test_verified_postures(sandbox: Sandbox, posture: str, domain: str, version: str) -> None:
    server = world.MX_BY_POSTURE[posture]
    rcpt = f"{unique()}@{domain}"

    async def run() -> tuple[bool, str, str]:
        client = await connect(sandbox, server)
        try:
            offered = client.supports_extension("starttls")
            await client.starttls(
                tls_context=verifying_context(sandbox), server_hostname=server.host
            )
            await client.ehlo()
            negotiated = str(client.get_transport_info("ssl_object").version())
            _, reply = await client.sendmail(SENDER, [rcpt], message_bytes([rcpt]))
            return offered, negotiated, reply
        finally:
            client.close()

    offered, negotiated, reply = asyncio.run(run())
    assert offered
    assert negotiated == version
    assert reply.startswith("2.0.0 Ok: queued as")
    [stored] = stored_for(sandbox, rcpt)
    assert stored.x_sandbox_tls == version
    assert stored.x_sandbox_mx == server.host


def test_tls13_only_refuses_tls12_clients(sandbox: Sandbox) -> None:
    ctx = verifying_context(sandbox)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server = world.MX_BY_POSTURE["tls13"]

    async def run() -> None:
        client = await connect(sandbox, server)
        try:
            await client.starttls(tls_context=ctx, server_hostname=server.host)
        finally:
            client.close()

    with pytest.raises((ssl.SSLError, aiosmtplib.SMTPException)):
        asyncio.run(run())


@pytest.mark.parametrize(
    ("posture", "reason"),
    [
        ("selfsigned", "self-signed certificate"),
        ("expired", "certificate has expired"),
        ("wrongname", "Hostname mismatch"),
    ],
)
def test_unverifiable_postures(sandbox: Sandbox, posture: str, reason: str) -> None:
    server = world.MX_BY_POSTURE[posture]

    async def verified() -> None:
        client = await connect(sandbox, server)
        try:
            assert client.supports_extension("starttls")
            await client.starttls(
                tls_context=verifying_context(sandbox), server_hostname=server.host
            )
        finally:
            client.close()

    with pytest.raises(ssl.SSLCertVerificationError) as failure:
        asyncio.run(verified())
    assert reason in str(failure.value)

    # Without verification the same server takes mail over TLS (an L2 channel).
    domain = next(d.name for d in world.DOMAINS if d.mx and d.mx[0][1] == server.host)
    rcpt = f"{unique()}@{domain}"
    errors, version = asyncio.run(
        send_over(sandbox, server, [rcpt], message_bytes([rcpt]), permissive_context())
    )
    assert errors == {}
    [stored] = stored_for(sandbox, rcpt)
    assert stored.x_sandbox_tls == version == "TLSv1.3"


def test_plain_offers_no_starttls(sandbox: Sandbox) -> None:
    server = world.MX_BY_POSTURE["plain"]
    rcpt = f"{unique()}@vecchiaposta.test"

    async def run() -> bool:
        client = await connect(sandbox, server)
        try:
            offered = client.supports_extension("starttls")
            await client.sendmail(SENDER, [rcpt], message_bytes([rcpt]))
            return offered
        finally:
            client.close()

    assert asyncio.run(run()) is False
    [stored] = stored_for(sandbox, rcpt)
    assert stored.x_sandbox_tls == "none"


def test_greylist_defers_then_accepts(sandbox: Sandbox) -> None:
    server = world.MX_BY_POSTURE["greylist"]
    rcpt = f"{unique()}@webposta.test"
    other = f"{unique()}@webposta.test"

    async def rcpt_code(address: str) -> tuple[int, str]:
        client = await connect(sandbox, server)
        try:
            await client.starttls(
                tls_context=verifying_context(sandbox), server_hostname=server.host
            )
            await client.ehlo()
            await client.mail(SENDER)
            try:
                reply = await client.rcpt(address)
            except aiosmtplib.SMTPRecipientRefused as exc:
                return exc.code, exc.message
            await client.data(message_bytes([address]))
            return reply.code, reply.message
        finally:
            client.close()

    started = time.monotonic()
    code, text = asyncio.run(rcpt_code(rcpt))
    assert (code, text[:5]) == (451, "4.7.1")
    assert asyncio.run(rcpt_code(rcpt))[0] == 451  # still inside the delay
    # A different pair is greylisted on its own.
    assert asyncio.run(rcpt_code(other))[0] == 451
    time.sleep(max(0.0, world.GREYLIST_DELAY_SECONDS - (time.monotonic() - started)) + 0.1)
    assert asyncio.run(rcpt_code(rcpt))[0] == 250
    assert len(stored_for(sandbox, rcpt)) == 1
    assert stored_for(sandbox, other) == []


def test_rejecting_refuses_marked_mailboxes(sandbox: Sandbox) -> None:
    server = world.MX_BY_POSTURE["rejecting"]
    good = f"{unique('mario.rossi')}@comune-esempio.test"
    bad = [f"{unique(marker)}@comune-esempio.test" for marker in world.REJECTED_LOCAL_MARKERS]

    async def run() -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        client = await connect(sandbox, server)
        try:
            await client.starttls(
                tls_context=verifying_context(sandbox), server_hostname=server.host
            )
            await client.ehlo()
            version = str(client.get_transport_info("ssl_object").version())
            errors, _ = await client.sendmail(SENDER, [good, *bad], message_bytes([good, *bad]))
            return errors, version
        finally:
            client.close()

    errors, version = asyncio.run(run())
    assert version == "TLSv1.3"
    assert set(errors) == set(bad)
    for response in errors.values():
        assert response.code == 550 and response.message.startswith("5.1.1")
    assert len(stored_for(sandbox, good)) == 1
    for address in bad:
        assert stored_for(sandbox, address) == []


# -- storage --------------------------------------------------------------------------------


def test_maildir_once_per_recipient_with_trace_headers(sandbox: Sandbox) -> None:
    server = world.MX_BY_POSTURE["tls13"]
    rcpts = [
        f"{unique('a')}@postaveloce.test",
        f"{unique('b')}@postaveloce.test",
        f"{unique('c')}@MailItalia.test",
    ]
    body = "Prima riga.\r\n.riga che inizia con un punto\r\n..due punti\r\n.\r\n"
    body += ("x" * 998 + "\r\n") * 3 + ("testo " * 12 + "\r\n") * 30000  # ~2.2 MB
    data = message_bytes(rcpts, body=body)
    errors, _ = asyncio.run(send_over(sandbox, server, rcpts, data, verifying_context(sandbox)))
    assert errors == {}
    for rcpt in rcpts:
        [stored] = stored_for(sandbox, rcpt)
        assert stored.domain == rcpt.rpartition("@")[2].lower()
        assert stored.path.parent.name == "new"
        assert stored.path.parent.parent == sandbox.maildir_root / stored.domain
        assert stored.return_path == SENDER
        assert stored.x_sandbox_mx == server.host
        assert stored.x_sandbox_tls == "TLSv1.3"
        assert stored.delivery_id is not None and stored.delivery_id in data.decode()
        assert stored.message_id == f"<{stored.delivery_id}@banca-esempio.test>"
        assert stored.header("X-RECAPITO-DELIVERY") == stored.delivery_id
        assert [k for k, _ in stored.header_list[:4]] == [
            "Return-Path",
            "Delivered-To",
            "X-Sandbox-MX",
            "X-Sandbox-TLS",
        ]
        # The stored message is byte for byte what was sent, after the four trace headers.
        raw = stored.read_bytes()
        prefix = (
            f"Return-Path: <{SENDER}>\r\nDelivered-To: {rcpt}\r\n"
            f"X-Sandbox-MX: {server.host}\r\nX-Sandbox-TLS: TLSv1.3\r\n"
        ).encode()
        assert raw == prefix + data
    assert not any((sandbox.maildir_root / "postaveloce.test" / "tmp").iterdir())


def test_data_phase_limits_and_session_reuse(tmp_path: Path) -> None:
    """SandboxSMTP's block reader: size limit (552), long lines (500), empty body, reuse."""
    server = world.MX_BY_POSTURE["plain"]
    handler = SandboxHandler(server, MaildirWriter(tmp_path, server.host))

    async def run() -> list[int]:
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(
            lambda: SandboxSMTP(handler, hostname=server.host, data_size_limit=4096, loop=loop),
            host="127.0.0.1",
            port=0,
        )
        port = listener.sockets[0].getsockname()[1]
        codes: list[int] = []
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
        await client.connect()
        try:
            for payload in (
                b"Subject: big\r\n\r\n" + b"y" * 70 + b"\r\n" + (b"z" * 70 + b"\r\n") * 200,
                b"Subject: long\r\n\r\n" + b"w" * 1200 + b"\r\n",
                b"",
                b"Subject: ok\r\n\r\n.\r\n..\r\nfine\r\n",
            ):
                await client.mail(SENDER)
                await client.rcpt("someone@vecchiaposta.test")
                try:
                    reply = await client.data(payload)
                    codes.append(reply.code)
                except aiosmtplib.SMTPDataError as exc:
                    codes.append(exc.code)
        finally:
            client.close()
            listener.close()
        return codes

    assert asyncio.run(run()) == [552, 500, 250, 250]
    stored = list(iter_maildirs(tmp_path))
    assert len(stored) == 2
    bodies = sorted(m.read_bytes().split(b"X-Sandbox-TLS: none\r\n", 1)[1] for m in stored)
    assert bodies == [b"\r\n", b"Subject: ok\r\n\r\n.\r\n..\r\nfine\r\n"]


def test_clear_maildirs_keeps_folders(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)  # not started: only its paths are used
    writer = MaildirWriter(box.maildir_root, "test")
    for rcpt in ("a@x.test", "b@x.test", "c@y.test"):
        writer.deliver(rcpt, b"Delivered-To: " + rcpt.encode() + b"\r\n", b"\r\nbody\r\n")
    assert [m.delivered_to for m in box.messages()] == ["a@x.test", "b@x.test", "c@y.test"]
    assert box.clear_maildirs() == 3
    assert box.messages() == []
    assert (box.maildir_root / "x.test" / "new").is_dir()
    # Folders removed under a live writer are recreated.
    shutil.rmtree(box.maildir_root)
    writer.deliver("d@x.test", b"Delivered-To: d@x.test\r\n", b"\r\n")
    assert [m.delivered_to for m in box.messages()] == ["d@x.test"]


# -- lifecycle and CLI ----------------------------------------------------------------------


def test_sandbox_settings_and_state(sandbox: Sandbox) -> None:
    env = sandbox.env()
    expected = {
        "RECAPITO_DNS": f"127.0.0.1:{sandbox.dns_port}",
        "RECAPITO_MX_PORT": str(sandbox.mx_port),
        "RECAPITO_TLS_CA_FILE": str(sandbox.ca_file),
        "RECAPITO_HTTPS_PORT": str(sandbox.https_port),
    }
    assert {k: env.get(k) for k in expected} == expected
    # the DANE resolver when DNSSEC tools exist; the demo sender's DKIM keys; the bounce
    # mailbox when Dovecot exists
    bounce_imap = {
        f"RECAPITO_BOUNCE_IMAP_{k}"
        for k in ("HOST", "PORT", "SECURITY", "USER", "PASSWORD", "CA_FILE")
    }
    twilio = {f"RECAPITO_TWILIO_{k}" for k in ("ACCOUNT_SID", "AUTH_TOKEN", "BASE_URL", "FROM")}
    assert set(env) - set(expected) <= {
        "RECAPITO_DANE_RESOLVER",
        "RECAPITO_DKIM_KEYS",
        "RECAPITO_PEC_MAILBOXES_FILE",
        "RECAPITO_PEC_CA_FILE",
        *bounce_imap,
        *twilio,
    }
    # the Twilio-compatible Messages API always runs; its auth token makes the file secret
    assert twilio <= set(env)
    assert env["RECAPITO_TWILIO_BASE_URL"].startswith("http://127.0.0.1:")
    assert sandbox.settings_path.stat().st_mode & 0o077 == 0
    if sandbox.imap_ports is not None:
        assert bounce_imap <= set(env)
        assert sandbox.settings_path.stat().st_mode & 0o077 == 0  # it holds a password
        # the PEC providers run with the IMAP server; their mailboxes file holds passwords
        assert env["RECAPITO_PEC_MAILBOXES_FILE"] == str(sandbox.pec_mailboxes_file)
        assert env["RECAPITO_PEC_CA_FILE"] == str(sandbox.ca_file)  # receipt signatures
        assert sandbox.pec_mailboxes_file.stat().st_mode & 0o077 == 0
        assert set(sandbox.pec_ports) == {"postaveloce", "legalmail"}
    assert json.loads(sandbox.settings_path.read_text()) == env
    settings = Settings.load(env={"RECAPITO_HOME": str(sandbox.home)})
    assert settings.dns == sandbox.dns_address
    assert settings.mx_port == sandbox.mx_port
    assert settings.tls_ca_file == sandbox.ca_file
    assert settings.https_port == sandbox.https_port
    state = read_state(sandbox.home)
    assert state is not None and state.owner_pid == os.getpid()
    assert {s.host: s.pid for s in state.servers} == {
        h: p
        for h, p in sandbox.pids.items()
        if h not in ("dns", "https", "dnssec", "imap", "pec", "twilio")
    }
    assert (state.https_port, state.https_pid) == (sandbox.https_port, sandbox.pids["https"])
    assert all(pid_alive(p) for p in state.child_pids)
    assert sandbox.pids["https"] in state.child_pids


def test_busy_port_is_one_clear_error(sandbox: Sandbox, tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match=f"MX port {sandbox.mx_port} is already in use"):
        Sandbox(tmp_path, mx_port=sandbox.mx_port).start()
    with pytest.raises(SandboxError, match=f"DNS port {sandbox.dns_port} is already in use"):
        Sandbox(tmp_path, dns_port=sandbox.dns_port).start()
    # A second sandbox for the same home is refused and leaves the running one alone.
    with pytest.raises(SandboxError, match="already running"):
        Sandbox(sandbox.home).start()
    assert probe_mx(world.MX_SERVERS[0].address, sandbox.mx_port) is not None
    assert sandbox.settings_path.exists()


def test_children_die_with_their_owner(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from recapito.sandbox.runtime import Sandbox\n"
        "Sandbox(Path(sys.argv[1])).start()\n"
        "print('up', flush=True)\n"
        "time.sleep(120)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "up"
        state = read_state(tmp_path)
        assert state is not None and state.owner_pid == owner.pid
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(pid_alive(p) for p in state.child_pids):
            time.sleep(0.1)
        assert not [p for p in state.child_pids if pid_alive(p)]
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


@pytest.fixture
def cli_home(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {**os.environ, "RECAPITO_HOME": str(tmp_path / "home")}
    yield env
    # Whatever happened in the test, leave nothing running.
    subprocess.run(
        [sys.executable, "-m", "recapito.sandbox.cli", "down"], env=env, capture_output=True
    )


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recapito.sandbox.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_cli_up_status_down(cli_home: dict[str, str]) -> None:
    home = Path(cli_home["RECAPITO_HOME"])
    up = cli(cli_home, "up", "--mx-port", "0", "--dns-port", "0", "--catch-all", "--json")
    assert up.returncode == 0, up.stderr
    summary = json.loads(up.stdout)
    assert summary["running"] and summary["catch_all"] and not summary["already_running"]

    again = cli(cli_home, "up", "--mx-port", "0", "--dns-port", "0")
    assert again.returncode == 0 and "already running" in again.stdout

    status = cli(cli_home, "status", "--json")
    info = json.loads(status.stdout)
    mx_port, dns_port = info["mx_port"], info["dns"]["port"]
    # the MTA-STS policy server is shown too (its port is also in settings.json)
    settings_port = json.loads((home / "sandbox" / "settings.json").read_text())[
        "RECAPITO_HTTPS_PORT"
    ]
    assert info["mta_sts"] == f"127.0.0.1:{settings_port}"
    assert summary["mta_sts"] == info["mta_sts"]
    running = f"on MX port {mx_port}, DNS port {dns_port}"
    # `up` again says where the running sandbox is: with no ports, the defaults, or its ports
    for args in ([], ["--mx-port", str(mx_port)], ["--mx-port", str(mx_port), "--catch-all"]):
        reused = cli(cli_home, "up", *args)
        assert reused.returncode == 0, reused.stderr
        assert reused.stdout.startswith("sandbox already running") and running in reused.stdout
    # explicitly requested ports it does not have: not applied, one line, non-zero
    other = cli(cli_home, "up", "--mx-port", str(mx_port + 1))
    assert other.returncode == 1 and other.stdout == ""
    assert other.stderr == (
        f"Error: sandbox already running (pid {summary['owner_pid']}, home {home}) {running}; "
        f"the requested --mx-port {mx_port + 1} was not applied: run 'recapito sandbox down' "
        "first, or leave it out to reuse the running one\n"
    )
    both = cli(
        cli_home, "up", "--json", "--mx-port", str(mx_port + 1), "--dns-port", str(dns_port + 1)
    )
    assert both.returncode == 1 and both.stderr.count("\n") == 1
    assert f"--mx-port {mx_port + 1} and --dns-port {dns_port + 1} were not applied" in both.stderr
    assert json.loads(cli(cli_home, "status", "--json").stdout)["mx_port"] == mx_port
    assert info["running"] and info["dns"]["up"]
    assert [(s["host"], s["posture"], s["up"]) for s in info["servers"]] == [
        (s.host, s.posture, True) for s in world.MX_SERVERS
    ]
    text = cli(cli_home, "status").stdout
    assert "mx.greylist.sandbox.test" in text and "greylist" in text and " up" in text

    settings = Settings.load(env={"RECAPITO_HOME": str(home)})
    assert settings.dns is not None and settings.mx_port == info["mx_port"]
    # catch-all: a real-world domain gets a sandbox MX
    mx = resolver_for(settings.dns[1]).resolve("example.com", "MX")
    assert [str(r.exchange) for r in mx] == [f"{world.catch_all_posture('example.com').host}."]

    # a second sandbox on the same ports fails with one line, no traceback
    clash = cli(
        {**cli_home, "RECAPITO_HOME": str(home.parent / "other")},
        "up",
        "--mx-port",
        str(info["mx_port"]),
        "--dns-port",
        "0",
    )
    assert clash.returncode == 1
    assert clash.stderr.startswith("Error: MX port") and "Traceback" not in clash.stderr

    state = read_state(home)
    assert state is not None
    down = cli(cli_home, "down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not (home / "sandbox" / "settings.json").exists()
    assert not [p for p in (state.owner_pid, *state.child_pids) if pid_alive(p)]
    after = json.loads(cli(cli_home, "status", "--json").stdout)
    assert not after["running"] and not any(s["up"] for s in after["servers"])
    assert "not running" in cli(cli_home, "down").stdout
