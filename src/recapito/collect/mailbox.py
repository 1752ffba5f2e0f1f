"""A collector mailbox over IMAP: poll, hand each message to a handler, file it away.

The only module that imports ``imapclient``. Reused by every collector (bounces now, PEC
receipts later): the caller supplies a ``handler`` that turns one message's raw bytes into a
``Disposition`` (archive or quarantine); the poller

1. connects with implicit TLS (993 style) or STARTTLS, always verifying the certificate
   (system trust store plus ``ca_file``), and logs in (the password is never logged);
2. creates the archive and quarantine folders when missing;
3. searches the folder for unseen, undeleted messages (UIDs), and fetches them in batches
   of ``batch_size`` with ``BODY.PEEK[]`` (so nothing is marked seen before it is filed);
   a message larger than ``max_bytes`` is not fetched at all and goes to quarantine;
4. calls the handler for each message; a handler error quarantines that message only
   (one bad message never stops the loop), except ``TransientError``, which ends the poll
   and leaves the rest of the mailbox for the next one;
5. after each batch moves the messages to their folders (``MOVE``, or ``COPY`` +
   ``\\Deleted`` + ``UID EXPUNGE`` on servers without it).

Idempotency is the handler's job (the bounce handler keys messages by SHA-256 in the
ledger): a crash between the handler's commit and the MOVE leaves the message in the folder,
and the next poll finds it already recorded and only moves it.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from recapito import config
from recapito.errors import ConfigError, TransientError

log = logging.getLogger(__name__)

Security = Literal["tls", "starttls"]
Disposition = Literal["archive", "quarantine"]

DEFAULT_ARCHIVE = "recapito-archive"
DEFAULT_QUARANTINE = "recapito-quarantine"
DEFAULT_BATCH = 200
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class MailboxSettings:
    """Where a collector mailbox is and how to reach it. ``password`` is a secret."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    security: Security = "tls"
    ca_file: Path | None = None
    folder: str = "INBOX"
    archive_folder: str = DEFAULT_ARCHIVE
    quarantine_folder: str = DEFAULT_QUARANTINE
    batch_size: int = DEFAULT_BATCH
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = DEFAULT_TIMEOUT

    @property
    def label(self) -> str:
        """``user@host:port/folder``, for logs and the ledger (never the password)."""
        return f"{self.user}@{self.host}:{self.port}/{self.folder}"

    @classmethod
    def load(cls, prefix: str, env: Mapping[str, str] | None = None) -> MailboxSettings:
        """Settings ``<prefix>_HOST``, ``_PORT``, ``_USER``, ``_PASSWORD``, ``_SECURITY``
        (``tls`` | ``starttls``), ``_CA_FILE`` (default ``RECAPITO_TLS_CA_FILE``),
        ``_FOLDER``, ``_ARCHIVE``, ``_QUARANTINE``, ``_BATCH``, ``_MAX_BYTES``, from the
        environment first, then the sandbox's ``settings.json``."""
        environ = dict(os.environ if env is None else env)
        home = Path(environ.get("RECAPITO_HOME", "var")).resolve()
        merged = {**_sandbox_file(home), **{k: v for k, v in environ.items() if v}}

        def get(name: str, default: str | None = None) -> str | None:
            return merged.get(f"{prefix}_{name}") or default

        host, user, password = get("HOST"), get("USER"), get("PASSWORD")
        missing = [n for n, v in (("HOST", host), ("USER", user), ("PASSWORD", password)) if not v]
        if missing:
            names = ", ".join(f"{prefix}_{n}" for n in missing)
            raise ConfigError(f"collector mailbox not configured: set {names}")
        assert host is not None and user is not None and password is not None
        security = (get("SECURITY", "tls") or "tls").lower()
        if security not in ("tls", "starttls"):
            raise ConfigError(f"{prefix}_SECURITY={security!r}: expected tls or starttls")
        port = _int(get("PORT", "993" if security == "tls" else "143"), f"{prefix}_PORT")
        ca_text = get("CA_FILE") or merged.get("RECAPITO_TLS_CA_FILE")
        ca = Path(ca_text) if ca_text else None
        if ca is not None and not ca.is_file():
            raise ConfigError(f"{prefix}_CA_FILE={ca_text}: no such file")
        return cls(
            host=host,
            port=port,
            user=user,
            password=password,
            security="tls" if security == "tls" else "starttls",
            ca_file=ca,
            folder=get("FOLDER", "INBOX") or "INBOX",
            archive_folder=get("ARCHIVE", DEFAULT_ARCHIVE) or DEFAULT_ARCHIVE,
            quarantine_folder=get("QUARANTINE", DEFAULT_QUARANTINE) or DEFAULT_QUARANTINE,
            batch_size=_int(get("BATCH", str(DEFAULT_BATCH)), f"{prefix}_BATCH"),
            max_bytes=_int(get("MAX_BYTES", str(DEFAULT_MAX_BYTES)), f"{prefix}_MAX_BYTES"),
        )


def _int(text: str | None, name: str) -> int:
    if text is None or not text.isdigit() or int(text) <= 0:
        raise ConfigError(f"{name}={text!r}: expected a positive integer")
    return int(text)


def _sandbox_file(home: Path) -> dict[str, str]:
    path = config.sandbox_settings_path(home)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable sandbox settings ({exc})") from exc
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def tls_context(settings: MailboxSettings) -> ssl.SSLContext:
    """Certificate and host name verified: the system store plus ``ca_file``."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.ca_file is not None:
        ctx.load_verify_locations(cafile=str(settings.ca_file))
    return ctx


@dataclass(frozen=True)
class InboundMessage:
    """One message as fetched: ``raw`` is None when it was too large to fetch."""

    uid: int
    size: int
    raw: bytes | None


@dataclass
class PollStats:
    seen: int = 0  # messages found in the folder
    archived: int = 0
    quarantined: int = 0
    handler_errors: int = 0
    too_large: int = 0
    seconds: float = 0.0
    stopped_early: str | None = None  # why the poll ended before the folder was empty

    def as_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "archived": self.archived,
            "quarantined": self.quarantined,
            "handler_errors": self.handler_errors,
            "too_large": self.too_large,
            "seconds": round(self.seconds, 3),
            "stopped_early": self.stopped_early,
        }


Handler = Callable[[InboundMessage], Disposition]


@contextmanager
def connect(settings: MailboxSettings) -> Iterator[IMAPClient]:
    """A logged-in client; IMAP and network failures become ``TransientError``."""
    ctx = tls_context(settings)
    try:
        client = IMAPClient(
            settings.host,
            port=settings.port,
            ssl=settings.security == "tls",
            ssl_context=ctx,
            timeout=settings.timeout,
        )
    except (OSError, IMAPClientError) as exc:
        raise TransientError(f"IMAP {settings.label}: cannot connect ({exc})") from exc
    try:
        if settings.security == "starttls":
            client.starttls(ctx)
        client.login(settings.user, settings.password)
    except (OSError, IMAPClientError) as exc:
        _close(client)
        # the server's message, never the credentials
        raise TransientError(f"IMAP {settings.label}: login failed ({exc})") from exc
    try:
        yield client
    finally:
        _close(client)


def _close(client: IMAPClient) -> None:
    try:
        client.logout()
    except (OSError, IMAPClientError):
        with suppress(OSError, IMAPClientError):
            client.shutdown()


def ensure_folders(client: IMAPClient, names: Sequence[str]) -> None:
    for name in names:
        if not client.folder_exists(name):
            try:
                client.create_folder(name)
            except IMAPClientError:
                if not client.folder_exists(name):  # created meanwhile by another poller
                    raise


def poll(settings: MailboxSettings, handler: Handler, *, limit: int | None = None) -> PollStats:
    """Process the unseen messages of the folder (at most ``limit``); see the module doc."""
    stats = PollStats()
    started = time.perf_counter()
    try:
        with connect(settings) as client:
            ensure_folders(client, [settings.archive_folder, settings.quarantine_folder])
            client.select_folder(settings.folder)
            uids = sorted(int(u) for u in client.search(["UNSEEN", "UNDELETED"]))
            if limit is not None:
                uids = uids[:limit]
            stats.seen = len(uids)
            moves = client.has_capability("MOVE")
            for i in range(0, len(uids), settings.batch_size):
                batch = uids[i : i + settings.batch_size]
                targets: dict[Disposition, list[int]] = {"archive": [], "quarantine": []}
                try:
                    for message in _fetch(client, batch, settings.max_bytes, stats):
                        targets[_dispose(handler, message, stats)].append(message.uid)
                except TransientError as exc:
                    stats.stopped_early = str(exc)
                    _file(client, settings, targets, moves, stats)
                    raise
                _file(client, settings, targets, moves, stats)
    except (OSError, IMAPClientError) as exc:
        raise TransientError(f"IMAP {settings.label}: {exc}") from exc
    finally:
        stats.seconds = time.perf_counter() - started
    return stats


def _fetch(
    client: IMAPClient, uids: Sequence[int], max_bytes: int, stats: PollStats
) -> Iterator[InboundMessage]:
    sizes = client.fetch(list(uids), ["RFC822.SIZE"])
    small = [u for u in uids if int(sizes.get(u, {}).get(b"RFC822.SIZE", 0)) <= max_bytes]
    for uid in uids:
        if uid not in sizes:
            continue  # expunged meanwhile
        if uid not in small:
            stats.too_large += 1
            yield InboundMessage(uid, int(sizes[uid][b"RFC822.SIZE"]), None)
    if not small:
        return
    bodies = client.fetch(small, ["BODY.PEEK[]"])
    for uid in small:
        data = bodies.get(uid)
        if data is None:
            continue
        raw = data.get(b"BODY[]")
        raw_bytes = bytes(raw) if isinstance(raw, (bytes, bytearray)) else b""
        yield InboundMessage(uid, len(raw_bytes), raw_bytes)


def _dispose(handler: Handler, message: InboundMessage, stats: PollStats) -> Disposition:
    if message.raw is None:
        return "quarantine"
    try:
        return handler(message)
    except TransientError:
        raise
    except Exception as exc:  # one bad message never stops the loop
        stats.handler_errors += 1
        log.warning("message uid %d quarantined: %s: %s", message.uid, type(exc).__name__, exc)
        return "quarantine"


def _file(
    client: IMAPClient,
    settings: MailboxSettings,
    targets: Mapping[Disposition, list[int]],
    moves: bool,
    stats: PollStats,
) -> None:
    for disposition, uids in targets.items():
        if not uids:
            continue
        folder = settings.archive_folder if disposition == "archive" else settings.quarantine_folder
        if moves:
            client.move(uids, folder)
        else:
            client.copy(uids, folder)
            client.delete_messages(uids)
            if client.has_capability("UIDPLUS"):
                client.uid_expunge(uids)
            else:
                client.expunge()
        if disposition == "archive":
            stats.archived += len(uids)
        else:
            stats.quarantined += len(uids)
