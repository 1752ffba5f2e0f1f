"""Plain-text alternative derived from HTML, for templates that ship no text part.

Regular expressions rather than an HTML parser: the input is our own template (plain HTML
or MJML output), converted once per template load (``html_template_to_text_template``),
not arbitrary web pages. What the reader gets:

* links as ``text (url)``, or the bare URL when the text is the URL itself; images as
  their ``alt`` text (so a linked logo reads ``Banca Esempio (https://…)``);
* paragraphs wrapped at 72 columns;
* headings as ``# Title`` / ``## Title`` on their own paragraph;
* bulleted lists as ``- item``, numbered lists as ``1. item``;
* paragraphs, table rows and line breaks as line breaks (newlines in the source are
  spaces, as in a browser); table cells side by side;
* nothing of ``<head>``, ``<style>``, ``<script>``, comments (Outlook's conditional
  comments included) and hidden elements (the preheader ``<span style="display:none">``).
"""

from __future__ import annotations

import html as html_lib
import re
import textwrap

_DROP = re.compile(r"<(style|script|head|title)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
# a hidden span or div without the same tag nested inside (the preheader idiom)
_HIDDEN = re.compile(
    r"<(span|div)\b[^>]*?style\s*=\s*([\"'])[^\"']*?display\s*:\s*none[^\"']*\2[^>]*>"
    r"(?:(?!<\1\b).)*?</\1\s*>",
    re.I | re.S,
)
_IMG = re.compile(r"<img\b[^>]*>", re.I)
_ALT = re.compile(r"\balt\s*=\s*(?:\"([^\"]*)\"|'([^']*)')", re.I)
_LINK = re.compile(r"<a\b[^>]*?\bhref\s*=\s*([\"'])(.*?)\1[^>]*>(.*?)</a\s*>", re.I | re.S)
_HEADING = re.compile(r"<h([1-6])\b[^>]*>(.*?)</h\1\s*>", re.I | re.S)
_OL = re.compile(r"<ol\b[^>]*>(.*?)</ol\s*>", re.I | re.S)
_LI = re.compile(r"<li\b[^>]*>", re.I)
_PARAGRAPH = re.compile(r"</?(p|table|ul|ol|blockquote|h[1-6])\b[^>]*>", re.I)
_LINE = re.compile(r"<(br|/?div|/?tr|hr)\b[^>]*>", re.I)
_CELL = re.compile(r"</t[dh]\s*>", re.I)
_TAG = re.compile(r"<[^>\x00\x01]+>")
_SPACES = re.compile(r"[ \t\r\f\v\xa0]+")
_BLANKS = re.compile(r"\n{3,}")


def _image(match: re.Match[str]) -> str:
    alt = _ALT.search(match.group(0))
    return f" {(alt.group(1) or alt.group(2) or '').strip()} " if alt else " "


def _plain(fragment: str) -> str:
    return " ".join(html_lib.unescape(_TAG.sub(" ", fragment)).split())


def _link(match: re.Match[str]) -> str:
    raw, label = match.group(2).strip(), match.group(3)
    href, shown = html_lib.unescape(raw), _plain(label)
    if not href or href.startswith("#"):
        return label
    if href.lower().startswith("mailto:"):
        address = href[7:].split("?")[0]
        return label if address in shown else f"{label} ({address})"
    if not shown or shown == href or shown.rstrip("/") == href.rstrip("/"):
        return f"\x00{raw}\x01"
    return f"{label} \x00({raw})\x01"


def _heading(match: re.Match[str]) -> str:
    level = int(match.group(1))
    return f"\n\n{'#' * min(level, 3)} {match.group(2)}\n\n"


def _numbered(match: re.Match[str]) -> str:
    count = 0

    def item(_: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"\n{count}. "

    return "\n\n" + _LI.sub(item, match.group(1)) + "\n\n"


def html_to_text(html: str) -> str:
    # newlines in the source are spaces, as a browser sees them; lines come from elements
    text = _COMMENT.sub("", _DROP.sub("", html)).replace("\r", " ").replace("\n", " ")
    text = _HIDDEN.sub("", text)
    text = _IMG.sub(_image, text)
    text = _LINK.sub(_link, text)
    text = _HEADING.sub(_heading, text)
    text = _OL.sub(_numbered, text)
    text = _LI.sub("\n- ", text)
    text = _PARAGRAPH.sub("\n\n", text)
    text = _LINE.sub("\n", text)
    text = _CELL.sub(" ", text)
    text = _TAG.sub("", text)
    text = html_lib.unescape(_SPACES.sub(" ", text.replace("\n", " \n ")))
    text = text.replace("\x00", "").replace("\x01", "")
    lines = [_wrapped(_SPACES.sub(" ", line).strip()) for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip() + "\n"


_ITEM = re.compile(r"(?:-|\d+\.) ")
WIDTH = 72


def _wrapped(line: str) -> str:
    """A paragraph wrapped at 72 columns at spaces (URLs and long words stay whole), list
    items indented under their text: readable as it is, and quoted-printable then rarely
    needs a soft line break."""
    if len(line) <= WIDTH:
        return line
    item = _ITEM.match(line)
    indent = " " * (item.end() if item else 0)
    return textwrap.fill(
        line,
        width=WIDTH,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


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
