"""Twilio webhooks received by the tracking service: status callbacks and inbound replies.

Every request is checked with Twilio's ``RequestValidator`` against the URL Twilio posted
to (``public_url`` when the service sits behind a proxy); a bad signature answers 403.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from recapito.fallback.sms import normalize_phone, signature_valid
from recapito.fallback.sweeper import STOP_WORDS, opt_out, record_sms_status
from recapito.ledger.store import Ledger


@dataclass
class TwilioHook:
    ledger: Ledger
    auth_token: str
    public_url: str | None = None  # the service's external base URL, e.g. https://t.example

    def __repr__(self) -> str:  # never the token
        return f"TwilioHook(public_url={self.public_url!r})"

    def url_for(self, path: str, request_url: str) -> str:
        if self.public_url:
            return self.public_url.rstrip("/") + path
        return request_url

    def verify(self, url: str, params: Mapping[str, str], signature: str) -> bool:
        return bool(signature) and signature_valid(self.auth_token, url, params, signature)

    def status(self, params: Mapping[str, str], ref: str | None = None) -> str:
        sid = params.get("MessageSid") or params.get("SmsSid") or ""
        status = (params.get("MessageStatus") or params.get("SmsStatus") or "").lower()
        code_text = params.get("ErrorCode") or ""
        code = int(code_text) if code_text.isdigit() else None
        if not sid or not status:
            return "malformed"
        step_id = int(ref) if ref and ref.isdigit() else None
        return record_sms_status(self.ledger, sid, status, code, step_id=step_id)

    def inbound(self, params: Mapping[str, str]) -> str:
        body = (params.get("Body") or "").strip().upper()
        sender = params.get("From") or ""
        if body in STOP_WORDS and sender:
            try:
                phone = normalize_phone(sender, require_mobile=False)
            except Exception:
                return "ignored"
            opt_out(self.ledger, phone, source="sms_stop")
            return "opted_out"
        return "ignored"
