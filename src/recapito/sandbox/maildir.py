"""Where the sandbox MX servers put what they accept, and how tests read it back.

Layout: ``<root>/<recipient domain>/{tmp,new,cur}``, one file per accepted recipient. Files are
written to ``tmp`` and renamed into ``new`` (the Maildir protocol), so a reader never sees a
half-written message. The message is stored with the bytes it had on the wire (CRLF line ends,
dots already unstuffed) after four trace headers the MX server adds in front:

    Return-Path: <envelope sender>
    Delivered-To: <envelope recipient>
    X-Sandbox-MX: <MX host name>
    X-Sandbox-TLS: <TLS version, e.g. TLSv1.3, or "none">
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

_UNSAFE = re.compile(r"[^a-z0-9._-]")
# Enough to hold the header block of anything the product sends; a longer header block is
# read in full anyway, this only sizes the first read.
_HEADER_PROBE = 16384


def domain_dir_name(address: str) -> str:
    """The directory name for a recipient address: its domain, lowercased and path-safe."""
    domain = address.rpartition("@")[2].strip().lower().rstrip(".")
    safe = _UNSAFE.sub("_", domain).lstrip(".")
    return safe or "_unknown"


class MaildirWriter:
    """Stores messages in per-domain Maildirs; one instance per MX server process."""

    def __init__(self, root: Path, tag: str) -> None:
        self.root = root
        # The tag ends every file name; the MX host name makes it unique across servers.
        self._tag = _UNSAFE.sub("_", tag.lower()) or "sandbox"
        self._pid = os.getpid()
        self._counter = itertools.count(1)
        self._ready: set[str] = set()

    def _domain_dir(self, domain: str) -> Path:
        path = self.root / domain
        if domain not in self._ready:
            for sub in ("tmp", "new", "cur"):
                (path / sub).mkdir(parents=True, exist_ok=True)
            self._ready.add(domain)
        return path

    def unique_name(self) -> str:
        now = time.time()
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micros:06d}P{self._pid}Q{next(self._counter)}.{self._tag}"

    def deliver(self, recipient: str, prefix: bytes, content: bytes) -> Path:
        """Store ``prefix + content`` for ``recipient``; return the final path under ``new``."""
        domain = domain_dir_name(recipient)
        try:
            return self._write(self._domain_dir(domain), prefix, content)
        except FileNotFoundError:
            # Someone removed the folders under a running server (a test cleaning up):
            # create them again and retry once.
            self._ready.discard(domain)
            return self._write(self._domain_dir(domain), prefix, content)

    def _write(self, folder: Path, prefix: bytes, content: bytes) -> Path:
        name = self.unique_name()
        tmp_path = folder / "tmp" / name
        final = folder / "new" / name
        with open(tmp_path, "xb") as handle:
            handle.write(prefix)
            handle.write(content)
        os.rename(tmp_path, final)
        return final


def trace_headers(mail_from: str, recipient: str, mx_host: str, tls: str) -> bytes:
    """The header lines an MX server puts in front of a stored message."""
    return (
        f"Return-Path: <{mail_from}>\r\n"
        f"Delivered-To: {recipient}\r\n"
        f"X-Sandbox-MX: {mx_host}\r\n"
        f"X-Sandbox-TLS: {tls}\r\n"
    ).encode("utf-8", "surrogateescape")


# -- reading back ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredMessage:
    """One message as an MX server stored it for one recipient.

    ``headers`` maps lowercased header names to the first value of that header (decoded from
    RFC 2047 if needed); ``header_list`` keeps every header in file order.
    """

    domain: str
    path: Path
    delivered_to: str
    return_path: str
    message_id: str | None
    x_sandbox_mx: str
    x_sandbox_tls: str
    headers: dict[str, str] = field(repr=False)
    header_list: tuple[tuple[str, str], ...] = field(repr=False)

    @property
    def delivery_id(self) -> str | None:
        """The ``X-Recapito-Delivery`` header the product puts on every message."""
        return self.headers.get("x-recapito-delivery")

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


def _read_header_block(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(_HEADER_PROBE)
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            more = handle.read(_HEADER_PROBE)
            if not more:
                break
            data += more
    return data


def _decoded(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def parse_stored(path: Path, domain: str) -> StoredMessage:
    block = _read_header_block(path)
    message = BytesHeaderParser(policy=compat32).parsebytes(block)
    pairs = tuple((k, _decoded(str(v)).strip()) for k, v in message.items())
    headers: dict[str, str] = {}
    for key, value in pairs:
        headers.setdefault(key.lower(), value)
    return_path = headers.get("return-path", "")
    return StoredMessage(
        domain=domain,
        path=path,
        delivered_to=headers.get("delivered-to", ""),
        return_path=return_path.removeprefix("<").removesuffix(">"),
        message_id=headers.get("message-id"),
        x_sandbox_mx=headers.get("x-sandbox-mx", ""),
        x_sandbox_tls=headers.get("x-sandbox-tls", ""),
        headers=headers,
        header_list=pairs,
    )


def iter_maildirs(root: Path) -> Iterator[StoredMessage]:
    """Every stored message under ``root`` (``new`` and ``cur``), domain by domain."""
    if not root.is_dir():
        return
    for domain_path in sorted(p for p in root.iterdir() if p.is_dir()):
        for sub in ("new", "cur"):
            folder = domain_path / sub
            if not folder.is_dir():
                continue
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.is_file() and not entry.name.startswith("."):
                    yield parse_stored(Path(entry.path), domain_path.name)


def read_maildirs(root: Path) -> list[StoredMessage]:
    """All stored messages under the Maildir root (``Sandbox.maildir_root``)."""
    return list(iter_maildirs(root))
