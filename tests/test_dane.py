"""DANE (RFC 7672): TLSA matching, lookups through the sandbox's validating resolver, and
end-to-end checks against the chains the sandbox MX servers present.

The lookups and end-to-end tests need the sandbox's DNSSEC part (nsd, unbound, ldns tools).
Without them these tests fail and say how to install them; set RECAPITO_ALLOW_NO_DNSSEC=1
to skip them instead on a machine where that is intended.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from recapito.delivery.dns import DNSSEC_INVALID, MXResolver, MXResult
from recapito.delivery.tls import client_context, presented_chain
from recapito.sandbox import dnssec, world
from recapito.sandbox.runtime import Sandbox, pid_alive, read_state
from recapito.security.dane import (
    DANEResolver,
    DANEVerdict,
    TLSARecord,
    TLSAResult,
    dane_outcome,
    match_tlsa,
    spki_der,
    tlsa_name,
)

NOW = dt.datetime.now(dt.UTC)
MX_HOST = "mx.example.test"


# -- certificates for the matching tests ----------------------------------------------------

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: Key

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def spki(self) -> bytes:
        return self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(cn: str = "test CA", issuer: Issued | None = None) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def make_leaf(
    issuer: Issued | None,
    name: str = MX_HOST,
    *,
    expired: bool = False,
    rsa_key: bool = False,
) -> Issued:
    key: Key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    window = (
        (NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1))
        if expired
        else (NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=90))
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer.cert.subject if issuer else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(window[0])
        .not_valid_after(window[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    return Issued(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def association(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def record_for(usage: int, selector: int, mtype: int, cert: Issued) -> TLSARecord:
    selected = cert.der if selector == 0 else cert.spki
    return TLSARecord(usage, selector, mtype, association(selected, mtype))


def flipped(record: TLSARecord) -> TLSARecord:
    data = bytearray(record.data)
    data[-1] ^= 0x01
    return TLSARecord(record.usage, record.selector, record.mtype, bytes(data))


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    ca = make_ca("root CA")
    intermediate = make_ca("intermediate CA", issuer=ca)
    return {
        "ca": ca,
        "intermediate": intermediate,
        "leaf": make_leaf(ca),
        "via_intermediate": make_leaf(intermediate),
        "expired": make_leaf(ca, expired=True),
        "other_name": make_leaf(ca, "mail.example.test"),
        "wildcard": make_leaf(ca, "*.example.test"),
        "selfsigned": make_leaf(None, "some.other.name"),
        "stranger": make_leaf(make_ca("someone else's CA")),
        "rsa": make_leaf(ca, rsa_key=True),
    }


# -- records --------------------------------------------------------------------------------


def test_record_parse_and_text() -> None:
    record = TLSARecord.parse("3 1 1 " + "ab" * 16 + " " + "CD" * 16)
    assert (record.usage, record.selector, record.mtype) == (3, 1, 1)
    assert record.data == bytes.fromhex("ab" * 16 + "cd" * 16)
    assert str(record) == "3 1 1 " + "ab" * 16 + "cd" * 16
    assert record.usable
    with pytest.raises(ValueError):
        TLSARecord.parse("3 1 1")
    with pytest.raises(ValueError):
        TLSARecord.parse("3 1 1 zz")


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (TLSARecord(0, 0, 1, b"\0" * 32), "PKIX-TA"),
        (TLSARecord(1, 1, 1, b"\0" * 32), "PKIX-EE"),
        (TLSARecord(4, 1, 1, b"\0" * 32), "usage 4"),
        (TLSARecord(3, 2, 1, b"\0" * 32), "selector 2"),
        (TLSARecord(3, 1, 3, b"\0" * 32), "matching type 3"),
        (TLSARecord(3, 1, 1, b"\0" * 31), "31 octets"),
        (TLSARecord(3, 1, 2, b"\0" * 32), "32 octets"),
        (TLSARecord(3, 0, 0, b""), "empty"),
    ],
)
def test_unusable_records(record: TLSARecord, why: str) -> None:
    assert not record.usable
    assert why in (record.unusable_reason or "")


def test_tlsa_name() -> None:
    assert tlsa_name("MX.Example.Test.", 25) == "_25._tcp.mx.example.test"
    assert tlsa_name("mx.example.test", 2525) == "_2525._tcp.mx.example.test"


def test_spki_is_taken_verbatim_from_the_certificate(pki: dict[str, Issued]) -> None:
    for name in ("leaf", "rsa", "ca", "selfsigned"):
        assert spki_der(pki[name].der) == pki[name].spki
    with pytest.raises(ValueError):
        spki_der(b"\x30\x03\x02\x01\x01")


# -- matching: DANE-EE ----------------------------------------------------------------------


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_each_selector_and_matching_type(
    pki: dict[str, Issued], selector: int, mtype: int
) -> None:
    leaf = pki["leaf"]
    record = record_for(3, selector, mtype, leaf)
    chain = [leaf.der, pki["ca"].der]
    verdict = match_tlsa([record], chain, MX_HOST)
    assert verdict == DANEVerdict(
        "match", matched=record, depth=0, detail="DANE-EE matches the leaf"
    )
    wrong = match_tlsa([flipped(record)], chain, MX_HOST)
    assert wrong.outcome == "mismatch" and wrong.reason == "tlsa-invalid"


def test_dane_ee_ignores_names_and_dates(pki: dict[str, Issued]) -> None:
    # DANE-EE pins the key: an expired, self-signed, wrongly named certificate still matches
    for name in ("expired", "selfsigned", "other_name"):
        cert = pki[name]
        assert match_tlsa([record_for(3, 1, 1, cert)], [cert.der], MX_HOST).outcome == "match"


def test_dane_ee_only_looks_at_the_leaf(pki: dict[str, Issued]) -> None:
    # a DANE-EE record for the CA does not vouch for whatever leaf it signed
    chain = [pki["leaf"].der, pki["ca"].der]
    verdict = match_tlsa([record_for(3, 1, 1, pki["ca"])], chain, MX_HOST)
    assert verdict.outcome == "mismatch"


def test_dane_ee_rsa_key(pki: dict[str, Issued]) -> None:
    rsa_leaf = pki["rsa"]
    verdict = match_tlsa([record_for(3, 1, 2, rsa_leaf)], [rsa_leaf.der], MX_HOST)
    assert verdict.outcome == "match"


# -- matching: DANE-TA ----------------------------------------------------------------------


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ta_each_selector_and_matching_type(
    pki: dict[str, Issued], selector: int, mtype: int
) -> None:
    record = record_for(2, selector, mtype, pki["ca"])
    verdict = match_tlsa([record], [pki["leaf"].der, pki["ca"].der], MX_HOST)
    assert verdict.outcome == "match"
    assert verdict.matched == record and verdict.depth == 1
    assert match_tlsa([flipped(record)], [pki["leaf"].der, pki["ca"].der], MX_HOST).outcome == (
        "mismatch"
    )


def test_dane_ta_through_an_intermediate(pki: dict[str, Issued]) -> None:
    chain = [pki["via_intermediate"].der, pki["intermediate"].der, pki["ca"].der]
    root = match_tlsa([record_for(2, 0, 1, pki["ca"])], chain, MX_HOST)
    assert root.outcome == "match" and root.depth == 2
    # the intermediate may be the trust anchor as well
    middle = match_tlsa([record_for(2, 1, 1, pki["intermediate"])], chain, MX_HOST)
    assert middle.outcome == "match" and middle.depth == 1


def test_dane_ta_needs_the_anchor_in_the_chain(pki: dict[str, Issued]) -> None:
    # RFC 7672 §3.1.2: with a digest record the anchor must be presented; a leaf alone fails
    verdict = match_tlsa([record_for(2, 0, 1, pki["ca"])], [pki["leaf"].der], MX_HOST)
    assert verdict.outcome == "mismatch" and verdict.reason == "tlsa-invalid"


def test_dane_ta_record_for_the_leaf_is_not_an_anchor(pki: dict[str, Issued]) -> None:
    chain = [pki["leaf"].der, pki["ca"].der]
    assert match_tlsa([record_for(2, 1, 1, pki["leaf"])], chain, MX_HOST).outcome == "mismatch"


def test_dane_ta_checks_the_name(pki: dict[str, Issued]) -> None:
    chain = [pki["other_name"].der, pki["ca"].der]
    record = record_for(2, 0, 1, pki["ca"])
    verdict = match_tlsa([record], chain, MX_HOST)
    assert verdict.outcome == "mismatch"
    assert "depth 1" in verdict.detail
    # RFC 7672 §3.2.3: other reference identifiers (original MX name, next-hop domain)
    assert match_tlsa([record], chain, MX_HOST, names=["mail.example.test"]).outcome == "match"
    # a wildcard covers exactly one label
    wildcard = [pki["wildcard"].der, pki["ca"].der]
    assert match_tlsa([record], wildcard, MX_HOST).outcome == "match"
    assert match_tlsa([record], wildcard, "a.mx.example.test").outcome == "mismatch"


def test_dane_ta_checks_dates_and_signatures(pki: dict[str, Issued]) -> None:
    record = record_for(2, 0, 1, pki["ca"])
    expired = match_tlsa([record], [pki["expired"].der, pki["ca"].der], MX_HOST)
    assert expired.outcome == "mismatch"
    # the anchor is presented, but the leaf was issued by someone else
    foreign = match_tlsa([record], [pki["stranger"].der, pki["ca"].der], MX_HOST)
    assert foreign.outcome == "mismatch"


# -- matching: mixed and unusable record sets -----------------------------------------------


def test_only_unusable_records(pki: dict[str, Issued]) -> None:
    pkix = [record_for(0, 0, 1, pki["ca"]), record_for(1, 1, 1, pki["leaf"])]
    verdict = match_tlsa(pkix, [pki["leaf"].der, pki["ca"].der], MX_HOST)
    assert verdict.outcome == "unusable"
    assert verdict.reason is None and verdict.ignored == tuple(pkix)
    assert "RFC 7672 §3.1.3" in verdict.detail
    assert match_tlsa([], [pki["leaf"].der], MX_HOST).outcome == "unusable"


def test_mixed_records(pki: dict[str, Issued]) -> None:
    chain = [pki["leaf"].der, pki["ca"].der]
    pkix = record_for(1, 1, 1, pki["leaf"])  # would match, but PKIX-EE does not count
    stale = flipped(record_for(3, 1, 1, pki["leaf"]))  # e.g. the key before a rollover
    good_ta = record_for(2, 1, 1, pki["ca"])
    good_ee = record_for(3, 1, 1, pki["leaf"])
    assert match_tlsa([pkix, stale], chain, MX_HOST).outcome == "mismatch"
    verdict = match_tlsa([pkix, stale, good_ta], chain, MX_HOST)
    assert verdict.outcome == "match" and verdict.matched == good_ta
    assert verdict.ignored == (pkix,)
    # any one usable record matching is enough
    assert match_tlsa([stale, good_ee], chain, MX_HOST).matched == good_ee


def test_no_certificate_presented() -> None:
    verdict = match_tlsa([TLSARecord(3, 1, 1, b"\0" * 32)], [], MX_HOST)
    assert verdict.outcome == "mismatch" and verdict.reason == "tlsa-invalid"


def test_dane_outcome_table() -> None:
    record = TLSARecord(3, 1, 1, b"\0" * 32)
    match = DANEVerdict("match", matched=record, depth=0)
    mismatch = DANEVerdict("mismatch", "tlsa-invalid")
    assert dane_outcome(TLSAResult("n", "unchecked"), None) == "unchecked"
    assert dane_outcome(TLSAResult("n", "bogus"), None) == "bogus"
    assert dane_outcome(TLSAResult("n", "temporary"), None) == "bogus"
    assert dane_outcome(TLSAResult("n", "insecure", (record,)), None) == "none"
    assert dane_outcome(TLSAResult("n", "none"), None) == "none"
    secure = TLSAResult("n", "secure", (record,))
    assert dane_outcome(secure, match) == "match"
    assert dane_outcome(secure, mismatch) == "mismatch"
    # DANE applies but there was no handshake (no STARTTLS): never a pass
    assert dane_outcome(secure, None) == "mismatch"


def test_without_a_validating_resolver_nothing_is_checked() -> None:
    resolver = DANEResolver(None)

    async def run() -> tuple[TLSAResult, bool | None]:
        return await resolver.tlsa("mx.dane-ok.test", 25), await resolver.mx_is_secure("x.test")

    result, secure = asyncio.run(run())
    assert result.status == "unchecked" and not result.applies and not result.defer
    assert secure is None


def test_unreachable_resolver_defers() -> None:
    resolver = DANEResolver(("127.0.0.1", 9), timeout=1.0)
    result = asyncio.run(resolver.tlsa("mx.dane-ok.test", 25))
    assert result.status == "temporary" and result.defer


# -- the sandbox's DNSSEC part --------------------------------------------------------------


def _no_dnssec(reason: str) -> None:
    message = (
        f"{reason}: the DANE tests need nsd, unbound and the ldns tools; run .ci/run or "
        f"{dnssec.INSTALL_HINT}"
    )
    if os.environ.get("RECAPITO_ALLOW_NO_DNSSEC") == "1":
        pytest.skip(message)
    pytest.fail(message)


@pytest.fixture(scope="module")
def dane(sandbox: Sandbox) -> tuple[str, int]:
    """The address of the sandbox's validating resolver (fails when it could not start)."""
    if sandbox.dane_resolver is None:
        _no_dnssec(f"missing {', '.join(dnssec.missing_tools()) or 'DNSSEC resolver'}")
    assert sandbox.dane_resolver is not None
    return sandbox.dane_resolver


def test_sandbox_settings_name_the_resolver(sandbox: Sandbox, dane: tuple[str, int]) -> None:
    expected = f"{dane[0]}:{dane[1]}"
    assert sandbox.env()["RECAPITO_DANE_RESOLVER"] == expected
    settings = json.loads(sandbox.settings_path.read_text())
    assert settings["RECAPITO_DANE_RESOLVER"] == expected
    state = read_state(sandbox.home)
    assert state is not None and state.dane_resolver_port == dane[1]
    assert state.dnssec_pid in state.child_pids


def test_tlsa_lookups(sandbox: Sandbox, dane: tuple[str, int]) -> None:
    port = sandbox.mx_port

    async def run() -> dict[str, TLSAResult]:
        resolver = DANEResolver(dane)
        hosts: dict[str, str] = {d.dane: d.mx_host for d in world.SIGNED_DOMAINS}
        hosts["unsigned"] = world.MX_BY_POSTURE["tls13"].host
        results = await asyncio.gather(*(resolver.tlsa(h, port) for h in hosts.values()))
        return dict(zip(hosts, results, strict=True))

    found = asyncio.run(run())
    ee = found["ee"]
    assert ee.status == "secure" and ee.applies and not ee.defer
    assert [(r.usage, r.selector, r.mtype) for r in ee.records] == [(3, 1, 1)]
    assert ee.name == f"_{port}._tcp.mx.dane-ok.test"
    assert [(r.usage, r.selector, r.mtype) for r in found["ta"].records] == [(2, 0, 1)]
    assert found["ta"].status == "secure"
    assert found["mismatch"].status == "secure"
    assert found["notlsa"].status == "none" and not found["notlsa"].applies
    bogus = found["bogus"]
    assert bogus.status == "bogus" and bogus.defer and not bogus.applies
    assert DNSSEC_INVALID in bogus.detail
    unsigned = found["unsigned"]
    assert unsigned.status == "insecure" and not unsigned.applies and not unsigned.defer


def test_mx_lookups_report_validation(dane: tuple[str, int]) -> None:
    domains = {
        "signed": "dane-ok.test",
        "unsigned": "mailitalia.test",
        "bogus_mx": world.BOGUS_MX_DOMAIN,
        "bogus_a": world.BOGUS_A_DOMAIN,
        "null_mx": "nessuna-posta.test",
    }

    async def lookups() -> dict[str, MXResult]:
        mx = MXResolver(dane, dnssec=True)
        found = {key: await mx.resolve(domain) for key, domain in domains.items()}
        # without dnssec=True the same answer is not taken as validated
        found["plain"] = await MXResolver(dane).resolve("dane-ok.test")
        return found

    async def secure_mx() -> list[bool | None]:
        resolver = DANEResolver(dane)
        names = ["dane-ok.test", "mailitalia.test", world.BOGUS_MX_DOMAIN]
        return [await resolver.mx_is_secure(name) for name in names]

    found = asyncio.run(lookups())
    signed = found["signed"]
    assert signed.authenticated and signed.error is None
    [host] = signed.hosts
    assert host.name == "mx.dane-ok.test" and host.addresses == ("127.0.0.20",)
    assert host.authenticated
    unsigned = found["unsigned"]
    assert unsigned.error is None and not unsigned.authenticated
    assert not any(h.authenticated for h in unsigned.hosts)
    assert found["bogus_mx"].error == "temporary"
    assert found["bogus_mx"].detail == DNSSEC_INVALID
    assert found["bogus_a"].error == "temporary"
    assert found["bogus_a"].detail.startswith(DNSSEC_INVALID)
    assert found["null_mx"].error == "null_mx"
    assert found["plain"].error is None and not found["plain"].authenticated
    assert asyncio.run(secure_mx()) == [True, False, None]


def test_mx_failure_is_not_called_bogus_when_the_resolver_is_down() -> None:
    result = asyncio.run(MXResolver(("127.0.0.1", 9), timeout=1.0, dnssec=True).resolve("x.test"))
    assert result.error == "temporary" and result.detail != DNSSEC_INVALID


def test_resolver_refuses_names_outside_the_sandbox(dane: tuple[str, int]) -> None:
    result = asyncio.run(MXResolver(dane, timeout=2.0, dnssec=True).resolve("example.com"))
    assert result.error == "temporary"


# -- end to end: handshake, presented chain, TLSA match ------------------------------------


async def presented(sandbox: Sandbox, address: str, server_name: str) -> list[bytes]:
    """STARTTLS with an MX server as the delivery engine does; the chain it presented."""
    client = aiosmtplib.SMTP(
        hostname=address, port=sandbox.mx_port, start_tls=False, local_hostname="client.test"
    )
    await client.connect(timeout=10)
    try:
        await client.ehlo()
        assert client.supports_extension("starttls")
        await client.starttls(tls_context=client_context(legacy=False), server_hostname=server_name)
        assert client.transport is not None
        ssl_object = client.transport.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        return list(presented_chain(ssl_object))
    finally:
        await client.quit()


async def check_domain(
    sandbox: Sandbox, resolver: tuple[str, int], domain: str
) -> tuple[TLSAResult, DANEVerdict | None]:
    """What the engine does per MX host: MX (validated?), TLSA, handshake, match."""
    mx = await MXResolver(resolver, dnssec=True).resolve(domain)
    assert mx.error is None, mx.detail
    host = mx.hosts[0]
    tlsa = await DANEResolver(resolver).tlsa_for(mx, host, sandbox.mx_port)
    if not tlsa.applies:
        return tlsa, None
    chain = await presented(sandbox, host.addresses[0], host.name)
    return tlsa, match_tlsa(tlsa.records, chain, host.name)


def test_dane_ee_end_to_end(sandbox: Sandbox, dane: tuple[str, int]) -> None:
    tlsa, verdict = asyncio.run(check_domain(sandbox, dane, "dane-ok.test"))
    assert tlsa.status == "secure"
    assert verdict is not None and verdict.outcome == "match" and verdict.depth == 0
    assert dane_outcome(tlsa, verdict) == "match"


def test_dane_ta_end_to_end(sandbox: Sandbox, dane: tuple[str, int]) -> None:
    tlsa, verdict = asyncio.run(check_domain(sandbox, dane, "dane-ta.test"))
    assert tlsa.status == "secure"
    assert verdict is not None and verdict.outcome == "match", verdict
    assert verdict.depth == 1 and verdict.matched is not None and verdict.matched.usage == 2


def test_dane_ta_record_does_not_fit_a_server_without_the_anchor(
    sandbox: Sandbox, dane: tuple[str, int]
) -> None:
    # the tls13 server sends its leaf only, so the CA digest has nothing to match
    async def run() -> DANEVerdict:
        tlsa = await DANEResolver(dane).tlsa(world.DANE_TA_MX.host, sandbox.mx_port)
        tls13 = world.MX_BY_POSTURE["tls13"]
        chain = await presented(sandbox, tls13.address, tls13.host)
        assert len(chain) == 1
        return match_tlsa(tlsa.records, chain, tls13.host)

    assert asyncio.run(run()).outcome == "mismatch"


def test_dane_mismatch_end_to_end(sandbox: Sandbox, dane: tuple[str, int]) -> None:
    tlsa, verdict = asyncio.run(check_domain(sandbox, dane, "dane-mismatch.test"))
    assert tlsa.status == "secure"
    assert verdict is not None and verdict.outcome == "mismatch"
    assert verdict.reason == "tlsa-invalid"
    assert dane_outcome(tlsa, verdict) == "mismatch"


def test_dane_bogus_end_to_end(sandbox: Sandbox, dane: tuple[str, int]) -> None:
    tlsa, verdict = asyncio.run(check_domain(sandbox, dane, "dane-bogus.test"))
    assert tlsa.status == "bogus" and tlsa.defer and verdict is None
    assert dane_outcome(tlsa, verdict) == "bogus"


def test_no_dane_for_unsigned_or_tlsa_less_domains(sandbox: Sandbox, dane: tuple[str, int]) -> None:
    unsigned, verdict = asyncio.run(check_domain(sandbox, dane, "mailitalia.test"))
    assert unsigned.status == "insecure" and verdict is None
    assert "MX records not DNSSEC-validated" in unsigned.detail
    notlsa, verdict = asyncio.run(check_domain(sandbox, dane, "dane-notlsa.test"))
    assert notlsa.status == "none" and verdict is None
    assert dane_outcome(notlsa, verdict) == "none"


def test_dane_ta_mx_accepts_mail(sandbox: Sandbox, dane: tuple[str, int]) -> None:
    recipient = f"dane-{uuid.uuid4().hex[:8]}@dane-ta.test"
    message = (
        f"From: campagne@banca-esempio.test\r\nTo: {recipient}\r\nSubject: dane\r\n\r\nCiao.\r\n"
    )

    async def run() -> None:
        client = aiosmtplib.SMTP(
            hostname=world.DANE_TA_MX.address,
            port=sandbox.mx_port,
            start_tls=False,
            local_hostname="client.test",
        )
        await client.connect(timeout=10)
        await client.ehlo()
        await client.starttls(
            tls_context=client_context(legacy=False), server_hostname=world.DANE_TA_MX.host
        )
        await client.sendmail("campagne@banca-esempio.test", [recipient], message)
        await client.quit()

    asyncio.run(run())
    stored = [m for m in sandbox.messages() if m.delivered_to == recipient]
    assert len(stored) == 1
    assert stored[0].x_sandbox_mx == world.DANE_TA_MX.host
    assert stored[0].x_sandbox_tls == "TLSv1.3"


# -- sandbox lifecycle with and without the DNSSEC tools ------------------------------------


def test_sandbox_without_dnssec_tools_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a PATH without nsd and unbound (they live in /usr/sbin), and no looking there either
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin"]))
    monkeypatch.setattr(dnssec, "EXTRA_TOOL_DIRS", ())
    if not dnssec.missing_tools():
        pytest.skip("the DNSSEC tools are in /usr/bin here: cannot hide them")
    with Sandbox(tmp_path) as box:
        assert box.dane_resolver is None
        assert "RECAPITO_DANE_RESOLVER" not in box.env()
        assert "RECAPITO_DANE_RESOLVER" not in json.loads(box.settings_path.read_text())
        lines = (box.log_dir / "dnssec.log").read_text().splitlines()
        assert len(lines) == 1 and "no DNSSEC/DANE" in lines[0] and "apt-get" in lines[0]
        state = read_state(tmp_path)
        assert state is not None and state.dnssec_pid == 0


def test_dnssec_daemons_die_with_the_owner(tmp_path: Path, dane: tuple[str, int]) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from recapito.sandbox.runtime import Sandbox\n"
        "Sandbox(Path(sys.argv[1])).start()\n"
        "print('up', flush=True)\n"
        "time.sleep(120)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "up"
        work = tmp_path / "sandbox" / "dnssec"
        daemons = [
            int((work / f"{name}.pid").read_text().split()[0]) for name in ("nsd", "unbound")
        ]
        state = read_state(tmp_path)
        assert state is not None and state.dnssec_pid
        assert all(pid_alive(p) for p in [state.dnssec_pid, *daemons])
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            pid_alive(p) for p in [state.dnssec_pid, *daemons]
        ):
            time.sleep(0.1)
        assert not any(pid_alive(p) for p in [state.dnssec_pid, *daemons])
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_catch_all_names_resolve_through_the_validating_resolver(
    tmp_path: Path, dane: tuple[str, int]
) -> None:
    with Sandbox(tmp_path, catch_all=True) as box:
        assert box.dane_resolver is not None
        resolver = box.dane_resolver

        async def run() -> tuple[MXResult, MXResult]:
            mx = MXResolver(resolver, dnssec=True)
            return await mx.resolve("azienda-vera.example"), await mx.resolve("dane-ok.test")

        anywhere, signed = asyncio.run(run())
    assert anywhere.error is None and not anywhere.authenticated
    assert anywhere.hosts[0].name == world.catch_all_posture("azienda-vera.example").host
    assert signed.authenticated and signed.hosts[0].name == "mx.dane-ok.test"


# -- zone building --------------------------------------------------------------------------


def test_tamper_alters_data_but_not_signatures() -> None:
    signed = (
        "x.test.\t300\tIN\tMX\t10 mx.x.test.\n"
        "x.test.\t300\tIN\tRRSIG\tMX 13 2 300 20360101000000 20250101000000 1 x.test. c2ln\n"
        "_25._tcp.mx.x.test.\t300\tIN\tTLSA\t3 1 1 abcd\n"
    )
    tampered = dnssec.tamper(signed, "_25._tcp.mx.x.test", "TLSA")
    assert tampered.splitlines()[2].split()[-1] == "abcc"
    assert tampered.splitlines()[:2] == signed.splitlines()[:2]
    tampered = dnssec.tamper(tampered, "X.test.", "MX")
    assert tampered.splitlines()[0].split()[4:] == ["11", "mx.x.test."]
    address = dnssec.tamper("mx.x.test.\t300\tIN\tA\t127.0.0.20\n", "mx.x.test", "A")
    assert address.split()[-1] == "127.0.0.21"
    with pytest.raises(ValueError):
        dnssec.tamper(signed, "nothing.x.test", "TLSA")


def test_zone_text_per_case(pki: dict[str, Issued]) -> None:
    inputs = dnssec.TLSAInputs(ee_cert=pki["leaf"].cert, ca_cert=pki["ca"].cert)
    texts = {d.dane: dnssec.zone_text(d, 2525, inputs, serial=1) for d in world.SIGNED_DOMAINS}
    spki = hashlib.sha256(pki["leaf"].spki).hexdigest()
    assert f"_2525._tcp.mx.dane-ok.test. IN TLSA 3 1 1 {spki}" in texts["ee"]
    ca = hashlib.sha256(pki["ca"].der).hexdigest()
    assert f"_2525._tcp.mx.dane-ta.test. IN TLSA 2 0 1 {ca}" in texts["ta"]
    assert "TLSA" not in texts["notlsa"]
    assert spki not in texts["mismatch"] and "TLSA 3 1 1" in texts["mismatch"]
    assert f"{world.BOGUS_MX_DOMAIN}. IN MX 10 mx.dane-bogus.test." in texts["bogus"]
    for domain in world.SIGNED_DOMAINS:
        assert f"{domain.mx_host}. IN A {domain.address}" in texts[domain.dane]


def test_refresh_asks_again_instead_of_using_the_run_cache(
    sandbox: Sandbox, dane: tuple[str, int]
) -> None:
    host = world.SIGNED_DOMAINS_BY_NAME["dane-mismatch.test"].mx_host

    async def run() -> int:
        resolver = DANEResolver(dane)
        asked: list[str] = []
        original = resolver._lookup_tlsa

        async def counting(name: str) -> TLSAResult:
            asked.append(name)
            return await original(name)

        resolver._lookup_tlsa = counting  # type: ignore[method-assign]
        await resolver.tlsa(host, sandbox.mx_port)
        await resolver.tlsa(host, sandbox.mx_port)  # from the run's cache
        await resolver.tlsa(host, sandbox.mx_port, refresh=True)
        return len(asked)

    assert asyncio.run(run()) == 2
