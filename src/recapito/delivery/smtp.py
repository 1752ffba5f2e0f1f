"""SMTP client for delivery to an MX host, on asyncio streams.

``MXSession`` is one connection to one MX host: banner, EHLO, explicit STARTTLS when the
server offers it (never a silent fall back to cleartext after a failed handshake), then
any number of single-recipient transactions. With PIPELINING (RFC 2920) a transaction
costs one round trip before the body: MAIL, RCPT and DATA leave in one write, while the
ledger commits that the body is about to go out. Refusals come back as ``SMTPReply``
values; a broken connection raises ``SessionLost``, which says whether the message may
have reached the server.

The hot loop of a campaign runs here, so the client is deliberately small: one reader,
one writer, ``asyncio.timeout`` around every wait, no per-command tasks.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from recapito.delivery.tls import (
    TLSFacts,
    certificate_verdict,
    client_context,
    presented_chain,
)
from recapito.security.policy import HostVerdict

_BARE_LF = re.compile(rb"(?<!\r)\n")
_READ_LIMIT = 1 << 16  # longest reply line accepted (RFC 5321 allows 512)
_MAX_REPLY_LINES = 200


@dataclass(frozen=True)
class SMTPReply:
    code: int
    text: str
    stage: str  # "mail", "rcpt" or "data"


class ConnectFailed(Exception):
    """No session could be set up with this host (refused, timeout, 4xx/5xx banner, TLS).

    ``tls_failed`` is True when the server offered STARTTLS and the handshake failed: the
    host was reached, and its level may be found with a more permissive context.
    """

    def __init__(self, message: str, *, tls_failed: bool = False) -> None:
        super().__init__(message)
        self.tls_failed = tls_failed


class SessionLost(Exception):
    """The connection broke in the middle of a transaction.

    ``after_data`` is True once the message body has been handed over: the server may
    have accepted it, so the delivery is uncertain and must not be resent blindly.
    """

    def __init__(self, message: str, *, after_data: bool) -> None:
        super().__init__(message)
        self.after_data = after_data


class ClaimLost(Exception):
    """The ledger no longer lets us send this delivery (its lease passed to someone else).

    Nothing was sent: the connection was cut before the body left.
    """


class _ProtocolError(Exception):
    """The server's bytes are not an SMTP reply."""


BeforeBody = Callable[[], Awaitable[bool]]


class MXSession:
    def __init__(
        self,
        mx_host: str,
        address: str,
        port: int,
        *,
        helo_name: str,
        extra_ca_file: Path | None,
        connect_timeout: float,
        command_timeout: float,
    ) -> None:
        self.mx_host = mx_host
        self.address = address
        self.port = port
        self.helo_name = helo_name
        self.extra_ca_file = extra_ca_file
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.starttls_offered = False
        self.extensions: dict[str, str] = {}
        self.tls = TLSFacts(None, None, None)
        self.verdict: HostVerdict | None = None  # set once the host is judged fit to send
        self.sent = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._dirty = False  # the last transaction failed: RSET before the next one

    # ---- wire ----------------------------------------------------------------------

    async def _reply(self, timeout: float | None = None) -> tuple[int, str]:
        reader = self._reader
        assert reader is not None
        lines: list[str] = []
        async with asyncio.timeout(timeout or self.command_timeout):
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionResetError("the server closed the connection")
                if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r"):
                    raise _ProtocolError(f"not an SMTP reply: {line[:80]!r}")
                lines.append(line[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
                if line[3:4] != b"-":
                    return int(line[:3]), "\n".join(lines)
                if len(lines) > _MAX_REPLY_LINES:
                    raise _ProtocolError("reply longer than any SMTP server sends")

    async def _command(self, line: str) -> tuple[int, str]:
        writer = self._writer
        assert writer is not None
        writer.write(line.encode("utf-8") + b"\r\n")
        return await self._reply()

    async def _ehlo(self) -> None:
        code, text = await self._command(f"EHLO {self.helo_name}")
        if code != 250:
            code, text = await self._command(f"HELO {self.helo_name}")
            if code != 250:
                raise ConnectFailed(f"{self.mx_host}: HELO refused: {code} {text}")
            self.extensions = {}
            return
        extensions: dict[str, str] = {}
        for entry in text.split("\n")[1:]:
            keyword, _, params = entry.strip().partition(" ")
            extensions[keyword.upper()] = params
        self.extensions = extensions

    # ---- session -------------------------------------------------------------------

    async def open(self, tls_context: ssl.SSLContext | None = None) -> None:
        """Connect, EHLO and, when offered, STARTTLS with ``tls_context``.

        Without a context the legacy-capable one is used (opportunistic delivery).
        """
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._reader, self._writer = await asyncio.open_connection(
                    self.address, self.port, limit=_READ_LIMIT
                )
                code, text = await self._reply(self.connect_timeout)
            if code != 220:
                raise ConnectFailed(f"{self.mx_host}: {code} {text}")
            await self._ehlo()
            self.starttls_offered = "STARTTLS" in self.extensions
            if self.starttls_offered:
                await self._starttls(tls_context or client_context(legacy=True))
        except ConnectFailed:
            self._abort()
            raise
        except (OSError, TimeoutError, ssl.SSLError, _ProtocolError, ValueError) as exc:
            self._abort()
            detail = str(exc) or "no answer in time"
            raise ConnectFailed(f"{self.mx_host}: {type(exc).__name__}: {detail}") from exc

    async def _starttls(self, context: ssl.SSLContext) -> None:
        writer = self._writer
        assert writer is not None
        try:
            code, text = await self._command("STARTTLS")
            if code != 220:
                raise ConnectFailed(
                    f"{self.mx_host}: STARTTLS refused: {code} {text}", tls_failed=True
                )
            async with asyncio.timeout(self.command_timeout):
                await writer.start_tls(context, server_hostname=self.mx_host)
        except ConnectFailed:
            raise
        except (OSError, TimeoutError, ssl.SSLError, _ProtocolError, ValueError) as exc:
            raise ConnectFailed(
                f"{self.mx_host}: TLS handshake failed: {type(exc).__name__}: {exc}",
                tls_failed=True,
            ) from exc
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is None:
            raise ConnectFailed(
                f"{self.mx_host}: STARTTLS did not produce a TLS session", tls_failed=True
            )
        cipher = ssl_object.cipher()
        chain = presented_chain(ssl_object)
        self.tls = TLSFacts(
            version=ssl_object.version(),
            cipher=cipher[0] if cipher else None,
            cert_verdict=certificate_verdict(chain, self.mx_host, self.extra_ca_file),
            chain=chain,
        )
        await self._ehlo()  # RFC 3207: forget what was learnt before TLS

    def _envelope(self, sender: str, recipient: str, size: int) -> bytes | SMTPReply:
        params = ""
        if not (sender.isascii() and recipient.isascii()):
            if "SMTPUTF8" not in self.extensions:
                return SMTPReply(
                    553, "5.6.7 address needs SMTPUTF8, which the server does not offer", "mail"
                )
            params += " SMTPUTF8"
        if "SIZE" in self.extensions:
            params += f" SIZE={size}"
        reset = b"RSET\r\n" if self._dirty else b""
        return reset + f"MAIL FROM:<{sender}>{params}\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode()

    async def send(
        self,
        sender: str,
        recipient: str,
        data: bytes,
        before_body: BeforeBody | None = None,
    ) -> SMTPReply:
        """One transaction. A refusal is a reply; a broken connection raises SessionLost.

        ``before_body`` runs while the envelope is on its way (it commits that the body
        is about to leave); when it answers False the connection is cut before any byte
        of the body is sent, and ``ClaimLost`` is raised.
        """
        writer = self._writer
        if writer is None or writer.is_closing():
            self._writer = None
            raise SessionLost(f"{self.mx_host}: session is not open", after_data=False)
        body = _wire_body(data)
        envelope = self._envelope(sender, recipient, len(body))
        if isinstance(envelope, SMTPReply):
            return envelope
        body_sent = False
        try:
            if "PIPELINING" in self.extensions:
                writer.write(envelope)
                owned = await before_body() if before_body is not None else True
                replies = [await self._reply() for _ in range(envelope.count(b"\r\n"))]
            else:
                replies = []
                owned = True
                for line in envelope.split(b"\r\n")[:-1]:
                    if line == b"DATA":
                        owned = await before_body() if before_body is not None else True
                        if not owned:
                            break
                    writer.write(line + b"\r\n")
                    replies.append(await self._reply())
                    if replies[-1][0] >= 400 and not line.startswith(b"RSET"):
                        break
            if self._dirty:
                replies = replies[1:]  # the RSET's answer
                self._dirty = False
            if not owned:
                self._abort()
                raise ClaimLost(f"{self.mx_host}: the claim on {recipient} was lost")
            for (code, text), stage in zip(replies, ("mail", "rcpt", "data"), strict=False):
                if code >= 400:
                    return self._refused(SMTPReply(code, text, stage), replies)
            if len(replies) != 3 or replies[2][0] != 354:
                raise _ProtocolError(f"unexpected answers to the envelope: {replies}")
            writer.write(body)
            body_sent = True
            await writer.drain()
            code, text = await self._reply()
        except (OSError, TimeoutError, _ProtocolError, ValueError, ssl.SSLError) as exc:
            self._abort()
            detail = str(exc) or "no answer in time"
            raise SessionLost(
                f"{self.mx_host}: {type(exc).__name__}: {detail}", after_data=body_sent
            ) from exc
        self.sent += 1
        if code == 421:
            self._abort()
        elif code >= 400:
            self._dirty = True
        return SMTPReply(code, text, "data")

    def _refused(self, reply: SMTPReply, replies: list[tuple[int, str]]) -> SMTPReply:
        """A transaction refused before the body: the session stays usable after RSET."""
        self.sent += 1
        if reply.code == 421 or any(code == 354 for code, _ in replies):
            # the server is closing, or it wants a body for a refused recipient: cut the
            # connection rather than hand it an empty message
            self._abort()
        else:
            self._dirty = True
        return reply

    def _abort(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.transport.abort()

    @property
    def level(self) -> str:
        """The host's level: the verdict's (which knows recipient policies) once judged."""
        return self.verdict.level if self.verdict is not None else self.tls.level

    @property
    def is_open(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def close(self) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            writer.write(b"QUIT\r\n")
            await self._reply(min(self.command_timeout, 5.0))
        except (OSError, TimeoutError, _ProtocolError, ValueError, ssl.SSLError):
            pass
        self._writer = self._reader = None
        writer.close()
        try:
            async with asyncio.timeout(2.0):
                await writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError):
            writer.transport.abort()


def _wire_body(data: bytes) -> bytes:
    """The message as DATA content: CRLF line ends, dot-stuffed, with the final dot."""
    if b"\n" in data and data.count(b"\n") != data.count(b"\r\n"):
        data = _BARE_LF.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"
