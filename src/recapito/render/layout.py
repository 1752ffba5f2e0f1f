"""Template layout, done once when a template is loaded: MJML to HTML, CSS inlining.

``template.toml`` may name an MJML body (``mjml = "body.mjml"``) instead of an HTML one. It
is compiled with mjml-python (MRML, the Rust port of MJML) and its CSS inlined with
css-inline, so the responsive layout survives mail clients that drop ``<style>`` (the
``<style>`` blocks are kept for those that honour media queries). A plain HTML body gets
the same inlining with ``inline_css = true``.

Both tools parse the document, and neither knows Jinja: an HTML parser moves text that
stands between table rows out of the table ("foster parenting"), and MRML may escape
attribute values. So the Jinja markup is set aside first: each statement (``{% … %}``,
``{# … #}``) becomes an HTML comment, which parsers keep where it is, even between rows,
and each expression (``{{ … }}``), or a statement inside a tag, becomes a plain word; the
originals are put back afterwards. Compiling happens once per template load, never per
message.
"""

from __future__ import annotations

import re

from recapito.errors import TemplateError

_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)


def _inside_tag(source: str, pos: int) -> bool:
    """Whether ``pos`` lies inside a tag (an attribute value), not in text."""
    return source.rfind("<", 0, pos) > source.rfind(">", 0, pos)


def protect_jinja(source: str) -> tuple[str, list[str]]:
    """Replace Jinja markup with tokens that HTML and MJML parsers leave alone.

    The first item of the returned list is the token prefix: a word that does not occur
    in the source, so nothing of the template itself is taken for a token on the way back.
    """
    prefix = "rcj"
    while prefix in source:
        prefix += "q"
    saved: list[str] = [prefix]

    def keep(match: re.Match[str]) -> str:
        saved.append(match.group(0))
        index = len(saved) - 1
        if match.group(0).startswith("{{") or _inside_tag(match.string, match.start()):
            return f"{prefix}{index}x"
        return f"<!--{prefix}{index}-->"

    return _JINJA.sub(keep, source), saved


def restore_jinja(html: str, saved: list[str], name: str) -> str:
    prefix = saved[0]
    token = re.compile(rf"<!--{prefix}(\d+)-->|{prefix}(\d+)x")
    seen: set[int] = set()

    def put_back(match: re.Match[str]) -> str:
        index = int(match.group(1) or match.group(2))
        seen.add(index)
        return saved[index]

    restored = token.sub(put_back, html)
    lost = [saved[i] for i in range(1, len(saved)) if i not in seen]
    if lost:
        raise TemplateError(
            f"template {name!r}: the layout step dropped Jinja markup {lost[0]!r} "
            "(put Jinja inside MJML elements, or in <mj-raw>)"
        )
    return restored


def inline_css(html: str, name: str) -> str:
    """Inline ``<style>`` rules into ``style`` attributes (the ``<style>`` blocks stay,
    for clients that honour media queries). Remote stylesheets are never fetched."""
    import css_inline

    protected, saved = protect_jinja(html)
    try:
        inliner = css_inline.CSSInliner(
            keep_style_tags=True, keep_link_tags=True, load_remote_stylesheets=False
        )
        inlined = inliner.inline(protected)
    except (ValueError, css_inline.InlineError) as exc:
        raise TemplateError(f"template {name!r}: CSS inlining failed: {exc}") from None
    return restore_jinja(inlined, saved, name)


def mjml_to_html(source: str, name: str) -> str:
    """Compile an MJML template (Jinja markup included) to HTML with inlined CSS."""
    import mjml

    protected, saved = protect_jinja(source)
    try:
        html = mjml.mjml2html(protected)
    except Exception as exc:  # MRML raises its own error types, all with a message
        detail = str(exc).strip().splitlines()
        raise TemplateError(
            f"template {name!r}: MJML does not compile: {detail[0] if detail else exc!r}"
        ) from None
    return inline_css(restore_jinja(html, saved, name), name)


_RAW_TEXT = re.compile(r"<(style|script)\b.*?</\1\s*>", re.I | re.S)
_TAG_START = re.compile(r"(<[A-Za-z][A-Za-z0-9-]*)\s+")
_WIRE_LINE = 900  # 7bit allows 998 octets a line; leave room for what placeholders add


def wire_ready_html(source: str) -> str:
    """The HTML template rewritten, once, so that its rendered output can usually travel
    as 7bit, with no transfer encoding to compute per message.

    Non-ASCII characters outside ``<style>``/``<script>`` and Jinja markup become numeric
    character references (``è`` → ``&#232;``, the same text to any HTML reader; the
    placeholders' values get the same treatment from the environment's ``finalize``), and
    lines longer than 900 characters (MJML writes whole tables on one line) are broken
    at the whitespace between a tag's name and its first attribute, where a newline means
    exactly what a space did. A body that still has non-ASCII bytes or long lines after
    rendering simply goes quoted-printable.
    """
    protected, saved = protect_jinja(source)
    pieces: list[str] = []
    last = 0
    for match in _RAW_TEXT.finditer(protected):
        pieces.append(_ascii(protected[last : match.start()]))
        pieces.append(match.group(0))
        last = match.end()
    pieces.append(_ascii(protected[last:]))
    lines = "".join(pieces).split("\n")
    out = [line if len(line) <= _WIRE_LINE else _TAG_START.sub("\\1\n", line) for line in lines]
    return restore_jinja("\n".join(out), saved, "")


def _ascii(text: str) -> str:
    return text if text.isascii() else text.encode("ascii", "xmlcharrefreplace").decode("ascii")
