"""Bounce parsing: one returned message in, one ``BounceReport`` out.

What is recognised, in this order:

1. ARF complaints (RFC 5965 ``multipart/report; report-type=feedback-report``, or a
   ``message/feedback-report`` part anywhere): reason ``complaint``, never a bounce.
2. DSNs (RFC 3464 / RFC 6522 ``message/delivery-status``, RFC 6533
   ``message/global-delivery-status``, and the same fields when an MTA writes them into a
   text part): one record a recipient group. Only ``Action: failed`` is a bounce;
   ``delayed`` makes a ``delayed_warning``; ``delivered`` / ``relayed`` / ``expanded`` are
   reported but are not failures. A diagnostic text beats a filler ``Status: X.0.0``.
3. Free-text notices of MTAs that ignore the standards (qmail, old Sendmail, Exchange 2003,
   Domino, providers' own wording…): the failed addresses are read from the notice (the
   part before the copy of the returned message), each with the text that follows it.
4. Auto-replies (RFC 3834 ``Auto-Submitted: auto-replied``, ``X-Autoreply``, subjects such
   as "Out of office", "Risposta automatica", "Fuori sede"): never bounces.
5. Anything else: ``not_bounce``.

The parser never raises on bad input (only on empty input): sizes and MIME depth are
capped, so a MIME bomb (deep nesting, huge headers, thousands of parts) costs bounded time
and comes back as whatever could be read of it.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes, message_from_string
from email.header import decode_header, make_header
from email.message import Message
from email.policy import compat32

from recapito.bounces.classify import CONF_PROVIDER, classify, find_status
from recapito.errors import InputError

MAX_BYTES = 1_000_000  # a bounce bigger than this is read up to here
MAX_DEPTH = 8  # MIME nesting followed
MAX_PARTS = 64  # MIME parts looked at
MAX_NOTICE = 20_000  # characters of notice text read
MAX_BOUNDARIES = 200  # more boundary declarations than this: a bomb, read the headers only
MAX_DIAGNOSTIC = 1000


@dataclass(frozen=True)
class BounceRecipient:
    recipient: str | None  # failed address (lowercased), None when unknown
    action: str | None  # failed / delayed / delivered / relayed / expanded
    status: str | None  # enhanced status "5.1.1"
    reply_code: int | None
    diagnostic: str  # remote diagnostic text (may be "")
    reason: str  # one of DESIGN §7 reasons
    permanence: str | None  # "permanent" | "temporary" | None
    scope: str | None  # "recipient" | "domain" | "sender" | "message" | None
    confidence: float  # 0..1
    remote_mta: str | None


@dataclass(frozen=True)
class BounceReport:
    kind: str  # "dsn" | "arf" | "auto_reply" | "delayed_warning" | "free_text" | "not_bounce"
    is_bounce: bool  # True only when some recipient has failed
    recipients: tuple[BounceRecipient, ...]
    mta_family: str | None  # postfix, exim, sendmail, qmail, exchange, gmail, ...
    original_message_id: str | None
    verp_address: str | None  # the To/Delivered-To/X-Original-To of the bounce
    recapito_delivery: str | None  # X-Recapito-Delivery found in returned headers/body
    original_envelope_id: str | None

    @property
    def failed(self) -> tuple[BounceRecipient, ...]:
        return tuple(r for r in self.recipients if r.action == "failed")


# ---- small helpers ------------------------------------------------------------------------

_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
)
_REPLY_WITH_STATUS = re.compile(r"(?<![\d.])([245][0-5]\d)[ -]+\(?#?([245]\.\d{1,3}\.\d{1,3})\b")
_REPLY_AFTER_WORD = re.compile(
    r"(?:said|reply|replied|response|responded|answer|error|returned|smtp|code|status)"
    r"[^\n\d]{0,30}?(?<![\d.])([245][0-5]\d)(?![\d.])",
    re.I,
)
_REPLY_LEADING = re.compile(r"(?m)^[\s<>#(]*([245][0-5]\d)(?:[ -]|$)(?![\d.])")
_MSGID = re.compile(r"<[^<>\s@]+@[^<>\s]+>")
_TAGS = re.compile(r"<(?:script|style)[^>]*>.*?</(?:script|style)>|<[^>]{0,2000}>", re.S | re.I)
_SPACES = re.compile(r"[ \t]+")
_NON_RECIPIENT_LOCAL = re.compile(
    r"^(mailer-daemon|maildaemon|mail-daemon|postmaster|mailerdaemon|noreply|no-reply|"
    r"nobody|abuse|daemon|mailer|mdaemon|root)$",
    re.I,
)


def _header(msg: Message, name: str) -> str:
    value = msg.get(name)
    if value is None:
        return ""
    text = str(value)
    if "=?" in text:
        with contextlib.suppress(Exception):  # a broken encoded word: keep it as it is
            text = str(make_header(decode_header(text)))
    return " ".join(text.split())


def _address_of(value: str) -> str | None:
    match = _ADDRESS.search(value or "")
    return match.group(0).lower() if match else None


def _decode(payload: bytes, charset: str | None) -> str:
    for name in (charset, "utf-8"):
        if not name:
            continue
        try:
            return payload.decode(name)
        except (LookupError, UnicodeDecodeError):
            continue
    return payload.decode("latin-1")


def _part_text(part: Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):  # message/* parsed into blocks of fields
        blocks = []
        for block in payload:
            if isinstance(block, Message):
                fields = "\n".join(f"{k}: {v}" for k, v in block.items())
                body = block.get_payload()
                if isinstance(body, str) and body.strip():
                    fields += "\n\n" + body
                blocks.append(fields)
        return "\n\n".join(blocks)
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        return payload if isinstance(payload, str) else ""
    text = _decode(data[:MAX_BYTES], part.get_content_charset())
    if part.get_content_subtype() == "html":
        text = html.unescape(_TAGS.sub(" ", text))
    return text


def _walk(msg: Message) -> Iterator[tuple[Message, int, bool]]:
    """(part, depth, inside a returned message) for up to MAX_PARTS parts, depth-capped."""
    stack: list[tuple[Message, int, bool]] = [(msg, 0, False)]
    seen = 0
    while stack and seen < MAX_PARTS:
        part, depth, returned = stack.pop()
        seen += 1
        yield part, depth, returned
        if depth >= MAX_DEPTH:
            continue
        payload = part.get_payload()
        if not isinstance(payload, list):
            continue
        ctype = part.get_content_type()
        if ctype in ("message/delivery-status", "message/feedback-report"):
            continue
        inner = returned or ctype in _RETURNED_TYPES
        children = [(p, depth + 1, inner) for p in payload if isinstance(p, Message)]
        stack.extend(reversed(children[:MAX_PARTS]))


_RETURNED_TYPES = frozenset(
    {
        "message/rfc822",
        "message/global",
        "text/rfc822-headers",
        "message/rfc822-headers",
        "message/global-headers",
        "message/partial",
    }
)
_STATUS_TYPES = frozenset(
    {"message/delivery-status", "message/global-delivery-status", "text/delivery-status"}
)


# ---- DSN fields ---------------------------------------------------------------------------


def _field_groups(text: str) -> list[dict[str, str]]:
    """Blocks of ``Name: value`` lines separated by blank lines (continuations folded)."""
    groups: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if current:
                groups.append(current)
            current, last = {}, None
            continue
        if line[0] in " \t" and last is not None:
            current[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if sep and name and " " not in name and len(name) < 40:
            last = name
            if name in current:  # a second value of the same field: keep both
                current[name] += " " + value.strip()
            else:
                current[name] = value.strip()
        else:
            last = None
    if current:
        groups.append(current)
    return groups


def _typed_value(value: str) -> str:
    """``rfc822; user@example.org`` → ``user@example.org``."""
    _, sep, rest = value.partition(";")
    return (rest if sep else value).strip()


_RECIPIENT_FIELDS = ("final-recipient", "original-recipient", "x-actual-recipient")


@dataclass
class _Draft:
    recipient: str | None
    action: str | None = None
    status: str | None = None
    diagnostic: str = ""
    remote_mta: str | None = None
    context: str = ""  # notice text about this recipient
    notice: str = ""  # the whole notice (a last resort for the reason)
    program: bool = False  # Diagnostic-Code of type X-Unix: a local delivery program failed


def _normal_action(value: str | None) -> str | None:
    if not value:
        return None
    word = value.strip().lower().split()[0] if value.strip() else ""
    for action in ("failed", "delayed", "delivered", "relayed", "expanded"):
        if word.startswith(action[:4]):
            return action
    return None


def _dsn_drafts(groups: list[dict[str, str]]) -> list[_Draft]:
    drafts: list[_Draft] = []
    for group in groups:
        if not any(f in group for f in _RECIPIENT_FIELDS):
            continue
        address = None
        for field in _RECIPIENT_FIELDS:
            if field in group:
                address = _address_of(_typed_value(group[field]))
                if address:
                    break
        status = find_status(group.get("status", ""))
        raw_diagnostic = group.get("diagnostic-code", "")
        diagnostic = _typed_value(raw_diagnostic)
        remote = group.get("remote-mta", "")
        drafts.append(
            _Draft(
                recipient=address,
                action=_normal_action(group.get("action")),
                status=status,
                diagnostic=" ".join(diagnostic.split()),
                remote_mta=_typed_value(remote).strip(" []").lower() or None if remote else None,
                program=raw_diagnostic[:6].lower() == "x-unix",
            )
        )
    return drafts


# ---- the notice (the human-readable part) -------------------------------------------------

_COPY_MARKER = re.compile(
    r"(?im)^[ \t>|*#=_-]*(?:"
    r"-+ ?(?:original message|the original message|below this line is a copy of the message"
    r"|message header follows|original message headers?|returned message)"
    r"|below this line is a copy of the message"
    r"|------ this is a copy of the message"
    r"|-+ ?(?:original|returned|unsent|undelivered) (?:message|mail)"
    r"|(?:original|returned|unsent|undelivered) message (?:follows|below|header|headers|text)"
    r"|the (?:original|returned|first \S+ lines of the) message(?! was (?:received|sent))"
    r"|(?:content|header|headers) of (?:the )?(?:original|returned) (?:message|mail)"
    r"|messaggio originale|copia del messaggio|intestazioni del messaggio originale"
    r"|bounced e-?mail:"
    r")"
)
_HEADER_NAMES = (
    r"(?:return-path|received|message-id|date|from|to|subject|mime-version|"
    r"dkim-signature|content-type|reply-to|x-[a-z0-9-]+)"
)
# three header fields in a row (continuation lines allowed): the returned copy begins
_HEADER_BLOCK = re.compile(
    rf"(?im)^{_HEADER_NAMES}:[^\n]*\n(?:[ \t][^\n]*\n)*"
    rf"{_HEADER_NAMES}:[^\n]*\n(?:[ \t][^\n]*\n)*"
    rf"(?:{_HEADER_NAMES}|[ \t])"
)


def _split_notice(text: str) -> tuple[str, str]:
    """(notice, copy of the returned message) of a free-text body."""
    cut = len(text)
    marker = _COPY_MARKER.search(text)
    if marker is not None:
        cut = marker.start()
    block = _HEADER_BLOCK.search(text, 0, cut + 1)
    if block is not None and block.start() > 0:
        cut = min(cut, block.start())
    return text[:cut], text[cut:]


# ---- families and providers ---------------------------------------------------------------

_FAMILY_SIGNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "gmail",
        re.compile(r"mail delivery subsystem <mailer-daemon@(?:googlemail|google)\.com"),
    ),
    (
        "exim",
        re.compile(
            r"^x-failed-recipients:|\bexim\b|"
            r"this message was created automatically by mail delivery software",
            re.M,
        ),
    ),
    ("postfix", re.compile(r"this is the mail system at host|^x-postfix|\bpostfix\b", re.M)),
    ("qmail", re.compile(r"this is the qmail-send program|\bqmail\b")),
    (
        "exchange",
        re.compile(
            r"^x-ms-exchange|msexch|microsoft exchange|^x-mimeole: produced by microsoft exchange",
            re.M,
        ),
    ),
    ("sendmail", re.compile(r"transcript of session follows|\bsendmail\b")),
    ("domino", re.compile(r"lotus domino|\bdomino\b|x-notes")),
    ("courier", re.compile(r"courier mail server|\bcourier\b")),
    ("opensmtpd", re.compile(r"this is the mailer-daemon at|opensmtpd")),
    ("yahoo", re.compile(r"yahoo")),
    ("outlook", re.compile(r"outlook\.com|hotmail|live\.com|msn\.com")),
    ("amazonses", re.compile(r"amazonses|amazon ses")),
)
_PROVIDERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("google", re.compile(r"google|gmail|1e100\.net", re.I)),
    (
        "microsoft",
        re.compile(r"outlook|hotmail|protection\.outlook|exchangelabs|live\.com|msn\.com", re.I),
    ),
    ("yahoo", re.compile(r"yahoo|\baol\b|aol\.com|yahoodns", re.I)),
    ("apple", re.compile(r"icloud|\bme\.com|mac\.com|apple", re.I)),
)


def _family(msg: Message, sample: str) -> str | None:
    probe = ("\n".join(f"{k}: {v}" for k, v in msg.items())[:6000] + "\n" + sample[:6000]).lower()
    for name, pattern in _FAMILY_SIGNS:
        if pattern.search(probe):
            return name
    return None


def _provider(remote_mta: str | None, family: str | None, diagnostic: str) -> str | None:
    probe = f"{remote_mta or ''} {family or ''} {diagnostic[:300]}"
    for name, pattern in _PROVIDERS:
        if pattern.search(probe):
            return name
    return None


# ---- auto-replies and notices -------------------------------------------------------------

_AUTO_SUBJECT = re.compile(
    r"^\s*(?:re:\s*)?(?:auto(?:matic)?[ -]?(?:reply|response|antwort|risposta)|autoreply"
    r"|out of (?:the )?office|away from|on vacation|vacation|i am away|i'm away|abwesenheit"
    r"|risposta automatica|fuori (?:sede|ufficio)|assente|in ferie|absence|r[ée]ponse automatique"
    r"|respuesta autom[aá]tica|away until)",
    re.I,
)
_NDR_SUBJECT = re.compile(
    r"undeliver|undelivered|returned mail|return(?:ed)? to sender|failure notice|"
    r"delivery (?:status|failure|failed|notification|problem|report)|mail delivery|"
    r"could not be delivered|"
    r"non ?recapitabil|mancato recapito|impossibile recapitare|errore di consegna|"
    r"nondeliverable|non-delivery|not delivered|bounce|rejected|failed|warning|delayed|"
    r"message status|notification",
    re.I,
)
_DAEMON_FROM = re.compile(
    r"mailer-daemon|mail-daemon|postmaster|mail delivery|maildaemon|mailerdaemon|"
    r"bounce|administrator|system administrator|notification",
    re.I,
)
_DELAY_WORDS = re.compile(
    r"(?:has|have) not (?:yet )?been delivered|will (?:continue to )?(?:retry|try)|"
    r"still (?:trying|undelivered)|delivery (?:is )?delayed|delivery has been delayed|"
    r"this is a warning|warning: message|not yet delivered|ritard",
    re.I,
)
_FAILED_WORDS = re.compile(
    r"could not be delivered|couldn't be delivered|was not delivered|undeliverable|"
    r"permanent(?:ly)? (?:error|failure|fatal)|fatal error|failed|rejected|"
    r"unable to deliver|wasn't able to deliver|delivery failure|returned|non (?:è stato|e' stato) "
    r"recapitato|impossibile (?:recapitare|consegnare)|mancato recapito|respinto|gave up|giving up",
    re.I,
)


# bodies that are delivery-failure notices whatever their headers say: a gateway's "Error
# message below" form (Apache James, Verizon), a mailing-list server refusing a post
_NOTICE_BODY = re.compile(
    r"(?im)^\s*error message below:|^\s*error: invalid user address"
    r"|you are not a member of this mailing list|^duplicated message-id in "
    r"|^message could not be delivered to mobile"
)


def _is_auto_reply(msg: Message, subject: str) -> bool:
    auto = _header(msg, "Auto-Submitted").lower()
    if auto.startswith("auto-replied"):
        return True
    if any(msg.get(h) is not None for h in ("X-Autoreply", "X-Autorespond", "X-Autoresponder")):
        return True
    if _header(msg, "Precedence").lower() == "auto_reply":
        return True
    return bool(_AUTO_SUBJECT.search(subject))


# ---- free-text recipients ----------------------------------------------------------------

_SKIP_LINE = re.compile(
    r"^\s*(?:from:|return-path:|received:|by |for <|message-id:|reporting-mta|sender:|"
    r"reply-to:|mail from|>+ ?mail from|envelope-from|references:|in-reply-to:|"
    r"dkim-signature|x-[a-z-]+:)",
    re.I,
)


def _free_recipients(notice: str, exclude: set[str]) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    seen: set[str] = set()
    for match in _ADDRESS.finditer(notice):
        address = match.group(0).lower().strip(".")
        if address in seen or address in exclude:
            continue
        local = address.partition("@")[0]
        if _NON_RECIPIENT_LOCAL.match(local):
            continue
        start = notice.rfind("\n", 0, match.start()) + 1
        line = notice[start : match.end()]
        if _SKIP_LINE.match(line):
            continue
        before = notice[max(0, match.start() - 1) : match.start()]
        if before in ("/", "=", "?", "."):
            continue  # part of a URL or of another token
        seen.add(address)
        found.append((address, match.start()))
    return found


def _reply_code(text: str) -> int | None:
    for pattern in (_REPLY_WITH_STATUS, _REPLY_AFTER_WORD, _REPLY_LEADING):
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    return None


def _clean(text: str) -> str:
    return " ".join(text.split())[:MAX_DIAGNOSTIC]


# ---- the parser ---------------------------------------------------------------------------


def _load(raw: bytes) -> Message:
    data = raw[:MAX_BYTES]
    if data.count(b"boundary=") > MAX_BOUNDARIES or data.count(b"BOUNDARY=") > MAX_BOUNDARIES:
        raise _Bomb  # a MIME bomb: not a bounce, whatever it claims
    try:
        return message_from_bytes(data, policy=compat32)
    except (RecursionError, MemoryError, ValueError, IndexError, TypeError):
        text = data.decode("latin-1")
        return message_from_string(text[:MAX_NOTICE], policy=compat32)


def parse_bounce(raw: bytes) -> BounceReport:
    """Read one returned message. ``InputError`` only for empty input."""
    if not raw or not raw.strip():
        raise InputError("empty message: nothing to parse")
    try:
        return _parse(raw)
    except (RecursionError, MemoryError, ValueError, LookupError, TypeError, AttributeError):
        return BounceReport("not_bounce", False, (), None, None, None, None, None)


def _raw_body(raw: bytes) -> str:
    data = raw[:MAX_BYTES]
    cut = data.find(b"\n\n")
    cut2 = data.find(b"\r\n\r\n")
    if cut < 0 or (0 <= cut2 < cut):
        cut = cut2
    body = data[cut:] if cut >= 0 else b""
    return _decode(body, None).replace("\r\n", "\n")


def _verp(msg: Message) -> str | None:
    candidates = [
        _address_of(_header(msg, h)) for h in ("X-Original-To", "Delivered-To", "To", "Envelope-To")
    ]
    present = [c for c in candidates if c]
    for address in present:
        if "+" in address.partition("@")[0]:
            return address
    return present[0] if present else None


class _Bomb(Exception):
    """More MIME structure than any bounce has: read no further."""


def _parse(raw: bytes) -> BounceReport:
    try:
        msg = _load(raw)
    except _Bomb:
        return BounceReport("not_bounce", False, (), None, None, None, None, None)
    subject = _header(msg, "Subject")
    top_from = _header(msg, "From")
    notices: list[str] = []
    status_texts: list[str] = []
    feedback_texts: list[str] = []
    returned: list[Message] = []
    returned_texts: list[str] = []
    report_type = (msg.get_param("report-type") or "") if msg.get_content_type() else ""
    report_type = str(report_type).lower()

    for part, _depth, inside in _walk(msg):
        ctype = part.get_content_type()
        if inside:
            if ctype in _RETURNED_TYPES or not part.is_multipart():
                continue
            continue
        if ctype in _STATUS_TYPES:
            status_texts.append(_part_text(part))
        elif ctype == "message/feedback-report":
            feedback_texts.append(_part_text(part))
        elif ctype in _RETURNED_TYPES:
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                returned.append(payload[0])
            else:
                returned_texts.append(_part_text(part))
        elif part.get_content_maintype() == "text" or (ctype == "text/plain"):
            if part is msg or not part.is_multipart():
                text = _part_text(part)
                if part.get_filename() is None or not returned:
                    notices.append(text[:MAX_NOTICE])
        elif not part.is_multipart() and part.get_content_maintype() == "message":
            notices.append(_part_text(part)[:MAX_NOTICE])

    if not notices and not status_texts and not feedback_texts and not returned:
        # a multipart whose boundary never occurs (or no readable part): the raw body
        notices.append(_raw_body(raw)[:MAX_NOTICE])
    body = "\n\n".join(notices)
    notice, copy_text = _split_notice(body)
    if returned_texts:
        copy_text = "\n".join(returned_texts) + "\n" + copy_text

    # the returned message's headers
    original_from: str | None = None
    original_to: str | None = None
    message_id: str | None = None
    delivery: str | None = None
    if returned:
        first = returned[0]
        original_from = _address_of(_header(first, "From"))
        original_to = _address_of(_header(first, "To"))
        mid = _MSGID.search(_header(first, "Message-ID"))
        message_id = mid.group(0) if mid else None
        delivery = _header(first, "X-Recapito-Delivery") or None
    if copy_text:
        copy_head = copy_text[:30_000]
        if message_id is None:
            m = re.search(r"(?im)^[ \t>]*message-id:\s*(<[^<>\s]+>)", copy_head)
            message_id = m.group(1) if m else None
        if delivery is None:
            m = re.search(r"(?im)^[ \t>]*x-recapito-delivery:\s*(\d+)", copy_head)
            delivery = m.group(1) if m else None
        if original_from is None:
            m = re.search(r"(?im)^[ \t>]*from:\s*([^\n]+)", copy_head)
            original_from = _address_of(m.group(1)) if m else None
        if original_to is None:
            m = re.search(r"(?im)^[ \t>]*to:\s*([^\n]+)", copy_head)
            original_to = _address_of(m.group(1)) if m else None

    family = _family(msg, notice)
    verp = _verp(msg)

    # ---- ARF
    if report_type == "feedback-report" or feedback_texts:
        fields: dict[str, str] = {}
        for group in _field_groups("\n\n".join(feedback_texts)):
            fields.update(group)
        rcpts = re.findall(r"(?im)^original-rcpt-to:\s*([^\n]+)", "\n".join(feedback_texts))
        addresses = [a for a in (_address_of(r) for r in rcpts) if a]
        if not addresses:
            removal = _address_of(fields.get("removal-recipient", ""))
            addresses = [removal or original_to] if (removal or original_to) else [None]  # type: ignore[list-item]
        kind_text = fields.get("feedback-type", "abuse")
        recs = tuple(
            BounceRecipient(
                recipient=a,
                action=None,
                status=None,
                reply_code=None,
                diagnostic=f"feedback-type: {kind_text}",
                reason="complaint",
                permanence=None,
                scope="recipient",
                confidence=0.95,
                remote_mta=None,
            )
            for a in addresses
        )
        return BounceReport(
            "arf",
            False,
            recs,
            family,
            message_id,
            verp,
            delivery,
            _typed_value(fields.get("original-envelope-id", "")) or None,
        )

    # ---- Amazon SES notifications forwarded as mail (a JSON document in the body)
    if "notificationType" in body:
        ses = _ses_report(body, family, message_id, verp, delivery)
        if ses is not None:
            return ses

    # ---- DSN fields
    groups: list[dict[str, str]] = []
    for text in status_texts:
        groups.extend(_field_groups(text))
    drafts = _dsn_drafts(groups)
    if not drafts and re.search(r"(?im)^(final|original)-recipient:", body):
        groups = _field_groups(body)
        drafts = _dsn_drafts(groups)
    envid = next(
        (_typed_value(g["original-envelope-id"]) for g in groups if "original-envelope-id" in g),
        None,
    )
    own = {a for a in (_address_of(top_from), verp, original_from) if a}
    own.update(
        a
        for a in (_address_of(_header(msg, h)) for h in ("To", "Delivered-To", "X-Original-To"))
        if a
    )

    kind = "dsn" if drafts else ""
    if not drafts:
        is_notice = bool(
            msg.get("X-Failed-Recipients")
            or _DAEMON_FROM.search(top_from)
            or (_NDR_SUBJECT.search(subject) and not _AUTO_SUBJECT.search(subject))
            or report_type == "delivery-status"
            or _NOTICE_BODY.search(notice[:4000])
            or (
                (returned or copy_text.strip())
                and _FAILED_WORDS.search(notice)
                and not _AUTO_SUBJECT.search(subject)
            )
        )
        if not is_notice:
            if _is_auto_reply(msg, subject):
                who = _address_of(top_from)
                rec = BounceRecipient(
                    recipient=who,
                    action=None,
                    status=None,
                    reply_code=None,
                    diagnostic=_clean(subject),
                    reason="auto_reply",
                    permanence=None,
                    scope="recipient",
                    confidence=0.9,
                    remote_mta=None,
                )
                return BounceReport(
                    "auto_reply", False, (rec,), family, message_id, verp, delivery, envid
                )
            return BounceReport("not_bounce", False, (), family, message_id, verp, delivery, envid)
        kind = "free_text"
        failed_header = _header(msg, "X-Failed-Recipients")
        listed = [a.lower() for a in _ADDRESS.findall(failed_header)]
        found = _free_recipients(notice, own - set(listed))
        if listed:
            positions = dict(found)
            found = [(a, positions.get(a, -1)) for a in dict.fromkeys(listed)]
        if not found and original_to:
            found = [(original_to, -1)]
        delayed = bool(_DELAY_WORDS.search(notice)) and not _FAILED_WORDS.search(subject)
        action = "delayed" if delayed else "failed"
        ordered = sorted((p, a) for a, p in found if p >= 0)
        for address, position in found:
            if position < 0:
                context = notice
            else:
                start = notice.rfind("\n", 0, position) + 1
                later = [p for p, _ in ordered if p > position]
                end = later[0] if later else len(notice)
                end = notice.rfind("\n", 0, end) + 1 or end
                context = notice[start:end] if end > start else notice[start:]
            drafts.append(_Draft(recipient=address, action=action, context=context, notice=notice))
        if not drafts:
            drafts.append(_Draft(recipient=None, action=action, context=notice))
    else:
        # add the notice's words about each recipient (an MTA often says more there)
        low_notice = notice.lower()
        mentions = sorted({low_notice.find(d.recipient) for d in drafts if d.recipient} - {-1})
        for draft in drafts:
            if draft.recipient and draft.recipient in low_notice:
                position = low_notice.find(draft.recipient)
                start = notice.rfind("\n", 0, position) + 1
                # up to the paragraph of the next recipient the notice names
                later = [m for m in mentions if m > position]
                end = notice.rfind("\n", 0, later[0]) + 1 if later else len(notice)
                draft.context = notice[
                    start : min(end if end > start else len(notice), start + 1500)
                ]
            else:
                draft.context = notice[:3000]
            if draft.action is None:
                klass = (draft.status or "5")[0]
                draft.action = (
                    "delayed"
                    if klass == "4" and _DELAY_WORDS.search(notice)
                    else "delivered"
                    if klass == "2"
                    else "failed"
                )

    records = tuple(_record(d, family) for d in drafts)
    failed = any(r.action == "failed" for r in records)
    delayed_only = not failed and any(r.action == "delayed" for r in records)
    if (kind == "dsn" and delayed_only) or (kind == "free_text" and not failed):
        kind = "delayed_warning"
    return BounceReport(kind, failed, records, family, message_id, verp, delivery, envid)


# wordings of an MTA that stopped retrying a temporary condition
_GAVE_UP = re.compile(
    r"connection timed out|timed out while|(?:was|is) not reachable|host not reachable"
    r"|could not find a gateway"
    r"|unable to connect|couldn't connect|could not connect|cannot connect"
    r"|did not accept our requests to connect|server did not respond|no route to host"
    r"|queue (?:lifetime|period)"
)


def _ses_report(
    body: str, family: str | None, message_id: str | None, verp: str | None, delivery: str | None
) -> BounceReport | None:
    """An Amazon SES notification (SNS JSON): Bounce, Complaint or Delivery."""
    start = body.find("{")
    if start < 0:
        return None
    try:
        doc, _end = json.JSONDecoder(strict=False).raw_decode(body.replace("\n", ""), start)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("Message"), str):
        # the SNS envelope: the notification is a JSON string inside it
        try:
            doc = json.loads(doc["Message"], strict=False)
        except ValueError:
            return None
    if not isinstance(doc, dict):
        return None
    kind = str(doc.get("notificationType", "")).lower()
    section = doc.get(kind) if isinstance(doc.get(kind), dict) else {}
    assert isinstance(section, dict)
    records: list[BounceRecipient] = []
    if kind == "complaint":
        for item in section.get("complainedRecipients") or []:
            address = (
                _address_of(str(item.get("emailAddress", ""))) if isinstance(item, dict) else None
            )
            feedback = str(section.get("complaintFeedbackType") or "abuse")
            records.append(
                BounceRecipient(
                    address,
                    None,
                    None,
                    None,
                    f"feedback-type: {feedback}",
                    "complaint",
                    None,
                    "recipient",
                    0.95,
                    None,
                )
            )
        return BounceReport(
            "arf", False, tuple(records), "amazonses", message_id, verp, delivery, None
        )
    if kind == "delivery":
        for item in section.get("recipients") or []:
            address = _address_of(str(item))
            records.append(
                BounceRecipient(
                    address,
                    "delivered",
                    None,
                    None,
                    _clean(str(section.get("smtpResponse", ""))),
                    "unknown",
                    None,
                    None,
                    0.9,
                    _typed_value(str(section.get("reportingMTA", ""))) or None,
                )
            )
        return BounceReport(
            "not_bounce", False, tuple(records), "amazonses", message_id, verp, delivery, None
        )
    if kind == "bounce":
        drafts = []
        for item in section.get("bouncedRecipients") or []:
            if not isinstance(item, dict):
                continue
            drafts.append(
                _Draft(
                    recipient=_address_of(str(item.get("emailAddress", ""))),
                    action=_normal_action(str(item.get("action") or "failed")),
                    status=find_status(str(item.get("status") or "")),
                    diagnostic=_clean(str(item.get("diagnosticCode") or "")),
                )
            )
        if not drafts:
            return None
        recs = tuple(_record(d, "amazonses") for d in drafts)
        failed = any(r.action == "failed" for r in recs)
        return BounceReport(
            "dsn" if failed else "delayed_warning",
            failed,
            recs,
            "amazonses",
            message_id,
            verp,
            delivery,
            None,
        )
    return None


_FILLER_STATUS = re.compile(r"^[245]\.0\.0$")
_PHASES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "data",
        re.compile(
            r"(in reply to|after|command) (end of )?data\b|>>> data\b|after end of data"
            r"|in risposta al comando data|dopo (la fine dei )?data\b"
        ),
    ),
    (
        "mail",
        re.compile(r"(in reply to|after) mail from|smtp command:? mail\b|but sender was rejected"),
    ),
    (
        "rcpt",
        re.compile(
            r"(in reply to|after) rcpt( to| command)?\b|did not like our rcpt|>>> rcpt to"
            r"|most progress was rcpt|does not like recipient|\[rcpt_to\]|smtp:rcpt\b"
            r"|in risposta al comando rcpt",
        ),
    ),
    (
        "connect",
        re.compile(
            r"after initial connection|refused to talk to me|my name was rejected"
            r"|in reply to (the )?(initial )?"
            r"(greeting|banner|ehlo|helo)|after (helo|ehlo)|while connecting|during connection",
        ),
    ),
)
_CONNECT_PHASE = {
    "unknown",
    "recipient_policy",
    "remote_temporary",
    "domain_invalid",
    "user_unknown",
    "mailbox_disabled",
}
_SENDER_PHASE = {
    "user_unknown",
    "domain_invalid",
    "unknown",
    "recipient_policy",
    "mailbox_disabled",
}


def _phase(text: str) -> str | None:
    low = text.lower()
    for name, pattern in _PHASES:
        if pattern.search(low):
            return name
    return None


# Wordings that can only come from a directory lookup of the address (Exchange, Domino,
# IMail, Google's and Yahoo's own notices): an unknown user whatever the SMTP phase.
_DIRECTORY_WORDING = re.compile(
    r"not listed in|recipient name is not recognized|invalid final delivery userid"
    r"|unknown user:|address couldn't be found|delivery error: dd "
    r"|no such user here|couldn't find any host|unknown local.?part|adresse destinataire invalide"
)
# au / KDDI (ezweb) answer "550 : User unknown", with the address left blank, when the
# recipient's own reception settings refuse the sender: a filter, not a dead address.
# "<address>: User unknown" names the very address refused: a directory answer when nothing
# says it came after DATA
_NAMED_ADDRESS_UNKNOWN = re.compile(r">: user unknown")
_BLANK_ADDRESS_UNKNOWN = re.compile(r"\b550:? : user unknown")


def _phase_adjusted(
    reason: str,
    scope: str | None,
    text: str,
    address_level: bool = True,
    words: str = "",
) -> tuple[str, str | None]:
    """The SMTP phase changes what a vague or address-level reply means: refused before
    MAIL FROM it is about the sending host; at MAIL FROM, about the sender. An "unknown
    user" that was not the answer to RCPT TO and whose status is not about the address
    (X.1.X) is a filter's answer (RCPT TO was accepted, or a mailbox-status code such as
    X.2.0 / X.7.1 says the mailbox exists), unless its wording can only come from a
    directory lookup."""
    phase = _phase(text)
    if phase == "connect" and reason in _CONNECT_PHASE:
        return "reputation_block", "sender"
    if phase == "mail" and reason in _SENDER_PHASE:
        return "sender_rejected", "sender"
    if reason == "user_unknown" and phase != "rcpt" and not address_level:
        low = f"{text} {words}".lower()
        if _BLANK_ADDRESS_UNKNOWN.search(low):
            return "recipient_policy", "recipient"
        if _DIRECTORY_WORDING.search(low):
            return reason, scope
        if phase == "data" or not _NAMED_ADDRESS_UNKNOWN.search(low):
            return "recipient_policy", "recipient"
    return reason, scope


_CONTINUATION = re.compile(r"(?<=\S) ([245]\d\d)[ -](?:[245]\.\d{1,3}\.\d{1,3} )?")
_PROGRAM = re.compile(r"pipe to \||procmail:|\bmaildrop:|delivery program|mailer program|x-unix")


def _unwrap(text: str) -> str:
    """``550-5.7.1 a 550-5.7.1 b 550 5.7.1 c`` → ``550-5.7.1 a b c``: the code repeated on
    each line of a multi-line reply would cut the words in two."""
    first = _REPLY_LEADING.match(text) or re.match(r"\s*([245]\d\d)[ -]", text)
    if first is None:
        return text
    code = first.group(1)
    return _CONTINUATION.sub(lambda m: " " if m.group(1) == code else m.group(0), text)


def _record(draft: _Draft, family: str | None) -> BounceRecipient:
    diagnostic = _unwrap(draft.diagnostic)
    context = _clean(draft.context) if draft.context else ""
    text = diagnostic if diagnostic else context
    status = draft.status
    text_status = find_status(text) if text else None
    if text_status and (status is None or _FILLER_STATUS.match(status)):
        status = text_status if not _FILLER_STATUS.match(text_status) or status is None else status
    code = _reply_code(text) if text else None
    provider = _provider(draft.remote_mta, family, text)
    if draft.action == "delayed":
        _reason, permanence, scope, confidence = classify(code, status, text, provider)
        reason, permanence = "delayed_warning", "temporary"
    elif draft.action in ("delivered", "relayed", "expanded"):
        reason, permanence, scope, confidence = "unknown", None, None, 0.9
    else:
        reason, permanence, scope, confidence = classify(code, status, text, provider)
        words = text
        if reason == "unknown" and diagnostic and context:
            reason, permanence, scope, confidence = classify(code, status, context, provider)
            words = context
        if reason == "unknown" and draft.notice and draft.notice != draft.context:
            whole = _clean(draft.notice)
            reason, permanence, scope, confidence = classify(
                code or _reply_code(whole), status or find_status(whole), whole, provider
            )
            words = whole
        address_level = bool(status and status[2:4] == "1.")
        phase_text = f"{diagnostic} {context}" if diagnostic else context
        if draft.program or _PROGRAM.search(f"{diagnostic} {context}".lower()):
            # a local delivery program (pipe, procmail) failed at the remote: its exit code
            # says nothing about the address
            reason, scope = "remote_temporary", "domain"
        elif confidence < CONF_PROVIDER:  # a provider's own wording is not second-guessed
            reason, scope = _phase_adjusted(reason, scope, phase_text, address_level, words)
        if (reason == "unknown" and (status or "")[:1] == "4") or (
            reason == "remote_temporary" and _GAVE_UP.search(f"{diagnostic} {context}".lower())
        ):
            # a failure report for a temporary condition (a connection that never worked,
            # a queue lifetime reached): the MTA gave up retrying, the message expired
            reason, permanence, scope = "expired", "temporary", "domain"
    return BounceRecipient(
        recipient=draft.recipient,
        action=draft.action,
        status=status,
        reply_code=code,
        diagnostic=_clean(diagnostic or context),
        reason=reason,
        permanence=permanence,
        scope=scope,
        confidence=confidence,
        remote_mta=draft.remote_mta,
    )
