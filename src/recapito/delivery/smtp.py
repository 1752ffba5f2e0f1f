"""SMTP client adapter over aiosmtplib: the only module here that imports it.

``MXSession`` is one connection to one MX host: banner, EHLO, explicit STARTTLS when the
server offers it (aiosmtplib's own opportunistic mode would silently stay in cleartext),
then any number of single-recipient transactions. Library errors become ``SMTPReply``
values or ``SessionLost``, which say whether the message may have reached the server.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from recapito.delivery.tls import (
    TLSFacts,
    certificate_verdict,
    client_context,
    presented_chain,
)
from recapito.security.policy import HostVerdict


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

    ``after_data`` is True when the message body had been handed over: the server may
    have accepted it, so the delivery is uncertain and must not be resent blindly.
    """

    def __init__(self, message: str, *, after_data: bool) -> None:
        super().__init__(message)
        self.after_data = after_data


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
        self.tls = TLSFacts(None, None, None)
        self.verdict: HostVerdict | None = None  # set once the host is judged fit to send
        self.sent = 0
        self._smtp: aiosmtplib.SMTP | None = None

    async def open(self, tls_context: ssl.SSLContext | None = None) -> None:
        """Connect, EHLO and, when offered, STARTTLS with ``tls_context``.

        Without a context the legacy-capable one is used (opportunistic delivery).
        """
        smtp = aiosmtplib.SMTP(
            hostname=self.address,
            port=self.port,
            local_hostname=self.helo_name,
            start_tls=False,
            use_tls=False,
            timeout=self.command_timeout,
        )
        try:
            await smtp.connect(timeout=self.connect_timeout)
            await smtp.ehlo()
            self.starttls_offered = smtp.supports_extension("starttls")
            if self.starttls_offered:
                try:
                    await smtp.starttls(
                        tls_context=tls_context or client_context(legacy=True),
                        server_hostname=self.mx_host,
                    )
                except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
                    raise ConnectFailed(
                        f"{self.mx_host}: TLS handshake failed: {exc}", tls_failed=True
                    ) from exc
                ssl_object = smtp.transport.get_extra_info("ssl_object") if smtp.transport else None
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
        except ConnectFailed:
            smtp.close()
            raise
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise ConnectFailed(f"{self.mx_host}: {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            smtp.close()
            raise ConnectFailed(f"{self.mx_host}: {type(exc).__name__}: {exc}") from exc
        self._smtp = smtp

    async def send(
        self,
        sender: str,
        recipient: str,
        data: bytes,
        before_data: Callable[[], object] | None = None,
    ) -> SMTPReply:
        """One transaction. A refusal is a reply; a broken connection raises SessionLost.

        ``before_data`` runs once the recipient is accepted, just before DATA: from then on
        the server may end up with the message whatever happens to the connection.
        """
        smtp = self._smtp
        if smtp is None:
            raise SessionLost("session is not open", after_data=False)
        stage = "mail"
        try:
            await smtp.mail(sender)
            stage = "rcpt"
            await smtp.rcpt(recipient)
            if before_data is not None:
                before_data()
            stage = "data"
            response = await smtp.data(data)
        except aiosmtplib.SMTPServerDisconnected as exc:
            self._smtp = None
            raise SessionLost(f"{self.mx_host}: {exc}", after_data=stage == "data") from exc
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code in (421, -1):
                self._smtp = None
                smtp.close()
                if stage == "data" and exc.code == -1:
                    raise SessionLost(f"{self.mx_host}: {exc.message}", after_data=True) from exc
            else:
                await self._reset()
            self.sent += 1
            return SMTPReply(exc.code, exc.message, stage)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self._smtp = None
            smtp.close()
            raise SessionLost(
                f"{self.mx_host}: {type(exc).__name__}: {exc}", after_data=stage == "data"
            ) from exc
        self.sent += 1
        return SMTPReply(response.code, response.message, "data")

    async def _reset(self) -> None:
        if self._smtp is None:
            return
        try:
            await self._smtp.rset()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self._smtp.close()
            self._smtp = None

    @property
    def level(self) -> str:
        """The host's level: the verdict's (which knows recipient policies) once judged."""
        return self.verdict.level if self.verdict is not None else self.tls.level

    @property
    def is_open(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()
