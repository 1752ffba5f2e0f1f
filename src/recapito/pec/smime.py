"""S/MIME (CMS SignedData, RFC 5652) for PEC receipts: verify and sign, sha1 and sha-256.

PEC providers sign every receipt (``multipart/signed`` with a detached ``smime.p7s``, now and
then an opaque ``application/pkcs7-mime`` blob). ``cryptography`` signs CMS but cannot sign
with SHA-1 and has no CMS verifier, so this module reads the SignedData structure itself (a
small DER/BER reader: definite and indefinite lengths) and checks, with ``cryptography``'s
primitives:

1. the ``messageDigest`` signed attribute equals the digest of the signed content (or, with
   no signed attributes, the signature covers the content itself);
2. the signature over the DER ``SET OF`` signed attributes with the signer certificate's key
   (RSA PKCS#1 v1.5 or ECDSA; sha1, sha224, sha256, sha384, sha512);
3. the signer certificate chains to a trust anchor (a PEM bundle: the providers' CAs, or the
   providers' certificates themselves as AgID publishes them), each link checked with
   ``verify_directly_issued_by`` and inside its validity window at signing time.

Verdicts are honest: ``valid`` only when all three hold; ``invalid`` when any fails (the
reason says which: ``digest-mismatch``, ``bad-signature``, ``untrusted-signer``,
``expired-signer``, ``malformed``, ``unsigned``); ``unchecked`` when the check was not made
(disabled, no trust anchors configured — then ``intact`` says whether 1 and 2 held — or an
algorithm this module does not know, such as RSA-PSS).

``sign_detached`` builds the signatures the sandbox provider and the tests use (sha1 or
sha-256, RSA or EC keys), byte-compatible with OpenSSL's ``smime -verify``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

SignatureStatus = Literal["valid", "invalid", "unchecked"]

# -- OIDs (DER content bytes) ----------------------------------------------------------------


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for value in parts[2:]:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


OID_DATA = _oid("1.2.840.113549.1.7.1")
OID_SIGNED_DATA = _oid("1.2.840.113549.1.7.2")
OID_CONTENT_TYPE = _oid("1.2.840.113549.1.9.3")
OID_MESSAGE_DIGEST = _oid("1.2.840.113549.1.9.4")
OID_SIGNING_TIME = _oid("1.2.840.113549.1.9.5")
OID_RSA = _oid("1.2.840.113549.1.1.1")
OID_RSA_PSS = _oid("1.2.840.113549.1.1.10")
OID_EC_PUBLIC_KEY = _oid("1.2.840.10045.2.1")

_DIGESTS: dict[bytes, str] = {
    _oid("1.3.14.3.2.26"): "sha1",
    _oid("2.16.840.1.101.3.4.2.4"): "sha224",
    _oid("2.16.840.1.101.3.4.2.1"): "sha256",
    _oid("2.16.840.1.101.3.4.2.2"): "sha384",
    _oid("2.16.840.1.101.3.4.2.3"): "sha512",
}
_DIGEST_OID = {name: oid for oid, name in _DIGESTS.items()}
_RSA_WITH = {  # sha*WithRSAEncryption
    _oid("1.2.840.113549.1.1.5"): "sha1",
    _oid("1.2.840.113549.1.1.14"): "sha224",
    _oid("1.2.840.113549.1.1.11"): "sha256",
    _oid("1.2.840.113549.1.1.12"): "sha384",
    _oid("1.2.840.113549.1.1.13"): "sha512",
}
_ECDSA_WITH = {
    _oid("1.2.840.10045.4.1"): "sha1",
    _oid("1.2.840.10045.4.3.1"): "sha224",
    _oid("1.2.840.10045.4.3.2"): "sha256",
    _oid("1.2.840.10045.4.3.3"): "sha384",
    _oid("1.2.840.10045.4.3.4"): "sha512",
}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
MICALG = {"sha1": "sha-1", "sha224": "sha-224", "sha256": "sha-256", "sha384": "sha-384"}


class MalformedCMS(ValueError):
    """The bytes are not a CMS SignedData this module can read."""


# -- a small DER/BER reader -------------------------------------------------------------------


@dataclass(frozen=True)
class TLV:
    tag: int
    start: int  # first byte of the TLV (the tag)
    body: int  # first content byte
    end: int  # one past the last content byte (before an end-of-contents for BER)
    after: int  # one past the whole TLV
    data: bytes = field(repr=False)

    @property
    def content(self) -> bytes:
        return self.data[self.body : self.end]

    @property
    def raw(self) -> bytes:
        return self.data[self.start : self.after]

    @property
    def constructed(self) -> bool:
        return bool(self.tag & 0x20)

    def children(self) -> list[TLV]:
        out = []
        pos = self.body
        while pos < self.end:
            child = read_tlv(self.data, pos, self.end)
            out.append(child)
            pos = child.after
        return out


_MAX_DEPTH = 64


def read_tlv(data: bytes, pos: int, limit: int | None = None, depth: int = 0) -> TLV:
    """One TLV at ``pos`` (single-byte tags only, which is all CMS uses)."""
    limit = len(data) if limit is None else limit
    if depth > _MAX_DEPTH or pos + 2 > limit:
        raise MalformedCMS("truncated or too deeply nested DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise MalformedCMS("multi-byte tags are not used by CMS")
    first = data[pos + 1]
    body = pos + 2
    if first < 0x80:
        length = first
    elif first == 0x80:  # BER indefinite length: children up to the end-of-contents octets
        if not tag & 0x20:
            raise MalformedCMS("indefinite length on a primitive")
        cursor = body
        while True:
            if cursor + 2 > limit:
                raise MalformedCMS("unterminated indefinite length")
            if data[cursor] == 0 and data[cursor + 1] == 0:
                return TLV(tag, pos, body, cursor, cursor + 2, data)
            cursor = read_tlv(data, cursor, limit, depth + 1).after
    else:
        count = first & 0x7F
        if count > 4 or body + count > limit:
            raise MalformedCMS("bad DER length")
        length = int.from_bytes(data[body : body + count], "big")
        body += count
    end = body + length
    if end > limit:
        raise MalformedCMS("DER length past the end")
    return TLV(tag, pos, body, end, end, data)


def _octets(node: TLV) -> bytes:
    """An OCTET STRING's bytes, also BER constructed ones (chunks)."""
    if not node.constructed:
        return node.content
    return b"".join(_octets(c) for c in node.children())


# -- verification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureResult:
    status: SignatureStatus
    reason: str | None = None  # why not valid
    digest: str | None = None  # sha1, sha256, ...
    signer: str | None = None  # the signer certificate's subject (RFC 4514)
    signing_time: dt.datetime | None = None
    intact: bool | None = None  # digest and signature checked out (trust aside)

    def as_dict(self) -> dict[str, object]:
        return {
            "status": self.status,
            "reason": self.reason,
            "digest": self.digest,
            "signer": self.signer,
            "signing_time": self.signing_time.isoformat() if self.signing_time else None,
            "intact": self.intact,
        }


UNSIGNED = SignatureResult("invalid", "unsigned")
NOT_CHECKED = SignatureResult("unchecked", "disabled")


class TrustStore:
    """Trust anchors for receipt signatures: CA certificates or provider certificates."""

    def __init__(self, certificates: Iterable[x509.Certificate]) -> None:
        self.anchors = list(certificates)
        self._fingerprints = {c.fingerprint(hashes.SHA256()) for c in self.anchors}
        self._by_subject: dict[bytes, list[x509.Certificate]] = {}
        for cert in self.anchors:
            self._by_subject.setdefault(cert.subject.public_bytes(), []).append(cert)

    @classmethod
    def from_pem_file(cls, path: Path) -> TrustStore:
        return cls(x509.load_pem_x509_certificates(path.read_bytes()))

    def __len__(self) -> int:
        return len(self.anchors)

    def trusts(self, cert: x509.Certificate) -> bool:
        return cert.fingerprint(hashes.SHA256()) in self._fingerprints

    def issuers_of(self, cert: x509.Certificate) -> list[x509.Certificate]:
        return self._by_subject.get(cert.issuer.public_bytes(), [])


@dataclass(frozen=True)
class _Signer:
    sid_issuer: bytes | None
    sid_serial: int | None
    sid_ski: bytes | None
    digest: str
    signed_attrs: TLV | None
    sig_alg: bytes
    signature: bytes


def _parse_signed_data(der: bytes) -> tuple[bytes | None, list[bytes], list[_Signer]]:
    """(encapsulated content or None, raw certificates, signer infos)."""
    top = read_tlv(der, 0)
    items = top.children()
    if len(items) < 2 or items[0].content != OID_SIGNED_DATA or items[1].tag != 0xA0:
        raise MalformedCMS("not a CMS SignedData")
    sd_children = items[1].children()
    if not sd_children:
        raise MalformedCMS("empty SignedData")
    parts = sd_children[0].children()
    if len(parts) < 4:
        raise MalformedCMS("short SignedData")
    encap = parts[2].children()
    content = None
    if len(encap) > 1 and encap[1].tag == 0xA0:
        inner = encap[1].children()
        content = _octets(inner[0]) if inner else b""
    certs: list[bytes] = []
    signer_set = parts[-1]
    for node in parts[3:-1]:
        if node.tag == 0xA0:  # [0] IMPLICIT CertificateSet
            certs = [c.raw for c in node.children() if c.tag == 0x30]
    signers = []
    for info in signer_set.children():
        fields = info.children()
        if len(fields) < 5:
            raise MalformedCMS("short SignerInfo")
        sid = fields[1]
        issuer = serial = ski = None
        if sid.tag == 0x30:
            name, number = sid.children()[:2]
            issuer, serial = name.raw, int.from_bytes(number.content, "big", signed=True)
        elif sid.tag == 0x80:
            ski = sid.content
        digest_oid = fields[2].children()[0].content
        index = 3
        attrs = None
        if fields[index].tag == 0xA0:
            attrs = fields[index]
            index += 1
        sig_alg = fields[index].children()[0].content
        signature = fields[index + 1].content
        digest = _DIGESTS.get(digest_oid)
        if digest is None:
            raise _Unsupported("digest algorithm")
        signers.append(_Signer(issuer, serial, ski, digest, attrs, sig_alg, signature))
    if not signers:
        raise MalformedCMS("no signer")
    return content, certs, signers


class _Unsupported(Exception):
    pass


def _attributes(node: TLV) -> dict[bytes, list[TLV]]:
    out: dict[bytes, list[TLV]] = {}
    for attr in node.children():
        oid, values = attr.children()[:2]
        out[oid.content] = values.children()
    return out


def _time(node: TLV) -> dt.datetime | None:
    text = node.content.decode("ascii", "replace")
    try:
        if node.tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
            value = dt.datetime.strptime(text, "%y%m%d%H%M%SZ")
        elif node.tag == 0x18:  # GeneralizedTime
            value = dt.datetime.strptime(text[:14], "%Y%m%d%H%M%S")
        else:
            return None
    except ValueError:
        return None
    return value.replace(tzinfo=dt.UTC)


def _find_signer(signer: _Signer, certs: Sequence[x509.Certificate]) -> x509.Certificate | None:
    for cert in certs:
        if (
            signer.sid_serial is not None
            and cert.serial_number == signer.sid_serial
            and (signer.sid_issuer is None or cert.issuer.public_bytes() == signer.sid_issuer)
        ):
            return cert
        if signer.sid_ski is not None:
            try:
                ext = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            except x509.ExtensionNotFound:
                continue
            if ext.value.digest == signer.sid_ski:
                return cert
    if signer.sid_serial is not None:  # issuer encoded differently: serial alone
        same = [c for c in certs if c.serial_number == signer.sid_serial]
        if len(same) == 1:
            return same[0]
    return None


def _check_signature(cert: x509.Certificate, signer: _Signer, signed: bytes) -> None:
    key = cert.public_key()
    name = signer.digest
    if signer.sig_alg in _RSA_WITH:
        name = _RSA_WITH[signer.sig_alg]
    elif signer.sig_alg in _ECDSA_WITH:
        name = _ECDSA_WITH[signer.sig_alg]
    elif signer.sig_alg not in (OID_RSA, OID_EC_PUBLIC_KEY):
        raise _Unsupported("signature algorithm")
    algorithm = _HASHES[name]()
    if isinstance(key, rsa.RSAPublicKey) and signer.sig_alg != OID_EC_PUBLIC_KEY:
        if signer.sig_alg in _ECDSA_WITH:
            raise InvalidSignature("ECDSA signature with an RSA key")
        key.verify(signer.signature, signed, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signer.signature, signed, ec.ECDSA(algorithm))
    else:
        raise _Unsupported("key type")


def _chain_ok(
    cert: x509.Certificate,
    bundled: Sequence[x509.Certificate],
    trust: TrustStore,
    at: dt.datetime,
) -> str | None:
    """None when ``cert`` chains to an anchor, else the reason it does not."""
    current = cert
    for _ in range(8):
        if not current.not_valid_before_utc <= at <= current.not_valid_after_utc:
            return "expired-signer"
        if trust.trusts(current):
            return None
        candidates = trust.issuers_of(current) + [
            c for c in bundled if c.subject == current.issuer and c is not current
        ]
        parent = None
        for candidate in candidates:
            try:
                current.verify_directly_issued_by(candidate)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            parent = candidate
            break
        if parent is None:
            return "untrusted-signer"
        if trust.trusts(parent):
            if not parent.not_valid_before_utc <= at <= parent.not_valid_after_utc:
                return "expired-signer"
            return None
        current = parent
    return "untrusted-signer"


def verify(
    content: bytes | None,
    cms_der: bytes,
    trust: TrustStore | None,
    *,
    now: dt.datetime | None = None,
) -> tuple[SignatureResult, bytes | None]:
    """Check a CMS SignedData over ``content`` (``None`` for an opaque signature, whose
    encapsulated content is returned). ``trust`` None or empty: integrity only, status
    ``unchecked``. Returns (result, the signed content)."""
    try:
        encapsulated, raw_certs, signers = _parse_signed_data(cms_der)
    except _Unsupported as exc:
        return SignatureResult("unchecked", f"unsupported {exc}"), content
    except (MalformedCMS, IndexError, ValueError) as exc:
        return SignatureResult("invalid", "malformed", signer=str(exc)[:200]), content
    signed_content = content if content is not None else encapsulated
    if signed_content is None:
        return SignatureResult("invalid", "malformed", signer="no signed content"), None
    signer = signers[0]
    try:
        certs = [x509.load_der_x509_certificate(c) for c in raw_certs]
    except ValueError:
        return SignatureResult("invalid", "malformed", digest=signer.digest), signed_content
    cert = _find_signer(signer, certs)
    if cert is None:
        return SignatureResult("invalid", "no-signer-certificate", signer.digest), signed_content
    subject = cert.subject.rfc4514_string()
    digest_value = hashlib.new(signer.digest, signed_content).digest()
    signing_time = None
    if signer.signed_attrs is not None:
        attrs = _attributes(signer.signed_attrs)
        claimed = attrs.get(OID_MESSAGE_DIGEST)
        if not claimed or claimed[0].content != digest_value:
            return (
                SignatureResult("invalid", "digest-mismatch", signer.digest, subject, intact=False),
                signed_content,
            )
        when = attrs.get(OID_SIGNING_TIME)
        signing_time = _time(when[0]) if when else None
        raw = signer.signed_attrs.raw
        signed_bytes = b"\x31" + raw[1:]
    else:
        signed_bytes = signed_content
    try:
        _check_signature(cert, signer, signed_bytes)
    except _Unsupported as exc:
        result = SignatureResult(
            "unchecked", f"unsupported {exc}", signer.digest, subject, signing_time
        )
        return result, signed_content
    except (InvalidSignature, ValueError, TypeError):
        result = SignatureResult(
            "invalid", "bad-signature", signer.digest, subject, signing_time, intact=False
        )
        return result, signed_content
    if trust is None or not len(trust):
        result = SignatureResult(
            "unchecked", "no-trust-anchors", signer.digest, subject, signing_time, intact=True
        )
        return result, signed_content
    at = signing_time or now or dt.datetime.now(dt.UTC)
    problem = _chain_ok(cert, certs, trust, at)
    status: SignatureStatus = "valid" if problem is None else "invalid"
    return (
        SignatureResult(status, problem, signer.digest, subject, signing_time, intact=True),
        signed_content,
    )


def decode_p7s(body: bytes) -> bytes:
    """The DER of an ``smime.p7s`` part body (base64, as every provider sends it)."""
    return base64.b64decode(b"".join(body.split()), validate=False)


# -- signing (sandbox provider, tests) -----------------------------------------------------------


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _len(len(content)) + content


def _seq(*items: bytes) -> bytes:
    return _der(0x30, b"".join(items))


def _set(*items: bytes) -> bytes:
    return _der(0x31, b"".join(sorted(items)))  # DER SET OF: sorted encodings


def _int(value: int) -> bytes:
    raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    return _der(0x02, raw)


def _alg(oid: bytes, null: bool = True) -> bytes:
    return _seq(_der(0x06, oid), b"\x05\x00" if null else b"")


SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def sign_detached(
    content: bytes,
    cert: x509.Certificate,
    key: SigningKey,
    *,
    digest: str = "sha256",
    chain: Sequence[x509.Certificate] = (),
    signing_time: dt.datetime | None = None,
) -> bytes:
    """A detached CMS SignedData (DER) over ``content``, with signed attributes."""
    if digest not in _HASHES:
        raise ValueError(f"unknown digest {digest!r}")
    algorithm = _HASHES[digest]()
    when = (signing_time or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    attrs = [
        _seq(_der(0x06, OID_CONTENT_TYPE), _set(_der(0x06, OID_DATA))),
        _seq(
            _der(0x06, OID_SIGNING_TIME),
            _set(_der(0x17, when.strftime("%y%m%d%H%M%SZ").encode())),
        ),
        _seq(
            _der(0x06, OID_MESSAGE_DIGEST),
            _set(_der(0x04, hashlib.new(digest, content).digest())),
        ),
    ]
    attr_set = _set(*attrs)
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(attr_set, padding.PKCS1v15(), algorithm)
        sig_alg = _alg(OID_RSA)
    else:
        signature = key.sign(attr_set, ec.ECDSA(algorithm))
        ecdsa = {v: k for k, v in _ECDSA_WITH.items()}[digest]
        sig_alg = _alg(ecdsa, null=False)
    issuer_serial = _seq(cert.issuer.public_bytes(), _int(cert.serial_number))
    signer_info = _seq(
        _int(1),
        issuer_serial,
        _alg(_DIGEST_OID[digest]),
        b"\xa0" + attr_set[1:],  # [0] IMPLICIT SET OF Attribute
        sig_alg,
        _der(0x04, signature),
    )
    certs = b"".join(c.public_bytes(serialization.Encoding.DER) for c in (cert, *chain))
    signed_data = _seq(
        _int(1),
        _set(_alg(_DIGEST_OID[digest])),
        _seq(_der(0x06, OID_DATA)),
        _der(0xA0, certs),
        _set(signer_info),
    )
    return _seq(_der(0x06, OID_SIGNED_DATA), _der(0xA0, signed_data))


def smime_signed(
    headers: bytes,
    entity: bytes,
    cert: x509.Certificate,
    key: SigningKey,
    *,
    digest: str = "sha256",
    boundary: str = "----=_smime_signed",
    protocol: str = "application/pkcs7-signature",
    chain: Sequence[x509.Certificate] = (),
    signing_time: dt.datetime | None = None,
) -> bytes:
    """A whole ``multipart/signed`` message: ``headers`` (CRLF lines, without MIME-Version
    and Content-Type) then the signed MIME ``entity`` (CRLF line ends) and ``smime.p7s``."""
    der = sign_detached(entity, cert, key, digest=digest, chain=chain, signing_time=signing_time)
    b64 = base64.encodebytes(der).replace(b"\n", b"\r\n")
    micalg = MICALG.get(digest, digest)
    return (
        headers
        + b"MIME-Version: 1.0\r\n"
        + (
            f'Content-Type: multipart/signed; protocol="{protocol}"; micalg={micalg}; '
            f'boundary="{boundary}"\r\n\r\nThis is an S/MIME signed message\r\n\r\n'
            f"--{boundary}\r\n"
        ).encode()
        + entity
        + f"\r\n--{boundary}\r\n".encode()
        + (
            f'Content-Type: {protocol}; name="smime.p7s"\r\n'
            "Content-Transfer-Encoding: base64\r\n"
            'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n'
        ).encode()
        + b64
        + f"\r\n--{boundary}--\r\n".encode()
    )


def sign_message(
    raw: bytes,
    cert: x509.Certificate,
    key: SigningKey,
    *,
    digest: str = "sha256",
    protocol: str = "application/pkcs7-signature",
    chain: Sequence[x509.Certificate] = (),
    signing_time: dt.datetime | None = None,
    boundary: str | None = None,
) -> bytes:
    """Sign a whole unsigned message: its ``Content-*`` header fields and body become the
    signed entity, the other header fields stay outside (as PEC providers do with
    ``X-Ricevuta`` and friends). Line ends become CRLF."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    cut = text.find(b"\r\n\r\n")
    head, body = (text, b"") if cut < 0 else (text[:cut], text[cut + 4 :])
    lines: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b"\r\n" + line
        else:
            lines.append(line)
    outer = [f for f in lines if not f.lower().startswith((b"content-", b"mime-version:"))]
    inner = [f for f in lines if f.lower().startswith(b"content-")]
    if not inner:
        inner = [b"Content-Type: text/plain; charset=utf-8"]
    entity = b"\r\n".join(inner) + b"\r\n\r\n" + body
    tag = boundary or "----=_smime_" + hashlib.sha256(entity).hexdigest()[:24]
    return smime_signed(
        b"".join(f + b"\r\n" for f in outer),
        entity,
        cert,
        key,
        digest=digest,
        boundary=tag,
        protocol=protocol,
        chain=chain,
        signing_time=signing_time,
    )


__all__ = [
    "NOT_CHECKED",
    "UNSIGNED",
    "MalformedCMS",
    "SignatureResult",
    "SignatureStatus",
    "TrustStore",
    "decode_p7s",
    "read_tlv",
    "sign_detached",
    "sign_message",
    "smime_signed",
    "verify",
]
