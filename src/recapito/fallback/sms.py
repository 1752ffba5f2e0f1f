"""SMS: E.164 numbers, Italian text normalisation, segments, the Twilio adapter and its
status callbacks (DESIGN §8).

The adapter is the only module importing ``twilio``; it translates Twilio's errors into
``SmsError`` (hard: next channel; soft: one delayed retry; uncertain: never resent, the
request may have reached Twilio). No automatic POST retries: Twilio has no idempotency key,
so the caller writes its attempt row before ``send`` (``recapito.fallback.sweeper``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

import phonenumbers
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

log = logging.getLogger("recapito.fallback.sms")

# Twilio error codes (DESIGN §8)
HARD_CODES = frozenset({21211, 21610, 21614, 30004, 30005, 30006, 30007, 21408, 21612})
SOFT_CODES = frozenset({30003, 30008, 20429, 429})

# GSM 03.38 basic set and extension table (extension characters take two septets)
_GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXT = "^{}\\[~]|€\f"
_GSM = frozenset(_GSM_BASIC) | frozenset(_GSM_EXT)

# Italian text into GSM-7 where the meaning is kept: capital grave vowels and acute
# vowels outside GSM take the apostrophe spelling Italian keyboards use (PERCHE')
_IT_MAP = str.maketrans(
    {
        "À": "A'",
        "È": "E'",
        "Ì": "I'",
        "Ò": "O'",
        "Ù": "U'",
        "á": "a'",
        "í": "i'",
        "ó": "o'",
        "ú": "u'",
        "Á": "A'",
        "Í": "I'",
        "Ó": "O'",
        "Ú": "U'",
        "‘": "'",
        "’": "'",
        "‚": "'",
        "“": '"',
        "”": '"',
        "„": '"',
        "«": '"',
        "»": '"',
        "–": "-",
        "—": "-",
        "…": "...",
        "\u00a0": " ",
        "\u2009": " ",
        "\t": " ",
    }
)


class SmsError(Exception):
    """A send that did not go: ``kind`` is hard, soft or uncertain; ``code`` Twilio's."""

    def __init__(self, kind: str, code: int | None, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


def classify_code(code: int | None, status: int | None = None) -> str:
    if code in HARD_CODES:
        return "hard"
    if code in SOFT_CODES or status == 429 or (status is not None and status >= 500):
        return "soft"
    if status is not None and 400 <= status < 500:
        return "hard"
    return "soft" if code is not None and 30000 <= code < 31000 else "hard"


# ---- numbers ------------------------------------------------------------------------------


def normalize_phone(raw: str, region: str = "IT", *, require_mobile: bool = True) -> str:
    """E.164 form of ``raw``; ``SmsError('hard', …)`` when invalid or not a mobile number."""
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        raise SmsError("hard", 21211, "not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise SmsError("hard", 21211, "invalid phone number")
    if require_mobile:
        kind = phonenumbers.number_type(number)
        if kind not in (
            phonenumbers.PhoneNumberType.MOBILE,
            phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE,
        ):
            raise SmsError("hard", 21614, "not a mobile number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# ---- text ---------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Italian SMS text: typographic quotes and dashes to ASCII, non-GSM accents spelled."""
    return " ".join(part for part in text.translate(_IT_MAP).split(" ") if part != "").strip()


@dataclass(frozen=True)
class Segments:
    encoding: str  # GSM-7 | UCS-2
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    count: int


def segments(text: str) -> Segments:
    """Segments of ``text``: GSM-7 160 single / 153 each concatenated, UCS-2 70 / 67."""
    if all(c in _GSM for c in text):
        units = sum(2 if c in _GSM_EXT else 1 for c in text)
        single, multi, enc = 160, 153, "GSM-7"
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, multi, enc = 70, 67, "UCS-2"
    count = 1 if units <= single else -(-units // multi)
    return Segments(enc, units, count)


_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


def render_sms(template: str, context: Mapping[str, object], *, max_segments: int = 3) -> str:
    """Render the SMS template (sandboxed Jinja, strict undefined), normalised, capped."""
    text = normalize_text(_ENV.from_string(template).render(**context))
    if not text:
        raise SmsError("hard", None, "empty SMS text")
    seg = segments(text)
    if seg.count > max_segments:
        raise SmsError("hard", None, f"SMS text takes {seg.count} segments (cap {max_segments})")
    return text


# ---- the Twilio adapter -------------------------------------------------------------------


@dataclass(frozen=True)
class SmsSent:
    sid: str
    status: str


@dataclass(frozen=True)
class TwilioSettings:
    account_sid: str
    auth_token: str
    from_number: str
    base_url: str | None = None  # the sandbox's Messages API, e.g. http://127.0.0.1:PORT
    status_callback: str | None = None
    validity_period: int | None = 14400  # seconds Twilio keeps trying the carrier
    timeout: float = 10.0

    def __repr__(self) -> str:  # never the token
        return f"TwilioSettings(account_sid={self.account_sid!r}, base_url={self.base_url!r})"


class TwilioSms:
    """Sends one SMS per ``send`` call through the twilio SDK, with no retries."""

    def __init__(self, settings: TwilioSettings) -> None:
        from twilio.http.http_client import TwilioHttpClient
        from twilio.rest import Client

        self.settings = settings
        http = TwilioHttpClient(timeout=settings.timeout, max_retries=None)
        self.client = Client(settings.account_sid, settings.auth_token, http_client=http)
        if settings.base_url:
            self.client.api.base_url = settings.base_url.rstrip("/")

    def send(self, to: str, body: str, *, reference: str | None = None) -> SmsSent:
        """One POST. ``reference`` (the step id) rides on the status callback URL, so a
        callback that overtakes the recording of the answer still finds its step."""
        from twilio.base.exceptions import TwilioException, TwilioRestException

        kwargs: dict[str, object] = {"to": to, "from_": self.settings.from_number, "body": body}
        if self.settings.status_callback:
            callback = self.settings.status_callback
            if reference is not None:
                sep = "&" if "?" in callback else "?"
                callback = f"{callback}{sep}{urlencode({'ref': reference})}"
            kwargs["status_callback"] = callback
        if self.settings.validity_period:
            kwargs["validity_period"] = self.settings.validity_period
        try:
            msg = self.client.messages.create(**kwargs)
        except TwilioRestException as exc:
            kind = classify_code(exc.code, exc.status)
            raise SmsError(kind, exc.code or exc.status, f"twilio {exc.status}") from None
        except TwilioException as exc:
            raise SmsError("uncertain", None, type(exc).__name__) from None
        except OSError as exc:  # requests' errors derive from OSError
            raise SmsError("uncertain", None, type(exc).__name__) from None
        return SmsSent(str(msg.sid), str(msg.status or "queued"))


# ---- status callbacks ---------------------------------------------------------------------

# Twilio's message statuses in order; a callback never moves a step back
STATUS_RANK = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "failed": 4,
    "undelivered": 4,
    "delivered": 5,
    "read": 6,
}
FINAL_FAILURES = frozenset({"failed", "undelivered"})


def advances(current: str | None, new: str) -> bool:
    """Whether ``new`` moves a message forward from ``current`` (late ``sent`` is ignored)."""
    if new not in STATUS_RANK:
        return False
    if current is None:
        return True
    return STATUS_RANK[new] > STATUS_RANK.get(current, -1)


def signature_valid(auth_token: str, url: str, params: Mapping[str, str], signature: str) -> bool:
    from twilio.request_validator import RequestValidator

    return bool(RequestValidator(auth_token).validate(url, dict(params), signature))


def sign(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """The ``X-Twilio-Signature`` of a callback (the sandbox signs with this)."""
    from twilio.request_validator import RequestValidator

    return str(RequestValidator(auth_token).compute_signature(url, dict(params)))
