"""The sandbox MX servers: one aiosmtpd server per ``world.MX_SERVERS`` entry.

Each server runs in its own OS process (so several of them use several cores) and listens on
its own loopback address and the shared MX port. What a server does is fixed by its posture:

- ``tls13`` / ``tls12``: STARTTLS with a sandbox-CA certificate, TLS 1.3 only / TLS 1.2 at most;
- ``selfsigned`` / ``expired`` / ``wrongname``: STARTTLS with a certificate that fails
  verification in the way the name says;
- ``plain``: no STARTTLS at all;
- ``greylist``: ``451 4.7.1`` for a (sender, recipient) pair until ``GREYLIST_DELAY_SECONDS``
  after its first try, then accepted;
- ``rejecting``: ``550 5.1.1`` for local parts containing a ``REJECTED_LOCAL_MARKERS`` marker;
- ``legacy``: STARTTLS with TLS 1.0/1.1 only;
- ``flapping``: STARTTLS on its first ``FLAPPING_TLS_CONNECTIONS`` connections, then never.

Every server, whatever its posture, accepts a recipient whose local part carries one of
``world.BOUNCE_LATER_MARKERS`` and then, instead of storing the message, writes an RFC 3464
delivery status notification addressed to the envelope sender into the bounce mailbox's
Maildir (``MXProcessSpec.bounce_maildir``, served over IMAP by ``recapito.sandbox.imap``):
a recipient that is "accepted now, bounced later", as behind a real relay.

STARTTLS is always optional (``require_starttls=False``), as on the public Internet. Accepted
mail is written once per accepted recipient into ``<maildir root>/<domain>/new`` (see
``recapito.sandbox.maildir``) before DATA is answered.

Run one server: ``python -m recapito.sandbox.servers '<MXProcessSpec as JSON>'``; the
``Sandbox`` class in ``recapito.sandbox.runtime`` does this for every server.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import ssl
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from recapito.sandbox import _proc, world
from recapito.sandbox.maildir import MaildirWriter, trace_headers

DATA_SIZE_LIMIT = 50 * 1024 * 1024
BANNER_IDENT = "ESMTP recapito sandbox"
# Postures that publish a certificate chaining to the sandbox CA and accept only TLS 1.3.
_TLS13_ONLY = frozenset({"tls13", "rejecting"})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MXProcessSpec:
    """Everything an MX server process needs, passed to it as JSON on its command line."""

    host: str
    address: str
    posture: str
    port: int
    cert_file: str | None
    key_file: str | None
    maildir_root: str
    parent_pid: int
    greylist_delay: float = world.GREYLIST_DELAY_SECONDS
    data_size_limit: int = DATA_SIZE_LIMIT
    bounce_maildir: str | None = None  # where DSNs for "bounce later" recipients go

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MXProcessSpec:
        return cls(**json.loads(text))

    @property
    def server(self) -> world.MXServer:
        for server in (*world.MX_SERVERS, world.DEAD_MX):
            if server.host == self.host:
                return server
        raise ValueError(f"unknown MX host {self.host!r}")


def tls_context(posture: str, cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    """The server-side TLS context for a posture, or None when it offers no STARTTLS."""
    if posture == "plain":
        return None
    if cert_file is None or key_file is None:
        raise ValueError(f"posture {posture!r} needs a certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    if posture in _TLS13_ONLY:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    elif posture == "tls12":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif posture == "legacy":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # old on purpose
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def session_tls_version(session: Session) -> str:
    """The TLS version negotiated on this connection ("TLSv1.3"...), or "none"."""
    extra = session.ssl
    if not extra:
        return "none"
    ssl_object = extra.get("ssl_object")
    version = ssl_object.version() if isinstance(ssl_object, ssl.SSLObject) else None
    return version or "none"


class SandboxHandler:
    """aiosmtpd handler: the posture's RCPT policy plus Maildir storage."""

    def __init__(
        self,
        server: world.MXServer,
        writer: MaildirWriter,
        greylist_delay: float = world.GREYLIST_DELAY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        bouncer: DsnWriter | None = None,
    ) -> None:
        self.server = server
        self.writer = writer
        self.bouncer = bouncer
        self.greylist_delay = greylist_delay
        self._clock = clock
        self._first_try: dict[tuple[str, str], float] = {}

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = self.refusal(envelope.mail_from or "", address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    def refusal(self, mail_from: str, address: str) -> str | None:
        """The SMTP reply refusing ``address``, or None to accept it."""
        posture = self.server.posture
        if posture == "rejecting":
            local = address.rpartition("@")[0].lower()
            if any(marker in local for marker in world.REJECTED_LOCAL_MARKERS):
                return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        elif posture == "greylist":
            key = (mail_from.lower(), address.lower())
            now = self._clock()
            first = self._first_try.setdefault(key, now)
            if now - first < self.greylist_delay:
                return f"451 4.7.1 <{address}>: Recipient address rejected: Greylisted, retry later"
        return None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        if content is None:  # aiosmtpd always sets it before calling us
            return "451 4.3.0 Error: no message content"
        mail_from = envelope.mail_from or ""
        tls = session_tls_version(session)
        queue_id = self.writer.unique_name()
        try:
            for recipient in envelope.rcpt_tos:
                later = world.bounce_later(recipient) if self.bouncer else None
                if later is not None and self.bouncer is not None:
                    if mail_from:  # never bounce a bounce (null return path)
                        self.bouncer.bounce(mail_from, recipient, later, content, queue_id)
                    continue
                prefix = trace_headers(mail_from, recipient, self.server.host, tls)
                self.writer.deliver(recipient, prefix, content)
        except OSError as exc:
            # Like a real MTA with a full disk: a transient failure the client retries.
            log.error("cannot store a message: %s", exc)
            return "451 4.3.0 Error: cannot store the message, try again later"
        return f"250 2.0.0 Ok: queued as {queue_id}"


def make_dsn(
    mail_from: str,
    recipient: str,
    status: str,
    diagnostic: str,
    reporting_mta: str,
    original: bytes,
    queue_id: str,
) -> bytes:
    """An RFC 3464 DSN (``Action: failed``) for ``recipient``, addressed to ``mail_from``.

    Shaped like Postfix's: a human-readable part, the ``message/delivery-status`` part and
    the returned message's header block (``text/rfc822-headers``).
    """
    now = email.utils.formatdate(localtime=False)
    boundary = f"{queue_id}.{int(time.time() * 1000)}/{reporting_mta}"
    head, sep, _ = original.partition(b"\r\n\r\n")
    if not sep:
        head = original.partition(b"\n\n")[0]
    returned = head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    text = (
        f"Return-Path: <>\r\n"
        f"Delivered-To: {mail_from}\r\n"
        f"Date: {now}\r\n"
        f"From: MAILER-DAEMON@{reporting_mta} (Mail Delivery System)\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"To: {mail_from}\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"Message-ID: <{queue_id}.dsn@{reporting_mta}>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f'\tboundary="{boundary}"\r\n'
        f"Content-Transfer-Encoding: 8bit\r\n"
        f"\r\n"
        f"This is a MIME-encapsulated message.\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Notification\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n"
        f"\r\n"
        f"This is the mail system at host {reporting_mta}.\r\n"
        f"\r\n"
        f"I'm sorry to have to inform you that your message could not\r\n"
        f"be delivered to one or more recipients. It's attached below.\r\n"
        f"\r\n"
        f"<{recipient}>: {diagnostic}\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Delivery report\r\n"
        f"Content-Type: message/delivery-status\r\n"
        f"\r\n"
        f"Reporting-MTA: dns; {reporting_mta}\r\n"
        f"X-Postfix-Queue-ID: {queue_id}\r\n"
        f"X-Postfix-Sender: rfc822; {mail_from}\r\n"
        f"Arrival-Date: {now}\r\n"
        f"\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        f"Action: failed\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Undelivered Message Headers\r\n"
        f"Content-Type: text/rfc822-headers\r\n"
        f"\r\n"
    ).encode("utf-8", "surrogateescape")
    return text + returned + f"\r\n\r\n--{boundary}--\r\n".encode()


class DsnWriter:
    """Writes DSNs into the bounce mailbox's Maildir (``new``), owned by the mail user."""

    def __init__(self, maildir: Path, reporting_mta: str) -> None:
        self.maildir = maildir
        self.reporting_mta = reporting_mta
        self._writer = MaildirWriter(maildir, f"dsn.{reporting_mta}")

    def bounce(
        self,
        mail_from: str,
        recipient: str,
        verdict: tuple[str, str],
        original: bytes,
        queue_id: str,
    ) -> Path:
        status, diagnostic = verdict
        dsn = make_dsn(
            mail_from, recipient, status, diagnostic, self.reporting_mta, original, queue_id
        )
        for sub in ("tmp", "new", "cur"):
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        return self._writer._write(self.maildir, b"", dsn)


class SandboxSMTP(SMTP):
    """aiosmtpd's SMTP with a DATA phase that reads the message in large blocks.

    Stock aiosmtpd awaits one ``readuntil(b"\\r\\n")`` per line, which makes it the
    bottleneck of a bulk run (a 20 KB HTML message is ~350 lines). Here the reader is asked
    for everything up to the next ``.\\r\\n``; since every block ends at a line end, the
    end-of-data line is either a block of its own or the tail ``\\r\\n.\\r\\n`` of a block.
    The replies (354, 250, 500 for lines over 1000 octets, 552 over the size limit) and the
    dot-unstuffing are those of RFC 5321 §4.5.2, as in aiosmtpd.
    """

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        reader = self._reader
        if not isinstance(getattr(reader, "_limit", None), int):
            # A StreamReader without the attribute we rely on: use the stock line reader.
            await super().smtp_DATA(arg)
            return
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            raw = await self._read_data(reader)
        except asyncio.CancelledError:
            self._writer.close()
            raise
        except asyncio.IncompleteReadError:
            # The client went away in the middle of the message.
            self._writer.close()
            return
        if raw is None:
            await self.push("552 Error: Too much mail data")
            self.envelope = self._create_envelope()  # the post-DATA state
            return
        if any(len(line) + 2 > self.line_length_limit for line in raw.split(b"\r\n")):
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self.envelope = self._create_envelope()  # the post-DATA state
            return
        # Undo dot-stuffing: drop the first dot of every line that starts with one.
        content = raw[1:] if raw.startswith(b".") else raw
        content = content.replace(b"\r\n.", b"\r\n")
        envelope.content = content
        envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()  # the post-DATA state
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self, reader: asyncio.StreamReader) -> bytes | None:
        """The message up to (excluding) the end-of-data line; None if over the size limit."""
        limit = self.data_size_limit
        saved_limit: int = reader._limit  # type: ignore[attr-defined]
        reader._limit = (limit or DATA_SIZE_LIMIT) + 4096  # type: ignore[attr-defined]
        blocks: list[bytes] = []
        size = 0
        too_much = False
        # The two bytes before the current block; the DATA command line ended with CRLF.
        tail = b"\r\n"
        try:
            while True:
                try:
                    block = await reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as exc:
                    # No end marker within the limit: the message is too big. Keep
                    # draining until the end-of-data line, storing nothing.
                    drained = await reader.readexactly(exc.consumed)
                    tail = (tail + drained)[-2:]
                    too_much = True
                    blocks.clear()
                    continue
                done = (tail + block[-5:]).endswith(b"\r\n.\r\n")
                tail = block[-2:]
                if done:
                    block = block[:-3]
                size += len(block)
                if limit and size > limit:
                    too_much = True
                    blocks.clear()
                if not too_much and block:
                    blocks.append(block)
                if done:
                    break
        finally:
            reader._limit = saved_limit  # type: ignore[attr-defined]
        return None if too_much else b"".join(blocks)


def smtp_factory(spec: MXProcessSpec, loop: asyncio.AbstractEventLoop) -> Callable[[], SMTP]:
    """The protocol factory ``loop.create_server`` calls for every new connection."""
    server = spec.server
    writer = MaildirWriter(Path(spec.maildir_root), server.host)
    bouncer = DsnWriter(Path(spec.bounce_maildir), server.host) if spec.bounce_maildir else None
    handler = SandboxHandler(server, writer, spec.greylist_delay, bouncer=bouncer)
    context = tls_context(spec.posture, spec.cert_file, spec.key_file)
    connections = 0

    def factory() -> SMTP:
        nonlocal connections
        connections += 1
        offered = context
        if spec.posture == "flapping" and connections > world.FLAPPING_TLS_CONNECTIONS:
            offered = None  # STARTTLS vanishes from the EHLO reply from now on
        return SandboxSMTP(
            handler,
            hostname=server.host,
            ident=BANNER_IDENT,
            tls_context=offered,
            require_starttls=False,
            data_size_limit=spec.data_size_limit,
            enable_SMTPUTF8=True,
            timeout=300,
            loop=loop,
        )

    return factory


async def serve(spec: MXProcessSpec) -> int:
    """Listen until SIGTERM/SIGINT or until the parent process exits."""
    loop = asyncio.get_running_loop()
    try:
        factory = smtp_factory(spec, loop)
    except (OSError, ValueError) as exc:  # unreadable certificate or key (SSLError included)
        _proc.report(f"{_proc.ERROR} {spec.host}: cannot load its TLS certificate: {exc}")
        return 1
    try:
        listener = await loop.create_server(factory, host=spec.address, port=spec.port, backlog=512)
    except OSError as exc:
        _proc.report(_proc.listen_error(spec.host, spec.address, spec.port, exc))
        return 1
    return await _proc.serve_until_stopped(listener, spec.parent_pid)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m recapito.sandbox.servers '<spec json>'", file=sys.stderr)
        return 2
    spec = MXProcessSpec.from_json(_proc.spec_text(args[0]))
    _proc.configure_logging(spec.host)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    return asyncio.run(serve(spec))


if __name__ == "__main__":
    sys.exit(main())
