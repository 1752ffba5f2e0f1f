"""Template compilation and MIME rendering."""

from __future__ import annotations

import email
import html as html_lib
from email import policy
from pathlib import Path

import pytest

from recapito.errors import TemplateError
from recapito.render.template import header_safe, load_template, message_id_for
from recapito.render.text import html_to_text

DEMO = Path(__file__).parents[1] / "src" / "recapito" / "sandbox" / "demo_template"


def _template(tmp_path: Path, subject: str, html: str, **extra: str) -> Path:
    root = tmp_path / "tpl"
    root.mkdir(exist_ok=True)
    lines = [f"subject = {subject!r}"] + [f"{k} = {v!r}" for k, v in extra.items()]
    (root / "template.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "body.html").write_text(html, encoding="utf-8")
    return root


def _render(tpl_path: Path, ctx: dict[str, object]) -> email.message.EmailMessage:
    tpl = load_template(tpl_path)
    out = tpl.render(ctx, sender="news@bank.test", recipient="a@b.test", message_id="<x@bank.test>")
    assert b"\r\n" in out.data and b"\n" not in out.data.replace(b"\r\n", b"")
    msg = email.message_from_bytes(out.data, policy=policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_placeholders_defaults_and_conditions(tmp_path: Path) -> None:
    root = _template(
        tmp_path,
        "Ciao {{ nome | default('cliente') }}",
        "<p>{% if vip == 'si' %}VIP{% endif %} {{ nome | default('cliente') }}{{ ditta }}</p>",
        from_name="Banca {{ filiale | default('Centrale') }}",
    )
    msg = _render(root, {"nome": "Zoë", "vip": "si", "ditta": " & co"})
    assert msg["Subject"] == "Ciao Zoë"
    assert msg["From"].addresses[0].display_name == "Banca Centrale"
    html = msg.get_body(("html",))
    text = msg.get_body(("plain",))
    assert html is not None and text is not None
    # non-ASCII placeholder values become character references: the HTML part stays 7bit
    assert "VIP Zo&#235; &amp; co" in html.get_content()
    assert "VIP Zoë & co" in text.get_content()
    # empty values fall back to the default too
    assert _render(root, {"nome": "", "vip": "no", "ditta": ""})["Subject"] == "Ciao cliente"


def test_html_is_autoescaped(tmp_path: Path) -> None:
    root = _template(tmp_path, "x", "<p>{{ nome }}</p>")
    msg = _render(root, {"nome": "<script>alert(1)</script>"})
    body = msg.get_body(("html",))
    assert body is not None
    assert "<script>" not in body.get_content()
    assert "&lt;script&gt;" in body.get_content()


def test_undefined_placeholder_is_named_before_sending(tmp_path: Path) -> None:
    root = _template(tmp_path, "Ciao {{ nome }}", "<p>{{ saldo }} {{ x | default('') }}</p>")
    tpl = load_template(root)
    assert tpl.variables == {"nome", "saldo"}
    with pytest.raises(TemplateError, match=r"template 'tpl': undefined placeholder 'saldo'"):
        tpl.check_variables(["nome", "email"])
    tpl.check_variables(["nome", "saldo"])


def test_crlf_in_placeholder_never_reaches_a_header(tmp_path: Path) -> None:
    root = _template(tmp_path, "Ciao {{ nome }}", "<p>x</p>", from_name="{{ nome }}")
    evil = "Mario\r\nBcc: victim@evil.test\r\nX-Injected: yes"
    msg = _render(root, {"nome": evil})
    assert msg["Bcc"] is None and msg["X-Injected"] is None
    assert "\n" not in msg["Subject"] and "Bcc: victim" in msg["Subject"]
    assert header_safe("a\r\nb\x00c\u2028d") == "a b c d"


def test_sandbox_blocks_unsafe_attribute_access(tmp_path: Path) -> None:
    root = _template(tmp_path, "x", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    tpl = load_template(root)
    with pytest.raises(TemplateError, match="tpl"):
        tpl.render({}, sender="a@b.test", recipient="c@d.test", message_id="<m@b.test>")


def test_syntax_error_names_template_and_line(tmp_path: Path) -> None:
    root = _template(tmp_path, "x", "<p>\n{% if %}</p>")
    with pytest.raises(TemplateError, match=r"'tpl': syntax error in html line 2"):
        load_template(root)


def test_missing_template_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"no template\.toml"):
        load_template(tmp_path / "nope")


def test_digest_changes_with_content(tmp_path: Path) -> None:
    a = load_template(_template(tmp_path, "x", "<p>1</p>")).digest
    b = load_template(_template(tmp_path, "x", "<p>2</p>")).digest
    assert a != b and len(a) == 64


def test_message_id_is_deterministic() -> None:
    a = message_id_for("Spring 2026", 42, "bank.test")
    assert a == message_id_for("Spring 2026", 42, "bank.test")
    assert a != message_id_for("Spring 2026", 43, "bank.test")
    assert a.startswith("<Spring-2026.42.") and a.endswith("@bank.test>")


def test_html_to_text_keeps_links_and_drops_style() -> None:
    text = html_to_text(
        "<style>p{}</style><p>Ciao <b>Anna</b></p><p><a href='https://x.test/a'>qui</a></p>"
    )
    assert text == "Ciao Anna\n\nqui (https://x.test/a)\n"


def test_demo_template_renders() -> None:
    tpl = load_template(DEMO)
    ctx = {
        "nome": "Anna",
        "cognome": "Bianchi",
        "segmento": "private",
        "citta": "Milano",
        "provincia": "MI",
        "email": "anna@x.test",
    }
    tpl.check_variables(ctx)
    out = tpl.render(ctx, sender="c@banca.test", recipient="anna@x.test", message_id="<1@b>")
    assert len(out.data) > 2000


def test_mime_headers_round_trip_through_the_standard_parser(tmp_path: Path) -> None:
    long_subject = "Aggiornamento importante sul tuo conto corrente " * 3 + "{{ nome }}"
    root = _template(tmp_path, long_subject, "<p>{{ corpo }}</p>", from_name="{{ ditta }}")
    corpo = "riga lunghissima " * 40 + "\n.punto a inizio riga\nfine € è"
    msg = _render(
        root, {"nome": "Niccolò Àlvarez 😀", "ditta": 'Banca "Sicura", S.p.A.', "corpo": corpo}
    )
    assert msg["Subject"] == long_subject.replace("{{ nome }}", "Niccolò Àlvarez 😀")
    sender = msg["From"].addresses[0]
    assert sender.display_name == 'Banca "Sicura", S.p.A.' and sender.addr_spec == "news@bank.test"
    assert msg.get_content_type() == "multipart/alternative"
    html = msg.get_body(("html",))
    # non-ASCII values become character references, so the HTML part goes 7bit
    assert html is not None and html["Content-Transfer-Encoding"] == "7bit"
    content = html_lib.unescape(html.get_content())
    assert "fine € è" in content and "riga lunghissima " * 40 in content
    text = msg.get_body(("plain",))
    assert text is not None and text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "fine € è" in text.get_content()


def test_every_wire_line_is_short_and_ascii(tmp_path: Path) -> None:
    root = _template(tmp_path, "Oggetto {{ nome }}", "<p>{{ nome }}</p>" * 50)
    tpl = load_template(root)
    out = tpl.render(
        {"nome": "Ünïcödé " * 30}, sender="a@b.test", recipient="c@d.test", message_id="<m@b.test>"
    )
    for line in out.data.split(b"\r\n"):
        assert len(line) <= 78 and line.isascii()


def test_encoded_words_in_data_stay_literal(tmp_path: Path) -> None:
    root = _template(tmp_path, "Ciao {{ nome }}", "<p>x</p>", from_name="{{ nome }}")
    trick = "=?utf-8?q?Bcc=3A_evil=40attacker.test?="
    msg = _render(root, {"nome": trick})
    assert msg["Subject"] == f"Ciao {trick}"  # shown as typed, never decoded
    assert msg["From"].addresses[0].display_name == trick


def test_a_file_that_is_not_a_template_is_named(tmp_path: Path) -> None:
    other = tmp_path / "contacts.csv"
    other.write_bytes(b"\xe9\xe8;x\n")
    with pytest.raises(TemplateError, match="not a template folder"):
        load_template(other)
