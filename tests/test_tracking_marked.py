"""Link tracking through the template's marked links (``recapito.render.links``) gives
exactly what scanning each rendered message gave: the reference below is the scanning
rewrite as it was before the marking existed, kept verbatim as an oracle."""

from __future__ import annotations

import base64
import hashlib
import hmac
import html as html_lib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from recapito.identity.verp import keyring_from_entries
from recapito.render.links import MARK
from recapito.render.template import CompiledTemplate, load_template
from recapito.tracking import Tracker
from recapito.tracking.tokens import TokenSigner

SECRET = "marked-secret-0123456789"
SIGNER = TokenSigner(keyring_from_entries([("k1", SECRET)]))
BASE = "https://t.bank.test"

# ---- the reference: the scanning rewrite as it was (recapito 6fc5be4), verbatim ---------

_TAG = re.compile(r"<(?:a|area)\b[^>]*>", re.IGNORECASE)
_HREF = re.compile(r"""(\shref\s*=\s*)(?:"([^"]*)"|'([^']*)'|([^\s>"']+))""", re.IGNORECASE)
_NOTRACK = re.compile(r"\sdata-notrack\b", re.IGNORECASE)
_TEXT_URL = re.compile(r"""https?://[^\s<>"'()\[\]{}]+""")
_TRAILING = ".,;:!?"
_SPACE = re.compile(r"\s")


def _ref_click_token(delivery_id: int, index: int, url: str) -> str:
    parts = [b"recapito-click-v1", b"k1", str(delivery_id).encode(), str(index).encode()]
    mac = hmac.new(SECRET.encode(), b"\0".join([*parts, url.encode()]), hashlib.sha256)
    b64 = base64.urlsafe_b64encode
    target = b64(url.encode()).rstrip(b"=").decode()
    return f"k1.{delivery_id}.{index}.{target}.{b64(mac.digest()[:12]).decode()}"


def _ref_open_token(delivery_id: int) -> str:
    msg = b"\0".join([b"recapito-open-v1", b"k1", str(delivery_id).encode()])
    mac = hmac.new(SECRET.encode(), msg, hashlib.sha256).digest()[:12]
    return f"k1.{delivery_id}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def reference_rewrite(html: str, text: str, delivery_id: int) -> tuple[str, str]:
    base = BASE

    def trackable(url: str) -> bool:
        low = url[:8].lower()
        if not (low.startswith("https://") or low.startswith("http://")):
            return False
        if len(url) > 2048 or _SPACE.search(url):
            return False
        return not url.startswith(base + "/")

    index_of: dict[str, int] = {}
    click_url: dict[str, str] = {}

    def tracked(url: str) -> str:
        found = click_url.get(url)
        if found is None:
            index = index_of.setdefault(url, len(index_of))
            found = f"{base}/c/{_ref_click_token(delivery_id, index, url)}"
            click_url[url] = found
        return found

    def tag(match: re.Match[str]) -> str:
        whole = match.group(0)
        if _NOTRACK.search(whole):
            return whole
        href = _HREF.search(whole)
        if href is None:
            return whole
        raw = next(g for g in href.groups()[1:] if g is not None)
        url = html_lib.unescape(raw).strip()
        if not trackable(url):
            return whole
        start, end = href.span()
        return f'{whole[:start]}{href.group(1)}"{tracked(url)}"{whole[end:]}'

    def text_url(match: re.Match[str]) -> str:
        url = match.group(0)
        stripped = url.rstrip(_TRAILING)
        if not trackable(stripped):
            return url
        return tracked(stripped) + url[len(stripped) :]

    html = _TAG.sub(tag, html)
    text = _TEXT_URL.sub(text_url, text)
    pixel = (
        f'<img src="{base}/o/{_ref_open_token(delivery_id)}" width="1" height="1" '
        'alt="" border="0" style="display:block;width:1px;height:1px;border:0" />'
    )
    end = html.lower().rfind("</body>")
    html = html + pixel if end < 0 else f"{html[:end]}{pixel}\n{html[end:]}"
    return html, text


# ---- templates --------------------------------------------------------------------------

PLACEHOLDER_LINKS = """<!doctype html><html><body>
<p><a href="https://shop.test/p/{{ contact_id }}?n={{ nome }}&amp;src=mail">your page</a>
<a class="btn" href="https://www.bank.test/area?x=1&amp;y=2">Area</a>
<a href='http://www.bank.test/plain'>plain</a> <A HREF=https://www.bank.test/upper>up</A>
<a href="{{ link }}">yours</a> <a title="{{ nome }}" href="https://www.bank.test/area?x=1&amp;y=2">again</a>
<a href="mailto:help@bank.test">write</a> <a href="#top">top</a> <a href="tel:+39061234">call</a>
<a data-notrack href="https://www.bank.test/private">private</a>
<a href=" https://www.bank.test/spaced ">spaced</a> <a href="https://www.bank.test/a b">bad</a>
<a name="anchor">no href</a> <map><area shape="rect" href="https://www.bank.test/map"></map>
{% if segmento == "vip" %}<a href="https://www.bank.test/vip">vip only</a>{% endif %}
{% for i in range(2) %}<a href="https://www.bank.test/loop/{{ i }}">n. {{ i }}</a>
<a href="https://www.bank.test/static-in-loop">s</a>{% endfor %}
<a href="{{ unsubscribe_url }}">unsubscribe</a> <a href="https://t.bank.test/own">own</a></p>
<p>Hello {{ nome | default('cliente') }}, https://www.bank.test/in-text.</p>
</body></html>
"""

BLOCKS_TOML = """subject = "Ciao {{ nome | default('cliente') }}"
preheader = "novità"
[blocks.promo]
visible_if = 'segmento = "vip"'
"""
BLOCKS_HTML = """<html><BODY><span>{{ preheader }}</span>
{% block promo %}<a href="https://www.bank.test/promo">promo</a>{% endblock %}
<a href="https://www.bank.test/promo">promo again</a> <a href="https://www.bank.test/è">è</a>
</BODY></html>"""

NO_BODY_HTML = """<p><a href="https://www.bank.test/x">x</a> <a href="{{ link }}">l</a></p>"""

TEXT_GIVEN = (
    'subject = "x"\ntext = "body.txt"\n',
    PLACEHOLDER_LINKS,
    "Ciao {{ nome }}: https://www.bank.test/vip, https://shop.test/p/{{ contact_id }}\n"
    "https://www.bank.test/area?x=1&y=2 and {{ link }} ({{ unsubscribe_url }})\n",
)

CONTACTS: list[dict[str, Any]] = [
    {
        "contact_id": "C1",
        "nome": "Zoë&<Bob>\"q\"'a'",
        "segmento": "vip",
        "link": "https://partner.test/a?b=1&c=2",
    },
    {"contact_id": "C 2", "nome": "", "segmento": "base", "link": "mailto:x@bank.test"},
    {"contact_id": "C3", "nome": "Lu\x00\ue000<a href=x>", "segmento": "vip", "link": ""},
    {"contact_id": "C4", "nome": "Max", "segmento": "base", "link": "https://t.bank.test/c/x"},
    {"contact_id": "C5", "nome": "Ann", "segmento": "vip", "link": "javascript:alert(1)"},
]


def _template(root: Path, toml: str, html: str, text: str | None = None) -> CompiledTemplate:
    root.mkdir()
    (root / "template.toml").write_text(toml, encoding="utf-8")
    (root / "body.html").write_text(html, encoding="utf-8")
    if text is not None:
        (root / "body.txt").write_text(text, encoding="utf-8")
    return load_template(root)


def _render(
    template: CompiledTemplate,
    contact: dict[str, Any],
    delivery: int,
    transform: Callable[[str, str], tuple[str, str]] | None,
    tracker: Tracker,
) -> bytes:
    data = template.render(
        {**contact, "unsubscribe_url": tracker.body_link(delivery)},
        sender="news@bank.test",
        recipient="anna@example.test",
        message_id=f"<{delivery}@bank.test>",
        headers=tracker.headers(delivery),
        transform=transform,
    ).data
    return re.sub(rb"\r\nDate: [^\r]*", b"", data)


@pytest.mark.parametrize(
    "case",
    ["placeholders", "blocks", "no-body", "text-given", "mjml"],
)
def test_marked_links_give_the_scanning_rewrite_output(tmp_path: Path, case: str) -> None:
    if case == "placeholders":
        template = _template(tmp_path / case, 'subject = "x"\n', PLACEHOLDER_LINKS)
    elif case == "blocks":
        template = _template(tmp_path / case, BLOCKS_TOML, BLOCKS_HTML)
    elif case == "no-body":
        template = _template(tmp_path / case, 'subject = "x"\n', NO_BODY_HTML)
    elif case == "text-given":
        template = _template(tmp_path / case, *TEXT_GIVEN)
    else:
        from benchmarks.render import MJML, TOML, contacts

        root = tmp_path / case
        root.mkdir()
        (root / "template.toml").write_text(TOML, encoding="utf-8")
        (root / "body.mjml").write_text(MJML, encoding="utf-8")
        template = load_template(root)
    assert template.html_marked is not None and template.link_slots is not None
    people = contacts(6) if case == "mjml" else CONTACTS
    tracker = Tracker(SIGNER, BASE, "bank.test")
    for delivery, contact in enumerate(people, start=40):
        fast = tracker.transform(delivery)
        assert fast is not None and hasattr(fast, "marked")

        def scan(html: str, text: str, delivery: int = delivery) -> tuple[str, str]:
            return reference_rewrite(html, text, delivery)

        got = _render(template, contact, delivery, fast, tracker)
        assert got == _render(template, contact, delivery, scan, tracker)
        assert b"\x00" not in got and MARK.encode() not in got
        # the scanning path of today's tracker agrees as well
        assert got == _render(template, contact, delivery, fast.__call__, tracker)


def test_links_with_placeholders_in_the_url_are_tracked_per_contact(tmp_path: Path) -> None:
    template = _template(tmp_path / "p", 'subject = "x"\n', PLACEHOLDER_LINKS)
    tracker = Tracker(SIGNER, BASE, "bank.test")
    seen: dict[str, list[str]] = {}
    for delivery, contact in enumerate(CONTACTS, start=1):
        html = (
            _render(template, contact, delivery, tracker.transform(delivery), tracker)
            .decode()
            .split("text/html")[1]
            .replace("=\r\n", "")
        )
        tokens = re.findall(r'href="https://t\.bank\.test/c/(k1\.[^"]+)"', html)
        urls = [SIGNER.verify_click(t).url for t in tokens]
        assert all(SIGNER.verify_click(t).delivery_id == delivery for t in tokens)
        seen[contact["contact_id"]] = urls
    # the placeholder link is the contact's own, unescaped
    assert seen["C1"][0] == "https://shop.test/p/C1?n=Zoë&<Bob>\"q\"'a'&src=mail"
    assert not any("shop.test" in u for u in seen["C 2"])  # a space in it: left alone
    # a link that is a placeholder: tracked when http(s), left alone otherwise
    assert "https://partner.test/a?b=1&c=2" in seen["C1"]
    for cid in ("C 2", "C3", "C4", "C5"):
        assert not any(u.startswith(("mailto:", "javascript:", BASE)) for u in seen[cid])
    # conditional and loop links: the same as the scan; a repeated URL keeps one index
    assert "https://www.bank.test/vip" in seen["C1"]
    assert "https://www.bank.test/vip" not in seen["C4"]
    assert [u for u in seen["C4"] if "/loop/" in u] == [
        "https://www.bank.test/loop/0",
        "https://www.bank.test/loop/1",
    ]


def test_templates_that_cannot_be_marked_are_scanned(tmp_path: Path) -> None:
    """Markup outside autoescaping (a link in the data), macros and statements inside a
    tag: no marked copy, and the rendered HTML is scanned as before."""
    tracker = Tracker(SIGNER, BASE, "bank.test")
    cases = {
        "safe": "<body>{{ snippet | safe }} <a href='https://x.test/'>x</a></body>",
        "macro": (
            "{% macro l(u) %}<a href='{{ u }}'>m</a>{% endmacro %}<body>{{ l('https://m.test/') }}"
            "</body>"
        ),
        "statement-in-tag": '<body><a {% if vip %}class="v" {% endif %}href="https://x.test/">'
        "x</a></body>",
        "glued": "<body><a{{ attrs }}>x</a> <a href='https://x.test/'>y</a></body>",
    }
    contact = {"snippet": '<a href="https://data.test/">d</a>', "vip": True, "attrs": ""}
    for name, body in cases.items():
        template = _template(tmp_path / name, 'subject = "x"\n', body)
        assert template.html_marked is None, name

        def scan(html: str, text: str) -> tuple[str, str]:
            return reference_rewrite(html, text, 9)

        got = _render(template, contact, 9, tracker.transform(9), tracker)
        assert got == _render(template, contact, 9, scan, tracker), name
    safe = _render(load_template(tmp_path / "safe"), contact, 9, tracker.transform(9), tracker)
    assert b"https://data.test/" not in safe.split(b"text/html")[1]  # tracked, like the scan


def test_tracking_off_leaves_the_unmarked_html(tmp_path: Path) -> None:
    template = _template(tmp_path / "off", 'subject = "x"\n', PLACEHOLDER_LINKS)
    tracker = Tracker(SIGNER, BASE, "bank.test")
    assert tracker.transform(3, enabled=False) is None
    got = _render(template, CONTACTS[0], 3, None, tracker)
    assert b"\x00" not in got and b"/c/" not in got and b"/o/" not in got
    assert b'href=3D"https://shop.test/p/C1' in got or b'href="https://shop.test/p/C1' in got


def test_tokens_are_the_documented_hmac_sha256() -> None:
    """The faster signer writes byte for byte the tokens of HMAC-SHA256 as documented, so
    messages already sent keep working (long keys are hashed first, RFC 2104)."""
    for secret in (SECRET, "k" * 64, "long-" * 30):
        signer = TokenSigner(keyring_from_entries([("k1", secret)]))
        for delivery, index, url in (
            (1, 0, "https://a.test/"),
            (123456789, 14, "https://b.test/è"),
        ):
            token = signer.click_token(delivery, index, url)
            fields = [b"recapito-click-v1", b"k1", str(delivery).encode(), str(index).encode()]
            msg = b"\0".join([*fields, url.encode()])
            mac = hmac.new(secret.encode(), msg, hashlib.sha256).digest()[:12]
            assert token.rsplit(".", 1)[1] == base64.urlsafe_b64encode(mac).decode()
            assert signer.verify_click(token).url == url
        unsub = signer.unsubscribe_token(77)
        msg = b"\0".join([b"recapito-unsub-v1", b"k1", b"77"])
        mac = hmac.new(secret.encode(), msg, hashlib.sha256).digest()[:12]
        assert unsub == f"77-k1-{base64.b32encode(mac).decode().lower().rstrip('=')}"
        assert signer.verify_unsubscribe(unsub.upper()) == 77
        assert signer.verify_open(signer.open_token(5)) == 5
