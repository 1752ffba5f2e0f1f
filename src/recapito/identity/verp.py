"""Signed VERP return paths: ``bounces+<token>@<bounce domain>`` maps a bounce to its delivery.

The token is ``<delivery id>-<key id>-<mac>``:

- the delivery id in decimal (the ledger's ``deliveries.id``);
- the id of the key that signed it, so keys can be rotated: a keyring holds several keys,
  the first one signs, every one verifies;
- the first 80 bits of HMAC-SHA256(secret, ``recapito-verp-v1 \\0 key id \\0 delivery id``),
  in lowercase base32 (16 characters).

Everything in the token is digits, lowercase letters and ``-``, so an MTA that folds the
local part to lower or upper case does not break it: parsing is case-insensitive, and the
MAC is compared in constant time. A token that does not verify raises ``VerpError``.

Keys come from the settings (never from code): ``RECAPITO_VERP_KEYS="k2:secret,k1:secret"``
or ``RECAPITO_VERP_KEYS_FILE`` (one ``id:secret`` a line, ``#`` comments). With neither, a
random key is generated once and kept in ``$RECAPITO_HOME/secrets/verp-keys`` (mode 0600):
right for one machine and the sandbox; several sending hosts must share an explicit keyring,
or bounces signed on one host would not verify on another.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from recapito.errors import ConfigError, RecapitoError

if TYPE_CHECKING:
    from recapito.config import Settings

DEFAULT_PREFIX = "bounces"
MIN_SECRET_LENGTH = 16
_MAC_BYTES = 10  # 80 bits: 16 base32 characters
_CONTEXT = b"recapito-verp-v1"
_KEY_ID = re.compile(r"^[a-z0-9]{1,16}$")
_TOKEN = re.compile(r"^([0-9]{1,20})-([a-z0-9]{1,16})-([a-z2-7]{16})$")
GENERATED_KEYS_FILE = Path("secrets") / "verp-keys"


class VerpError(RecapitoError):
    """A return path that is not one of ours: malformed, unknown key, or a forged MAC."""


@dataclass(frozen=True)
class VerpKeyring:
    """Key id -> secret, in order: the first key signs, every key verifies."""

    keys: tuple[tuple[str, bytes], ...] = field(repr=False)
    source: str = "settings"  # where the keys came from (for messages; never the secrets)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("VERP keyring: no keys")
        seen: set[str] = set()
        for key_id, secret in self.keys:
            if not _KEY_ID.match(key_id):
                raise ConfigError(
                    f"VERP key id {key_id!r} ({self.source}): use 1-16 lowercase letters or digits"
                )
            if key_id in seen:
                raise ConfigError(f"VERP key id {key_id!r} ({self.source}): listed twice")
            if len(secret) < MIN_SECRET_LENGTH:
                raise ConfigError(
                    f"VERP key {key_id!r} ({self.source}): the secret must be at least "
                    f"{MIN_SECRET_LENGTH} characters"
                )
            seen.add(key_id)

    def __repr__(self) -> str:
        return f"VerpKeyring(key_ids={list(self.key_ids)!r}, source={self.source!r})"

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.keys)

    @property
    def signing_key_id(self) -> str:
        return self.keys[0][0]

    def secret(self, key_id: str) -> bytes | None:
        for kid, secret in self.keys:
            if kid == key_id:
                return secret
        return None

    @classmethod
    def parse(cls, text: str, source: str = "settings") -> VerpKeyring:
        """``id:secret`` entries separated by commas or new lines (``#`` lines are comments)."""
        entries: list[tuple[str, bytes]] = []
        lines = (line.strip() for line in text.splitlines())
        for item in (
            i.strip() for line in lines if not line.startswith("#") for i in line.split(",")
        ):
            if not item:
                continue
            key_id, sep, secret = item.partition(":")
            if not sep or not secret.strip():
                raise ConfigError(f"VERP keys ({source}): expected id:secret entries")
            entries.append((key_id.strip().lower(), secret.strip().encode("utf-8")))
        return cls(tuple(entries), source)

    @classmethod
    def from_settings(cls, settings: Settings) -> VerpKeyring:
        """The keyring the settings name, or the generated one under the recapito home."""
        if settings.verp_keys:
            return cls.parse(settings.verp_keys, "RECAPITO_VERP_KEYS")
        if settings.verp_keys_file is not None:
            path = settings.verp_keys_file
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"RECAPITO_VERP_KEYS_FILE={path}: unreadable ({exc})") from exc
            return cls.parse(text, f"RECAPITO_VERP_KEYS_FILE={path}")
        return cls.generated(settings.home)

    @classmethod
    def generated(cls, home: Path, name: Path = GENERATED_KEYS_FILE) -> VerpKeyring:
        """The keyring kept in ``home/name`` (default ``secrets/verp-keys``); created
        (mode 0600) if absent. Other HMAC keyrings (tracking tokens) use their own ``name``.

        Creation is atomic (hard link of a complete file): processes that start at once all
        end up with the same key.
        """
        path = home / name
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key_id = "g" + secrets.token_hex(3)
            text = (
                f"# recapito {path.name} (generated): id:secret lines; the first one signs.\n"
                f"{key_id}:{secrets.token_urlsafe(32)}\n"
            )
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(text)
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)  # someone else's file, if they were first
            finally:
                tmp.unlink(missing_ok=True)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable VERP keys ({exc})") from exc
        return cls.parse(text, str(path))


def _mac(secret: bytes, key_id: str, delivery: str) -> str:
    digest = hmac.new(
        secret, b"\0".join((_CONTEXT, key_id.encode(), delivery.encode())), hashlib.sha256
    ).digest()
    return base64.b32encode(digest[:_MAC_BYTES]).decode("ascii").lower()


def verp_token(delivery_id: int, keyring: VerpKeyring) -> str:
    if delivery_id < 0:
        raise ValueError("a delivery id is not negative")
    key_id, secret = keyring.keys[0]
    delivery = str(delivery_id)
    return f"{delivery}-{key_id}-{_mac(secret, key_id, delivery)}"


def verp_address(
    delivery_id: int, keyring: VerpKeyring, domain: str, prefix: str = DEFAULT_PREFIX
) -> str:
    """The signed return path of one delivery, e.g. ``bounces+42-k1-abcd…@bank.example``."""
    return f"{prefix}+{verp_token(delivery_id, keyring)}@{domain.lower()}"


def parse_verp(address: str, keyring: VerpKeyring, prefix: str | None = DEFAULT_PREFIX) -> int:
    """The delivery id a signed return path stands for; ``VerpError`` when it does not verify.

    Accepts ``<…>`` brackets and any letter case. ``prefix`` None accepts any local part
    before the ``+`` (a bounce domain shared by several prefixes).
    """
    text = address.strip().removeprefix("<").removesuffix(">").strip().lower()
    local, at, _domain = text.rpartition("@")
    if not at:
        local = text
    base, plus, token = local.partition("+")
    if not plus:
        raise VerpError(f"{address!r}: not a VERP address (no '+' in the local part)")
    if prefix is not None and base != prefix.lower():
        raise VerpError(f"{address!r}: not a VERP address (local part is not {prefix}+…)")
    match = _TOKEN.match(token)
    if match is None:
        raise VerpError(f"{address!r}: malformed VERP token")
    delivery, key_id, mac = match.groups()
    secret = keyring.secret(key_id)
    if secret is None:
        raise VerpError(f"{address!r}: VERP token signed with unknown key {key_id!r}")
    if not hmac.compare_digest(mac, _mac(secret, key_id, delivery)):
        raise VerpError(f"{address!r}: VERP token does not verify (forged or altered)")
    return int(delivery)


def delivery_from_return_path(
    address: str, keyring: VerpKeyring, prefix: str | None = DEFAULT_PREFIX
) -> int | None:
    """``parse_verp`` that returns None instead of raising (for correlation chains)."""
    try:
        return parse_verp(address, keyring, prefix)
    except VerpError:
        return None


def keyring_from_entries(entries: Iterable[tuple[str, str]], source: str = "code") -> VerpKeyring:
    """A keyring from (id, secret) pairs (tests and Prefect blocks)."""
    return VerpKeyring(tuple((k.lower(), s.encode("utf-8")) for k, s in entries), source)
