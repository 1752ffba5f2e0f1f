"""PEC receipts: read one message from a PEC mailbox and say what it is.

``parse_receipt(raw, trust)`` reads the headers, the S/MIME structure, ``daticert.xml`` and
the headers of ``postacert.eml``, and returns a ``Receipt``:

- ``type``: the ``X-Ricevuta`` value (``accettazione``, ``non-accettazione``,
  ``presa-in-carico``, ``avvenuta-consegna``, ``errore-consegna``,
  ``preavviso-errore-consegna``, ``rilevazione-virus``) or the ``X-Trasporto`` value
  (``posta-certificata``, ``errore``), or ``not-pec``. Header names are compared
  case-insensitively; the subject is never read. A message without either header but with
  a daticert.xml takes the daticert's ``tipo``;
- ``kind``: what it means for a delivery — ``acceptance``, ``non_acceptance``,
  ``taken_in_charge``, ``delivery``, ``delivery_error``, ``delivery_warning`` (12 h),
  ``delivery_timeout`` (the final notice for the maximum time: an ``errore-consegna``
  whose ``errore-esteso`` says so), ``virus``; and what is not a receipt — ``envelope``
  (a certified message: ``X-Trasporto: posta-certificata``), ``third_party_notice`` (an
  envelope carrying someone else's receipt or notice), ``anomaly`` (``X-Trasporto:
  errore``), ``not_pec`` (plain mail), ``malformed`` (claims to be a receipt but its
  daticert.xml is missing, unreadable or contradicts the header);
- the daticert fields (msgid, identificativo, mittente, destinatari with ``tipo``,
  consegna, errore, errore-esteso, timezone-aware date, ricevuta tipo), the ``X-TipoRicevuta``
  value (either case), the receipt's own Message-ID, ``X-Riferimento-Message-ID``, the
  Message-ID of ``postacert.eml`` when the receipt carries the original message;
- ``signature``: ``recapito.pec.smime`` over the raw bytes (``valid | invalid | unchecked``).

The reader walks the MIME tree on raw bytes (no ``email`` object model: receipts arrive by
the thousand) with limits on depth and part count. ``ReceiptParser`` is the seam for other
evidence formats (ETSI EN 319 532 REM) beside daticert.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from recapito.pec import smime
from recapito.pec.daticert import Daticert, DaticertError, Destinatario, parse_daticert

RECEIPT_TYPES = frozenset(
    {
        "accettazione",
        "non-accettazione",
        "presa-in-carico",
        "avvenuta-consegna",
        "errore-consegna",
        "preavviso-errore-consegna",
        "rilevazione-virus",
    }
)
TRANSPORT_TYPES = frozenset({"posta-certificata", "errore"})
KIND_OF_TYPE = {
    "accettazione": "acceptance",
    "non-accettazione": "non_acceptance",
    "presa-in-carico": "taken_in_charge",
    "avvenuta-consegna": "delivery",
    "errore-consegna": "delivery_error",
    "preavviso-errore-consegna": "delivery_warning",
    "rilevazione-virus": "virus",
    "posta-certificata": "envelope",
    "errore": "anomaly",
}
# kinds that concern one of our submissions (the others never change a delivery)
RECEIPT_KINDS = frozenset(
    {
        "acceptance",
        "non_acceptance",
        "taken_in_charge",
        "delivery",
        "delivery_error",
        "delivery_warning",
        "delivery_timeout",
        "virus",
    }
)
RECEIPT_VARIANTS = frozenset({"completa", "breve", "sintetica"})
# errore-esteso wordings of the final notice for the maximum delivery time (24 h)
_TIMEOUT = re.compile(r"tempo massimo|tempi massimi|5\.4\.7|timeout|time ?limit|expired", re.I)

MAX_DEPTH = 8
MAX_PARTS = 64
_HEADER_LIMIT = 256 * 1024


@dataclass(frozen=True)
class Receipt:
    type: str
    kind: str
    message_id: str | None  # the receipt's own Message-ID
    riferimento: str | None  # X-Riferimento-Message-ID
    msgid: str | None  # the original message's Message-ID (daticert, else X-Riferimento)
    identificativo: str | None
    sender: str | None
    recipients: tuple[Destinatario, ...]
    consegna: str | None
    errore: str | None
    errore_esteso: str | None
    receipt_kind: str | None  # completa | breve | sintetica
    date: dt.datetime | None
    provider: str | None  # gestore-emittente
    signature: smime.SignatureResult
    daticert: Daticert | None = None
    original_message_id: str | None = None  # postacert.eml's Message-ID
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_receipt(self) -> bool:
        return self.kind in RECEIPT_KINDS

    @property
    def recipient_tipo(self) -> str | None:
        """``certificato`` / ``esterno`` of the recipient this receipt is about."""
        target = (self.consegna or "").lower()
        for d in self.recipients:
            if not target or d.address.lower() == target:
                return d.tipo
        return None

    def correlation_ids(self) -> list[str]:
        """Message-IDs that may name our submission, best first."""
        out: list[str] = []
        for value in (self.msgid, self.riferimento, self.original_message_id):
            if value and value not in out:
                out.append(value)
        return out

    def as_json(self) -> dict[str, Any]:
        """The ``recapito pec parse --json`` fields (plus a few more)."""
        return {
            "type": self.type,
            "kind": self.kind,
            "msgid": self.msgid,
            "identificativo": self.identificativo,
            "sender": self.sender,
            "recipients": [{"address": d.address, "tipo": d.tipo} for d in self.recipients],
            "consegna": self.consegna,
            "errore": self.errore,
            "errore_esteso": self.errore_esteso,
            "receipt_kind": self.receipt_kind,
            "date": self.date.isoformat() if self.date else None,
            "provider": self.provider,
            "message_id": self.message_id,
            "riferimento": self.riferimento,
            "signature": self.signature.status,
            "signature_detail": self.signature.as_dict(),
            "problems": list(self.problems),
        }


ReceiptParser = Callable[[bytes, "smime.TrustStore | None", bool], Receipt]


# -- raw MIME ------------------------------------------------------------------------------------


def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """(header block, body) at the first empty line (CRLF or LF)."""
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return raw[:crlf], raw[crlf + 4 :]
    if lf >= 0:
        return raw[:lf], raw[lf + 2 :]
    return raw, b""


_FOLD = re.compile(rb"\r?\n[ \t]+")


def parse_headers(block: bytes) -> dict[str, list[str]]:
    """Header fields by lower-case name (unfolded, values stripped), in order."""
    out: dict[str, list[str]] = {}
    text = _FOLD.sub(b" ", block[:_HEADER_LIMIT])
    for line in text.split(b"\n"):
        name, sep, value = line.partition(b":")
        if not sep or not name or b" " in name.strip():
            continue
        key = name.strip().decode("latin-1").lower()
        out.setdefault(key, []).append(value.strip().decode("utf-8", "replace"))
    return out


def _first(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


_PARAM = re.compile(r';\s*([A-Za-z0-9*_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def content_type(value: str | None) -> tuple[str, dict[str, str]]:
    if not value:
        return "text/plain", {}
    mime = value.split(";", 1)[0].strip().lower()
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(value)
    }
    return mime, params


def split_multipart(body: bytes, boundary: str) -> list[bytes]:
    """The body parts between the boundary delimiters (RFC 2046 §5.1.1)."""
    delim = b"--" + boundary.encode("latin-1", "replace")
    pos = 0 if body.startswith(delim) else body.find(b"\n" + delim)
    if pos < 0:
        return []
    if pos > 0 or not body.startswith(delim):
        pos += 1
    parts: list[bytes] = []
    while len(parts) < MAX_PARTS:
        after = pos + len(delim)
        if body[after : after + 2] == b"--":
            break
        line_end = body.find(b"\n", after)
        if line_end < 0:
            break
        start = line_end + 1
        nxt = body.find(b"\n" + delim, start)
        if nxt < 0:
            parts.append(body[start:])
            break
        end = nxt - 1 if nxt > start and body[nxt - 1 : nxt] == b"\r" else nxt
        parts.append(body[start:end])
        pos = nxt + 1
    return parts


def decode_body(body: bytes, encoding: str | None) -> bytes:
    cte = (encoding or "").strip().lower()
    if cte == "base64":
        try:
            return base64.b64decode(b"".join(body.split()), validate=False)
        except (binascii.Error, ValueError):
            return b""
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    return body


@dataclass(frozen=True)
class Part:
    headers: dict[str, list[str]]
    mime: str
    params: dict[str, str]
    body: bytes

    @property
    def filename(self) -> str:
        name = self.params.get("name") or ""
        disposition = _first(self.headers, "content-disposition")
        if disposition:
            name = content_type(disposition)[1].get("filename") or name
        return name.strip().lower()

    def decoded(self) -> bytes:
        return decode_body(self.body, _first(self.headers, "content-transfer-encoding"))


def _part(entity: bytes) -> Part:
    head, body = split_message(entity)
    headers = parse_headers(head)
    mime, params = content_type(_first(headers, "content-type"))
    return Part(headers, mime, params, body)


def walk(entity: bytes, depth: int = 0) -> Iterator[Part]:
    """Every leaf part of a MIME entity (message/rfc822 parts are leaves)."""
    part = _part(entity)
    if part.mime.startswith("multipart/") and depth < MAX_DEPTH:
        boundary = part.params.get("boundary")
        if boundary:
            for child in split_multipart(part.body, boundary):
                yield from walk(child, depth + 1)
            return
    yield part


def _angle(value: str | None) -> str | None:
    if not value:
        return None
    text = value.strip()
    if not text:
        return None
    if not text.startswith("<"):
        text = f"<{text.strip('<>')}>"
    return text


def _canonical(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# -- signature -----------------------------------------------------------------------------------


def check_signature(
    top: Part, trust: smime.TrustStore | None, verify: bool
) -> tuple[smime.SignatureResult, bytes | None]:
    """(the verdict, the signed MIME entity) of a message's top part."""
    if top.mime == "multipart/signed":
        boundary = top.params.get("boundary")
        parts = split_multipart(top.body, boundary) if boundary else []
        if len(parts) < 2:
            return smime.SignatureResult("invalid", "malformed"), parts[0] if parts else None
        entity = parts[0]
        if not verify:
            return smime.NOT_CHECKED, entity
        der = smime.decode_p7s(_part(parts[1]).body)
        result, _ = smime.verify(entity, der, trust)
        if result.reason == "digest-mismatch":
            canonical = _canonical(entity)
            if canonical != entity:
                retry, _ = smime.verify(canonical, der, trust)
                if retry.reason != "digest-mismatch":
                    result = retry
        return result, entity
    if top.mime in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        der = decode_body(top.body, _first(top.headers, "content-transfer-encoding"))
        smime_type = top.params.get("smime-type", "signed-data").lower()
        if smime_type != "signed-data":
            return smime.SignatureResult("unchecked", f"unsupported {smime_type}"), None
        result, content = smime.verify(None, der, trust if verify else None)
        if not verify:
            result = smime.NOT_CHECKED
        return result, content
    return smime.UNSIGNED, None


# -- the parser ----------------------------------------------------------------------------------


def parse_receipt(
    raw: bytes, trust: smime.TrustStore | None = None, verify: bool = True
) -> Receipt:
    """Read one message of a PEC mailbox (see the module doc). Never raises on odd input:
    what cannot be read ends as kind ``malformed`` or ``not_pec``."""
    head, body = split_message(raw)
    headers = parse_headers(head)
    ricevuta = (_first(headers, "x-ricevuta") or "").strip().lower()
    trasporto = (_first(headers, "x-trasporto") or "").strip().lower()
    variant = (_first(headers, "x-tiporicevuta") or "").strip().lower() or None
    mime, params = content_type(_first(headers, "content-type"))
    top = Part(headers, mime, params, body)
    problems: list[str] = []

    claims_pec = bool(ricevuta or trasporto)
    if claims_pec or mime in ("multipart/signed", "application/pkcs7-mime"):
        signature, entity = check_signature(top, trust, verify)
    else:
        signature, entity = smime.SignatureResult("unchecked", "unsigned"), None
    leaves = list(walk(entity)) if entity is not None else list(walk(raw))

    daticert: Daticert | None = None
    original: str | None = None
    inner_notice = False
    for leaf in leaves:
        name = leaf.filename
        if daticert is None and (
            name == "daticert.xml"
            or (leaf.mime in ("application/xml", "text/xml") and name.endswith("daticert.xml"))
        ):
            try:
                daticert = parse_daticert(leaf.decoded())
            except DaticertError as exc:
                problems.append(f"daticert: {exc}"[:200])
        elif leaf.mime == "message/rfc822" or name == "postacert.eml":
            inner = leaf.decoded()
            inner_headers = parse_headers(split_message(inner)[0])
            original = original or _angle(_first(inner_headers, "message-id"))
            inner_mime = content_type(_first(inner_headers, "content-type"))[0]
            if (
                "x-ricevuta" in inner_headers
                or inner_mime == "multipart/report"
                or (_first(inner_headers, "auto-submitted") or "no").lower() != "no"
            ):
                inner_notice = True

    if ricevuta:
        type_ = ricevuta
    elif trasporto:
        type_ = trasporto
    elif daticert is not None and daticert.tipo in RECEIPT_TYPES | TRANSPORT_TYPES:
        type_ = daticert.tipo
        problems.append("type from daticert (no X-Ricevuta / X-Trasporto header)")
    else:
        type_ = "not-pec"

    kind = KIND_OF_TYPE.get(type_, "not_pec" if type_ == "not-pec" else "malformed")
    if type_ not in KIND_OF_TYPE and type_ != "not-pec":
        problems.append(f"unknown PEC type {type_!r}")
    if kind in RECEIPT_KINDS:
        if daticert is None:
            problems.append("receipt without daticert.xml")
            kind = "malformed"
        elif daticert.tipo != type_:
            problems.append(f"daticert tipo {daticert.tipo!r} differs from the header {type_!r}")
            kind = "malformed"
        elif kind == "delivery_error" and _TIMEOUT.search(daticert.errore_esteso or ""):
            kind = "delivery_timeout"
    elif kind == "envelope" and inner_notice:
        kind = "third_party_notice"

    riferimento = _angle(_first(headers, "x-riferimento-message-id"))
    msgid = _angle(daticert.msgid) if daticert and daticert.msgid else riferimento
    if variant is None and daticert is not None and type_ == "avvenuta-consegna":
        variant = daticert.ricevuta or ("completa" if original else None)
    if variant is not None and variant not in RECEIPT_VARIANTS:
        problems.append(f"unknown X-TipoRicevuta {variant!r}")
    date = daticert.date if daticert is not None else None
    if date is None:
        date = _header_date(_first(headers, "date"))
    return Receipt(
        type=type_,
        kind=kind,
        message_id=_angle(_first(headers, "message-id")),
        riferimento=riferimento,
        msgid=msgid,
        identificativo=daticert.identificativo if daticert else None,
        sender=daticert.mittente if daticert else None,
        recipients=daticert.destinatari if daticert else (),
        consegna=daticert.consegna if daticert else None,
        errore=daticert.errore if daticert else None,
        errore_esteso=daticert.errore_esteso if daticert else None,
        receipt_kind=variant if type_ == "avvenuta-consegna" or variant else None,
        date=date,
        provider=daticert.gestore if daticert else None,
        signature=signature,
        daticert=daticert,
        original_message_id=original,
        problems=tuple(problems),
    )


def _header_date(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else None


__all__ = [
    "KIND_OF_TYPE",
    "RECEIPT_KINDS",
    "RECEIPT_TYPES",
    "TRANSPORT_TYPES",
    "Receipt",
    "ReceiptParser",
    "check_signature",
    "content_type",
    "parse_headers",
    "parse_receipt",
    "split_message",
    "split_multipart",
    "walk",
]
