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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from recapito.errors import ConfigError, RecapitoError
from recapito.identity.verp import VerpKeyring

if TYPE_CHECKING:
    from recapito.config import Settings

GENERATED_KEYS_FILE = Path("secrets") / "tracking-keys"
MAX_TARGET_LENGTH = 2048  # longer link targets are not tracked (left as they are)
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
        self._keyed = {
            kid: hmac.new(secret, digestmod=hashlib.sha256) for kid, secret in keyring.keys
        }
        self.signing_key_id = keyring.signing_key_id
        self._targets: dict[str, str] = {}  # link target -> its base64url form (per campaign)
        self._unsub: tuple[int, str] = (-1, "")  # the last unsubscribe token made

    def __repr__(self) -> str:
        return f"TokenSigner(key_ids={list(self.keyring.key_ids)!r})"

    def _mac(self, key_id: str, *parts: bytes) -> bytes | None:
        keyed = self._keyed.get(key_id)
        if keyed is None:
            return None
        mac = keyed.copy()
        mac.update(b"\0".join(parts))
        return mac.digest()[:_MAC_BYTES]

    def _sign(self, *parts: bytes) -> bytes:
        mac = self._mac(self.signing_key_id, *parts)
        assert mac is not None
        return mac

    # ---- open -------------------------------------------------------------------------

    def open_token(self, delivery_id: int) -> str:
        did = str(delivery_id)
        kid = self.signing_key_id
        return f"{kid}.{did}.{_b64(self._sign(_CTX_OPEN, kid.encode(), did.encode()))}"

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
        did, idx, target = str(delivery_id), str(index), url.encode("utf-8")
        kid = self.signing_key_id
        mac = self._sign(_CTX_CLICK, kid.encode(), did.encode(), idx.encode(), target)
        encoded = self._targets.get(url)
        if encoded is None:
            encoded = _b64(target)
            if len(self._targets) < 10_000:  # a campaign's links repeat in every message
                self._targets[url] = encoded
        return f"{kid}.{did}.{idx}.{encoded}.{_b64(mac)}"

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
        did, kid = str(delivery_id), self.signing_key_id
        mac = self._sign(_CTX_UNSUB, kid.encode(), did.encode())
        token = f"{did}-{kid}-{base64.b32encode(mac).decode('ascii').lower().rstrip('=')}"
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
        shown = base64.b32encode(expected).decode("ascii").lower().rstrip("=")
        if not hmac.compare_digest(mac, shown):
            raise TokenError("unsubscribe token does not verify")
        return int(did)


def unsubscribe_token_from_address(address: str) -> str | None:
    """The token of an ``unsubscribe+TOKEN@domain`` address (the mailto: form), or None."""
    local = address.strip().removeprefix("<").removesuffix(">").rpartition("@")[0].lower()
    base, plus, token = local.partition("+")
    return token if plus and base == "unsubscribe" and _UNSUB.match(token) else None
