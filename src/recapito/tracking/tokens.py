"""Signed tracking tokens: open pixel, click redirect and unsubscribe.

Every token carries the id of the key that signed it and a truncated HMAC-SHA256 over a
context string (the kind of token), the delivery id and, for clicks, the target URL, so:

- a click token can only ever redirect to the URL it was made for (no open redirect);
- an open or click token can never be turned into an unsubscribe token (other context);
- any change to any part gives a token that does not verify: the service answers 404.

Forms (all URL-safe; the MAC is 96 bits):

- open:  ``<key id>.<delivery id>.<mac>`` (base64url MAC, 16 characters)
- click: ``<key id>.<delivery id>.<link index>.<target, base64url>.<mac>``
- unsubscribe: ``<delivery id>-<key id>-<mac>`` with the MAC in lowercase base32
  (20 characters): case-insensitive, so the same token works in the ``mailto:`` local part
  (``unsubscribe+TOKEN@…``) where an MTA may fold the case.

Keys come from the settings (``RECAPITO_TRACKING_KEYS="k2:secret,k1:secret"`` or
``RECAPITO_TRACKING_KEYS_FILE``); with neither, one is generated once in
``$RECAPITO_HOME/secrets/tracking-keys`` (mode 0600) by the same keyring helper as the VERP
keys. The first key signs, every key verifies: add a new key in front to rotate, drop the
old one when its messages no longer matter. Secrets are never logged (the keyring's repr
shows key ids only).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from recapito.errors import ConfigError, RecapitoError
from recapito.identity.verp import VerpKeyring
from recapito.render.links import MAX_TARGET_LENGTH

if TYPE_CHECKING:
    from hashlib import _Hash

    from recapito.config import Settings

GENERATED_KEYS_FILE = Path("secrets") / "tracking-keys"
_MAC_BYTES = 12
_CTX_OPEN = b"recapito-open-v1"
_CTX_CLICK = b"recapito-click-v1"
_CTX_UNSUB = b"recapito-unsub-v1"
_B64 = r"[A-Za-z0-9_-]"
_OPEN = re.compile(rf"^([a-z0-9]{{1,16}})\.([0-9]{{1,18}})\.({_B64}{{16}})$")
_CLICK = re.compile(
    rf"^([a-z0-9]{{1,16}})\.([0-9]{{1,18}})\.([0-9]{{1,4}})\.({_B64}{{1,2800}})\.({_B64}{{16}})$"
)
_UNSUB = re.compile(r"^([0-9]{1,18})-([a-z0-9]{1,16})-([a-z2-7]{20})$")


__all__ = ["MAX_TARGET_LENGTH", "ClickTarget", "TokenError", "TokenSigner", "tracking_keyring"]


class TokenError(RecapitoError):
    """A tracking token that is not one of ours (malformed, unknown key, forged)."""


def tracking_keyring(settings: Settings) -> VerpKeyring:
    """The tracking keyring the settings name, or the generated one under the home."""
    if settings.tracking_keys:
        return VerpKeyring.parse(settings.tracking_keys, "RECAPITO_TRACKING_KEYS")
    if settings.tracking_keys_file is not None:
        path = settings.tracking_keys_file
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"RECAPITO_TRACKING_KEYS_FILE={path}: unreadable ({exc})") from exc
        return VerpKeyring.parse(text, f"RECAPITO_TRACKING_KEYS_FILE={path}")
    return VerpKeyring.generated(settings.home, GENERATED_KEYS_FILE)


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _hmac_states(secret: bytes) -> tuple[_Hash, _Hash]:
    """SHA-256 states with the HMAC inner and outer padded keys absorbed (RFC 2104)."""
    key = hashlib.sha256(secret).digest() if len(secret) > 64 else secret
    key = key.ljust(64, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_B32_PAIRS = [a + b for a in _B32 for b in _B32]  # 10 bits -> two base32 digits
_B32_SHIFTS = tuple(range(110, 10, -10))


def _b32(mac: bytes) -> str:
    """A 12-byte MAC in lowercase base32 without padding (20 characters), as
    ``base64.b32encode(mac).lower().rstrip("=")`` writes it, without its Python loop."""
    number = int.from_bytes(mac + b"\0\0\0", "big")  # 120 bits: 24 digits, 20 used
    return "".join([_B32_PAIRS[(number >> shift) & 1023] for shift in _B32_SHIFTS])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class ClickTarget:
    delivery_id: int
    index: int
    url: str
    key_id: str


class TokenSigner:
    """Makes and checks tracking tokens with one keyring (HMAC states keyed once)."""

    def __init__(self, keyring: VerpKeyring) -> None:
        self.keyring = keyring
        # HMAC-SHA256 as RFC 2104 defines it, from SHA-256 states with the padded key
        # absorbed: copying two hash states is cheaper than copying an ``hmac`` object
        self._keyed = {kid: _hmac_states(secret) for kid, secret in keyring.keys}
        self.signing_key_id = keyring.signing_key_id
        # the signing key's inner states with each fixed prefix (context, key id) absorbed
        inner, self._outer = self._keyed[self.signing_key_id]
        kid = self.signing_key_id.encode()
        self._open_inner, self._click_inner, self._unsub_inner = (inner.copy() for _ in range(3))
        self._open_inner.update(_CTX_OPEN + b"\0" + kid + b"\0")
        self._click_inner.update(_CTX_CLICK + b"\0" + kid + b"\0")
        self._unsub_inner.update(_CTX_UNSUB + b"\0" + kid + b"\0")
        # link target -> NUL + its UTF-8 bytes, and ".<base64url>." (a campaign's links
        # repeat in every message)
        self._targets: dict[str, tuple[bytes, str]] = {}
        self._unsub: tuple[int, str] = (-1, "")  # the last unsubscribe token made

    def __repr__(self) -> str:
        return f"TokenSigner(key_ids={list(self.keyring.key_ids)!r})"

    def _mac(self, key_id: str, *parts: bytes) -> bytes | None:
        keyed = self._keyed.get(key_id)
        if keyed is None:
            return None
        inner = keyed[0].copy()
        inner.update(b"\0".join(parts))
        outer = keyed[1].copy()
        outer.update(inner.digest())
        return outer.digest()[:_MAC_BYTES]

    def _sign(self, prefixed: _Hash, rest: bytes) -> bytes:
        """The MAC with the signing key of a message whose start ``prefixed`` absorbed."""
        inner = prefixed.copy()
        inner.update(rest)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:_MAC_BYTES]

    # ---- open -------------------------------------------------------------------------

    def open_token(self, delivery_id: int) -> str:
        did = str(delivery_id)
        mac = self._sign(self._open_inner, did.encode())
        return f"{self.signing_key_id}.{did}.{_b64(mac)}"

    def verify_open(self, token: str) -> int:
        match = _OPEN.match(token)
        if match is None:
            raise TokenError("malformed open token")
        kid, did, mac = match.groups()
        expected = self._mac(kid, _CTX_OPEN, kid.encode(), did.encode())
        if expected is None or not hmac.compare_digest(_unb64(mac), expected):
            raise TokenError("open token does not verify")
        return int(did)

    # ---- click ------------------------------------------------------------------------

    def click_token(self, delivery_id: int, index: int, url: str) -> str:
        return self.clicker(delivery_id)(index, url)

    def clicker(self, delivery_id: int, prefix: str = "") -> Callable[[int, str], str]:
        """``prefix + click_token(delivery_id, index, url)`` for the links of one message:
        the MAC state with everything up to the delivery id absorbed is made once."""
        did = str(delivery_id)
        state = self._click_inner.copy()
        state.update(did.encode() + b"\0")
        head = f"{prefix}{self.signing_key_id}.{did}."
        targets = self._targets
        outer = self._outer

        def token(index: int, url: str) -> str:
            found = targets.get(url)
            if found is None:
                target = url.encode("utf-8")
                found = (b"\0" + target, f".{_b64(target)}.")
                if len(targets) < 10_000:  # a campaign's links repeat in every message
                    targets[url] = found
            idx = str(index)
            inner = state.copy()
            inner.update(idx.encode() + found[0])
            mac = outer.copy()
            mac.update(inner.digest())
            tag = binascii.b2a_base64(mac.digest()[:_MAC_BYTES], newline=False)
            return head + idx + found[1] + tag.translate(_URLSAFE).decode("ascii")

        return token

    def verify_click(self, token: str) -> ClickTarget:
        match = _CLICK.match(token)
        if match is None:
            raise TokenError("malformed click token")
        kid, did, idx, target_b64, mac = match.groups()
        try:
            target = _unb64(target_b64)
            url = target.decode("utf-8")
        except (binascii.Error, ValueError):
            raise TokenError("malformed click token") from None
        expected = self._mac(kid, _CTX_CLICK, kid.encode(), did.encode(), idx.encode(), target)
        if expected is None or not hmac.compare_digest(_unb64(mac), expected):
            raise TokenError("click token does not verify")
        if not url.lower().startswith(("http://", "https://")):
            raise TokenError("click target is not an http(s) URL")
        return ClickTarget(int(did), int(idx), url, kid)

    # ---- unsubscribe ------------------------------------------------------------------

    def unsubscribe_token(self, delivery_id: int) -> str:
        last_id, last = self._unsub  # headers and body link of one message ask in a row
        if last_id == delivery_id:
            return last
        did = str(delivery_id)
        mac = self._sign(self._unsub_inner, did.encode())
        token = f"{did}-{self.signing_key_id}-{_b32(mac)}"
        self._unsub = (delivery_id, token)
        return token

    def verify_unsubscribe(self, token: str) -> int:
        match = _UNSUB.match(token.strip().lower())
        if match is None:
            raise TokenError("malformed unsubscribe token")
        did, kid, mac = match.groups()
        expected = self._mac(kid, _CTX_UNSUB, kid.encode(), did.encode())
        if expected is None:
            raise TokenError("unsubscribe token signed with an unknown key")
        shown = _b32(expected)
        if not hmac.compare_digest(mac, shown):
            raise TokenError("unsubscribe token does not verify")
        return int(did)


def unsubscribe_token_from_address(address: str) -> str | None:
    """The token of an ``unsubscribe+TOKEN@domain`` address (the mailto: form), or None."""
    local = address.strip().removeprefix("<").removesuffix(">").rpartition("@")[0].lower()
    base, plus, token = local.partition("+")
    return token if plus and base == "unsubscribe" and _UNSUB.match(token) else None
