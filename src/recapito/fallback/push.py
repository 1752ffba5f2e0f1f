"""Push through FCM HTTP v1 (DESIGN §8): the adapter, the device-token registry, the channel.

``POST {endpoint}/v1/projects/{project}/messages:send`` with ``Authorization: Bearer`` from
a pluggable token provider (a callable: Google's service-account flow in production, a
fixed string for the sandbox). FCM's answers map to the sweeper's error kinds:
``UNREGISTERED`` (404) and an invalid token (400) are hard and the token is invalidated in
the registry; ``UNAVAILABLE``/``INTERNAL``/``QUOTA_EXCEEDED`` (5xx, 429) are soft. No
automatic retries (the sweeper's one delayed retry is the only one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import sqlalchemy as sa

from recapito.fallback.sms import SmsError
from recapito.fallback.sweeper import ChannelResult, StepRow
from recapito.ledger.schema import device_tokens
from recapito.ledger.store import Ledger, utcnow

DEFAULT_ENDPOINT = "https://fcm.googleapis.com"


class PushError(SmsError):
    """A push that did not go (the sweeper treats it as any channel error)."""


@dataclass(frozen=True)
class PushSent:
    name: str  # FCM's message name, projects/{project}/messages/{id}


def _fcm_error(resp: httpx.Response) -> tuple[str, str]:
    """FCM's error code (UNREGISTERED, INVALID_ARGUMENT…) and the status."""
    try:
        body: Any = resp.json()
    except ValueError:
        return "", ""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    status = str(error.get("status", ""))
    for detail in error.get("details", []) or []:
        if isinstance(detail, dict) and detail.get("errorCode"):
            return str(detail["errorCode"]), status
    return status, status


class FcmPush:
    def __init__(
        self,
        project_id: str,
        token_provider: Callable[[], str],
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = f"{endpoint.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self.token_provider = token_provider
        self.client = httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        self.client.close()

    def send(
        self, token: str, title: str, body: str, data: Mapping[str, str] | None = None
    ) -> PushSent:
        message: dict[str, Any] = {"token": token, "notification": {"title": title, "body": body}}
        if data:
            message["data"] = dict(data)
        try:
            resp = self.client.post(
                self.url,
                json={"message": message},
                headers={"Authorization": f"Bearer {self.token_provider()}"},
            )
        except httpx.ConnectError:
            raise PushError("soft", None, "FCM unreachable") from None
        except httpx.HTTPError as exc:
            raise PushError("uncertain", None, type(exc).__name__) from None
        if resp.status_code == 200:
            return PushSent(str(resp.json().get("name", "")))
        code, _status = _fcm_error(resp)
        if code == "UNREGISTERED" or resp.status_code == 404:
            raise PushError("hard", resp.status_code, "UNREGISTERED")
        if resp.status_code in (429, 500, 502, 503, 504) or code in (
            "UNAVAILABLE",
            "INTERNAL",
            "QUOTA_EXCEEDED",
        ):
            raise PushError("soft", resp.status_code, code or "unavailable")
        raise PushError("hard", resp.status_code, code or f"http {resp.status_code}")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class DeviceRegistry:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def register(self, contact_id: str, token: str, platform: str = "android") -> None:
        """Add (or re-activate, for this contact) a device token."""
        now = utcnow()
        h = _hash(token)
        with self.ledger.engine.begin() as conn:
            updated = conn.execute(
                device_tokens.update()
                .where(device_tokens.c.token_hash == h)
                .values(contact_id=contact_id, platform=platform, state="active", updated_at=now)
            ).rowcount
            if not updated:
                conn.execute(
                    device_tokens.insert().values(
                        contact_id=contact_id,
                        token=token,
                        token_hash=h,
                        platform=platform,
                        state="active",
                        created_at=now,
                        updated_at=now,
                    )
                )

    def active(self, contact_id: str) -> list[str]:
        with self.ledger.engine.connect() as conn:
            rows = conn.execute(
                sa.select(device_tokens.c.token)
                .where(device_tokens.c.contact_id == contact_id, device_tokens.c.state == "active")
                .order_by(device_tokens.c.updated_at.desc())
            ).all()
        return [str(r[0]) for r in rows]

    def invalidate(self, token: str, reason: str) -> bool:
        with self.ledger.engine.begin() as conn:
            return bool(
                conn.execute(
                    device_tokens.update()
                    .where(device_tokens.c.token_hash == _hash(token))
                    .values(state="invalid", reason=reason[:64], updated_at=utcnow())
                ).rowcount
            )


class PushChannel:
    """The ``push`` channel: every active device of the contact; invalid tokens dropped.

    Sent when at least one device took it; hard when the contact has no (valid) device left.
    """

    def __init__(self, ledger: Ledger, fcm: FcmPush, title: str, body: str) -> None:
        self.registry = DeviceRegistry(ledger)
        self.fcm = fcm
        self.title = title
        self.body = body

    def send(self, step: StepRow) -> ChannelResult:
        tokens = self.registry.active(step.contact_id)
        if not tokens:
            raise PushError("hard", None, "no device token")
        names: list[str] = []
        soft: PushError | None = None
        for token in tokens:
            try:
                names.append(self.fcm.send(token, self.title, self.body).name)
            except PushError as exc:
                if exc.kind == "hard":
                    self.registry.invalidate(token, str(exc))
                elif soft is None:
                    soft = exc
        if names:
            # FCM has no delivery receipts: accepted by FCM is as far as it goes
            return ChannelResult(names[0][-64:], "accepted", final=True)
        if soft is not None:
            raise soft
        raise PushError("hard", 404, "UNREGISTERED")
