"""Templates (visible_if, MJML, text part, preview, lint) and the MIME they become
(RFC 2047, transfer encodings, IDN, SMTPUTF8, header injection)."""

from __future__ import annotations

import base64
import binascii
import email
import html as html_lib
import random
import re
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from recapito.cli import main
from recapito.errors import TemplateError
from recapito.render.lint import lint_template
from recapito.render.mime import body_part, header_address, quoted_printable
from recapito.render.template import load_template

SENDER = "news@banca.test"


def _write(root: Path, toml: str, **files: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "template.toml").write_text(toml, encoding="utf-8")
    for name, text in files.items():
        (root / name.replace("_", ".", 1)).write_text(text, encoding="utf-8")
    return root


def _message(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _render(root: Path, ctx: dict[str, Any], **kw: Any) -> EmailMessage:
    tpl = load_template(root)
    out = tpl.render(
        ctx,
        sender=kw.pop("sender", SENDER),
        recipient=kw.pop("recipient", "anna@x.test"),
        message_id="<1@banca.test>",
        **kw,
    )
    assert b"\n" not in out.data.replace(b"\r\n", b"")  # CRLF on the wire, nothing bare
    assert b"\r" not in out.data.replace(b"\r\n", b"")
    return _message(out.data)


def _bodies(msg: EmailMessage) -> tuple[str, str]:
    html, text = msg.get_body(("html",)), msg.get_body(("plain",))
    assert isinstance(html, EmailMessage) and isinstance(text, EmailMessage)
    crlf = "\r\n"
    return html_lib.unescape(html.get_content()).replace(crlf, "\n"), text.get_content().replace(
        crlf, "\n"
    )


# ---- visible_if ----------------------------------------------------------------------

PROMO_TOML = """subject = "Ciao {{ nome }}"
preheader = "Novità"
[blocks.promo]
visible_if = 'segmento = "private" and provincia in ("MI", "RM")'
[blocks.estero]
visible_if = 'nazione is not empty and nazione != "IT"'
"""
PROMO_HTML = """<html><body><span style="display:none">{{ preheader }}</span>
<p>Gentile {{ nome }},</p>
{% block promo %}<div class="promo"><p>Offerta Private per {{ provincia }}</p></div>{% endblock %}
{% block estero %}<p>Bonifici esteri gratuiti</p>{% endblock %}
{% block sempre %}<p>Blocco senza condizione</p>{% endblock %}
</body></html>"""


def test_visible_if_shows_a_block_only_to_the_contacts_the_filter_selects(
    tmp_path: Path,
) -> None:
    root = _write(tmp_path / "promo", PROMO_TOML, body_html=PROMO_HTML)
    base = {"nome": "Anna", "nazione": ""}
    cases = [
        ({"segmento": "private", "provincia": "MI"}, True),
        ({"segmento": " PRIVATE ", "provincia": "rm"}, True),  # filter semantics: case, spaces
        ({"segmento": "private", "provincia": "TO"}, False),
        ({"segmento": "retail", "provincia": "MI"}, False),
        ({"segmento": None, "provincia": "MI"}, False),  # missing value matches nothing
    ]
    for values, shown in cases:
        html, text = _bodies(_render(root, {**base, **values}))
        assert ("Offerta Private" in html) is shown, values
        assert ("Offerta Private" in text) is shown, values  # the text part follows
        assert "Bonifici esteri" not in html and "Blocco senza condizione" in html
    html, _ = _bodies(_render(root, {**base, "segmento": "x", "provincia": "x", "nazione": "CH"}))
    assert "Bonifici esteri" in html


def test_visible_if_errors_name_the_template_and_block(tmp_path: Path) -> None:
    root = _write(tmp_path / "promo", PROMO_TOML, body_html=PROMO_HTML)
    tpl = load_template(root)
    with pytest.raises(TemplateError, match=r"template 'promo': block 'promo' .*'provincia'"):
        tpl.check_blocks(["nome", "segmento", "nazione"])
    tpl.check_blocks(["nome", "segmento", "provincia", "nazione"])
    # a condition that does not parse: at load time, with its position
    bad = _write(
        tmp_path / "bad",
        "subject = \"x\"\n[blocks.promo]\nvisible_if = 'segmento = '\n",
        body_html="{% block promo %}x{% endblock %}",
    )
    with pytest.raises(TemplateError, match=r"template 'bad': block 'promo' filter: expected"):
        load_template(bad)
    # a condition for a block the template does not have
    orphan = _write(
        tmp_path / "orphan",
        "subject = \"x\"\n[blocks.promo]\nvisible_if = 'vip'\n",
        body_html="<p>no blocks</p>",
    )
    with pytest.raises(TemplateError, match=r"\[blocks.promo\] names no \{% block promo %\}"):
        load_template(orphan)


# ---- MJML and CSS inlining -------------------------------------------------------------

MJML = """<mjml>
  <mj-head>
    <mj-attributes><mj-all font-family="Helvetica, Arial" /></mj-attributes>
    <mj-style>.titolo { color: #0b3d91; font-weight: bold; }</mj-style>
  </mj-head>
  <mj-body>
    <mj-section><mj-column>
      <mj-text css-class="titolo">Gentile {{ nome | default('cliente') }}</mj-text>
      <mj-button href="https://banca.test/area?c={{ contact_id }}&amp;x=1">Accedi</mj-button>
    </mj-column></mj-section>
    {% if segmento == "business" %}
    <mj-section><mj-column><mj-text>Commissioni aziendali</mj-text></mj-column></mj-section>
    {% endif %}
    {% block promo %}
    <mj-section><mj-column><mj-text>Offerta Private</mj-text></mj-column></mj-section>
    {% endblock %}
  </mj-body>
</mjml>"""


MJML_TOML = """subject = "Ciao"
mjml = "body.mjml"
[blocks.promo]
visible_if = 'segmento = "private"'
"""


def test_mjml_template_compiles_once_with_inlined_css(tmp_path: Path) -> None:
    toml = MJML_TOML
    root = _write(tmp_path / "mj", toml, body_mjml=MJML)
    tpl = load_template(root)
    assert load_template(root) is tpl  # compiled once per process while unchanged
    html, text = _bodies(_render(root, {"nome": "Zoë", "segmento": "business", "contact_id": "C7"}))
    assert "Gentile Zoë" in html and "Commissioni aziendali" in html
    assert "Offerta Private" not in html
    assert 'href="https://banca.test/area?c=C7&amp;x=1"' in html or "c=C7&x=1" in html
    # css-inline moved the mj-style rule onto the element; the <style> stays for clients
    assert re.search(r'class="titolo"[^>]*style="[^"]*color: ?#0b3d91', html), html[:2000]
    assert "@media" in html
    assert "Accedi (https://banca.test/area?c=C7&x=1)" in text
    html, _ = _bodies(_render(root, {"nome": "", "segmento": "private", "contact_id": "C8"}))
    assert "Gentile cliente" in html and "Offerta Private" in html
    # a changed file is compiled again
    (root / "body.mjml").write_text(MJML.replace("Accedi", "Entra"), encoding="utf-8")
    assert load_template(root) is not tpl


def test_mjml_errors_are_one_line(tmp_path: Path) -> None:
    root = _write(
        tmp_path / "broken", 'subject = "x"\nmjml = "body.mjml"\n', body_mjml="<mjml><mj-body>"
    )
    with pytest.raises(TemplateError, match=r"^template 'broken': MJML does not compile: ") as exc:
        load_template(root)
    assert "\n" not in str(exc.value)


def test_inline_css_for_plain_html(tmp_path: Path) -> None:
    html = "<html><head><style>p.x { color: red }</style></head><body><p class='x'>{{ a }}</p>"
    root = _write(tmp_path / "css", 'subject = "x"\ninline_css = true\n', body_html=html)
    part = _render(root, {"a": "<b>"}).get_body(("html",))
    assert isinstance(part, EmailMessage)
    assert re.search(r'<p class="x" style="color: ?red;?">&lt;b&gt;</p>', part.get_content())


# ---- text part ---------------------------------------------------------------------------


def test_text_part_reads_like_a_message(tmp_path: Path) -> None:
    html = """<html><head><title>t</title><style>h1{}</style></head><body>
<span style="display:none;max-height:0">{{ preheader }}</span>
<h1>Il tuo estratto conto</h1>
<p>Gentile {{ nome }}, ecco le novit&agrave;:</p>
<ul><li>nuova app</li><li>bonifici istantanei</li></ul>
<ol><li>accedi</li><li>scarica il PDF</li></ol>
<p><a href="https://banca.test/area">Area riservata</a> o
<a href="https://banca.test/faq">https://banca.test/faq</a></p>
<table><tr><td><a href="https://banca.test"><img src="https://banca.test/logo.png"
 alt="Banca Test"></a></td></tr></table>
<!--[if mso]><p>solo Outlook</p><![endif]-->
</body></html>"""
    root = _write(
        tmp_path / "txt", 'subject = "x"\npreheader = "anteprima nascosta"\n', body_html=html
    )
    _, text = _bodies(_render(root, {"nome": "Anna"}))
    assert text.startswith("# Il tuo estratto conto\n\nGentile Anna, ecco le novità:\n")
    assert "- nuova app\n- bonifici istantanei\n" in text
    assert "1. accedi\n2. scarica il PDF\n" in text
    assert "Area riservata (https://banca.test/area) o https://banca.test/faq" in text
    assert "Banca Test (https://banca.test)" in text
    assert "anteprima nascosta" not in text and "solo Outlook" not in text and "h1{}" not in text


# ---- preview ------------------------------------------------------------------------------

CONTACTS = (
    "id;nome;email;segmento;provincia;nazione\n"
    "C1;Anna;anna@x.test;retail;MI;\n"
    "C2;Bruno;bruno@città.test;private;RM;IT\n"
)


def test_preview_writes_eml_and_html(tmp_path: Path) -> None:
    root = _write(tmp_path / "promo", PROMO_TOML, body_html=PROMO_HTML)
    contacts = tmp_path / "contacts.csv"
    contacts.write_text(CONTACTS, encoding="utf-8")
    out = tmp_path / "out"
    args = ["template", "preview", str(root), "--contact", "C2", "--contacts", str(contacts)]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    eml, page = out / "promo-C2.eml", out / "promo-C2.html"
    msg = _message(eml.read_bytes())
    assert msg["Subject"] == "Ciao Bruno"
    assert msg["To"] == "bruno@xn--citt-3na.test"  # IDNA in the header
    assert "Offerta Private per RM" in html_lib.unescape(page.read_text(encoding="utf-8"))
    # an unknown contact: one line, exit status 1, no traceback
    result = CliRunner().invoke(
        main, ["template", "preview", str(root), "--contact", "C9", "--contacts", str(contacts)]
    )
    assert result.exit_code == 1 and "no contact 'C9'" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


# ---- lint --------------------------------------------------------------------------------

GOOD_HTML = """<html><body><span style="display:none">{{ preheader }}</span>
<p>Gentile {{ nome }}</p><img src="https://banca.test/logo.png" alt="Banca">
<a href="https://banca.test/area">Area</a> <a href="{{ unsubscribe_url }}">Disiscriviti</a>
</body></html>"""


def _lint_cli(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["template", "lint", *args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output.strip().splitlines()


def test_lint_clean_template_and_warnings(tmp_path: Path) -> None:
    good = _write(tmp_path / "good", 'subject = "Ciao"\npreheader = "p"\n', body_html=GOOD_HTML)
    assert lint_template(good).findings == []
    assert _lint_cli(str(good)) == (0, ["template 'good': ok"])

    html = """<p>{{ nome }}</p><img src="http://banca.test/logo.png">
<a href="http://banca.test/area">Area</a>"""
    warned = _write(tmp_path / "warned", 'subject = "' + "x" * 120 + '"\n', body_html=html)
    report = lint_template(warned)
    assert not report.errors
    messages = " | ".join(f.message for f in report.warnings)
    for expected in (
        "image(s) without alt text",
        "without https (first: http://banca.test/area)",
        "no unsubscribe link",
        "no preheader",
        "subject is 120 characters",
    ):
        assert expected in messages
    code, lines = _lint_cli(str(warned))
    assert code == 0 and all(line.startswith("template 'warned': warning: ") for line in lines)


def test_lint_without_contacts_renders_an_email_placeholder(tmp_path: Path) -> None:
    """The made-up sample's "[email]" goes in the body, not in the To header (it used to
    make every template that shows ``{{ email }}`` fail: 'not an e-mail address')."""
    from recapito.sandbox import __file__ as sandbox_init

    demo = Path(sandbox_init).parent / "demo_template"
    assert lint_template(demo).findings == []  # no error, no 'no unsubscribe link' warning
    assert _lint_cli(str(demo)) == (0, ["template 'demo_template': ok"])
    html = '<p>Scritto a {{ email }}</p><a href="{{ unsubscribe_url }}">Disiscriviti</a>'
    root = _write(tmp_path / "mail", 'subject = "Ciao"\npreheader = "p"\n', body_html=html)
    assert not lint_template(root).errors


def test_lint_errors_stop(tmp_path: Path) -> None:
    contacts = tmp_path / "contacts.csv"
    contacts.write_text(CONTACTS, encoding="utf-8")
    html = GOOD_HTML + '<a href="javascript:alert(1)">x</a><p>{{ saldo }}</p>'
    bad = _write(tmp_path / "bad", 'subject = "Ciao"\npreheader = "p"\n', body_html=html)
    code, lines = _lint_cli(str(bad), "--contacts", str(contacts))
    assert code == 1
    assert lines == [
        "template 'bad': error: undefined placeholder 'saldo': not a contact column "
        "(add the column, or give a default: {{ name | default('…') }})"
    ]
    report = lint_template(bad)  # without contacts: made-up values, the link is found
    assert [f.message for f in report.errors] == [
        "link with a javascript: URL (javascript:alert(1))"
    ]
    # Gmail clipping
    big = _write(
        tmp_path / "big",
        'subject = "Ciao"\npreheader = "p"\n',
        body_html=GOOD_HTML.replace("<p>", "<p>" + "testo lungo " * 9000, 1),
    )
    assert "Gmail clips messages over 102 KB" in lint_template(big).errors[0].message
    # a template that does not load: one error line, no traceback
    broken = _write(tmp_path / "broken", 'subject = "x"\n', body_html="{% if %}")
    code, lines = _lint_cli(str(broken))
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("template 'broken': error: syntax error in html line 1")
    with pytest.raises(TemplateError, match=r"^template 'big': error: HTML is \d+ KB"):
        lint_template(big).raise_on_errors()


def test_campaign_preflight_stops_on_lint_errors(tmp_path: Path) -> None:
    from recapito.campaign import CampaignParams, preflight

    contacts = tmp_path / "contacts.csv"
    contacts.write_text(CONTACTS, encoding="utf-8")
    html = GOOD_HTML + '<a href="javascript:void(0)">x</a>'
    bad = _write(tmp_path / "bad", 'subject = "Ciao"\npreheader = "p"\n', body_html=html)
    params = CampaignParams(
        name="lint-stop", contacts=str(contacts), template=str(bad), sender=SENDER
    )
    with pytest.raises(TemplateError, match=r"template 'bad': error: link with a javascript"):
        preflight(params)


# ---- MIME: headers -------------------------------------------------------------------------

INJECTIONS = [
    "Mario\r\nBcc: victim@evil.test",
    "Mario\nBcc: victim@evil.test",
    "Mario\rBcc: victim@evil.test",
    "Mario\u2028Bcc: victim@evil.test",
    "Mario\x00\r\n\r\n<html>body</html>",
    "Mario\r\n Bcc: folded@evil.test",
    "=?utf-8?q?Mario=0D=0ABcc=3A_x=40evil.test?=",
    "Màrio\r\nBcc: victim@evil.test",  # non-ASCII: encoded words, still no line break
]


@pytest.mark.parametrize("evil", INJECTIONS)
def test_placeholders_never_inject_headers(tmp_path: Path, evil: str) -> None:
    root = _write(
        tmp_path / "inj",
        'subject = "Ciao {{ nome }}"\nfrom_name = "{{ nome }} - Banca"\npreheader = "{{ nome }}"\n',
        body_html="<p>{{ preheader }}</p>",
    )
    tpl = load_template(root)
    out = tpl.render(
        {"nome": evil},
        sender=SENDER,
        recipient="anna@x.test",
        message_id="<1@banca.test>",
        headers={"X-Note": evil},
    )
    head = out.data.split(b"\r\n\r\n", 1)[0]
    names = [
        line.split(b":", 1)[0].lower() for line in head.split(b"\r\n") if line[:1] not in b" \t"
    ]
    assert sorted(names) == sorted(
        [
            b"from",
            b"to",
            b"subject",
            b"date",
            b"message-id",
            b"x-note",
            b"mime-version",
            b"content-type",
        ]
    )
    msg = _message(out.data)
    assert msg["Bcc"] is None
    for name in ("Subject", "From", "X-Note"):
        assert "\n" not in str(msg[name]) and "\r" not in str(msg[name])
    assert msg["From"].addresses[0].addr_spec == SENDER


def test_bad_addresses_are_refused_not_written(tmp_path: Path) -> None:
    root = _write(tmp_path / "a", 'subject = "x"\n', body_html="<p>x</p>")
    tpl = load_template(root)
    for recipient in ("anna@x.test\r\nBcc: e@evil.test", "anna @x.test", "anna@x.test>"):
        with pytest.raises(TemplateError, match="not an e-mail address"):
            tpl.render({}, sender=SENDER, recipient=recipient, message_id="<1@b.test>")


def test_idn_domains_and_smtputf8_local_parts(tmp_path: Path) -> None:
    root = _write(tmp_path / "a", 'subject = "x"\nfrom_name = "Banca"\n', body_html="<p>x</p>")
    msg = _render(root, {}, sender="news@banca-è.test", recipient="mario@città.it")
    assert msg["From"].addresses[0].addr_spec == "news@xn--banca--8ua.test"
    assert msg["To"] == "mario@xn--citt-3na.it"
    assert header_address("a@münchen.de") == "a@xn--mnchen-3ya.de"
    # a non-ASCII local part cannot be encoded: the header goes in UTF-8 (RFC 6532) and the
    # SMTP client asks for SMTPUTF8 for such an envelope
    tpl = load_template(root)
    out = tpl.render({}, sender=SENDER, recipient="mário@città.it", message_id="<1@b.test>")
    head = out.data.split(b"\r\n\r\n", 1)[0]
    assert "To: mário@xn--citt-3na.it".encode() in head
    parsed = email.message_from_bytes(out.data, policy=policy.SMTPUTF8)
    assert parsed["To"] == "mário@xn--citt-3na.it"


def test_rfc2047_subjects_and_folding(tmp_path: Path) -> None:
    subject = "Niccolò, il tuo estratto conto di novembre è pronto 😀 " * 3
    root = _write(tmp_path / "a", 'subject = "{{ s }}"\nfrom_name = "Banca Cortè"\n', body_html="x")
    tpl = load_template(root)
    out = tpl.render({"s": subject}, sender=SENDER, recipient="a@x.test", message_id="<1@b.test>")
    head = out.data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    for line in head.split(b"\r\n"):
        assert len(line) <= 78
    words = re.findall(rb"=\?utf-8\?b\?[A-Za-z0-9+/=]+\?=", head)
    assert words and all(len(w) <= 75 for w in words)  # RFC 2047 limit per encoded word
    msg = _message(out.data)
    assert msg["Subject"] == subject.strip()
    assert msg["From"].addresses[0].display_name == "Banca Cortè"
    # plain ASCII stays readable, folded at spaces
    out = tpl.render({"s": "word " * 40}, sender=SENDER, recipient="a@x.test", message_id="<m@b>")
    assert b"Subject: word word" in out.data
    assert _message(out.data)["Subject"] == ("word " * 40).strip()


# ---- MIME: bodies ---------------------------------------------------------------------------


def test_transfer_encodings_round_trip() -> None:
    rng = random.Random(5)
    pieces = ["a", " ", "\t", "=", "\n", "\r\n", "è", "€", "😀", "x" * 90, " \n", "\x01", "."]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 80)))
        expected = text.replace("\r\n", "\n").replace("\r", "\n").encode()
        qp = quoted_printable(text)
        assert binascii.a2b_qp(qp.replace(b"\r\n", b"\n")) == expected
        assert all(
            len(line) <= 76 and not line.endswith((b" ", b"\t")) for line in qp.split(b"\r\n")
        )
        cte, body = body_part(text)
        if cte == "7bit":
            assert body.replace(b"\r\n", b"\n") == expected
        elif cte == "base64":
            assert base64.b64decode(body) == expected
        else:
            assert binascii.a2b_qp(body.replace(b"\r\n", b"\n")) == expected
    assert body_part("plain ascii\nline")[0] == "7bit"
    assert body_part("x" * 1200)[0] == "quoted-printable"  # a line too long for 7bit
    assert body_part("Gentile cliente, il conto è pronto")[0] == "quoted-printable"
    assert body_part("Уважаемый клиент, ваш счёт готов")[0] == "base64"


def test_mjml_html_goes_7bit_with_short_lines(tmp_path: Path) -> None:
    toml = MJML_TOML
    root = _write(tmp_path / "mj", toml, body_mjml=MJML.replace("Gentile", "Caro cliente è"))
    tpl = load_template(root)
    out = tpl.render(
        {"nome": "Zoë Niccolò", "segmento": "private", "contact_id": "C1"},
        sender=SENDER,
        recipient="a@x.test",
        message_id="<1@b.test>",
    )
    html_part = out.data.split(b"Content-Type: text/html", 1)[1]
    assert b"Content-Transfer-Encoding: 7bit" in html_part[:100]
    assert html_part.isascii()
    assert max(len(line) for line in html_part.split(b"\r\n")) <= 998
    html, _ = _bodies(_message(out.data))
    assert "Caro cliente è Zoë Niccolò" in html
