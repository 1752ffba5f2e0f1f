"""The links of an HTML template, found once at load for link tracking.

Link tracking (``recapito.tracking``) rewrites the ``href`` of every ``<a>`` and ``<area>``
tag of a rendered message. Scanning 20 KB of rendered HTML for every message costs more
than rendering it, so the template is scanned instead, once, and a *marked* copy compiled:

- a tag written entirely in the template (no Jinja inside it) whose ``href`` could be
  tracked (``http(s)``, no whitespace, not too long, no ``data-notrack``) gets its href
  value replaced by ``MARK`` and a two-character slot key; its URL is known at load;
- a tag with ``{{ … }}`` expressions inside (``href="{{ unsubscribe_url }}"``,
  ``href="https://x/{{ id }}"``) gets ``MARK`` and its slot key in front, so each message's
  rendering of the tag (up to its first ``>``) is found without a scan and examined then.

Per message the tracker splits the rendered output on ``MARK`` (a NUL character: one
``memchr`` over the HTML) and splices click URLs in. The HTML environment's ``finalize``
turns a NUL in a placeholder's value into U+FFFD, so a NUL in the output can only come from
the marking. A template for which that reasoning does not hold (markup outside
autoescaping, macros or block assignments whose output passes ``finalize`` again, Jinja
statements inside a tag, a NUL in the source…) is not marked, and the tracker scans its
rendered output as before. A value cannot put a ``<`` or ``>`` in the output either (it is
escaped), which is what lets the tracker find a dynamic tag's end at its first ``>``.

The regular expressions here define which tags and hrefs are links, for both paths.
"""

from __future__ import annotations

import html as html_lib
import re
from dataclasses import dataclass

from jinja2 import nodes

# what is a link in rendered HTML (shared with recapito.tracking.links)
TAG = re.compile(r"<(?:a|area)\b[^>]*>", re.IGNORECASE)
HREF = re.compile(r"""(\shref\s*=\s*)(?:"([^"]*)"|'([^']*)'|([^\s>"']+))""", re.IGNORECASE)
NOTRACK = re.compile(r"\sdata-notrack\b", re.IGNORECASE)
SPACE = re.compile(r"\s")
MAX_TARGET_LENGTH = 2048  # longer link targets are not tracked (left as they are)

MARK = "\x00"  # starts a slot in the marked template's output, its key follows
_KEY_CHARS = [chr(c) for c in range(0x21, 0x7F)]  # printable ASCII
MAX_SLOTS = len(_KEY_CHARS) ** 2


def slot_key(index: int) -> str:
    """The two characters after ``MARK`` that name slot ``index``."""
    high, low = divmod(index, len(_KEY_CHARS))
    return _KEY_CHARS[high] + _KEY_CHARS[low]


# Jinja markup, aware of string literals (a "}}" inside quotes does not end an expression)
_STRING = r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'"""
_MARKUP = re.compile(
    r"(\{\{(?:" + _STRING + r"""|[^"'}]|\}(?!\}))*\}\})"""  # an expression
    r"|\{%(?:" + _STRING + r"""|[^"'%]|%(?!\}))*%\}|\{#.*?#\}""",  # a statement, a comment
    re.S,
)
_RAW = re.compile(r"\{%-?\s*raw\b")
_TAG_FROM_JINJA = re.compile("<[\x01\x02]|<(?:a|area)[\x01\x02]", re.IGNORECASE)
# nodes whose output is rendered once and output again through ``finalize`` (which would
# turn the markers into character references), or that switch autoescaping off
_UNSAFE_NODES = (
    nodes.Macro,
    nodes.CallBlock,
    nodes.AssignBlock,
    nodes.FilterBlock,
    nodes.EvalContextModifier,
    nodes.Include,
    nodes.Import,
    nodes.FromImport,
    nodes.Extends,
)
_UNSAFE_FILTERS = frozenset({"safe", "urlize", "forceescape"})
_UNSAFE_NAMES = frozenset({"self", "super", "caller", "varargs", "kwargs"})


def trackable_url(url: str) -> bool:
    """Whether a link target could be tracked at all (``http(s)``, no whitespace, not too
    long); the tracker also leaves its own URLs alone."""
    low = url[:8].lower()
    if not (low.startswith("https://") or low.startswith("http://")):
        return False
    return len(url) <= MAX_TARGET_LENGTH and SPACE.search(url) is None


def href_of(tag: str) -> tuple[re.Match[str], str] | None:
    """The href match of a link tag and its URL (unescaped, stripped); None when the tag
    has no href or is marked ``data-notrack``."""
    if NOTRACK.search(tag):
        return None
    href = HREF.search(tag)
    if href is None:
        return None
    raw = href.group(2)
    if raw is None:
        raw = href.group(3) if href.group(3) is not None else href.group(4)
    return href, html_lib.unescape(raw).strip()


@dataclass(frozen=True)
class LinkSlot:
    """One link of the template: static (``url`` known at load; ``raw`` is the href value
    as written, quotes included, kept when the tracker leaves the URL alone) or dynamic
    (``url`` None: the rendered tag follows the slot key, up to its first ``>``)."""

    url: str | None
    raw: str = ""


@dataclass(frozen=True, eq=False)  # identity hash: trackers cache their plan per object
class LinkSlots:
    slots: dict[str, LinkSlot]  # by slot key
    lower_body_end: bool  # every "</body>" the output can hold is written in lower case


def _eligible(ast: nodes.Template) -> bool:
    if any(True for _ in ast.find_all(_UNSAFE_NODES)):
        return False
    if any(f.name in _UNSAFE_FILTERS for f in ast.find_all(nodes.Filter)):
        return False
    return not any(n.name in _UNSAFE_NAMES for n in ast.find_all(nodes.Name))


def mark_links(source: str, ast: nodes.Template) -> tuple[str, LinkSlots] | None:
    """The template source with its links marked, and the slots; None when the template
    cannot be marked safely (the tracker then scans each rendered message)."""
    if "\x00" in source or _RAW.search(source) or not _eligible(ast):
        return None
    masked = _MARKUP.sub(lambda m: ("\x01" if m.group(1) else "\x02") * len(m.group(0)), source)
    if "{{" in masked or "{%" in masked or "{#" in masked or _TAG_FROM_JINJA.search(masked):
        return None  # markup this scan does not understand, or a tag name made by Jinja
    pieces: list[str] = []
    slots: dict[str, LinkSlot] = {}
    last = 0
    for match in TAG.finditer(masked):
        shape = match.group(0)
        if "\x02" in shape:
            return None  # a statement inside a tag: what it renders is not known here
        start, end = match.span()
        tag = source[start:end]
        if len(slots) >= MAX_SLOTS:
            return None
        key = slot_key(len(slots))
        if "\x01" in shape:
            if "{{-" in tag:
                return None  # whitespace control could join the tag name to a value
            marked = f"{MARK}{key}{tag}"
            slots[key] = LinkSlot(None)
        else:
            found = href_of(tag)
            if found is None or not trackable_url(found[1]):
                continue
            href, url = found
            marked = f"{tag[: href.end(1)]}{MARK}{key}{tag[href.end() :]}"
            slots[key] = LinkSlot(url, tag[href.end(1) : href.end()])
        pieces.append(source[last:start])
        pieces.append(marked)
        last = end
    if not slots:
        return None
    pieces.append(source[last:])
    ends = re.findall(r"</body>", masked, re.IGNORECASE)
    return "".join(pieces), LinkSlots(slots, all(e == "</body>" for e in ends))
