"""Plain-text alternative derived from HTML, for templates that ship no text part.

Regular expressions rather than an HTML parser: this runs once per message, and the
input is our own rendered template, not arbitrary web pages.
"""

from __future__ import annotations

import html as html_lib
import re

_DROP = re.compile(r"<(style|script|head|title)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_LINK = re.compile(r"<a\b[^>]*?\bhref\s*=\s*([\"'])(.*?)\1[^>]*>(.*?)</a\s*>", re.I | re.S)
_LI = re.compile(r"<li\b[^>]*>", re.I)
_BLOCK = re.compile(r"</?(p|div|br|tr|li|h[1-6]|table|hr|ul|ol)\b[^>]*>", re.I)
_TAG = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANKS = re.compile(r"\n{3,}")


def _link(match: re.Match[str]) -> str:
    href, label = match.group(2), match.group(3)
    if not href or href.startswith(("#", "mailto:")):
        return label
    # angle brackets would be taken for a tag below: mark them, restore at the end
    return f"{label} \x00{href}\x01"


def html_to_text(html: str) -> str:
    text = _COMMENT.sub("", _DROP.sub("", html))
    text = _LINK.sub(_link, text)
    text = _LI.sub("\n- ", text)
    text = _BLOCK.sub("\n", text)
    text = _TAG.sub("", text)
    text = html_lib.unescape(_SPACES.sub(" ", text.replace("\n", " \n ")))
    text = text.replace("\x00", "<").replace("\x01", ">")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip() + "\n"


_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)


def html_template_to_text_template(source: str) -> str:
    """Turn an HTML *template* into a text template once, at compile time.

    Jinja expressions and statements are set aside before the conversion and put back
    after it, so the derived template renders per contact at Jinja speed instead of
    converting every rendered HTML body.
    """
    saved: list[str] = []

    def keep(match: re.Match[str]) -> str:
        saved.append(match.group(0))
        return f"\x02{len(saved) - 1}\x03"

    text = html_to_text(_JINJA.sub(keep, source))
    return re.sub(r"\x02(\d+)\x03", lambda m: saved[int(m.group(1))], text)
