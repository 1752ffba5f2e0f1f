"""DANE for SMTP (RFC 7672): TLSA lookups through a trusted validating resolver, and matching.

Two halves, kept apart so the matching can be tested without a network:

- ``DANEResolver`` asks the resolver configured as ``RECAPITO_DANE_RESOLVER`` (and only that
  one: its AD bit is the only DNSSEC verdict trusted here) for the TLSA records of
  ``_<port>._tcp.<mx host>``, with EDNS and the DO bit, and says what it found as data
  (``TLSAResult``). It never decides to send or not; the statuses mean:

  ========== =====================================================================
  secure     AD set and at least one usable record: DANE applies, the MX host must match
  insecure   an answer without AD (unsigned zone): DANE does not apply
  none       a validated NXDOMAIN/NODATA, or only unusable records: DANE does not apply
  bogus      SERVFAIL from the validating resolver (DNSSEC failure): defer, never send
  temporary  timeout, unreachable resolver, odd rcode: defer, never send
  unchecked  no validating resolver configured: DANE was not looked at
  ========== =====================================================================

- ``match_tlsa`` compares the records with the certificate chain the server presented in the
  TLS handshake: DANE-EE(3) pins the leaf (name and validity period are ignored, RFC 7672
  §3.1.1); DANE-TA(2) names a trust anchor that must be in the presented chain and to which
  the leaf must chain, with the leaf naming the MX host (RFC 7672 §3.1.2, §3.2.3). The PKIX
  usages 0 and 1 do not apply to SMTP (RFC 7672 §3.1.3) and are ignored, like records with an
  unknown selector or matching type or a digest of the wrong length (RFC 7671 §5).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
from cryptography import x509
from cryptography.x509 import verification

from recapito.delivery.dns import MXHost, MXResult

TLSAStatus = Literal["secure", "insecure", "none", "bogus", "temporary", "unchecked"]
# The shape of ``recapito.security.policy.RecipientPolicy.dane``.
DANEOutcome = Literal["match", "mismatch", "none", "bogus", "unchecked"]

USAGE_PKIX_TA = 0
USAGE_PKIX_EE = 1
USAGE_DANE_TA = 2
USAGE_DANE_EE = 3
SELECTOR_CERT = 0
SELECTOR_SPKI = 1
MATCH_FULL = 0
MATCH_SHA256 = 1
MATCH_SHA512 = 2
_DIGEST_SIZE = {MATCH_SHA256: 32, MATCH_SHA512: 64}
_USAGE_NAMES = {0: "PKIX-TA", 1: "PKIX-EE", 2: "DANE-TA", 3: "DANE-EE"}
EDNS_PAYLOAD = 1232
DEFAULT_PORT = 25


# -- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSARecord:
    """One TLSA record: certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def parse(cls, text: str) -> TLSARecord:
        """From presentation form, e.g. ``"3 1 1 e3b0c442..."`` (the hex may be split)."""
        parts = text.split()
        if len(parts) < 4:
            raise ValueError(f"TLSA record {text!r}: expected usage selector mtype data")
        try:
            usage, selector, mtype = (int(p) for p in parts[:3])
            data = bytes.fromhex("".join(parts[3:]))
        except ValueError as exc:
            raise ValueError(f"TLSA record {text!r}: {exc}") from exc
        return cls(usage, selector, mtype, data)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def unusable_reason(self) -> str | None:
        """Why an SMTP client must ignore this record, or None when it is usable."""
        if self.usage in (USAGE_PKIX_TA, USAGE_PKIX_EE):
            return f"usage {_USAGE_NAMES[self.usage]} does not apply to SMTP (RFC 7672 §3.1.3)"
        if self.usage not in (USAGE_DANE_TA, USAGE_DANE_EE):
            return f"unknown certificate usage {self.usage}"
        if self.selector not in (SELECTOR_CERT, SELECTOR_SPKI):
            return f"unknown selector {self.selector}"
        if self.mtype == MATCH_FULL:
            return None if self.data else "empty association data"
        size = _DIGEST_SIZE.get(self.mtype)
        if size is None:
            return f"unknown matching type {self.mtype}"
        if len(self.data) != size:
            return f"digest of {len(self.data)} octets for matching type {self.mtype}"
        return None

    @property
    def usable(self) -> bool:
        return self.unusable_reason is None


def usable_records(records: Iterable[TLSARecord]) -> tuple[TLSARecord, ...]:
    return tuple(r for r in records if r.usable)


def tlsa_name(mx_host: str, port: int = DEFAULT_PORT) -> str:
    """The TLSA owner name of an SMTP server: ``_<port>._tcp.<mx host>`` (RFC 7672 §2.2.3)."""
    return f"_{port}._tcp.{mx_host.rstrip('.').lower()}"


@dataclass(frozen=True)
class TLSAResult:
    """What the validating resolver said about the TLSA records of one MX host."""

    name: str  # the owner name that was asked
    status: TLSAStatus
    records: tuple[TLSARecord, ...] = ()  # as published, unusable ones included
    detail: str = ""

    @property
    def usable(self) -> tuple[TLSARecord, ...]:
        return usable_records(self.records)

    @property
    def applies(self) -> bool:
        """DANE applies: the server must offer STARTTLS and match one of ``usable``."""
        return self.status == "secure"

    @property
    def defer(self) -> bool:
        """The lookup failed: try the delivery later, do not send now (not even in clear)."""
        return self.status in ("bogus", "temporary")


# -- matching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DANEVerdict:
    """The outcome of matching TLSA records against the chain a server presented."""

    outcome: Literal["match", "mismatch", "unusable"]
    reason: str | None = None  # TLS-RPT result type when the outcome is "mismatch"
    matched: TLSARecord | None = None
    depth: int | None = None  # position in the presented chain of the matching certificate
    detail: str = ""
    ignored: tuple[TLSARecord, ...] = ()  # unusable records, kept for the report


def _der_element(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of content, end of element) of the DER element at ``offset``."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[offset]
    length = data[offset + 1]
    pos = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, pos, end


def spki_der(cert_der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a DER certificate, exactly as encoded in it.

    Certificate ::= SEQUENCE { tbsCertificate, ... } and tbsCertificate lists an optional
    ``[0] version``, then serialNumber, signature, issuer, validity, subject and
    subjectPublicKeyInfo. Taking the bytes as they are avoids re-encoding the key.
    """
    _, cert_body, _ = _der_element(cert_der, 0)
    tag, pos, tbs_end = _der_element(cert_der, cert_body)
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, _, end = _der_element(cert_der, pos)
    if tag == 0xA0:  # explicit version
        pos = end
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        _, _, pos = _der_element(cert_der, pos)
    tag, _, end = _der_element(cert_der, pos)
    if tag != 0x30 or end > tbs_end:
        raise ValueError("no subjectPublicKeyInfo")
    return cert_der[pos:end]


def _association(cert_der: bytes, selector: int, mtype: int) -> bytes | None:
    try:
        selected = cert_der if selector == SELECTOR_CERT else spki_der(cert_der)
    except ValueError:
        return None
    if mtype == MATCH_SHA256:
        return hashlib.sha256(selected).digest()
    if mtype == MATCH_SHA512:
        return hashlib.sha512(selected).digest()
    return selected


def record_matches(record: TLSARecord, cert_der: bytes) -> bool:
    """Does this record's association data describe this certificate?"""
    found = _association(cert_der, record.selector, record.mtype)
    return found is not None and hmac.compare_digest(found, record.data)


def _chains_to(
    chain: Sequence[x509.Certificate], anchor_at: int, names: Sequence[str], moment: datetime
) -> str | None:
    """None if the leaf chains to ``chain[anchor_at]`` and names one of ``names``; else why not."""
    anchor = chain[anchor_at]
    intermediates = [c for i, c in enumerate(chain) if i not in (0, anchor_at)]
    last_error = "no reference name to check"
    for name in names:
        try:
            verifier = (
                verification.PolicyBuilder()
                .store(verification.Store([anchor]))
                .time(moment)
                .build_server_verifier(x509.DNSName(name))
            )
            verifier.verify(chain[0], intermediates)
        except verification.VerificationError as exc:
            last_error = str(exc).split("(encountered", 1)[0].strip()
            continue
        except ValueError as exc:
            last_error = f"{name}: {exc}"
            continue
        return None
    return last_error


def match_tlsa(
    records: Iterable[TLSARecord],
    chain_der: Sequence[bytes],
    mx_host: str,
    *,
    names: Iterable[str] = (),
    now: datetime | None = None,
) -> DANEVerdict:
    """Match TLSA records against the presented chain (leaf first), for MX host ``mx_host``.

    ``names`` adds reference identifiers for DANE-TA name checks besides ``mx_host`` (the TLSA
    base domain): RFC 7672 §3.2.3 lets a client also accept the MX host name before CNAME
    expansion, or the next-hop domain. DANE-EE ignores names and dates entirely.
    """
    all_records = tuple(records)
    ignored = tuple(r for r in all_records if not r.usable)
    usable = [r for r in all_records if r.usable]
    if not usable:
        reasons = "; ".join(sorted({r.unusable_reason or "" for r in ignored})) or "no records"
        return DANEVerdict("unusable", detail=f"no usable TLSA record ({reasons})", ignored=ignored)
    if not chain_der:
        return DANEVerdict(
            "mismatch",
            "tlsa-invalid",
            detail="the server presented no certificate",
            ignored=ignored,
        )
    leaf = chain_der[0]
    for record in usable:
        if record.usage == USAGE_DANE_EE and record_matches(record, leaf):
            return DANEVerdict(
                "match", matched=record, depth=0, detail="DANE-EE matches the leaf", ignored=ignored
            )
    reference = [mx_host.rstrip(".").lower()]
    reference += [n.rstrip(".").lower() for n in names if n.rstrip(".").lower() not in reference]
    moment = now or datetime.now(UTC)
    problems: list[str] = []
    parsed: list[x509.Certificate] | None = None
    for record in usable:
        if record.usage != USAGE_DANE_TA:
            continue
        for depth in range(1, len(chain_der)):
            if not record_matches(record, chain_der[depth]):
                continue
            if parsed is None:
                try:
                    parsed = [x509.load_der_x509_certificate(der) for der in chain_der]
                except ValueError as exc:
                    problems.append(f"unparsable certificate in the chain: {exc}")
                    break
            failure = _chains_to(parsed, depth, reference, moment)
            if failure is None:
                return DANEVerdict(
                    "match",
                    matched=record,
                    depth=depth,
                    detail=f"DANE-TA: trust anchor at depth {depth}, leaf names {reference[0]}",
                    ignored=ignored,
                )
            problems.append(f"DANE-TA anchor at depth {depth}: {failure}")
    detail = "; ".join(problems) if problems else "no TLSA record matches the presented chain"
    return DANEVerdict("mismatch", "tlsa-invalid", detail=detail, ignored=ignored)


def dane_outcome(tlsa: TLSAResult, verdict: DANEVerdict | None) -> DANEOutcome:
    """Fold a lookup and (when DANE applies) a match into ``RecipientPolicy.dane``.

    ``verdict`` is None when no handshake took place (the host offered no STARTTLS): with
    DANE applying that is a failure, never a reason to send in clear.
    """
    if tlsa.status == "unchecked":
        return "unchecked"
    if tlsa.defer:
        return "bogus"
    if not tlsa.applies:
        return "none"
    if verdict is None or verdict.outcome == "mismatch":
        return "mismatch"
    return "match" if verdict.outcome == "match" else "none"


# -- lookups ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    message: dns.message.Message | None
    error: str = ""


def _ede_text(message: dns.message.Message) -> str:
    parts: list[str] = []
    for option in message.options:
        if isinstance(option, dns.edns.EDEOption):
            code = option.code.name if hasattr(option.code, "name") else str(option.code)
            parts.append(f"{code}: {option.text}" if option.text else code)
    return "; ".join(parts)


@dataclass
class DANEResolver:
    """TLSA (and MX) lookups through one trusted validating resolver, cached per run.

    ``nameserver`` is ``Settings.dane_resolver``; None means no resolver is trusted and
    every answer is ``unchecked``: the AD bit of any other resolver means nothing.
    """

    nameserver: tuple[str, int] | None
    timeout: float = 5.0
    _cache: dict[tuple[str, str], object] = field(default_factory=dict)
    _inflight: dict[tuple[str, str], asyncio.Future[object]] = field(default_factory=dict)

    async def _ask(self, name: str, rdtype: str) -> _Reply:
        assert self.nameserver is not None
        host, port = self.nameserver
        query = dns.message.make_query(
            dns.name.from_text(name),
            dns.rdatatype.from_text(rdtype),
            use_edns=0,
            ednsflags=dns.flags.DO,
            payload=EDNS_PAYLOAD,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        last = "Timeout"
        while (left := deadline - loop.time()) > 0:
            try:
                reply, _ = await dns.asyncquery.udp_with_fallback(
                    query, host, timeout=min(2.0, left), port=port
                )
            except dns.exception.Timeout:
                last = "Timeout"
                continue
            except (OSError, dns.exception.DNSException) as exc:
                return _Reply(None, f"{type(exc).__name__}: {exc}")
            return _Reply(reply)
        return _Reply(None, last)

    async def _once(self, key: tuple[str, str], work: Callable[[], Awaitable[object]]) -> object:
        """Run ``work`` once per key at a time; keep results that are not worth retrying."""
        if key in self._cache:
            return self._cache[key]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await work()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            self._inflight.pop(key, None)
        if not (isinstance(result, TLSAResult) and result.defer) and result is not None:
            self._cache[key] = result
        future.set_result(result)
        return result

    async def tlsa(
        self, mx_host: str, port: int = DEFAULT_PORT, *, refresh: bool = False
    ) -> TLSAResult:
        """The TLSA records of ``_<port>._tcp.<mx_host>`` and what they mean for DANE.

        ``refresh`` asks again instead of answering from this run's cache (after a host
        failed to match, the records may just have been rolled over)."""
        name = tlsa_name(mx_host, port)
        if self.nameserver is None:
            return TLSAResult(name, "unchecked", detail="no DNSSEC-validating resolver configured")
        if refresh:
            self._cache.pop((name, "TLSA"), None)
        result = await self._once((name, "TLSA"), lambda: self._lookup_tlsa(name))
        assert isinstance(result, TLSAResult)
        return result

    async def tlsa_for(
        self, mx: MXResult, host: MXHost, port: int = DEFAULT_PORT, *, refresh: bool = False
    ) -> TLSAResult:
        """``tlsa`` with RFC 7672 §2.2's preconditions on the MX lookup already made.

        DANE applies only when the MX records (§2.2.1) and the host's addresses (§2.2.2)
        were DNSSEC-validated; ``mx`` must come from an ``MXResolver`` with ``dnssec=True``.
        """
        name = tlsa_name(host.name, port)
        if self.nameserver is None:
            return TLSAResult(name, "unchecked", detail="no DNSSEC-validating resolver configured")
        if not mx.authenticated:
            return TLSAResult(name, "insecure", detail="MX records not DNSSEC-validated")
        if not host.authenticated:
            return TLSAResult(name, "insecure", detail="address records not DNSSEC-validated")
        return await self.tlsa(host.name, port, refresh=refresh)

    async def _lookup_tlsa(self, name: str) -> TLSAResult:
        reply = await self._ask(name, "TLSA")
        message = reply.message
        if message is None:
            return TLSAResult(name, "temporary", detail=reply.error)
        rcode = message.rcode()
        secure = bool(message.flags & dns.flags.AD)
        if rcode == dns.rcode.SERVFAIL:
            why = _ede_text(message) or "SERVFAIL from the validating resolver"
            return TLSAResult(name, "bogus", detail=f"dnssec-invalid: {why}")
        if rcode == dns.rcode.NXDOMAIN:
            if secure:
                return TLSAResult(name, "none", detail="no TLSA records (validated NXDOMAIN)")
            return TLSAResult(name, "insecure", detail="NXDOMAIN without DNSSEC")
        if rcode != dns.rcode.NOERROR or not isinstance(message, dns.message.QueryMessage):
            return TLSAResult(name, "temporary", detail=f"rcode {dns.rcode.to_text(rcode)}")
        try:
            answer = message.resolve_chaining().answer
        except dns.exception.DNSException as exc:
            return TLSAResult(name, "temporary", detail=f"unusable answer: {exc}")
        records = tuple(
            TLSARecord(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))
            for r in (answer or ())
        )
        if not secure:
            return TLSAResult(name, "insecure", records, "answer not DNSSEC-validated")
        if not records:
            return TLSAResult(name, "none", detail="no TLSA records (validated NODATA)")
        if not usable_records(records):
            reasons = "; ".join(sorted({r.unusable_reason or "" for r in records}))
            return TLSAResult(name, "none", records, f"no usable TLSA record ({reasons})")
        return TLSAResult(name, "secure", records)

    async def mx_is_secure(self, domain: str) -> bool | None:
        """Was the MX answer for ``domain`` DNSSEC-validated? None when that is unknown.

        A validated NODATA counts as secure too (the domain's own address is then the MX,
        RFC 7672 §2.2.1). Unknown: no trusted resolver, SERVFAIL (bogus), timeout.
        """
        if self.nameserver is None:
            return None
        key = (domain.lower().rstrip("."), "MX")
        result = await self._once(key, lambda: self._lookup_mx_secure(key[0]))
        return result if isinstance(result, bool) else None

    async def _lookup_mx_secure(self, domain: str) -> bool | None:
        reply = await self._ask(domain, "MX")
        message = reply.message
        if message is None or message.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return None
        return bool(message.flags & dns.flags.AD)
