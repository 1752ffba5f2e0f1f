"""One sweep over every campaign with a fallback policy (the sweeper flow's core).

A campaign's policy is its ``fallback_policy`` parameter, else the default given (the
``RECAPITO_FALLBACK_POLICY`` setting). Its primary deliveries are enrolled (phones from the
audience snapshot's ``phone`` column), then its due steps are swept with its own policy.

Twilio settings (environment, or the sandbox's settings file through ``Settings``):
``RECAPITO_TWILIO_ACCOUNT_SID``, ``RECAPITO_TWILIO_AUTH_TOKEN`` (secret, never logged; the
tasks layer may read it from a Prefect Secret block instead), ``RECAPITO_TWILIO_FROM``,
``RECAPITO_TWILIO_BASE_URL`` (the sandbox API), ``RECAPITO_SMS_VALIDITY`` (seconds);
status callbacks go to ``$RECAPITO_TRACKING_URL/twilio/status``. Without an SID and a
token the ``sms`` steps stay due.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from recapito.campaign import campaign_dir
from recapito.config import Settings, sandbox_settings_path
from recapito.fallback.callbacks import TwilioHook
from recapito.fallback.policy import Policy, PolicyError, parse_policy
from recapito.fallback.push import DEFAULT_ENDPOINT, FcmPush, PushChannel
from recapito.fallback.sms import TwilioSettings, TwilioSms
from recapito.fallback.sweeper import (
    ChannelSender,
    PaperQueue,
    SmsChannel,
    Sweeper,
    enroll,
    funnel,
)
from recapito.ledger.store import Ledger

DEFAULT_SMS_TEMPLATE = (
    "Banca: abbiamo per lei una comunicazione che non siamo riusciti a recapitare via e-mail. "
    "Riceverà una lettera. Rif. {{ contact_id }}"
)


def twilio_settings(
    env: Mapping[str, str] | None = None,
    *,
    tracking_url: str | None = None,
    auth_token: str | None = None,
) -> TwilioSettings | None:
    if env is None:
        env = {**_sandbox_values(), **os.environ}
    sid = env.get("RECAPITO_TWILIO_ACCOUNT_SID", "").strip()
    token = auth_token or env.get("RECAPITO_TWILIO_AUTH_TOKEN", "").strip()
    if not sid or not token:
        return None
    validity = env.get("RECAPITO_SMS_VALIDITY", "").strip()
    return TwilioSettings(
        account_sid=sid,
        auth_token=token,
        from_number=env.get("RECAPITO_TWILIO_FROM", "").strip() or "Banca",
        base_url=env.get("RECAPITO_TWILIO_BASE_URL", "").strip() or None,
        status_callback=f"{tracking_url.rstrip('/')}/twilio/status" if tracking_url else None,
        validity_period=int(validity) if validity.isdigit() else 14400,
    )


def fcm_push(env: Mapping[str, str] | None = None) -> FcmPush | None:
    """FCM from ``RECAPITO_FCM_PROJECT``, ``RECAPITO_FCM_ENDPOINT`` and a bearer token in
    ``RECAPITO_FCM_TOKEN`` (production plugs Google's OAuth flow in as the provider)."""
    env = os.environ if env is None else env
    project = env.get("RECAPITO_FCM_PROJECT", "").strip()
    token = env.get("RECAPITO_FCM_TOKEN", "").strip()
    if not project or not token:
        return None
    endpoint = env.get("RECAPITO_FCM_ENDPOINT", "").strip() or DEFAULT_ENDPOINT
    return FcmPush(project, lambda: token, endpoint=endpoint)


def twilio_hook(ledger: Ledger, public_url: str | None = None) -> TwilioHook | None:
    """The tracking service's Twilio webhooks, when a Twilio auth token is configured
    (signatures are checked against ``public_url`` + path when the service is proxied)."""
    settings = twilio_settings()
    if settings is None:
        return None
    return TwilioHook(ledger, settings.auth_token, public_url=public_url)


def _sandbox_values() -> dict[str, str]:
    """RECAPITO_TWILIO_* / RECAPITO_SMS_* from the sandbox's settings file, if it runs."""
    path = sandbox_settings_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(k): str(v)
        for k, v in data.items()
        if str(k).startswith(("RECAPITO_TWILIO_", "RECAPITO_SMS_"))
    }


def _phones(audience: Path) -> dict[str, str | None]:
    if not audience.exists():
        return {}
    import polars as pl

    cols = pl.read_parquet_schema(audience)
    if "phone" not in cols or "contact_id" not in cols:
        return {}
    frame = pl.read_parquet(audience, columns=["contact_id", "phone"])
    return {str(r["contact_id"]): r["phone"] for r in frame.iter_rows(named=True)}


def campaign_policy(params: Mapping[str, Any], default: str | None) -> Policy | None:
    text = params.get("fallback_policy") or default
    if not text:
        return None
    try:
        return parse_policy(str(text))
    except PolicyError as exc:
        raise PolicyError(f"fallback policy of the campaign: {exc}") from None


def sweep_all(
    ledger: Ledger,
    *,
    settings: Settings,
    default_policy: str | None = None,
    twilio: TwilioSettings | None = None,
    sms_template: str = DEFAULT_SMS_TEMPLATE,
    fcm: FcmPush | None = None,
    push_title: str = "Banca",
    push_body: str = "Abbiamo una comunicazione per lei: la trova nell'app.",
    campaign: str | None = None,
    now: datetime | None = None,
) -> dict[str, dict[str, int]]:
    """Enrol and sweep each campaign with a policy; returns counts per campaign."""
    senders: dict[str, ChannelSender] = {"paper": PaperQueue()}
    if twilio is not None:
        senders["sms"] = SmsChannel(ledger, TwilioSms(twilio), sms_template)
    if fcm is not None:
        senders["push"] = PushChannel(ledger, fcm, push_title, push_body)
    out: dict[str, dict[str, int]] = {}
    for camp in ledger.list_campaigns():
        if campaign is not None and camp.name != campaign:
            continue
        policy = campaign_policy(camp.params, default_policy)
        if policy is None:
            continue
        audience = campaign_dir(settings, camp.name) / "audience.parquet"
        enrolled = enroll(ledger, camp.id, policy, _phones(audience), now=now)
        counts = Sweeper(ledger, policy, senders, campaign_id=camp.id).sweep(now)
        if enrolled:
            counts["enrolled"] = enrolled
        out[camp.name] = counts
    return out


def funnel_rows(ledger: Ledger, campaign: str | None = None) -> list[dict[str, Any]]:
    """The fallback funnel per campaign and channel (due → sent → delivered / failed)."""
    rows: list[dict[str, Any]] = []
    for camp in ledger.list_campaigns():
        if campaign is not None and camp.name != campaign:
            continue
        for channel, states in sorted(funnel(ledger, camp.id).items()):
            rows.append({"campaign": camp.name, "channel": channel, **states})
    return rows
