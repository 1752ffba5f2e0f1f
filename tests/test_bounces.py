"""Bounce parsing, classification, correlation and the ``bounce classify`` command.

Fixtures in tests/fixtures/bounces/ were written for this project (no shared corpus needed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from recapito.bounces import classify, is_hard, parse_bounce
from recapito.bounces.correlate import correlate
from recapito.cli import main
from recapito.delivery.replies import classify_reply
from recapito.errors import InputError
from recapito.identity.verp import keyring_from_entries, verp_address
from recapito.ledger import Ledger
from recapito.ledger.schema import deliveries
from recapito.ledger.store import PlannedDelivery

FIXTURES = Path(__file__).parent / "fixtures" / "bounces"


def _report(name: str):  # type: ignore[no-untyped-def]
    return parse_bounce((FIXTURES / name).read_bytes())


@pytest.mark.parametrize(
    ("name", "kind", "recipient", "reason", "status", "permanence", "family"),
    [
        (
            "postfix_user_unknown.eml",
            "dsn",
            "mario.rossi@cliente.example",
            "user_unknown",
            "5.1.1",
            "permanent",
            "postfix",
        ),
        (
            "exim_mailbox_full.eml",
            "free_text",
            "giulia.bianchi@posta.example",
            "mailbox_full",
            "5.2.2",
            "permanent",
            "exim",
        ),
        (
            "exchange_italiano.eml",
            "dsn",
            "luca.verdi@azienda.example",
            "user_unknown",
            "5.1.1",
            "permanent",
            "exchange",
        ),
        (
            "gmail_auth.eml",
            "dsn",
            "anna.neri@gmail.com",
            "auth_failure",
            "5.7.26",
            "permanent",
            "gmail",
        ),
    ],
)
def test_bounces(
    name: str,
    kind: str,
    recipient: str,
    reason: str,
    status: str,
    permanence: str,
    family: str,
) -> None:
    report = _report(name)
    assert report.kind == kind and report.is_bounce
    assert report.mta_family == family
    (record,) = report.failed
    assert (record.recipient, record.reason, record.status, record.permanence) == (
        recipient,
        reason,
        status,
        permanence,
    )
    assert record.action == "failed" and 0 < record.confidence <= 1


def test_returned_headers_are_read() -> None:
    report = _report("postfix_user_unknown.eml")
    assert report.recapito_delivery == "7"
    assert report.original_message_id == "<estratto-maggio.7.0123456789abcdef@banca.example>"
    assert report.verp_address == "bounces+7-k1-abcdefghijklmnop@banca.example"
    assert report.recipients[0].remote_mta == "mx1.cliente.example"
    assert report.recipients[0].scope == "recipient"
    assert is_hard(report.recipients[0].reason, report.recipients[0].permanence)
    exim = _report("exim_mailbox_full.eml")
    assert exim.recapito_delivery == "12"
    assert not is_hard(exim.recipients[0].reason, exim.recipients[0].permanence)


def test_multi_recipient_dsn() -> None:
    report = _report("multi_recipient.eml")
    assert report.kind == "dsn" and report.is_bounce
    assert report.original_envelope_id == "40-k1-cdefghijklmnopqr"
    got = [(r.recipient, r.action, r.reason) for r in report.recipients]
    assert got == [
        ("primo@dominio.example", "failed", "user_unknown"),
        ("secondo@dominio.example", "failed", "mailbox_full"),
        ("terzo@dominio.example", "delivered", "unknown"),
        ("quarto@dominio.example", "delayed", "delayed_warning"),
    ]
    # a diagnostic text beats the filler status 5.0.0
    assert report.recipients[0].status == "5.1.1"
    assert [r.recipient for r in report.failed] == [
        "primo@dominio.example",
        "secondo@dominio.example",
    ]


def test_delayed_dsn_is_a_warning() -> None:
    report = _report("delayed.eml")
    assert report.kind == "delayed_warning" and not report.is_bounce
    assert report.recipients[0].reason == "delayed_warning"
    assert report.recipients[0].permanence == "temporary"


def test_arf_complaint() -> None:
    report = _report("arf_complaint.eml")
    assert report.kind == "arf" and not report.is_bounce
    (record,) = report.recipients
    assert (record.recipient, record.reason) == ("paola.gialli@isp.example", "complaint")
    assert report.recapito_delivery == "60"


@pytest.mark.parametrize(
    ("name", "who"),
    [
        ("autoreply_en.eml", "john.smith@company.example"),
        ("autoreply_it.eml", "chiara.blu@ufficio.example"),
    ],
)
def test_auto_replies_are_never_bounces(name: str, who: str) -> None:
    report = _report(name)
    assert report.kind == "auto_reply" and not report.is_bounce
    assert report.recipients[0].recipient == who
    assert report.recipients[0].reason == "auto_reply"


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        # the SMTP phase is read from the notice when the Diagnostic-Code lacks it: an
        # "unknown user" at RCPT TO is a dead address, after DATA a filter's answer
        (
            "postfix_phase_in_notice.eml",
            "dsn",
            [
                ("paolo.ferri@studio.example", "user_unknown", "5.0.0"),
                ("chiara.galli@studio.example", "recipient_policy", "5.0.0"),
            ],
        ),
        # an Italian provider's own notice, two recipients with their own replies
        (
            "italiano_rcpt_inesistente.eml",
            "free_text",
            [
                ("giorgio.marino@provider-italia.example", "user_unknown", "5.1.1"),
                ("elena.conti@provider-italia.example", "mailbox_full", "5.2.2"),
            ],
        ),
        # the MTA gave up on a connection that never worked: expired, not the address
        ("exim_timeout_expired.eml", "free_text", [("ufficio@lontano.example", "expired", None)]),
        # no reverse DNS for our host, refused after MAIL FROM: about us, not the sender
        (
            "exim_reverse_dns.eml",
            "free_text",
            [("acquisti@fornitore.example", "reputation_block", "5.7.1")],
        ),
        # a multi-line reply whose repeated "550-5.7.1" cut the sentence in two
        (
            "gmail_rfc5322_multiline.eml",
            "dsn",
            [("federica.riva@gmail.com", "content_rejected", "5.7.1")],
        ),
        # Amazon SES notification forwarded as JSON
        (
            "ses_notifications.eml",
            "dsn",
            [("sara.lombardi@esempio.example", "user_unknown", "5.1.1")],
        ),
        # an SMS/MMS gateway's "Error message below" form
        (
            "gateway_error_below.eml",
            "free_text",
            [("3331234567@sms-gateway.example", "user_unknown", None)],
        ),
        # a pipe to a program failed at the remote: not about the address
        (
            "exim_pipe_failure.eml",
            "free_text",
            [("ticket@cliente.example", "remote_temporary", None)],
        ),
    ],
)
def test_rule_families(name: str, kind: str, expected: list[tuple[str, str, str | None]]) -> None:
    report = _report(name)
    assert report.kind == kind and report.is_bounce
    got = [(r.recipient, r.reason, r.status) for r in report.failed]
    assert got == expected


def test_italian_notice_is_correlated_and_classified() -> None:
    report = _report("italiano_rcpt_inesistente.eml")
    assert report.recapito_delivery == "33"
    first, second = report.failed
    assert is_hard(first.reason, first.permanence)
    assert not is_hard(second.reason, second.permanence)


def test_ses_complaint_is_a_complaint() -> None:
    report = _report("ses_complaint.eml")
    assert report.kind == "arf" and not report.is_bounce
    (record,) = report.recipients
    assert (record.recipient, record.reason) == ("marco.bruno@esempio.example", "complaint")


@pytest.mark.parametrize(
    ("code", "status", "text", "reason"),
    [
        (550, "5.7.1", "Messages with multiple addresses in From: header", "content_rejected"),
        (550, "5.7.1", "Message content rejected, UBE, id=1234", "spam_rejected"),
        (554, None, "Client host [192.0.2.1] blocked using zen.example.org", "reputation_block"),
        (550, "5.7.1", "Fix reverse DNS for 192.0.2.1", "reputation_block"),
        (550, None, "Ip frequency limited", "rate_limited"),
        (550, "5.1.1", "Unrouteable address", "domain_invalid"),
        (554, None, "Remote server does not support TLS", "insecure_channel"),
        (550, "5.7.9", "Rejected", "auth_failure"),
        (550, "5.1.6", "551 not our customer", "mailbox_moved"),
        (550, None, "casella temporaneamente bloccata", "mailbox_disabled"),
        (550, None, "You are not a member of this mailing list", "sender_rejected"),
        (None, None, "DNS lookup failure: host posta.example.it not found", "domain_invalid"),
        (553, None, "553 posta.example.it does not exist", "domain_invalid"),
        (550, None, "550 giulia@example.it does not exist", "user_unknown"),
        (554, "5.3.0", "Recipient address rejected: Mailer error", "remote_temporary"),
    ],
)
def test_text_rule_families(code: int | None, status: str | None, text: str, reason: str) -> None:
    assert classify(code, status, text)[0] == reason


def test_mime_bomb_and_junk_do_not_raise() -> None:
    start = time.perf_counter()
    report = _report("mime_bomb.eml")
    assert time.perf_counter() - start < 1.0
    assert report.kind == "not_bounce" and not report.is_bounce
    deep = b"Content-Type: multipart/mixed; boundary=a\n\n" + b"".join(
        b"--a\nContent-Type: message/rfc822\n\n" for _ in range(3000)
    )
    assert not parse_bounce(deep).is_bounce
    for junk in (b"\x00\xff\xfe garbage", b"Subject: hello\n\nnot a bounce", b"::::\n\n\n"):
        assert parse_bounce(junk).kind == "not_bounce"
    with pytest.raises(InputError):
        parse_bounce(b"")
    with pytest.raises(InputError):
        parse_bounce(b"  \r\n ")


@pytest.mark.parametrize(
    ("code", "status", "text", "provider", "reason"),
    [
        (550, "5.1.1", "Utente inesistente", None, "user_unknown"),
        (550, None, "550 indirizzo non valido", None, "user_unknown"),
        (552, "5.2.2", "casella piena", None, "mailbox_full"),
        (452, None, "La casella di posta è piena, quota superata", None, "mailbox_full"),
        (
            550,
            "5.0.0",
            "The email account that you tried to reach does not exist",
            None,
            "user_unknown",
        ),
        (550, "5.0.0", "Mailbox disabled for this recipient", None, "mailbox_disabled"),
        (550, None, "casella disattivata", None, "mailbox_disabled"),
        (530, "5.7.0", "Must issue a STARTTLS command first", None, "insecure_channel"),
        (451, "4.4.317", "cannot connect to remote server", "microsoft", "insecure_channel"),
        (550, "5.7.30", "blocked", "google", "auth_failure"),
        (550, "5.7.1", "Message rejected: listed on Spamhaus", None, "reputation_block"),
        (554, "5.7.1", "Message content rejected as spam", None, "spam_rejected"),
        (552, "5.3.4", "Message size exceeds fixed limit", None, "message_too_large"),
        (550, None, "Relaying denied", None, "relay_denied"),
        (421, "4.7.0", "Too many connections, slow down", None, "rate_limited"),
        (450, "4.7.1", "Greylisted, please try again in 5 minutes", None, "greylisted"),
        (550, "5.1.10", "null MX", None, "domain_invalid"),
        (554, "5.7.26", "Unauthenticated email is not accepted", None, "auth_failure"),
        (550, None, "Denied", None, "unknown"),
        (None, None, "", None, "unknown"),
    ],
)
def test_classify(
    code: int | None, status: str | None, text: str, provider: str | None, reason: str
) -> None:
    got, permanence, scope, confidence = classify(code, status, text, provider)
    assert got == reason
    assert 0 <= confidence <= 1
    if reason == "unknown":
        assert confidence <= 0.2 and scope is None
    elif code:
        assert permanence == ("temporary" if str(code)[0] == "4" else "permanent")


def test_evidence_order() -> None:
    # the provider table first: Gmail's 5.7.30 is about authentication, whatever the text
    assert classify(550, "5.7.30", "mailbox unavailable", "google")[0] == "auth_failure"
    # text beats the enhanced code, the enhanced code beats the reply code
    assert classify(550, "5.1.1", "mailbox full", None)[0] == "mailbox_full"
    assert classify(552, "5.1.1", "", None)[0] == "user_unknown"
    assert classify(552, None, "", None)[0] == "mailbox_full"
    # confidence falls with the kind of evidence
    confidences = [
        classify(550, "5.7.30", "x", "google")[3],
        classify(550, None, "user unknown", None)[3],
        classify(550, "5.1.1", "", None)[3],
        classify(552, None, "", None)[3],
        classify(550, None, "", None)[3],
    ]
    assert confidences == sorted(confidences, reverse=True)


def test_send_time_replies_share_the_table() -> None:
    for code, text in ((550, "5.1.1 utente inesistente"), (552, "5.2.2 casella piena")):
        assert classify_reply(code, text).reason == classify(code, None, text)[0]


def _ledger_with_deliveries(tmp_path: Path) -> tuple[Ledger, list[int]]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    campaign = ledger.ensure_campaign(
        "estratto-maggio", sender="comunicazioni@banca.example", template_hash="x", params={}
    )
    ledger.plan(
        campaign.id,
        [
            PlannedDelivery(f"c{i}", f"user{i}@cliente.example", "cliente.example", 0)
            for i in range(4)
        ],
    )
    with ledger.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(sa.select(deliveries.c.id).order_by(deliveries.c.id))]
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id == ids[2])
            .values(message_id="<m.2@banca.example>")
        )
    return ledger, ids


def test_correlation_order(tmp_path: Path) -> None:
    ledger, ids = _ledger_with_deliveries(tmp_path)
    keyring = keyring_from_entries([("k1", "a-secret-of-sixteen-chars")])
    template = (FIXTURES / "postfix_user_unknown.eml").read_bytes()

    def bounce(verp: str, delivery: str, message_id: str, rcpt: str) -> bytes:
        return (
            template.replace(b"bounces+7-k1-abcdefghijklmnop@banca.example", verp.encode())
            .replace(b"X-Recapito-Delivery: 7", f"X-Recapito-Delivery: {delivery}".encode())
            .replace(b"<estratto-maggio.7.0123456789abcdef@banca.example>", message_id.encode())
            .replace(b"mario.rossi@cliente.example", rcpt.encode())
        )

    try:
        good_verp = verp_address(ids[0], keyring, "banca.example")
        report = parse_bounce(bounce(good_verp, str(ids[1]), "<m.2@banca.example>", "user3@x"))
        assert correlate(report, ledger, keyring) == ids[0]  # the signed token first
        forged = "bounces+1-k1-aaaaaaaaaaaaaaaa@banca.example"
        report = parse_bounce(bounce(forged, str(ids[1]), "<m.2@banca.example>", "user3@x"))
        assert correlate(report, ledger, keyring) == ids[1]  # then X-Recapito-Delivery
        report = parse_bounce(bounce(forged, "99999", "<m.2@banca.example>", "user3@x"))
        assert correlate(report, ledger, keyring) == ids[2]  # then the Message-ID
        report = parse_bounce(bounce(forged, "99999", "<other@x>", "user3@cliente.example"))
        assert correlate(report, ledger, keyring) == ids[3]  # the recipient last
        report = parse_bounce(bounce(forged, "99999", "<other@x>", "nobody@else.example"))
        assert correlate(report, ledger, keyring) is None
    finally:
        ledger.close()


def test_cli_lines_and_json(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"RECAPITO_HOME": str(tmp_path / "home")}
    result = runner.invoke(main, ["bounce", "classify", str(FIXTURES)], env=env)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("mario.rossi@cliente.example user_unknown 5.1.1 permanent" in line for line in lines)
    assert any("autoreply_it.eml" in line and "auto_reply" in line for line in lines)
    assert any("delayed.eml" in line and "delayed_warning" in line for line in lines)
    assert all("not correlated" in line for line in lines)

    result = runner.invoke(main, ["bounce", "classify", "--json", str(FIXTURES)], env=env)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert {tuple(sorted(r)) for r in rows} == {
        ("delivery_id", "file", "is_bounce", "kind", "permanence", "reason", "recipient", "status")
    }
    multi = [r for r in rows if r["file"].endswith("multi_recipient.eml")]
    assert [r["recipient"] for r in multi] == ["primo@dominio.example", "secondo@dominio.example"]
    assert all(r["delivery_id"] is None for r in rows)
    bomb = next(r for r in rows if r["file"].endswith("mime_bomb.eml"))
    assert bomb["is_bounce"] is False


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"RECAPITO_HOME": str(tmp_path / "home")}
    result = runner.invoke(main, ["bounce", "classify", str(tmp_path / "missing.eml")], env=env)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'missing.eml'}: no such file or folder"
    ]
    empty = tmp_path / "empty.eml"
    empty.write_bytes(b"")
    result = runner.invoke(main, ["bounce", "classify", str(empty)], env=env)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
