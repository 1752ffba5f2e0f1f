"""PEC: channel rules, mailboxes, SMTPS submission to the sandbox providers, their receipts.

The submission tests run against a sandbox of their own (real Dovecot, real SMTPS on
127.0.0.1) whose two providers have limits chosen for the test; they are skipped where
Dovecot is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from recapito.campaign import CampaignParams, campaign_dir, prepare
from recapito.config import Settings
from recapito.ledger import Ledger
from recapito.pec.campaign import deliver_pec_chunk, explain
from recapito.pec.mailboxes import (
    PecMailbox,
    expiring_credentials,
    expiry_markdown,
    load_mailboxes_file,
)
from recapito.pec.rules import RulesError, classify, parse_rules
from recapito.pec.submit import PecOptions, is_traffic_limit
from recapito.sandbox import imap as sandbox_imap
from recapito.sandbox.pec import PecProvider, PecWorld, read_journal
from recapito.sandbox.runtime import Sandbox

DEMO_TEMPLATE = Path(__file__).parents[1] / "src" / "recapito" / "sandbox" / "demo_template"

RULES = """
pec_column = "pec"

[[channel]]
name = "legal-to-pec"
when = 'classe = "legal"'
channel = "pec"

[[channel]]
name = "certified-domain"
domains = ["pec.postaveloce.test", "legalmail-esempio.test"]
channel = "pec"

[[channel]]
name = "everyone-else"
channel = "email"

[[mailbox]]
name = "legal-spread"
when = 'classe = "legal"'
mailboxes = { veloce = 3, legal = 1 }

[[mailbox]]
name = "others-legal-quota"
mailboxes = { legal = 1, veloce = 1 }
quota = { legal = 1 }
"""


def _audience() -> pl.DataFrame:
    rows = [
        # contact_id, email, pec, classe
        ("A", "a@mail.test", "a@pec.postaveloce.test", "legal"),
        ("B", "b@mail.test", None, "legal"),  # legal but no PEC address: next rules
        ("C", "c@legalmail-esempio.test", None, "marketing"),  # a certified domain
        ("D", "d@mail.test", "d@pec.postaveloce.test", "marketing"),  # PEC, not legal
        ("E", "e@mail.test", "not-an-address", "legal"),  # bad PEC address: e-mail
        ("F", "f@pec.postaveloce.test", None, "news"),
        ("G", "g@legalmail-esempio.test", None, "news"),
    ]
    frame = pl.DataFrame(rows, schema=["contact_id", "email", "pec", "classe"], orient="row")
    return frame.with_columns(pl.col("email").str.split("@").list.last().alias("email_domain"))


def test_rules_first_match_wins_and_record_the_rule() -> None:
    rules = parse_rules(RULES.encode())
    out = classify(_audience(), rules, sender="x@bank.test", mailboxes=["veloce", "legal"])
    got = {r["contact_id"]: r for r in out.to_dicts()}
    assert [got[c]["_channel"] for c in "ABCDEFG"] == [
        "pec", "email", "pec", "email", "email", "pec", "pec",
    ]  # fmt: skip
    assert got["A"]["_rule"] == "legal-to-pec" and got["A"]["_address"] == "a@pec.postaveloce.test"
    assert got["B"]["_rule"] == "everyone-else" and got["B"]["_address"] == "b@mail.test"
    assert got["C"]["_rule"] == "certified-domain"
    assert got["C"]["_address"] == "c@legalmail-esempio.test"
    assert got["D"]["_rule"] == "everyone-else"  # a PEC address alone is not a rule here
    assert got["E"]["_rule"] == "everyone-else"
    assert got["A"]["_mailbox_rule"] == "legal-spread"
    # the quota: one recipient through "legal", the others through "veloce"
    others = [got[c] for c in "CFG"]
    assert {r["_mailbox_rule"] for r in others} == {"others-legal-quota"}
    assert sorted(r["_mailbox"] for r in others) == ["legal", "veloce", "veloce"]
    assert got["B"]["_mailbox"] is None  # e-mail rows get no mailbox
    # helper columns do not leak into the audience
    assert "pec_domain" not in out.columns and "sender" not in out.columns


def test_rules_weights_spread_deterministically() -> None:
    rules = parse_rules(
        b'[[channel]]\nname="all"\nchannel="pec"\naddress="email"\n'
        b'[[mailbox]]\nname="w"\nmailboxes={one=3, two=1}\n'
    )
    frame = pl.DataFrame({"contact_id": [str(i) for i in range(400)]}).with_columns(
        (pl.col("contact_id") + "@pec.test").alias("email")
    )
    out = classify(frame, rules, sender="s@x.test", mailboxes=["one", "two"])
    counts = out.group_by("_mailbox").len().sort("_mailbox").to_dicts()
    assert counts == [{"_mailbox": "one", "len": 300}, {"_mailbox": "two", "len": 100}]
    again = classify(frame, rules, sender="s@x.test", mailboxes=["one", "two"])
    assert again.get_column("_mailbox").to_list() == out.get_column("_mailbox").to_list()


def test_rules_sender_condition_and_errors() -> None:
    rules = parse_rules(
        b'[[channel]]\nname="all"\nchannel="pec"\naddress="email"\n'
        b'[[mailbox]]\nname="legale"\nsenders=["legale@bank.test"]\nmailboxes=["one"]\n'
        b'[[mailbox]]\nname="rest"\nmailboxes=["two"]\n'
    )
    frame = pl.DataFrame({"contact_id": ["1"], "email": ["x@pec.test"]})
    assert classify(frame, rules, sender="legale@bank.test").item(0, "_mailbox") == "one"
    assert classify(frame, rules, sender="news@bank.test").item(0, "_mailbox") == "two"
    with pytest.raises(RulesError, match="unknown PEC mailbox"):
        classify(frame, rules, sender="x@bank.test", mailboxes=["one"])
    bad = parse_rules(b'[[channel]]\nname="x"\nwhen="nonexistent = 1"\nchannel="pec"\n')
    with pytest.raises(RulesError, match="rule 'x'"):
        classify(frame, bad, sender="x@bank.test")
    with pytest.raises(RulesError, match="channel must be one of"):
        parse_rules(b'[[channel]]\nname="x"\nchannel="fax"\n')
    with pytest.raises(RulesError, match="used twice"):
        parse_rules(
            b'[[channel]]\nname="x"\nchannel="pec"\n[[channel]]\nname="x"\nchannel="email"\n'
        )
    yaml_rules = parse_rules(
        b"channel:\n  - name: y\n    channel: pec\n    address: email\n", suffix=".yaml"
    )
    assert yaml_rules.channel_rules[0].name == "y"


def test_mailbox_password_hidden_and_expiry_warning() -> None:
    box = PecMailbox(
        name="m",
        address="a@pec.test",
        smtp_host="smtps.pec.test",
        username="a@pec.test",
        password="s3cret-value",
        credential_expires=dt.date(2030, 1, 10),
    )
    assert "s3cret-value" not in repr(box) and "s3cret-value" not in json.dumps(box.public())
    warnings = expiring_credentials([box], within_days=14, today=dt.date(2030, 1, 1))
    assert [(w.mailbox, w.days_left) for w in warnings] == [("m", 9)]
    assert "| m | a@pec.test | 2030-01-10 | 9 |" in expiry_markdown(warnings, 14)
    assert expiring_credentials([box], within_days=14, today=dt.date(2029, 1, 1)) == []


def test_traffic_limit_wordings() -> None:
    assert is_traffic_limit(450, "4.7.0 Limite di invio superato: troppi messaggi per minuto")
    assert is_traffic_limit(421, "4.7.0 Too many messages, try again later")
    assert not is_traffic_limit(550, "5.1.1 User unknown")


# ---- against the sandbox providers -------------------------------------------------------------

FAST = PecWorld(
    providers=(
        PecProvider(
            name="postaveloce",
            gestore="Veloce PEC (test)",
            domain="pec.postaveloce.test",
            smtp_host="smtps.pec.postaveloce.test",
            mailboxes=("campagne@pec.postaveloce.test", "lento@pec.postaveloce.test"),
            per_minute=3000,
        ),
        PecProvider(
            name="legalmail",
            gestore="Legal PEC (test)",
            domain="legalmail-esempio.test",
            smtp_host="sendm.legalmail-esempio.test",
            mailboxes=("notifiche@legalmail-esempio.test",),
            per_minute=2400,
        ),
        PecProvider(  # a slow one, for the traffic-limit test
            name="lentissima",
            gestore="Lentissima PEC (test)",
            domain="pec.lentissima.test",
            smtp_host="smtps.pec.lentissima.test",
            mailboxes=("saturo@pec.lentissima.test",),
            per_minute=20,
        ),
    ),
    delivery_delay=0.2,
    time_scale=14_400.0,  # 12 h = 3 s, 24 h = 6 s
)

needs_dovecot = pytest.mark.skipif(not sandbox_imap.available(), reason="dovecot not installed")


@pytest.fixture(scope="module")
def pec_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    if not sandbox_imap.available():
        pytest.skip("dovecot not installed")
    with Sandbox(tmp_path_factory.mktemp("pec-sandbox"), pec=FAST) as box:
        yield box


@pytest.fixture
def home(pec_sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    for key, value in pec_sandbox.env().items():
        monkeypatch.setenv(key, value)
    return tmp_path


def _mailboxes(sandbox: Sandbox, **limits: float) -> dict[str, PecMailbox]:
    """The sandbox's mailboxes, by name, with the client-side limits overridden."""
    boxes = load_mailboxes_file(sandbox.pec_mailboxes_file)
    if not limits:
        return boxes
    import dataclasses

    return {n: dataclasses.replace(b, **limits) for n, b in boxes.items()}  # type: ignore[arg-type]


def _contacts(path: Path, pec_addresses: list[str]) -> Path:
    lines = ["id;nome;email;segmento;citta;provincia;consenso_email;pec;classe"]
    for i, pec in enumerate(pec_addresses):
        lines.append(f"P{i};Nome{i};utente{i}@mailitalia.test;retail;Roma;RM;true;{pec};legal")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rules(path: Path, mailboxes: dict[str, int]) -> Path:
    weights = ", ".join(f'"{k}" = {v}' for k, v in mailboxes.items())
    path.write_text(
        "[[channel]]\nname = 'legal-pec'\nwhen = 'classe = \"legal\"'\nchannel = 'pec'\n"
        "[[channel]]\nname = 'rest'\nchannel = 'email'\n"
        f"[[mailbox]]\nname = 'spread'\nmailboxes = {{ {weights} }}\n",
        encoding="utf-8",
    )
    return path


def _receipts(sandbox: Sandbox, login: str) -> list[Path]:
    folder = sandbox.pec_maildir(login)
    return sorted(p for sub in ("new", "cur") for p in (folder / sub).glob("*") if p.is_file())


def _wait_receipts(sandbox: Sandbox, login: str, count: int, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _receipts(sandbox, login)
        if len(found) >= count:
            return found
        time.sleep(0.2)
    return _receipts(sandbox, login)


def _header(path: Path, name: str) -> str | None:
    from email.parser import BytesHeaderParser

    headers = BytesHeaderParser().parsebytes(path.read_bytes())
    return headers.get(name)


def _accepted_times(sandbox: Sandbox, login: str, since: float) -> list[float]:
    return sorted(
        e["t"]
        for e in read_journal(sandbox.pec_journal)
        if e.get("event") == "accepted" and e.get("login") == login and e["t"] >= since
    )


@needs_dovecot
def test_submission_paced_per_mailbox_receipts_signed(home: Path, pec_sandbox: Sandbox) -> None:
    """Real SMTPS to a sandbox provider: one recipient per message, the mailbox's rate
    respected, an acceptance and a delivery (or error) receipt per message, signed."""
    settings = Settings.load()
    login = "lento@pec.postaveloce.test"
    name = "lento-postaveloce"
    targets = [f"dest{i}@pec.postaveloce.test" for i in range(8)]
    targets += ["mario.inesistente@legalmail-esempio.test", "esterno@gmail.test"]
    params = CampaignParams(
        name="pec-paced",
        contacts=str(_contacts(home / "c.csv", targets)),
        template=str(DEMO_TEMPLATE),
        sender="legale@banca-esempio.test",
        rules=str(_rules(home / "rules.toml", {name: 1})),
    )
    prepared = prepare(params, settings)
    assert prepared.chunks == {} and list(prepared.pec_chunks or {}) == [0]
    before = len(_receipts(pec_sandbox, login))
    started = time.time()
    boxes = _mailboxes(pec_sandbox, per_minute=240.0)  # 4 a second for this mailbox
    result = deliver_pec_chunk(params, 0, settings, mailboxes=boxes)
    assert result["outcomes"] == {"accepted": 10}
    assert result["per_mailbox"] == {name: 10}
    times = _accepted_times(pec_sandbox, login, started)
    assert len(times) == 10
    # GCRA at 4/s: ten messages take at least 9 intervals of 0.25 s
    assert times[-1] - times[0] >= 9 * 0.25 * 0.9
    ledger = Ledger(settings.db_url)
    try:
        campaign = ledger.get_campaign("pec-paced")
        assert campaign is not None
        rows = ledger.deliveries_of(campaign.id)
        assert {r["channel"] for r in rows} == {"pec"}
        assert {r["state"] for r in rows} == {"accepted"}
        assert {r["rule"] for r in rows} == {"legal-pec"}
        assert {r["pec_mailbox"] for r in rows} == {name}
        assert {r["tls_version"] for r in rows} <= {"TLSv1.2", "TLSv1.3"}
        assert all(str(r["message_id"]).endswith("@pec.postaveloce.test>") for r in rows)
        assert all(f".{r['id']}." in str(r["message_id"]) for r in rows)
        sent = ledger.events_of(campaign.id, "sent")
        assert len(sent) == 10
    finally:
        ledger.close()
    # 10 acceptances, 8 deliveries, 1 error, nothing for the esterno recipient
    receipts = _wait_receipts(pec_sandbox, login, before + 19, timeout=10)[before:]
    kinds: dict[str | None, int] = {}
    for path in receipts:
        kind = _header(path, "X-Ricevuta")
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == {"accettazione": 10, "avvenuta-consegna": 8, "errore-consegna": 1}
    delivered = next(p for p in receipts if _header(p, "X-Ricevuta") == "avvenuta-consegna")
    assert _header(delivered, "X-TipoRicevuta") == "breve"
    body = delivered.read_bytes()
    assert b"daticert.xml" in body and b"postacert.eml" in body
    for path in [*receipts[:3], delivered]:
        check = subprocess.run(
            ["openssl", "smime", "-verify", "-CAfile", str(pec_sandbox.ca_file),
             "-purpose", "any", "-in", str(path), "-out", "/dev/null"],
            capture_output=True,
        )  # fmt: skip
        assert check.returncode == 0, check.stderr
    # explain: the rule stored in the ledger, and the trace of every rule
    contact = explain(settings, "pec-paced", "P0")
    assert contact.deliveries[0]["rule"] == "legal-pec"
    assert [t["rule"] for t in contact.channel_trace if t["fired"]] == ["legal-pec"]
    assert "legal-pec" in contact.text() and "<- fired" in contact.text()


@needs_dovecot
def test_provider_traffic_limit_backs_off_and_defers(home: Path, pec_sandbox: Sandbox) -> None:
    """A mailbox configured faster than its provider allows: the provider answers 450 with a
    traffic-limit text, the client backs off, and what is left is deferred, never failed."""
    settings = Settings.load()
    targets = [f"limite{i}@pec.postaveloce.test" for i in range(6)]
    params = CampaignParams(
        name="pec-backoff",
        contacts=str(_contacts(home / "c.csv", targets)),
        template=str(DEMO_TEMPLATE),
        sender="legale@banca-esempio.test",
        rules=str(_rules(home / "rules.toml", {"saturo-lentissima": 1})),
    )
    prepare(params, settings)
    # the provider allows 20 a minute: use most of its window first, as another client
    # of the same mailbox would, then ask for more than is left
    boxes = _mailboxes(pec_sandbox, per_minute=100_000.0, connections=1)
    box = boxes["saturo-lentissima"]
    _fill_window(box, 17)
    started = time.time()
    options = PecOptions(helo_name="test.local", backoff_initial=0.3, max_wait=1.5)
    result = deliver_pec_chunk(params, 0, settings, mailboxes=boxes, options=options)
    assert result["backoffs"].get("saturo-lentissima", 0) >= 1
    assert result["outcomes"] == {"accepted": 3, "deferred": 3}
    assert result["outcomes"].get("failed", 0) == 0
    journal = read_journal(pec_sandbox.pec_journal)
    limited = [e for e in journal if e.get("event") == "traffic_limit" and e["t"] >= started]
    assert limited
    ledger = Ledger(settings.db_url)
    try:
        campaign = ledger.get_campaign("pec-backoff")
        assert campaign is not None
        states = ledger.state_counts(campaign.id)
        assert set(states) <= {"accepted", "deferred"}
        reasons = {r["reason"] for r in ledger.deliveries_of(campaign.id) if r["reason"]}
        assert reasons <= {"pec_traffic_limit"}
    finally:
        ledger.close()


def _fill_window(box: PecMailbox, count: int) -> None:
    """Send ``count`` tiny messages through ``box`` to use up the provider's minute."""
    import asyncio
    import socket

    import aiosmtplib

    from recapito.pec.submit import tls_context

    async def go() -> None:
        sock = socket.create_connection((box.smtp_address or box.smtp_host, box.smtp_port))
        sock.setblocking(False)
        smtp = aiosmtplib.SMTP(
            hostname=box.smtp_host, sock=sock, use_tls=True, tls_context=tls_context(box)
        )
        await smtp.connect()
        await smtp.login(box.username, box.password)
        for i in range(count):
            rcpt = f"riempi{i}@gmail.test"  # esterno: acceptance only
            data = (
                f"From: {box.address}\r\nTo: {rcpt}\r\nSubject: x\r\n"
                f"Message-ID: <fill{i}.{time.time()}@x>\r\nX-TipoRicevuta: sintetica\r\n\r\nx\r\n"
            ).encode()
            try:
                await smtp.sendmail(box.address, [rcpt], data)
            except aiosmtplib.SMTPResponseException:
                break
        await smtp.quit()

    asyncio.run(go())


@needs_dovecot
def test_simulator_1000_recipients_over_two_providers(home: Path, pec_sandbox: Sandbox) -> None:
    """1,000 PEC recipients spread over two providers' mailboxes: every message accepted
    within the limits, and every receipt (acceptance, delivery, error, warning) in the IMAP
    mailboxes, compressed time for the 12 h warning and 24 h error."""
    settings = Settings.load()
    targets = []
    for i in range(1000):
        domain = "pec.postaveloce.test" if i % 2 else "legalmail-esempio.test"
        local = f"utente{i}"
        if i % 100 == 7:
            local += ".inesistente"
        elif i % 250 == 11:
            local += ".silenzio"
        elif i % 250 == 13:
            local += ".tardiva"
        targets.append(f"{local}@{domain}")
    params = CampaignParams(
        name="pec-simulator",
        contacts=str(_contacts(home / "c.csv", targets)),
        template=str(DEMO_TEMPLATE),
        sender="legale@banca-esempio.test",
        chunk_size=1000,
        rules=str(
            _rules(home / "rules.toml", {"campagne-postaveloce": 1, "notifiche-legalmail": 1})
        ),
    )
    started = time.time()
    prepare(params, settings)
    boxes = _mailboxes(pec_sandbox, connections=3)
    logins = {b.name: b.address for b in boxes.values()}
    before = {login: len(_receipts(pec_sandbox, login)) for login in logins.values()}
    result = deliver_pec_chunk(params, 0, settings, mailboxes=boxes)
    sent_s = time.time() - started
    assert result["outcomes"] == {"accepted": 1000}
    assert result["per_mailbox"] == {"campagne-postaveloce": 500, "notifiche-legalmail": 500}
    # every provider's minute limit held: no refusal, and never more than it in 60 s
    for name, login in logins.items():
        if name not in ("campagne-postaveloce", "notifiche-legalmail"):
            continue
        times = _accepted_times(pec_sandbox, login, started)
        assert len(times) == 500
        limit = boxes[name].per_minute
        j = 0
        for i, t in enumerate(times):
            while t - times[j] >= 60:
                j += 1
            assert i - j + 1 <= limit
    silent = sum(1 for t in targets if ".silenzio" in t)
    late = sum(1 for t in targets if ".tardiva" in t)
    errors = sum(1 for t in targets if ".inesistente" in t)
    # per message: acceptance + (delivery | error); silenzio: warning + error; tardiva:
    # warning + delivery
    expected = 1000 + 1000 + silent + late
    deadline = time.monotonic() + 30
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        total = sum(len(_receipts(pec_sandbox, login)) - before[login] for login in logins.values())
        if total >= expected:
            break
        time.sleep(0.5)
    from recapito.pec import smime
    from recapito.pec.receipts import parse_receipt

    trust = smime.TrustStore.from_pem_file(pec_sandbox.ca_file)
    kinds: dict[str, int] = {}
    signatures: dict[str, int] = {}
    referenced: set[str] = set()
    for login in logins.values():
        for path in _receipts(pec_sandbox, login)[before[login] :]:
            receipt = parse_receipt(path.read_bytes().replace(b"\n", b"\r\n"), trust)
            kinds[receipt.type] = kinds.get(receipt.type, 0) + 1
            status = receipt.signature.status
            signatures[status] = signatures.get(status, 0) + 1
            referenced.add(str(receipt.msgid))
    counts = kinds
    assert counts == {
        "accettazione": 1000,
        "avvenuta-consegna": 1000 - errors - silent,
        "errore-consegna": errors + silent,
        "preavviso-errore-consegna": silent + late,
    }
    assert signatures == {"valid": sum(counts.values())}
    # every receipt names a message of the campaign, and every message has receipts
    ledger = Ledger(settings.db_url)
    try:
        campaign = ledger.get_campaign("pec-simulator")
        assert campaign is not None
        sent_ids = {str(r["message_id"]) for r in ledger.deliveries_of(campaign.id)}
    finally:
        ledger.close()
    assert referenced == sent_ids
    # the receipts are there over IMAP too (what the receipt collector reads)
    _imap_counts(pec_sandbox, boxes, {login: before[login] + 0 for login in logins.values()})
    elapsed = time.time() - started
    print(f"\n1,000 PEC recipients: submitted in {sent_s:.1f} s, all receipts in {elapsed:.1f} s")
    assert elapsed < 60


def _imap_counts(sandbox: Sandbox, boxes: dict[str, PecMailbox], before: dict[str, int]) -> None:
    import ssl

    from imapclient import IMAPClient

    for box in boxes.values():
        if box.imap_host is None:
            continue
        ctx = ssl.create_default_context(cafile=str(sandbox.ca_file))
        with IMAPClient(
            box.imap_host,
            port=box.imap_port,
            ssl=True,
            ssl_context=ctx,
        ) as client:
            client.login(box.username, box.password)
            client.select_folder("INBOX", readonly=True)
            found = len(client.search(["ALL"]))
            on_disk = len(_receipts(sandbox, box.address))
            assert found == on_disk, (box.name, found, on_disk)


@pytest.mark.prefect
def test_campaign_flow_sends_pec_rows_through_the_pec_task(
    prefect_harness: None, sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The campaign flow with a rules file: e-mail rows by the chunk task, PEC rows by the
    PEC chunk task under the mailboxes' Prefect global limits; the report groups by rule."""
    if sandbox.pec_ports == {}:
        pytest.skip("the sandbox runs no PEC provider (no dovecot)")
    from flows.campaign import campaign_flow

    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    lines = ["id;nome;email;segmento;citta;provincia;consenso_email;pec;classe"]
    lines += [
        "F1;Anna;anna.pecflow@postaveloce.test;retail;Roma;RM;true;anna@pec.postaveloce.test;legal",
        "F2;Luca;luca.pecflow@mailitalia.test;retail;Roma;RM;true;;legal",
        "F3;Sara;sara.pecflow@mailitalia.test;retail;Roma;RM;true;sara@legalmail-esempio.test;"
        "legal",
        "F4;Ugo;ugo.pecflow@mailitalia.test;retail;Roma;RM;true;ugo@pec.postaveloce.test;news",
    ]
    contacts = tmp_path / "c.csv"
    contacts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rules = _rules(tmp_path / "rules.toml", {"campagne-postaveloce": 1, "notifiche-legalmail": 1})
    params = CampaignParams(
        name="pec-flow",
        contacts=str(contacts),
        template=str(DEMO_TEMPLATE),
        sender="legale@banca-esempio.test",
        rules=str(rules),
        chunk_size=10,
    )
    report = campaign_flow(params)
    rows = {(r["rule"], r["channel"], r["mailbox"]): r for r in report["rules"]}
    assert {k: (r["recipients"], r.get("accepted", 0)) for k, r in rows.items()} == {
        ("legal-pec", "pec", "campagne-postaveloce"): (1, 1),
        ("legal-pec", "pec", "notifiche-legalmail"): (1, 1),
        ("rest", "email", "-"): (2, 2),
    }
    assert report["funnel"]["accepted"] == 4
    from recapito.report import funnel_markdown

    assert "## Recipients by rule" in funnel_markdown(report)


# ---- contacts with a PEC address and no e-mail; retry of deferred PEC rows; tracking ------

NO_EMAIL_RULES = (
    "[[channel]]\nname = 'legal-pec'\nwhen = 'classe = \"legal\"'\nchannel = 'pec'\n"
    "[[channel]]\nname = 'rest'\nchannel = 'email'\n"
)


def _no_email_contacts(path: Path) -> Path:
    lines = [
        "id;nome;email;pec;classe;consenso_email",
        "N1;Anna;;anna@pec.postaveloce.test;legal;sì",  # PEC, no e-mail at all
        "N2;Bruno;bruno-at-mail.test;bruno@legalmail-esempio.test;legal;sì",  # bad e-mail
        "N3;Carla;;;legal;sì",  # legal without PEC: e-mail, but there is none
        "N4;Dario;dario mail@mailitalia.test;;news;sì",  # e-mail with a bad address
        "N5;Elena;elena@mailitalia.test;;news;sì",
    ]
    lines = [f"{line};retail;Roma;RM" for line in lines]
    lines[0] = lines[0].replace("retail;Roma;RM", "segmento;citta;provincia")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_pec_contacts_without_email_are_kept_when_rules_route_to_pec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a rules file that can choose PEC, a contact needs no valid e-mail address; a
    contact a rule sends to e-mail still does, and is rejected with the address's reason and
    the rule that chose e-mail."""
    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path / "var"))
    for key in ("RECAPITO_DB_URL", "RECAPITO_PEC_MAILBOXES_FILE"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings.load()
    contacts = _no_email_contacts(tmp_path / "c.csv")
    rules = tmp_path / "rules.toml"
    rules.write_text(NO_EMAIL_RULES, encoding="utf-8")
    base = {"contacts": str(contacts), "template": str(DEMO_TEMPLATE), "sender": "x@banca.test"}
    prepared = prepare(CampaignParams(name="no-email", rules=str(rules), **base), settings)
    counts = prepared.counts
    assert counts["targeted"] == 3 and counts["rejected"] == 2
    assert counts["contacts"] == counts["filtered_out"] + counts["rejected"] + counts["targeted"]
    assert counts["rejected_empty"] == 1 and counts["rejected_whitespace"] == 1
    ledger = Ledger(settings.db_url)
    try:
        campaign = ledger.get_campaign("no-email")
        assert campaign is not None
        rows = {r["contact_id"]: r for r in ledger.deliveries_of(campaign.id)}
    finally:
        ledger.close()
    assert {c: (r["channel"], r["address"]) for c, r in rows.items()} == {
        "N1": ("pec", "anna@pec.postaveloce.test"),
        "N2": ("pec", "bruno@legalmail-esempio.test"),
        "N5": ("email", "elena@mailitalia.test"),
    }
    rejected = pl.read_csv(campaign_dir(settings, "no-email") / "rejected.csv")
    got = {r["contact_id"]: r for r in rejected.to_dicts()}
    assert set(got) == {"N3", "N4"}
    assert got["N3"]["reason"] == "empty" and got["N4"]["reason"] == "whitespace"
    assert all("channel e-mail (rule default)" in str(r["detail"]) for r in got.values())
    assert [got["N3"]["line"], got["N4"]["line"]] == [4, 5]
    # without rules nobody can go by PEC: every contact without a valid e-mail is rejected
    plain = prepare(CampaignParams(name="no-email-plain", **base), settings)
    assert plain.counts["targeted"] == 1 and plain.counts["rejected"] == 4


def test_pec_messages_tracked_by_the_same_tracking_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PEC message's HTML gets the open pixel and tracked links of the campaign's tracker;
    the tracking service records the open and the click against the PEC delivery."""
    import email
    from email.policy import default as default_policy

    import httpx

    from recapito.ledger import Outcome, State
    from recapito.pec.campaign import pec_renderer
    from recapito.render.template import load_template
    from recapito.report import campaign_report
    from recapito.tracking import tracker_for
    from recapito.tracking.service import TrackingApp, running
    from recapito.tracking.store import TrackingStore
    from recapito.tracking.tokens import TokenSigner, tracking_keyring

    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path / "var"))
    for key in ("RECAPITO_DB_URL", "RECAPITO_PEC_MAILBOXES_FILE", "RECAPITO_TRACKING_URL"):
        monkeypatch.delenv(key, raising=False)
    rules = tmp_path / "rules.toml"
    rules.write_text(NO_EMAIL_RULES, encoding="utf-8")
    params = CampaignParams(
        name="pec-tracked",
        contacts=str(_no_email_contacts(tmp_path / "c.csv")),
        template=str(DEMO_TEMPLATE),
        sender="x@banca.test",
        rules=str(rules),
    )
    settings = Settings.load()
    prepare(params, settings)
    ledger = Ledger(settings.db_url)
    app = TrackingApp(
        TrackingStore(ledger), TokenSigner(tracking_keyring(settings)), scanner_window=0.0
    )
    try:
        campaign = ledger.get_campaign("pec-tracked")
        assert campaign is not None
        claims = ledger.claim_chunk(campaign.id, 0, worker="test", channel="pec")
        claim = next(c for c in claims if c.contact_id == "N1")
        with running(app) as service:
            monkeypatch.setenv("RECAPITO_TRACKING_URL", service.url)
            tracked = Settings.load()
            audience = pl.read_parquet(campaign_dir(settings, "pec-tracked") / "audience.parquet")
            box = PecMailbox("veloce", "campagne@pec.postaveloce.test", "smtps.x", "u", "p")
            render = pec_renderer(
                load_template(params.template),
                audience,
                params,
                tracker_for(tracked, params.sender),
            )
            message = email.message_from_bytes(render(claim, box).data, policy=default_policy)
            for other in claims:
                ledger.record(other, Outcome(State.ACCEPTED, reply_code=250))
            assert message["From"].addresses[0].addr_spec == box.address
            assert message["X-TipoRicevuta"] == "breve"
            assert service.url in str(message["List-Unsubscribe"])
            html = next(
                str(p.get_content()) for p in message.walk() if p.get_content_type() == "text/html"
            )
            import re

            pixel = re.search(rf'{re.escape(service.url)}/o/[^"\s]+', html)
            click = re.search(rf'{re.escape(service.url)}/c/[^"\s]+', html)
            assert pixel is not None and click is not None, html[:2000]
            agent = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Thunderbird/128.3"
            with httpx.Client(follow_redirects=False, trust_env=False, timeout=10) as client:
                assert client.get(pixel.group(0), headers={"User-Agent": agent}).status_code == 200
                answer = client.get(
                    click.group(0).replace("&amp;", "&"), headers={"User-Agent": agent}
                )
                assert answer.status_code == 302
        engagement = campaign_report(ledger, "pec-tracked")["engagement"]
        assert engagement["opens"]["human"] == 1 and engagement["clicks"]["human"] == 1
        # tracking off for the campaign: the same PEC message, its links untouched
        off = pec_renderer(
            load_template(params.template),
            audience,
            params.model_copy(update={"tracking": False}),
            tracker_for(tracked, params.sender),
        )(claim, box)
        assert f"{service.url}/o/".encode() not in off.data
    finally:
        ledger.close()


@pytest.mark.prefect
def test_retry_deferred_flow_resubmits_deferred_pec_rows_once(
    prefect_harness: None, sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PEC rows deferred by one mailbox (its credentials refused) go out with the
    retry-deferred flow through the PEC path; rows already submitted are never sent again."""
    if sandbox.pec_ports == {}:
        pytest.skip("the sandbox runs no PEC provider (no dovecot)")
    import dataclasses
    from datetime import timedelta

    from flows.retry_deferred import retry_deferred_flow

    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    settings = Settings.load()
    targets = [f"riprova{i}@pec.postaveloce.test" for i in range(6)]
    params = CampaignParams(
        name="pec-retry",
        contacts=str(_contacts(tmp_path / "c.csv", targets)),
        template=str(DEMO_TEMPLATE),
        sender="legale@banca-esempio.test",
        rules=str(
            _rules(tmp_path / "rules.toml", {"campagne-postaveloce": 1, "notifiche-legalmail": 1})
        ),
    )
    prepare(params, settings)
    boxes = load_mailboxes_file(sandbox.pec_mailboxes_file)
    boxes["notifiche-legalmail"] = dataclasses.replace(
        boxes["notifiche-legalmail"], password="wrong-password"
    )
    options = PecOptions(helo_name="test.local", retry_after=timedelta(0), max_wait=5)
    started = time.time()
    first = deliver_pec_chunk(params, 0, settings, mailboxes=boxes, options=options)
    assert first["outcomes"] == {"accepted": 3, "deferred": 3}
    assert first["reasons"] == {"pec_auth_failed": 3}
    ledger = Ledger(settings.db_url)
    try:
        campaign = ledger.get_campaign("pec-retry")
        assert campaign is not None
        ledger.update_campaign(campaign.id, status="waiting_retry")  # as the campaign run ends
    finally:
        ledger.close()

    result = retry_deferred_flow(campaign="pec-retry")
    assert result["campaigns"]["pec-retry"]["claimed"] == 3
    assert result["campaigns"]["pec-retry"].get("accepted") == 3
    assert result["statuses"] == {"pec-retry": "completed"}
    ledger = Ledger(settings.db_url)
    try:
        rows = ledger.deliveries_of(campaign.id)
    finally:
        ledger.close()
    assert {r["state"] for r in rows} == {"accepted"}
    assert {r["pec_mailbox"] for r in rows} == {"campagne-postaveloce", "notifiche-legalmail"}
    # every delivery submitted exactly once (the provider's journal), never again
    submitted = [
        e["msgid"]
        for e in read_journal(sandbox.pec_journal)
        if e.get("event") == "accepted" and e["t"] >= started
    ]
    ours = [m for m in submitted if ".pec-retry." in m or "pec-retry" in m]
    assert sorted(ours) == sorted(str(r["message_id"]) for r in rows)
    assert retry_deferred_flow(campaign="pec-retry")["campaigns"] == {}
