"""PEC receipts: every kind parsed from the project's fixtures (signed here by a test CA,
sha1 and sha-256), signatures valid / tampered / untrusted / unchecked, the state machine out
of order, timeouts, the report, ``recapito pec parse``, and the collector against Dovecot."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from recapito.cli import main
from recapito.collect.mailbox import InboundMessage, MailboxSettings
from recapito.ledger import Ledger, PlannedDelivery, State
from recapito.ledger.schema import deliveries, events, inbound_messages, pec_receipts
from recapito.pec import smime
from recapito.pec.collector import ReceiptCollector, delivery_id_of
from recapito.pec.receipts import parse_receipt
from recapito.pec.report import pec_analysis, pec_markdown
from recapito.pec.timeouts import check_timeouts
from recapito.render.template import message_id_for
from recapito.sandbox import imap

FIXTURES = Path(__file__).parent / "fixtures" / "pec"
NOW = dt.datetime.now(dt.UTC)


# -- a test PKI: one CA, three provider signing certificates -----------------------------------


def _cert(
    cn: str,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: Any,
    *,
    ca: bool,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key or key, hashes.SHA256())
    )


class PKI:
    def __init__(self) -> None:
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = _cert("Test PEC CA", self.ca_key, None, None, ca=True)
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.certs: dict[str, x509.Certificate] = {}
        for provider in ("aruba", "poste", "sogei"):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.keys[provider] = key
            self.certs[provider] = _cert(
                f"posta-certificata@{provider}", key, self.ca, self.ca_key, ca=False
            )
        self.trust = smime.TrustStore([self.ca])

    def sign(self, raw: bytes, provider: str) -> bytes:
        digest = "sha1" if provider == "poste" else "sha256"
        protocol = (
            "application/x-pkcs7-signature"
            if provider == "sogei"
            else "application/pkcs7-signature"
        )
        return smime.sign_message(
            raw,
            self.certs[provider],
            self.keys[provider],
            digest=digest,
            protocol=protocol,
            chain=[self.ca] if provider == "aruba" else [],
        )


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


def _signed(pki: PKI, name: str) -> bytes:
    return pki.sign((FIXTURES / name).read_bytes(), name.split("-")[0])


# -- every kind ------------------------------------------------------------------------------------

EXPECTED = {
    # file: (type, kind, receipt_kind, errore, delivery id in msgid or None)
    "aruba-accettazione.eml": ("accettazione", "acceptance", None, "nessuno", 101),
    "aruba-presa-in-carico.eml": ("presa-in-carico", "taken_in_charge", None, "nessuno", 101),
    "aruba-avvenuta-consegna-breve.eml": ("avvenuta-consegna", "delivery", "breve", "nessuno", 101),
    "aruba-avvenuta-consegna-completa.eml": (
        "avvenuta-consegna",
        "delivery",
        "completa",
        "nessuno",
        102,
    ),
    "aruba-preavviso-errore-consegna.eml": (
        "preavviso-errore-consegna",
        "delivery_warning",
        None,
        "altro",
        103,
    ),
    "aruba-errore-consegna-tempo-massimo.eml": (
        "errore-consegna",
        "delivery_timeout",
        None,
        "altro",
        103,
    ),
    "aruba-non-accettazione-virus.eml": ("non-accettazione", "non_acceptance", None, "virus", 104),
    "aruba-posta-certificata.eml": ("posta-certificata", "envelope", None, "nessuno", None),
    "aruba-busta-notifica-terzi.eml": (
        "posta-certificata",
        "third_party_notice",
        None,
        "nessuno",
        None,
    ),
    "aruba-busta-anomalia.eml": ("errore", "anomaly", None, None, None),
    "poste-accettazione-esterno.eml": ("accettazione", "acceptance", None, "nessuno", 105),
    "poste-avvenuta-consegna-breve.eml": ("avvenuta-consegna", "delivery", "breve", "nessuno", 106),
    "poste-errore-consegna.eml": ("errore-consegna", "delivery_error", None, "no-dest", 107),
    "poste-non-accettazione.eml": ("non-accettazione", "non_acceptance", None, "altro", 108),
    "sogei-avvenuta-consegna-sintetica.eml": (
        "avvenuta-consegna",
        "delivery",
        "sintetica",
        "nessuno",
        109,
    ),
    "sogei-rilevazione-virus.eml": ("rilevazione-virus", "virus", None, "virus", 110),
    "sogei-errore-consegna-virus.eml": ("errore-consegna", "delivery_error", None, "virus", 110),
}


def test_every_fixture_is_listed() -> None:
    on_disk = {p.name for p in FIXTURES.glob("*.eml")} - {"plain-not-pec.eml"}
    assert on_disk == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_kind_parsed_and_signature_valid(pki: PKI, name: str) -> None:
    type_, kind, variant, errore, ref = EXPECTED[name]
    receipt = parse_receipt(_signed(pki, name), pki.trust)
    assert (receipt.type, receipt.kind, receipt.receipt_kind, receipt.errore) == (
        type_,
        kind,
        variant,
        errore,
    )
    assert receipt.signature.status == "valid", receipt.signature
    assert receipt.signature.digest == ("sha1" if name.startswith("poste") else "sha256")
    assert receipt.problems == ()
    if ref is None:
        assert receipt.msgid is None or delivery_id_of(receipt.msgid) is None
    else:
        assert receipt.msgid == message_id_for("avviso-tari-2025", ref, "pec.comune-esempio.it")
        assert receipt.identificativo
        assert receipt.date is not None and receipt.date.utcoffset() is not None


def test_daticert_details(pki: PKI) -> None:
    esterno = parse_receipt(_signed(pki, "poste-accettazione-esterno.eml"), pki.trust)
    assert [(d.address, d.tipo) for d in esterno.recipients] == [("mario@gmail.example", "esterno")]
    assert esterno.date == dt.datetime(
        2025, 3, 14, 10, 31, 1, tzinfo=dt.timezone(dt.timedelta(hours=2))
    )
    assert esterno.daticert is not None and "città" in (esterno.daticert.oggetto or "")
    error = parse_receipt(_signed(pki, "poste-errore-consegna.eml"), pki.trust)
    assert error.consegna == "nessuno@postecert.it"
    assert error.errore_esteso == "5.1.1 - Utente inesistente"
    completa = parse_receipt(_signed(pki, "aruba-avvenuta-consegna-completa.eml"), pki.trust)
    assert completa.original_message_id == completa.msgid
    assert completa.provider == "ARUBA PEC S.p.A."


def test_plain_mail_is_not_pec(pki: PKI) -> None:
    receipt = parse_receipt((FIXTURES / "plain-not-pec.eml").read_bytes(), pki.trust)
    assert (receipt.type, receipt.kind, receipt.signature.status) == (
        "not-pec",
        "not_pec",
        "unchecked",
    )
    assert not receipt.is_receipt


def test_x_tiporicevuta_in_either_case(pki: PKI) -> None:
    raw = _signed(pki, "aruba-avvenuta-consegna-breve.eml")
    for spelling in (b"X-TipoRicevuta: BREVE", b"x-tiporicevuta: Breve", b"X-TIPORICEVUTA: breve"):
        changed = raw.replace(b"X-TipoRicevuta: breve", spelling, 1)
        assert parse_receipt(changed, pki.trust).receipt_kind == "breve"
    lower = raw.replace(b"X-Ricevuta: avvenuta-consegna", b"x-ricevuta: Avvenuta-Consegna", 1)
    assert parse_receipt(lower, pki.trust).kind == "delivery"


def test_signature_tampered_untrusted_and_unchecked(pki: PKI) -> None:
    raw = _signed(pki, "aruba-avvenuta-consegna-breve.eml")
    # the delivered recipient changed inside the signed part: the digest no longer matches
    tampered = raw.replace(b"mario.rossi@pec.it.", b"mario.rossa@pec.it.", 1)
    assert tampered != raw
    result = parse_receipt(tampered, pki.trust).signature
    assert (result.status, result.reason) == ("invalid", "digest-mismatch")
    # the signature bytes themselves damaged
    head, _, p7s = raw.rpartition(b'filename="smime.p7s"\r\n\r\n')
    der = bytearray(smime.decode_p7s(p7s.split(b"\r\n--")[0]))
    der[-10] ^= 0x55
    import base64

    broken = (
        head
        + b'filename="smime.p7s"\r\n\r\n'
        + base64.encodebytes(bytes(der)).replace(b"\n", b"\r\n")
        + b"\r\n--"
        + p7s.split(b"\r\n--", 1)[1]
    )
    assert parse_receipt(broken, pki.trust).signature.status == "invalid"
    # another CA
    other = PKI()
    untrusted = parse_receipt(raw, other.trust).signature
    assert (untrusted.status, untrusted.reason, untrusted.intact) == (
        "invalid",
        "untrusted-signer",
        True,
    )
    # no trust anchors: intact but unchecked; verification off: unchecked
    assert parse_receipt(raw, None).signature.as_dict()["intact"] is True
    assert parse_receipt(raw, None).signature.status == "unchecked"
    assert parse_receipt(raw, pki.trust, verify=False).signature.status == "unchecked"
    # an unsigned receipt is never valid
    unsigned = parse_receipt((FIXTURES / "aruba-accettazione.eml").read_bytes(), pki.trust)
    assert (unsigned.signature.status, unsigned.signature.reason) == ("invalid", "unsigned")
    # the provider certificate itself as the anchor (AgID publishes provider certificates)
    direct = smime.TrustStore([pki.certs["aruba"]])
    assert parse_receipt(raw, direct).signature.status == "valid"


def test_lf_line_ends_still_verify(pki: PKI) -> None:
    raw = _signed(pki, "sogei-avvenuta-consegna-sintetica.eml").replace(b"\r\n", b"\n")
    assert parse_receipt(raw, pki.trust).signature.status == "valid"


def test_receipt_without_daticert_or_with_another_tipo_is_malformed(pki: PKI) -> None:
    raw = (FIXTURES / "poste-errore-consegna.eml").read_bytes()
    other = raw.replace(b"x-ricevuta: errore-consegna", b"x-ricevuta: avvenuta-consegna")
    assert parse_receipt(pki.sign(other, "poste"), pki.trust).kind == "malformed"
    cut = raw.split(b"content-type: application/xml")[0] + b"--=_POSTECERT_6f2a9c--\r\n"
    assert parse_receipt(pki.sign(cut, "poste"), pki.trust).kind == "malformed"


# -- the ledger ---------------------------------------------------------------------------


CAMPAIGN = "avviso-tari-2025"
DOMAIN = "pec.comune-esempio.it"


def _ledger(tmp_path: Path, addresses: list[str]) -> tuple[Ledger, list[int]]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    campaign = ledger.ensure_campaign(
        CAMPAIGN, sender=f"protocollo@{DOMAIN}", template_hash="t" * 64, params={}
    )
    ledger.plan(
        campaign.id,
        [
            PlannedDelivery(f"c{i}", a, a.rpartition("@")[2], 0, channel="pec")
            for i, a in enumerate(addresses)
        ],
    )
    ids = [int(d["id"]) for d in ledger.deliveries_of(campaign.id)]
    with ledger.engine.begin() as conn:
        for i in ids:
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == i)
                .values(state="accepted", message_id=message_id_for(CAMPAIGN, i, DOMAIN))
            )
            conn.execute(
                events.insert().values(
                    campaign_id=campaign.id,
                    delivery_id=i,
                    kind="sent",
                    at=NOW - dt.timedelta(minutes=5),
                    source="pec-smtp",
                )
            )
    return ledger, ids


def receipt(
    pki: PKI,
    tipo: str,
    delivery_id: int,
    address: str,
    *,
    dest_tipo: str = "certificato",
    errore: str = "nessuno",
    errore_esteso: str | None = None,
    variant: str = "breve",
    ident: str | None = None,
    message_id: str | None = None,
    delay: dt.timedelta = dt.timedelta(seconds=30),
) -> bytes:
    """A receipt as the sandbox-like provider writes it (Aruba layout, sha-256)."""
    when = (NOW - dt.timedelta(minutes=5) + delay).astimezone(dt.timezone(dt.timedelta(hours=1)))
    msgid = message_id_for(CAMPAIGN, delivery_id, DOMAIN)
    esc = msgid.replace("<", "&lt;").replace(">", "&gt;")
    consegna = f"<consegna>{address}</consegna>" if "consegna" in tipo else ""
    extra = f"<errore-esteso>{errore_esteso}</errore-esteso>" if errore_esteso else ""
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?><postacert tipo="{tipo}" errore="{errore}">'
        f"<intestazione><mittente>protocollo@{DOMAIN}</mittente>"
        f'<destinatari tipo="{dest_tipo}">{address}</destinatari><risposte>protocollo@{DOMAIN}'
        f"</risposte><oggetto>Avviso</oggetto></intestazione><dati>"
        f"<gestore-emittente>Sandbox PEC</gestore-emittente>"
        f'<data zona="+0100"><giorno>{when:%d/%m/%Y}</giorno><ora>{when:%H:%M:%S}</ora></data>'
        f"<identificativo>{ident or f'opec.{delivery_id}@pec.sandbox.test'}</identificativo>"
        f'<msgid>{esc}</msgid><ricevuta tipo="{variant}"/>{consegna}{extra}</dati></postacert>'
    )
    raw = (
        f"Message-ID: {message_id or f'<{uuid.uuid4().hex}@pec.sandbox.test>'}\r\n"
        f"From: posta-certificata@pec.sandbox.test\r\nTo: protocollo@{DOMAIN}\r\n"
        f"Subject: receipt\r\nX-Ricevuta: {tipo}\r\nX-Riferimento-Message-ID: {msgid}\r\n"
        f"X-TipoRicevuta: {variant}\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        f"--b1\r\nContent-Type: text/plain\r\n\r\nRicevuta\r\n"
        f'--b1\r\nContent-Type: application/xml; name="daticert.xml"\r\n\r\n{xml}\r\n--b1--\r\n'
    ).encode()
    return pki.sign(raw, "aruba")


def _handle(collector: ReceiptCollector, raw: bytes) -> str:
    return collector.handle(InboundMessage(1, len(raw), raw))


def _states(ledger: Ledger, ids: list[int]) -> list[str]:
    with ledger.engine.connect() as conn:
        rows = dict(conn.execute(sa.select(deliveries.c.id, deliveries.c.state)).all())
    return [rows[i] for i in ids]


def test_state_machine_out_of_order_and_idempotent(pki: PKI, tmp_path: Path) -> None:
    addresses = ["a@pec.it", "b@pec.it", "c@gmail.example", "d@pec.it", "e@pec.it", "f@pec.it"]
    ledger, ids = _ledger(tmp_path, addresses)
    collector = ReceiptCollector(ledger, tmp_path, "box-1", trust=pki.trust)
    a, b, c, d, e, f = ids
    # a: delivery before acceptance (out of order): delivered stays delivered
    assert _handle(collector, receipt(pki, "avvenuta-consegna", a, "a@pec.it")) == "archive"
    assert _handle(collector, receipt(pki, "accettazione", a, "a@pec.it")) == "archive"
    # b: acceptance, 12 h warning, then the delivery after all
    for tipo in ("accettazione", "preavviso-errore-consegna", "avvenuta-consegna"):
        _handle(collector, receipt(pki, tipo, b, "b@pec.it"))
    # c: esterno -> not_pec
    _handle(collector, receipt(pki, "accettazione", c, "c@gmail.example", dest_tipo="esterno"))
    # d: delivery error (no-dest)
    _handle(collector, receipt(pki, "accettazione", d, "d@pec.it"))
    _handle(collector, receipt(pki, "errore-consegna", d, "d@pec.it", errore="no-dest"))
    # e: non-accettazione
    _handle(collector, receipt(pki, "non-accettazione", e, "e@pec.it", errore="altro"))
    # f: provider's 24 h notice
    _handle(
        collector,
        receipt(
            pki,
            "errore-consegna",
            f,
            "f@pec.it",
            errore="altro",
            errore_esteso="Superamento tempo massimo",
        ),
    )
    assert _states(ledger, ids) == [
        "delivered",
        "delivered",
        "not_pec",
        "delivery_error",
        "pec_rejected",
        "delivery_timeout",
    ]
    # a late delivery receipt after the 24 h notice still counts
    _handle(collector, receipt(pki, "avvenuta-consegna", f, "f@pec.it"))
    assert _states(ledger, ids)[5] == "delivered"

    with ledger.engine.connect() as conn:
        before = (
            conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one(),
            conn.execute(sa.select(sa.func.count()).select_from(pec_receipts)).scalar_one(),
        )
    # the same receipt again: same bytes, and a copy with other bytes (same Message-ID)
    same_id = "<fixed-receipt-1@pec.sandbox.test>"
    first = receipt(pki, "avvenuta-consegna", d, "d@pec.it", message_id=same_id)
    assert _handle(collector, first) == "archive"
    again = receipt(
        pki, "avvenuta-consegna", d, "d@pec.it", message_id=same_id, delay=dt.timedelta(seconds=31)
    )
    assert again != first
    assert _handle(collector, first) == "archive"
    assert _handle(collector, again) == "archive"
    with ledger.engine.connect() as conn:
        after = (
            conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one(),
            conn.execute(sa.select(sa.func.count()).select_from(pec_receipts)).scalar_one(),
        )
        dispositions: dict[str, int] = dict(
            conn.execute(
                sa.select(inbound_messages.c.disposition, sa.func.count()).group_by(
                    inbound_messages.c.disposition
                )
            ).all()
        )
    assert after == (before[0] + 1, before[1] + 1)  # one new receipt, counted once
    assert dispositions["duplicate"] == 1
    assert collector.counts.duplicates == 2

    # evidence: raw bytes, 0600, by SHA-256
    files = list((tmp_path / "evidence" / "pec").rglob("*.eml"))
    assert files and all(p.stat().st_mode & 0o777 == 0o600 for p in files)

    report = pec_analysis(ledger, 1)
    assert report is not None
    assert report["funnel"]["delivered"] == 2 + 1  # a, b, f
    assert report["funnel"]["not_pec"] == 1
    assert report["time_to_delivery"]["deliveries"] == 3
    text = "\n".join(pec_markdown(report))
    assert "| delivered | 3 |" in text and "box-1" in text and "Sandbox PEC" in text
    ledger.close()


def test_invalid_signature_and_unknown_receipts_are_quarantined(pki: PKI, tmp_path: Path) -> None:
    ledger, ids = _ledger(tmp_path, ["a@pec.it"])
    collector = ReceiptCollector(ledger, tmp_path, "box-1", trust=pki.trust)
    good = receipt(pki, "avvenuta-consegna", ids[0], "a@pec.it")
    forged = good.replace(b"a@pec.it</consegna>", b"z@pec.it</consegna>")
    assert _handle(collector, forged) == "quarantine"
    assert _handle(collector, _signed(pki, "aruba-posta-certificata.eml")) == "quarantine"
    assert _handle(collector, (FIXTURES / "plain-not-pec.eml").read_bytes()) == "quarantine"
    # a receipt of ours for a delivery we do not have
    assert _handle(collector, receipt(pki, "accettazione", 999, "x@pec.it")) == "quarantine"
    assert _states(ledger, ids) == ["accepted"]
    assert collector.counts.rejected_signatures == 1
    assert _handle(collector, good) == "archive"
    assert _states(ledger, ids) == ["delivered"]
    ledger.close()


def test_timeouts(pki: PKI, tmp_path: Path) -> None:
    ledger, ids = _ledger(tmp_path, ["a@pec.it", "b@pec.it", "c@pec.it"])
    collector = ReceiptCollector(ledger, tmp_path, "box-1", trust=pki.trust)
    _handle(collector, receipt(pki, "accettazione", ids[1], "b@pec.it"))
    _handle(collector, receipt(pki, "avvenuta-consegna", ids[2], "c@pec.it"))
    soon = check_timeouts(ledger, now=NOW + dt.timedelta(hours=1))
    assert (soon["acceptance_overdue"], soon["acceptance_overdue_new"]) == (1, 1)
    assert soon["delivery_timeout"] == 0
    again = check_timeouts(ledger, now=NOW + dt.timedelta(hours=2))
    assert (again["acceptance_overdue"], again["acceptance_overdue_new"]) == (1, 0)
    late = check_timeouts(ledger, now=NOW + dt.timedelta(hours=25))
    assert late["delivery_timeout"] == 2
    assert _states(ledger, ids) == ["delivery_timeout", "delivery_timeout", "delivered"]
    # the delivery receipt after our own timeout still moves it on
    _handle(collector, receipt(pki, "avvenuta-consegna", ids[1], "b@pec.it"))
    assert _states(ledger, ids)[1] == "delivered"
    assert check_timeouts(ledger, now=NOW + dt.timedelta(hours=26))["delivery_timeout"] == 0
    ledger.close()


def test_identificativo_joins_a_receipt_without_our_message_id(pki: PKI, tmp_path: Path) -> None:
    ledger, ids = _ledger(tmp_path, ["a@pec.it"])
    collector = ReceiptCollector(ledger, tmp_path, "box-1", trust=pki.trust)
    _handle(collector, receipt(pki, "accettazione", ids[0], "a@pec.it", ident="opec.X1@p.it"))
    other = receipt(pki, "avvenuta-consegna", ids[0], "a@pec.it", ident="opec.X1@p.it")
    ours = message_id_for(CAMPAIGN, ids[0], DOMAIN).encode()
    hidden = pki.sign(
        _unsigned_copy(other)
        .replace(ours, b"<opec.X1@p.it>")
        .replace(ours.replace(b"<", b"&lt;").replace(b">", b"&gt;"), b"&lt;opec.X1@p.it&gt;"),
        "aruba",
    )
    assert _handle(collector, hidden) == "archive"
    assert _states(ledger, ids) == [State.DELIVERED.value]
    ledger.close()


def _unsigned_copy(signed: bytes) -> bytes:
    """The receipt before signing: outer headers + the signed entity."""
    head, _, body = signed.partition(b"\r\n\r\n")
    outer = b"\r\n".join(
        line
        for line in head.split(b"\r\n")
        if not line.lower().startswith((b"mime-version", b"content-type"))
    )
    boundary = head.split(b'boundary="')[1].split(b'"')[0]
    entity = body.split(b"--" + boundary + b"\r\n")[1].rsplit(b"\r\n", 1)[0]
    return outer + b"\r\nMIME-Version: 1.0\r\n" + entity


# -- the command line ---------------------------------------------------------------------


def test_cli_parse_json(pki: PKI, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.public_bytes(serialization.Encoding.PEM))
    files = []
    for name in ("aruba-accettazione.eml", "poste-avvenuta-consegna-breve.eml"):
        path = tmp_path / name
        path.write_bytes(_signed(pki, name))
        files.append(str(path))
    plain = str(FIXTURES / "plain-not-pec.eml")
    result = CliRunner().invoke(
        main, ["pec", "parse", "--json", "--ca-file", str(ca), *files, plain]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.output.splitlines()]
    assert [x["type"] for x in lines] == ["accettazione", "avvenuta-consegna", "not-pec"]
    assert [x["signature"] for x in lines] == ["valid", "valid", "unchecked"]
    for key in ("file", "msgid", "identificativo", "errore", "receipt_kind", "recipients", "date"):
        assert all(key in x for x in lines)
    assert lines[1]["receipt_kind"] == "breve" and lines[1]["date"].endswith("+02:00")
    human = CliRunner().invoke(main, ["pec", "parse", "--no-verify", files[0]])
    assert human.exit_code == 0 and "accettazione [acceptance]" in human.output
    assert "signature unchecked" in human.output


# -- against a real Dovecot ----------------------------------------------------------------

needs_dovecot = pytest.mark.skipif(not imap.available(), reason="dovecot-imapd is not installed")


@pytest.fixture(scope="module")
def dovecot_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailboxSettings]:
    if not imap.available():
        pytest.skip("dovecot-imapd is not installed")
    from test_bounce_collector import dovecot as bounce_dovecot

    yield from bounce_dovecot.__wrapped__(tmp_path_factory)  # type: ignore[attr-defined]


@needs_dovecot
def test_collector_against_dovecot_repoll_and_quarantine(
    pki: PKI, tmp_path: Path, dovecot_box: MailboxSettings
) -> None:
    from test_bounce_collector import _append, _count

    from recapito.collect.mailbox import poll
    from recapito.pec.collector import collect_receipts

    box = replace(
        dovecot_box,
        folder="pec-in",
        archive_folder="pec-archive",
        quarantine_folder="pec-quarantine",
    )
    ledger, ids = _ledger(tmp_path, ["a@pec.it", "b@pec.it", "c@gmail.example"])
    good = [
        receipt(pki, "accettazione", ids[0], "a@pec.it"),
        receipt(pki, "avvenuta-consegna", ids[0], "a@pec.it"),
        receipt(pki, "preavviso-errore-consegna", ids[1], "b@pec.it"),
        receipt(pki, "accettazione", ids[2], "c@gmail.example", dest_tipo="esterno"),
    ]
    bad = [
        good[1].replace(b"a@pec.it</consegna>", b"q@pec.it</consegna>"),  # tampered
        (FIXTURES / "plain-not-pec.eml").read_bytes(),
        _signed(pki, "aruba-busta-anomalia.eml"),
        b"\xff\xfe garbage without headers \x00",
    ]
    _append(box, good + bad)
    collector = ReceiptCollector(ledger, tmp_path, "sandbox-1", trust=pki.trust)
    stats = poll(box, collector.handle)
    assert (stats.seen, stats.archived, stats.quarantined) == (8, 4, 4)
    assert _states(ledger, ids) == ["delivered", "delivery_warning", "not_pec"]
    with ledger.engine.connect() as conn:
        n_events = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
    # re-poll: the same receipts land in the inbox again (a crash before the MOVE)
    _append(box, good)
    settings = replace(_settings(tmp_path), home=tmp_path)
    result = collect_receipts(settings, {"sandbox-1": box}, trust=pki.trust)
    assert (result["seen"], result["archived"], result["duplicates"]) == (4, 4, 4)
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one() == n_events
    assert _states(ledger, ids) == ["delivered", "delivery_warning", "not_pec"]
    assert _count(box, "pec-archive") == 8 and _count(box, "pec-quarantine") == 4
    assert _count(box, "pec-in") == 0
    ledger.close()


def _settings(tmp_path: Path) -> Any:
    from recapito.config import Settings

    return Settings.load(
        {"RECAPITO_HOME": str(tmp_path), "RECAPITO_DB_URL": f"sqlite:///{tmp_path / 'ledger.db'}"}
    )


def test_cli_parse_every_fixture_and_the_sandbox_receipts(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``recapito pec parse --json`` over a folder: every fixture layout (Aruba, Poste, Sogei;
    sha1 and sha-256; ``X-TipoRicevuta`` spelled in either case) and receipts written by the
    sandbox providers, verified against the sandbox CA named in its ``settings.json``."""
    import datetime as dt

    from recapito.sandbox import pec as sandbox_pec
    from recapito.sandbox.certs import ensure_certificates

    keys = {"file", "type", "msgid", "identificativo", "errore", "receipt_kind", "recipients"}
    keys |= {"date", "signature"}
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.public_bytes(serialization.Encoding.PEM))
    folder = tmp_path / "fixtures"
    folder.mkdir()
    names = sorted(p.name for p in FIXTURES.glob("*.eml"))
    for name in names:
        raw = (FIXTURES / name).read_bytes()
        signed = raw if name.startswith("plain") else _signed(pki, name)
        (folder / name).write_bytes(signed)
    result = CliRunner().invoke(main, ["pec", "parse", "--json", "--ca-file", str(ca), str(folder)])
    assert result.exit_code == 0, result.output
    lines = {Path(x["file"]).name: x for x in map(json.loads, result.output.splitlines())}
    assert sorted(lines) == names
    assert all(keys <= set(x) for x in lines.values())
    assert {n for n, x in lines.items() if x["signature"] != "valid"} == {"plain-not-pec.eml"}
    assert lines["sogei-avvenuta-consegna-sintetica.eml"]["receipt_kind"] == "sintetica"
    assert lines["poste-avvenuta-consegna-breve.eml"]["receipt_kind"] == "breve"  # "Breve"
    assert lines["aruba-avvenuta-consegna-completa.eml"]["receipt_kind"] == "completa"
    assert all(x["date"] and x["date"][-6] in "+-" for x in lines.values())  # with its zone

    # the sandbox providers' receipts, trusted through the sandbox's settings.json
    home = tmp_path / "var"
    sandbox = home / "sandbox"
    ensure_certificates(sandbox, [])
    provider = sandbox_pec.DEFAULT_PROVIDERS[0]
    cert, key = sandbox_pec.ensure_signing_certificate(sandbox, provider)
    signer = sandbox_pec.Signer(str(cert), str(key))
    original = (
        b"From: campagne@pec.postaveloce.test\r\nTo: anna@legalmail-esempio.test\r\n"
        b"Subject: Avviso\r\nMessage-ID: <demo.7.0123456789abcdef@pec.postaveloce.test>\r\n"
        b"X-TipoRicevuta: breve\r\n\r\nTesto\r\n"
    )
    sub = sandbox_pec.Submission(
        provider=provider,
        sender="campagne@pec.postaveloce.test",
        recipients=(("anna@legalmail-esempio.test", "certificato"),),
        subject="Avviso",
        msgid="<demo.7.0123456789abcdef@pec.postaveloce.test>",
        identificativo="opec0123.20250314103000@pec.postaveloce.test",
        receipt_kind="breve",
        original=original,
        accepted_at=dt.datetime.now(dt.UTC),
    )
    made = tmp_path / "sandbox-receipts"
    made.mkdir()
    (made / "1.eml").write_bytes(sandbox_pec.build_receipt(sub, "accettazione", signer))
    (made / "2.eml").write_bytes(
        sandbox_pec.build_receipt(
            sub, "avvenuta-consegna", signer, consegna="anna@legalmail-esempio.test"
        )
    )
    (sandbox / "settings.json").write_text(
        json.dumps({"RECAPITO_PEC_CA_FILE": str(sandbox / "ca.pem")})
    )
    monkeypatch.setenv("RECAPITO_HOME", str(home))
    monkeypatch.delenv("RECAPITO_PEC_CA_FILE", raising=False)
    result = CliRunner().invoke(main, ["pec", "parse", "--json", str(made)])
    assert result.exit_code == 0, result.output
    got = [json.loads(x) for x in result.output.splitlines()]
    assert [(x["type"], x["signature"]) for x in got] == [
        ("accettazione", "valid"),
        ("avvenuta-consegna", "valid"),
    ]
    assert got[1]["msgid"] == sub.msgid and got[1]["receipt_kind"] == "breve"
    assert got[1]["identificativo"] == sub.identificativo
    assert got[1]["recipients"] == [
        {"address": "anna@legalmail-esempio.test", "tipo": "certificato"}
    ]
