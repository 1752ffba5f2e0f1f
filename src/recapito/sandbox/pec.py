"""The sandbox PEC providers: SMTPS submission with the PEC checks, signed receipts into IMAP.

``Sandbox`` starts one child, ``python -m recapito.sandbox.pec @<PecProcessSpec>``, serving
every provider of its world (``DEFAULT_PROVIDERS``: two, with different limits) on
127.0.0.1, each on a port of its own with implicit TLS (a certificate from the sandbox CA
naming the provider's SMTP host) and AUTH PLAIN/LOGIN. A submission is checked like a real
provider does (DPR 68/2005, DM 2 Nov 2005):

- MAIL FROM and the ``From`` header must both be the authenticated mailbox;
- no ``Bcc`` header, and every RCPT TO appears in ``To`` or ``Cc``;
- at most ``max_recipients`` recipients and size × recipients within ``max_size``;
- at most ``per_minute`` messages a minute per mailbox: over it, MAIL FROM is answered
  ``450 4.7.0`` with a traffic-limit text, as providers do.

Each accepted message then gets, in the sender's mailbox (the Dovecot Maildir of that user,
``recapito.sandbox.imap``), receipts that are S/MIME signed (``cryptography`` PKCS#7,
SHA-256, detached ``multipart/signed``) by a provider certificate the sandbox CA issued, each
carrying a ``daticert.xml``:

- ``accettazione`` at once (``non-accettazione`` with ``errore="virus"`` when the message
  carries the EICAR test string);
- per recipient on a PEC domain of the sandbox (``tipo="certificato"``), after
  ``delivery_delay`` seconds, ``avvenuta-consegna`` (``completa`` with ``postacert.eml``,
  ``breve`` with it and attachments replaced by their hashes, ``sintetica`` without), or
  ``errore-consegna`` for local parts containing ``inesistente`` (``no-dest``) or
  ``casellapiena`` (``altro``);
- local parts containing ``silenzio``: ``preavviso-errore-consegna`` at 12 h, then
  ``errore-consegna`` at 24 h; ``tardiva``: the 12 h warning, then a delivery at 13 h;
  hours are compressed: one simulated second lasts ``1 / time_scale`` real seconds;
- recipients on other domains are ``tipo="esterno"``: no receipt but the acceptance.

Every submission and every receipt is logged as one JSON line in ``log_file`` (time,
mailbox, recipients, verdict), which tests use to check the limits.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import hashlib
import itertools
import json
import logging
import os
import secrets
import signal
import ssl
import sys
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from email import message_from_bytes
from email.message import Message
from email.policy import compat32
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from recapito.sandbox import _proc, world

log = logging.getLogger(__name__)

EICAR = b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE"
ROME = ZoneInfo("Europe/Rome")
WARNING_HOURS = 12
TIMEOUT_HOURS = 24
LATE_DELIVERY_HOURS = 13


@dataclass(frozen=True)
class PecProvider:
    """One sandbox PEC provider and the sender mailboxes it hosts."""

    name: str
    gestore: str  # gestore-emittente
    domain: str  # the provider's PEC domain (receipts come from posta-certificata@domain)
    smtp_host: str  # the name on its SMTPS certificate
    mailboxes: tuple[str, ...]  # logins (= addresses) of sender mailboxes
    per_minute: int = 60
    max_size: int = 30 * 1024 * 1024
    max_recipients: int = 50
    per_day: int | None = None


DEFAULT_PROVIDERS: tuple[PecProvider, ...] = (
    PecProvider(
        name="postaveloce",
        gestore="PostaVeloce PEC S.p.A. (sandbox)",
        domain="pec.postaveloce.test",
        smtp_host="smtps.pec.postaveloce.test",
        mailboxes=("campagne@pec.postaveloce.test",),
        per_minute=120,
        max_size=30 * 1024 * 1024,
        max_recipients=50,
        per_day=20_000,
    ),
    PecProvider(
        name="legalmail",
        gestore="LegalMail Esempio S.r.l. (sandbox)",
        domain="legalmail-esempio.test",
        smtp_host="sendm.legalmail-esempio.test",
        mailboxes=("notifiche@legalmail-esempio.test",),
        per_minute=60,
        max_size=100 * 1024 * 1024,
        max_recipients=500,
        per_day=5_000,
    ),
)


def mailbox_name(login: str, provider: PecProvider) -> str:
    """The sandbox's name for a sender mailbox: ``campagne@…`` at ``postaveloce`` ->
    ``campagne-postaveloce``."""
    return f"{login.partition('@')[0]}-{provider.name}"


@dataclass(frozen=True)
class ProviderProcess:
    """A provider as its child process serves it."""

    provider: dict[str, Any]  # asdict(PecProvider)
    address: str
    port: int
    cert_file: str
    key_file: str
    sign_cert: str
    sign_key: str

    @property
    def config(self) -> PecProvider:
        data = dict(self.provider)
        data["mailboxes"] = tuple(data["mailboxes"])
        return PecProvider(**data)


@dataclass(frozen=True)
class PecProcessSpec:
    providers: tuple[ProviderProcess, ...]
    passwords: dict[str, str]  # login -> password (secret: the spec file is 0600)
    pec_domains: tuple[str, ...]  # recipient domains that are PEC mailboxes (certificato)
    mail_root: str  # Dovecot homes: <mail_root>/<login>/Maildir
    log_file: str
    parent_pid: int
    delivery_delay: float = 0.5  # seconds before delivery/error receipts
    time_scale: float = 3600.0  # simulated seconds per real second (12 h = 12 s)
    uid: int = -1  # owner of the receipts written (the mail user), -1: unchanged
    gid: int = -1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PecProcessSpec:
        data = json.loads(text)
        data["providers"] = tuple(ProviderProcess(**p) for p in data["providers"])
        data["pec_domains"] = tuple(data["pec_domains"])
        return cls(**data)


# ---- certificates ----------------------------------------------------------------------------


def ensure_signing_certificate(
    sandbox_dir: Path, provider: PecProvider, now: dt.datetime | None = None
) -> tuple[Path, Path]:
    """The provider's receipt-signing certificate (RSA 2048, e-mail protection) issued by the
    sandbox CA (``ca.pem``/``ca-key.pem`` must exist); reused while valid and CA-issued."""
    moment = now or dt.datetime.now(dt.UTC)
    folder = sandbox_dir / "certs"
    folder.mkdir(parents=True, exist_ok=True)
    cert_path = folder / f"pec-signer-{provider.name}.pem"
    key_path = folder / f"pec-signer-{provider.name}.key"
    ca_cert = x509.load_pem_x509_certificate((sandbox_dir / "ca.pem").read_bytes())
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if (
            cert.issuer == ca_cert.subject
            and cert.not_valid_after_utc > moment + dt.timedelta(days=2)
            and cert.not_valid_before_utc >= ca_cert.not_valid_before_utc
        ):
            return cert_path, key_path
    except (OSError, ValueError):
        pass
    ca_key = serialization.load_pem_private_key(
        (sandbox_dir / "ca-key.pem").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "IT"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, provider.gestore),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{provider.gestore} - firma ricevute"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - dt.timedelta(hours=1))
        .not_valid_after(min(moment + dt.timedelta(days=365), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(f"posta-certificata@{provider.domain}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    for path, data, mode in (
        (
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        ),
        (cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644),
    ):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    return cert_path, key_path


# ---- receipts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """What a provider accepted: the facts every receipt about it repeats."""

    provider: PecProvider
    sender: str
    recipients: tuple[tuple[str, str], ...]  # (address, certificato | esterno)
    subject: str
    msgid: str  # the original Message-ID, with <>
    identificativo: str
    receipt_kind: str  # completa | breve | sintetica
    original: bytes
    accepted_at: dt.datetime


SUBJECTS = {
    "accettazione": "ACCETTAZIONE",
    "non-accettazione": "AVVISO DI NON ACCETTAZIONE",
    "avvenuta-consegna": "CONSEGNA",
    "errore-consegna": "AVVISO DI MANCATA CONSEGNA",
    "preavviso-errore-consegna": "AVVISO DI MANCATA CONSEGNA ENTRO 12 ORE",
}


def _zone(moment: dt.datetime) -> str:
    offset = moment.utcoffset() or dt.timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def daticert_xml(
    sub: Submission,
    tipo: str,
    moment: dt.datetime,
    *,
    errore: str = "nessuno",
    consegna: str | None = None,
    errore_esteso: str | None = None,
    ricevuta: str | None = None,
) -> bytes:
    """The certification data of one receipt (the ``daticert.xml`` of the technical rules)."""
    local = moment.astimezone(ROME)
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<postacert tipo="{tipo}" errore="{errore}">',
        "  <intestazione>",
        f"    <mittente>{escape(sub.sender)}</mittente>",
    ]
    for address, kind in sub.recipients:
        lines.append(f'    <destinatari tipo="{kind}">{escape(address)}</destinatari>')
    lines += [
        f"    <risposte>{escape(sub.sender)}</risposte>",
        f"    <oggetto>{escape(sub.subject)}</oggetto>",
        "  </intestazione>",
        "  <dati>",
        f"    <gestore-emittente>{escape(sub.provider.gestore)}</gestore-emittente>",
        f'    <data zona="{_zone(local)}">',
        f"      <giorno>{local:%d/%m/%Y}</giorno>",
        f"      <ora>{local:%H:%M:%S}</ora>",
        "    </data>",
        f"    <identificativo>{escape(sub.identificativo)}</identificativo>",
        f"    <msgid>{escape(sub.msgid)}</msgid>",
    ]
    if ricevuta:
        lines.append(f'    <ricevuta tipo="{ricevuta}" />')
    if consegna:
        lines.append(f"    <consegna>{escape(consegna)}</consegna>")
    if errore_esteso:
        lines.append(f"    <errore-esteso>{escape(errore_esteso)}</errore-esteso>")
    lines += ["  </dati>", "</postacert>", ""]
    return "\r\n".join(lines).encode("utf-8")


def _text_body(
    sub: Submission, tipo: str, moment: dt.datetime, consegna: str | None, errore_esteso: str | None
) -> str:
    local = moment.astimezone(ROME)
    when = f"Il giorno {local:%d/%m/%Y} alle ore {local:%H:%M:%S} ({_zone(local)})"
    head = f'il messaggio "{sub.subject}" proveniente da "{sub.sender}"'
    if tipo == "accettazione":
        dest = "\r\n".join(
            f'{a} ("{"posta certificata" if k == "certificato" else "posta ordinaria"}")'
            for a, k in sub.recipients
        )
        body = f"Ricevuta di accettazione\r\n\r\n{when} {head}\r\ned indirizzato a:\r\n{dest}\r\n"
        body += "è stato accettato dal sistema ed inoltrato.\r\n"
    elif tipo == "non-accettazione":
        body = (
            f'Avviso di non accettazione\r\n\r\n{when} nel messaggio "{sub.subject}" '
            f'proveniente da "{sub.sender}" è stato rilevato un problema che ne impedisce '
            f"l'accettazione: {errore_esteso or 'errore'}.\r\n"
            "Il messaggio non è stato accettato.\r\n"
        )
    elif tipo == "avvenuta-consegna":
        body = (
            f"Ricevuta di avvenuta consegna\r\n\r\n{when} {head}\r\ned indirizzato a "
            f'"{consegna}"\r\nè stato consegnato nella casella di destinazione.\r\n'
        )
    elif tipo == "preavviso-errore-consegna":
        body = (
            f"Avviso di mancata consegna\r\n\r\n{when} {head}\r\ned indirizzato a "
            f'"{consegna}"\r\nnon è stato ancora consegnato entro le prime 12 ore '
            "dall'invio.\r\n"
        )
    else:
        body = (
            f"Avviso di mancata consegna\r\n\r\n{when} {head}\r\ned indirizzato a "
            f'"{consegna}"\r\nnon è stato consegnato: {errore_esteso or "errore"}.\r\n'
        )
    return body + f"Identificativo messaggio: {sub.identificativo}\r\n"


def _b64(data: bytes) -> bytes:
    return b"\r\n".join(
        base64.b64encode(data)[i : i + 76] for i in range(0, len(base64.b64encode(data)), 76)
    )


def _breve_copy(original: bytes) -> bytes:
    """The original with every attachment replaced by its SHA-256 (``breve`` receipts)."""
    message = message_from_bytes(original, policy=compat32)
    if not message.is_multipart():
        return original
    for part in message.walk():
        if part.is_multipart():
            continue
        disposition = (part.get("Content-Disposition") or "").lower()
        if "attachment" not in disposition:
            continue
        payload = part.get_payload(decode=True)
        digest = hashlib.sha256(payload if isinstance(payload, bytes) else b"").hexdigest()
        for header in ("Content-Transfer-Encoding", "Content-Type"):
            del part[header]
        part["Content-Type"] = "text/plain; charset=us-ascii"
        part.set_payload(f"SHA-256: {digest}\r\n")
    return message.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class Signer:
    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        self.key = key

    def sign(self, content: bytes) -> bytes:
        """A detached PKCS#7 signature (DER) over ``content`` (already CRLF canonical)."""
        return (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(content)
            .add_signer(self.cert, self.key, hashes.SHA256())
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature])
        )


_COUNTER = itertools.count(1)


def build_receipt(
    sub: Submission,
    tipo: str,
    signer: Signer,
    *,
    moment: dt.datetime | None = None,
    errore: str = "nessuno",
    consegna: str | None = None,
    errore_esteso: str | None = None,
    subject_prefix: str | None = None,
) -> bytes:
    """One signed receipt (bytes as stored in the sender's mailbox)."""
    at = moment or dt.datetime.now(dt.UTC)
    ricevuta = sub.receipt_kind if tipo == "avvenuta-consegna" else None
    xml = daticert_xml(
        sub,
        tipo,
        at,
        errore=errore,
        consegna=consegna,
        errore_esteso=errore_esteso,
        ricevuta=ricevuta,
    )
    text = _text_body(sub, tipo, at, consegna, errore_esteso).encode("utf-8")
    boundary = f"----=_Part_{secrets.token_hex(12)}"
    parts = [
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        "This is a multi-part message in MIME format.\r\n".encode(),
        f"--{boundary}\r\n".encode()
        + b"Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + _b64(text)
        + b"\r\n",
        f"--{boundary}\r\n".encode()
        + b'Content-Type: application/xml; name="daticert.xml"\r\n'
        + b'Content-Disposition: inline; filename="daticert.xml"\r\n'
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + _b64(xml)
        + b"\r\n",
    ]
    if tipo == "avvenuta-consegna" and sub.receipt_kind in ("completa", "breve"):
        copy = sub.original if sub.receipt_kind == "completa" else _breve_copy(sub.original)
        parts.append(
            f"--{boundary}\r\n".encode()
            + b'Content-Type: message/rfc822; name="postacert.eml"\r\n'
            + b'Content-Disposition: inline; filename="postacert.eml"\r\n\r\n'
            + copy.rstrip(b"\r\n")
            + b"\r\n"
        )
    inner = b"".join(parts) + f"--{boundary}--\r\n".encode()
    signature = signer.sign(inner)
    outer = f"----=_Signed_{secrets.token_hex(12)}"
    prefix = subject_prefix or SUBJECTS[tipo]
    domain = sub.provider.domain
    receipt_id = (
        f"<opec{os.getpid()}.{at:%Y%m%d%H%M%S}.{next(_COUNTER)}.{secrets.token_hex(4)}@{domain}>"
    )
    headers = [
        ("Return-Path", "<>"),
        ("Date", email.utils.format_datetime(at.astimezone(ROME))),
        ("From", f'"Posta Certificata" <posta-certificata@{domain}>'),
        ("To", sub.sender),
        ("Subject", _encode_subject(f"{prefix}: {sub.subject}")),
        ("Message-ID", receipt_id),
        ("X-Ricevuta", tipo),
        ("X-Riferimento-Message-ID", sub.msgid),
    ]
    if tipo == "avvenuta-consegna":
        headers.append(("X-TipoRicevuta", sub.receipt_kind))
    if tipo in ("errore-consegna", "non-accettazione") and errore != "nessuno":
        headers.append(("X-Errore", errore))
    headers += [
        ("MIME-Version", "1.0"),
        (
            "Content-Type",
            f'multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; '
            f'boundary="{outer}"',
        ),
    ]
    head = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
    return (
        head
        + b"\r\nThis is an S/MIME signed message\r\n\r\n"
        + f"--{outer}\r\n".encode()
        + inner
        + f"\r\n--{outer}\r\n".encode()
        + b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        + b"Content-Transfer-Encoding: base64\r\n"
        + b'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n'
        + _b64(signature)
        + f"\r\n\r\n--{outer}--\r\n".encode()
    )


def _encode_subject(text: str) -> str:
    if text.isascii():
        return text
    from email.header import Header

    return Header(text, "utf-8").encode()


# ---- the submission server ---------------------------------------------------------------------


def _addr(value: str | None) -> str:
    return email.utils.parseaddr(value or "")[1].strip().lower()


def _header_addresses(message: Message, *names: str) -> set[str]:
    values = [v for name in names for v in (message.get_all(name) or [])]
    return {a.strip().lower() for _, a in email.utils.getaddresses(values) if a}


class Mailboxes:
    """Receipts into the sender mailboxes' Maildirs (``new``), readable by Dovecot."""

    def __init__(self, root: Path, uid: int, gid: int) -> None:
        self.root = root
        self.uid = uid
        self.gid = gid
        self._counter = itertools.count(1)

    def deliver(self, login: str, data: bytes) -> Path:
        maildir = self.root / login / "Maildir"
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"{int(now)}.M{int((now % 1) * 1e6):06d}P{os.getpid()}Q{next(self._counter)}.pec"
        tmp = maildir / "tmp" / name
        with open(tmp, "xb") as handle:
            handle.write(data.replace(b"\r\n", b"\n"))  # Maildir files use LF line ends
        if self.uid >= 0 and os.geteuid() == 0:
            os.chown(tmp, self.uid, self.gid)
        final = maildir / "new" / name
        os.rename(tmp, final)
        return final


class ProviderHandler:
    """aiosmtpd handler of one provider: the PEC checks, then the receipts."""

    def __init__(
        self,
        proc: ProviderProcess,
        spec: PecProcessSpec,
        boxes: Mailboxes,
        journal: Journal,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.proc = proc
        self.provider = proc.config
        self.spec = spec
        self.boxes = boxes
        self.journal = journal
        self.loop = loop
        self.signer = Signer(proc.sign_cert, proc.sign_key)
        self.recent: dict[str, deque[float]] = defaultdict(deque)  # login -> accept times
        self.today: dict[str, int] = defaultdict(int)
        self.pec_domains = {d.lower() for d in spec.pec_domains}

    # AUTH
    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = data.login.decode("utf-8", "replace").strip().lower()
        password = data.password.decode("utf-8", "replace")
        expected = self.spec.passwords.get(login)
        ok = (
            login in self.provider.mailboxes
            and expected is not None
            and secrets.compare_digest(expected, password)
        )
        if not ok:
            self.journal.write(provider=self.provider.name, event="auth_failed", login=login)
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=login)

    def _login(self, session: Session) -> str:
        return str(session.auth_data or "")

    def _over_limit(self, login: str) -> bool:
        window = self.recent[login]
        now = time.monotonic()
        while window and now - window[0] >= 60.0:
            window.popleft()
        return len(window) >= self.provider.per_minute

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        login = self._login(session)
        if address.strip().lower() != login:
            return f"553 5.7.1 Mittente <{address}> diverso dalla casella autenticata"
        if self._over_limit(login):
            self.journal.write(provider=self.provider.name, event="traffic_limit", login=login)
            return (
                "450 4.7.0 Limite di invio superato: troppi messaggi per minuto "
                f"({self.provider.per_minute}/min), riprovare più tardi (traffic limit exceeded)"
            )
        if self.provider.per_day is not None and self.today[login] >= self.provider.per_day:
            return "550 5.7.1 Limite giornaliero di invio superato (daily quota exceeded)"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.provider.max_recipients:
            return f"452 4.5.3 Troppi destinatari (massimo {self.provider.max_recipients})"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        login = self._login(session)
        raw = envelope.original_content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        message = message_from_bytes(raw, policy=compat32)
        rcpts = [r.strip().lower() for r in envelope.rcpt_tos]
        verdict = self._check(login, message, raw, rcpts)
        if verdict is not None:
            self.journal.write(
                provider=self.provider.name, event="refused", login=login, reply=verdict
            )
            return verdict
        self.recent[login].append(time.monotonic())
        self.today[login] += 1
        msgid = (message.get("Message-ID") or "").strip() or f"<{secrets.token_hex(8)}@missing>"
        kind = (_header(message, "X-TipoRicevuta") or "completa").strip().lower()
        if kind not in ("completa", "breve", "sintetica"):
            kind = "completa"
        now = dt.datetime.now(dt.UTC)
        sub = Submission(
            provider=self.provider,
            sender=login,
            recipients=tuple(
                (r, "certificato" if r.rpartition("@")[2] in self.pec_domains else "esterno")
                for r in rcpts
            ),
            subject=_decoded_subject(message),
            msgid=msgid,
            identificativo=f"opec{secrets.token_hex(6)}.{now:%Y%m%d%H%M%S}@{self.provider.domain}",
            receipt_kind=kind,
            original=raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
            accepted_at=now,
        )
        self.journal.write(
            provider=self.provider.name,
            event="accepted",
            login=login,
            recipients=rcpts,
            msgid=msgid,
            identificativo=sub.identificativo,
            size=len(raw),
        )
        if EICAR in raw:
            self._receipt(
                sub,
                "non-accettazione",
                errore="virus",
                errore_esteso="Rilevato virus informatico nel messaggio (EICAR)",
                subject_prefix="AVVISO DI NON ACCETTAZIONE PER VIRUS",
            )
        else:
            self._receipt(sub, "accettazione")
            self._schedule_fates(sub)
        return f"250 2.0.0 Ok: queued as {sub.identificativo}"

    def _check(self, login: str, message: Message, raw: bytes, rcpts: list[str]) -> str | None:
        if _addr(message.get("From")) != login:
            return "550 5.7.1 Il campo From deve coincidere con la casella PEC autenticata"
        if message.get_all("Bcc"):
            return "550 5.7.1 Destinatari in copia nascosta (Bcc) non ammessi nella PEC"
        listed = _header_addresses(message, "To", "Cc")
        missing = [r for r in rcpts if r not in listed]
        if missing:
            return f"550 5.7.1 Destinatario {missing[0]} non presente nei campi To o Cc"
        if len(raw) * len(rcpts) > self.provider.max_size:
            return (
                f"552 5.3.4 Dimensione del messaggio per numero di destinatari oltre il limite "
                f"di {self.provider.max_size} byte"
            )
        return None

    # receipts
    def _receipt(self, sub: Submission, tipo: str, **kw: Any) -> None:
        data = build_receipt(sub, tipo, self.signer, **kw)
        self.boxes.deliver(sub.sender, data)
        self.journal.write(
            provider=self.provider.name,
            event="receipt",
            tipo=tipo,
            login=sub.sender,
            msgid=sub.msgid,
            consegna=kw.get("consegna"),
        )

    def _later(self, sim_seconds: float, real_floor: float, fn: Any, *args: Any, **kw: Any) -> None:
        delay = max(real_floor, sim_seconds / self.spec.time_scale)
        self.loop.call_later(delay, lambda: self._safely(fn, *args, **kw))

    def _safely(self, fn: Any, *args: Any, **kw: Any) -> None:
        try:
            fn(*args, **kw)
        except Exception:  # one receipt that cannot be written never stops the provider
            log.exception("cannot write a PEC receipt")

    def _schedule_fates(self, sub: Submission) -> None:
        delay = self.spec.delivery_delay
        for address, kind in sub.recipients:
            if kind != "certificato":
                continue  # esterno: ordinary mail, no receipt will ever come
            local = address.rpartition("@")[0]
            hour = 3600.0
            if "inesistente" in local:
                self._later(
                    0,
                    delay,
                    self._receipt,
                    sub,
                    "errore-consegna",
                    errore="no-dest",
                    consegna=address,
                    errore_esteso="5.1.1 - Utente inesistente",
                )
            elif "casellapiena" in local:
                self._later(
                    0,
                    delay,
                    self._receipt,
                    sub,
                    "errore-consegna",
                    errore="altro",
                    consegna=address,
                    errore_esteso="5.2.2 - Casella piena",
                )
            elif "silenzio" in local:
                self._later(
                    WARNING_HOURS * hour,
                    delay,
                    self._receipt,
                    sub,
                    "preavviso-errore-consegna",
                    errore="altro",
                    consegna=address,
                    errore_esteso="4.4.7 - Messaggio non ancora consegnato",
                )
                self._later(
                    TIMEOUT_HOURS * hour,
                    delay * 2,
                    self._receipt,
                    sub,
                    "errore-consegna",
                    errore="altro",
                    consegna=address,
                    errore_esteso="5.4.7 - Tempo massimo di consegna superato",
                    subject_prefix="AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO",
                )
            elif "tardiva" in local:
                self._later(
                    WARNING_HOURS * hour,
                    delay,
                    self._receipt,
                    sub,
                    "preavviso-errore-consegna",
                    errore="altro",
                    consegna=address,
                    errore_esteso="4.4.7 - Messaggio non ancora consegnato",
                )
                self._later(
                    LATE_DELIVERY_HOURS * hour,
                    delay * 2,
                    self._receipt,
                    sub,
                    "avvenuta-consegna",
                    consegna=address,
                )
            else:
                self._later(0, delay, self._receipt, sub, "avvenuta-consegna", consegna=address)


def _header(message: Message, name: str) -> str | None:
    """A header's value, whatever the case of its name."""
    wanted = name.lower()
    for key, value in message.items():
        if key.lower() == wanted:
            return str(value)
    return None


def _decoded_subject(message: Message) -> str:
    from email.header import decode_header, make_header

    value = str(message.get("Subject") or "")
    if any("\udc80" <= c <= "\udcff" for c in value):  # raw 8-bit (UTF-8) header bytes
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    try:
        return str(make_header(decode_header(str(value)))).replace("\r", "").replace("\n", "")
    except (ValueError, LookupError):
        return str(value)


class Journal:
    """JSON lines of what the providers did (submissions, refusals, receipts)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, **fields: Any) -> None:
        fields["t"] = round(time.time(), 4)
        self._handle.write(json.dumps(fields, sort_keys=True) + "\n")

    def close(self) -> None:
        self._handle.close()


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


async def serve(spec: PecProcessSpec) -> int:
    loop = asyncio.get_running_loop()
    journal = Journal(Path(spec.log_file))
    boxes = Mailboxes(Path(spec.mail_root), spec.uid, spec.gid)
    listeners: list[asyncio.AbstractServer] = []
    try:
        for proc in spec.providers:
            try:
                handler = ProviderHandler(proc, spec, boxes, journal, loop)
                context = _server_context(proc.cert_file, proc.key_file)
            except (OSError, ValueError) as exc:
                _proc.report(f"{_proc.ERROR} PEC {proc.config.name}: {exc}")
                return 1

            def factory(handler: ProviderHandler = handler) -> SMTP:
                return SMTP(
                    handler,
                    hostname=handler.provider.smtp_host,
                    ident="recapito sandbox PEC",
                    data_size_limit=handler.provider.max_size + 1024 * 1024,
                    enable_SMTPUTF8=True,
                    auth_required=True,
                    auth_require_tls=False,  # the whole session is TLS (port 465 style)
                    authenticator=handler.authenticate,
                    timeout=300,
                    loop=loop,
                )

            try:
                listeners.append(
                    await loop.create_server(
                        factory, host=proc.address, port=proc.port, ssl=context, backlog=256
                    )
                )
            except OSError as exc:
                _proc.report(
                    _proc.listen_error(f"PEC {proc.config.name}", proc.address, proc.port, exc)
                )
                return 1
        _proc.report(_proc.READY)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        watchdog = asyncio.create_task(_proc.watch_parent(spec.parent_pid, stop))
        await stop.wait()
        watchdog.cancel()
        return 0
    finally:
        for listener in listeners:
            listener.close()
        journal.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m recapito.sandbox.pec '<spec json>'", file=sys.stderr)
        return 2
    _proc.configure_logging("pec")
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    spec = PecProcessSpec.from_json(_proc.spec_text(args[0]))
    return asyncio.run(serve(spec))


# ---- wiring into the sandbox -----------------------------------------------------------------


def pec_domains(providers: Sequence[PecProvider] = DEFAULT_PROVIDERS) -> tuple[str, ...]:
    """Recipient domains that are PEC mailboxes: the providers' own and world.py's."""
    return tuple(sorted({p.domain for p in providers} | set(world.pec_domains())))


@dataclass(frozen=True)
class PecWorld:
    """What the sandbox's PEC child serves (tests pass their own, e.g. higher limits)."""

    providers: tuple[PecProvider, ...] = DEFAULT_PROVIDERS
    delivery_delay: float = 0.5
    time_scale: float = 3600.0
    address: str = "127.0.0.1"

    def logins(self) -> list[str]:
        return [login for p in self.providers for login in p.mailboxes]

    def new_passwords(self) -> dict[str, str]:
        return {login: secrets.token_urlsafe(18) for login in self.logins()}

    def process_spec(
        self,
        sandbox_dir: Path,
        ports: dict[str, int],
        passwords: dict[str, str],
        *,
        parent_pid: int,
        mail_root: Path,
        mail_owner: tuple[int, int],
    ) -> PecProcessSpec:
        """Certificates made (or reused) and the child's spec."""
        from recapito.sandbox.certs import ensure_certificates

        servers = [world.MXServer(p.smtp_host, self.address, "tls13") for p in self.providers]
        pki = ensure_certificates(sandbox_dir, servers)
        procs = []
        for provider in self.providers:
            tls = pki.leaves[provider.smtp_host]
            sign_cert, sign_key = ensure_signing_certificate(sandbox_dir, provider)
            procs.append(
                ProviderProcess(
                    provider=asdict(provider),
                    address=self.address,
                    port=ports[provider.name],
                    cert_file=str(tls.cert),
                    key_file=str(tls.key),
                    sign_cert=str(sign_cert),
                    sign_key=str(sign_key),
                )
            )
        return PecProcessSpec(
            providers=tuple(procs),
            passwords=dict(passwords),
            pec_domains=pec_domains(self.providers),
            mail_root=str(mail_root),
            log_file=str(sandbox_dir / "logs" / "pec-journal.jsonl"),
            parent_pid=parent_pid,
            delivery_delay=self.delivery_delay,
            time_scale=self.time_scale,
            uid=mail_owner[0],
            gid=mail_owner[1],
        )

    def mailboxes_document(
        self,
        ports: dict[str, int],
        passwords: dict[str, str],
        *,
        ca_file: Path,
        imap: tuple[str, int] | None,
    ) -> dict[str, Any]:
        """The ``RECAPITO_PEC_MAILBOXES_FILE`` content (recapito.pec.mailboxes)."""
        items = []
        for provider in self.providers:
            for login in provider.mailboxes:
                item: dict[str, Any] = {
                    "name": mailbox_name(login, provider),
                    "address": login,
                    "smtp_host": provider.smtp_host,
                    "smtp_port": ports[provider.name],
                    "smtp_address": self.address,
                    "username": login,
                    "password": passwords[login],
                    "per_minute": provider.per_minute,
                    "per_day": provider.per_day,
                    "connections": 2,
                    "max_size": provider.max_size,
                    "receipt_kind": "breve",
                    "credential_expires": (dt.date.today() + dt.timedelta(days=90)).isoformat(),
                    "ca_file": str(ca_file),
                }
                if imap is not None:
                    item.update(imap_host=imap[0], imap_port=imap[1], imap_address=self.address)
                items.append(item)
        return {"mailboxes": items}


def journal_path(sandbox_dir: Path) -> Path:
    return sandbox_dir / "logs" / "pec-journal.jsonl"


if __name__ == "__main__":
    sys.exit(main())
