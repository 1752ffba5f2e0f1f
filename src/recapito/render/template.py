"""Campaign templates: a folder with ``template.toml`` and the body files.

``template.toml``::

    subject = "Il tuo estratto conto, {{ nome | default('cliente') }}"
    preheader = "Disponibile nell'area riservata"   # optional
    from_name = "Banca Esempio"                     # optional, may use placeholders
    html = "body.html"                              # default body.html
    mjml = "body.mjml"                              # instead of html: MJML, compiled once
    inline_css = true                               # default: true for MJML, false for HTML
    text = "body.txt"                               # optional: derived from the HTML if absent

    [blocks.promo]                                  # shows {% block promo %}…{% endblock %}
    visible_if = 'segmento = "private" and provincia in ("MI", "RM")'   # only to these

``visible_if`` uses the contact filter language (see ``recapito.render.blocks``).

Templates are user content: they run in Jinja2's ``SandboxedEnvironment`` with HTML
autoescaping and strict undefined variables. ``default`` treats empty values as missing,
so ``{{ nome | default('cliente') }}`` covers both absent columns and empty cells.

Everything costly happens once per template load (so once per campaign chunk task): MJML
compilation and CSS inlining (``recapito.render.layout``), Jinja parsing and compilation,
the text template derived from the HTML, and the rewriting of the HTML so its rendered
output can go as 7bit with no per-message encoding (``layout.wire_ready_html``).
"""

from __future__ import annotations

import hashlib
import re
import threading
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup, escape

from recapito.errors import TemplateError
from recapito.render.blocks import BlockCondition, apply_blocks, parse_blocks
from recapito.render.layout import inline_css, mjml_to_html, wire_ready_html
from recapito.render.links import LinkSlots, mark_links
from recapito.render.mime import AddressError, alternative_message, mailbox, unstructured
from recapito.render.text import html_template_to_text_template, html_to_text

_HEADS_SEPARATOR = "\x1e"  # ASCII record separator: never in template text
_BLANK_RUNS = re.compile(r"\n\s*\n(\s*\n)+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def _default(value: Any, default_value: Any = "", boolean: bool = True) -> Any:
    if isinstance(value, jinja2.Undefined) or (boolean and value in (None, "")):
        return default_value
    return value


def header_safe(value: str) -> str:
    """Collapse CR, LF and other control characters: a placeholder can never add a header."""
    return _CONTROL.sub(" ", value).strip()


def _ascii_markup(value: Any) -> Any:
    """HTML output of a placeholder with non-ASCII characters as character references
    (``Zoë`` → ``Zo&#235;``), so the HTML part stays 7bit; a NUL (never allowed in a
    message) becomes U+FFFD, so a NUL in the output can only come from the template
    (``recapito.render.links`` marks links with one)."""
    if isinstance(value, str) and value.isascii() and "\x00" not in value:
        return value
    if isinstance(value, jinja2.Undefined):
        return value
    escaped = escape(value)
    if "\x00" in escaped:
        escaped = Markup(str(escaped).replace("\x00", "&#65533;"))
    if escaped.isascii():
        return escaped
    return Markup(escaped.encode("ascii", "xmlcharrefreplace").decode("ascii"))


def _environment(autoescape: bool) -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        keep_trailing_newline=True,
        finalize=_ascii_markup if autoescape else None,
    )
    env.filters["default"] = _default
    env.filters["d"] = _default
    return env


def _guarded(ast: nodes.Template) -> set[int]:
    """ids of Name nodes used through ``default`` or tested with ``is defined``."""
    guarded: set[int] = set()
    for flt in ast.find_all(nodes.Filter):
        if flt.name in ("default", "d") and isinstance(flt.node, nodes.Name):
            guarded.add(id(flt.node))
    for test in ast.find_all(nodes.Test):
        if test.name in ("defined", "undefined") and isinstance(test.node, nodes.Name):
            guarded.add(id(test.node))
    return guarded


def _required_names(env: SandboxedEnvironment, source: str) -> set[str]:
    """Free variables the template uses at least once without a default."""
    from jinja2 import meta

    ast = env.parse(source)
    free = meta.find_undeclared_variables(ast)
    guarded = _guarded(ast)
    return {
        n.name
        for n in ast.find_all(nodes.Name)
        if n.ctx == "load" and n.name in free and id(n) not in guarded
    }


@dataclass(frozen=True)
class RenderedMessage:
    message_id: str
    subject: str
    data: bytes  # the whole message, CRLF line endings, ready for DATA
    # the SMTP envelope sender (MAIL FROM), e.g. a signed VERP address; None: the
    # delivery's configured sender
    envelope_from: str | None = None


@dataclass
class CompiledTemplate:
    name: str
    path: Path
    digest: str  # SHA-256 over every source file: identifies the template in the ledger
    subject: jinja2.Template
    preheader: jinja2.Template | None
    from_name: jinja2.Template | None
    html: jinja2.Template
    text: jinja2.Template | None
    variables: frozenset[str]  # variables the template needs (without defaults)
    blocks: tuple[BlockCondition, ...] = ()  # [blocks.NAME] visible_if conditions
    html_source: str = ""  # the HTML template as compiled (after MJML and inlining)
    meta: Mapping[str, Any] | None = None  # template.toml
    # subject, preheader and From name in one template (one render instead of three)
    heads: jinja2.Template | None = None
    # the HTML with its links marked for tracking (``recapito.render.links``), and the
    # links; None when the template cannot be marked (the tracker then scans each message)
    html_marked: jinja2.Template | None = None
    link_slots: LinkSlots | None = None

    def _short_parts(self, values: Mapping[str, Any]) -> tuple[str, str, str]:
        """(subject, preheader, From name), header values already made safe."""
        if self.heads is not None:
            parts = self.heads.render(values).split(_HEADS_SEPARATOR)
            if len(parts) == 3:  # else a value held the separator: render them one by one
                return header_safe(parts[0]), parts[1], header_safe(parts[2])
        subject = header_safe(self.subject.render(values))
        preheader = self.preheader.render(values) if self.preheader else ""
        from_name = header_safe(self.from_name.render(values)) if self.from_name else ""
        return subject, preheader, from_name

    def check_blocks(self, columns: Iterable[str]) -> None:
        """Every ``visible_if`` condition compiles against these contact columns."""
        names = list(columns)
        for block in self.blocks:
            block.check(names, self.name)

    def check_variables(self, available: Iterable[str]) -> None:
        """Fail before sending anything when the template needs a column the data lacks."""
        missing = sorted(self.variables - set(available) - _BUILTINS)
        if missing:
            names = ", ".join(repr(m) for m in missing)
            raise TemplateError(
                f"template {self.name!r}: undefined placeholder {names}: not a contact column "
                "(add the column, or give a default: {{ name | default('…') }})"
            )

    def render(
        self,
        context: Mapping[str, Any],
        *,
        sender: str,
        recipient: str,
        message_id: str,
        headers: Mapping[str, str] | None = None,
        transform: Callable[[str, str], tuple[str, str]] | None = None,
    ) -> RenderedMessage:
        """``transform(html, text) -> (html, text)`` runs on the rendered bodies before the
        MIME is written (link tracking and the open pixel, recapito.tracking). A transform
        with a ``marked(html, text, slots)`` method gets the output of the marked HTML
        template and the link slots instead, when the template has them."""
        values = {k: ("" if v is None else v) for k, v in context.items()}
        for block in self.blocks:
            values[block.flag] = block.evaluate(context, self.name)
        marked = None
        if transform is not None and self.html_marked is not None and self.text is not None:
            marked = getattr(transform, "marked", None)
        try:
            subject, preheader, from_name = self._short_parts(values)
            html_template = self.html if marked is None else self.html_marked
            assert html_template is not None
            html = html_template.render({**values, "preheader": preheader})
            if self.text is not None:
                text = _BLANK_RUNS.sub("\n\n", self.text.render({**values, "preheader": preheader}))
            else:
                text = html_to_text(html)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {self.name!r}: {exc}") from exc
        if marked is not None:
            html, text = marked(html, text, self.link_slots)
        elif transform is not None:
            html, text = transform(html, text)
        sender_domain = sender.rpartition("@")[2]
        try:
            from_line = mailbox("From", from_name, sender)
            to_line = mailbox("To", "", recipient)
        except AddressError as exc:
            raise TemplateError(f"template {self.name!r}: {exc}") from None
        lines = [
            from_line,
            to_line,
            unstructured("Subject", subject),
            f"Date: {formatdate(localtime=False, usegmt=True)}",
            f"Message-ID: {header_safe(message_id)}",
        ]
        lines.extend(
            unstructured(key, header_safe(value)) for key, value in (headers or {}).items()
        )
        data = alternative_message(lines, text, html, seed=f"{message_id}{sender_domain}")
        return RenderedMessage(message_id=message_id, subject=subject, data=data)


_BUILTINS = frozenset(
    {"preheader", "campaign", "unsubscribe_url", "range", "loop", "dict", "lipsum", "cycler"}
)


_LOADED: dict[tuple[str, bytes], CompiledTemplate] = {}
_LOADED_LOCK = threading.Lock()


def _source_key(path: str | Path) -> tuple[str, bytes] | None:
    """The folder and a hash of every file in it (a template is a few small files); None
    when it cannot be read (``_compile_template`` then reports why)."""
    root = Path(path)
    folder = root if root.is_dir() else root.parent
    digest = hashlib.sha256(str(root).encode())
    try:
        for item in sorted(folder.iterdir()):
            if item.is_file() and item.stat().st_size <= 4 * 1024 * 1024:
                digest.update(item.name.encode() + b"\0" + item.read_bytes() + b"\0")
    except OSError:
        return None
    return str(folder.resolve()), digest.digest()


def load_template(path: str | Path) -> CompiledTemplate:
    """Read and compile a template folder (or its ``template.toml``).

    Compiled once per process: a campaign's chunk tasks load the same folder again and
    again, and get the compiled template back as long as no file in it changed (MJML
    compilation and CSS inlining take milliseconds, rendering a message well under one).
    """
    key = _source_key(path)
    if key is None:
        return _compile_template(path)
    with _LOADED_LOCK:
        cached = _LOADED.get(key)
    if cached is not None:
        return cached
    compiled = _compile_template(path)
    with _LOADED_LOCK:
        if len(_LOADED) >= 64:
            _LOADED.clear()
        _LOADED[key] = compiled
    return compiled


def _compile_template(path: str | Path) -> CompiledTemplate:
    root = Path(path)
    if root.exists() and not root.is_dir() and root.suffix != ".toml":
        raise TemplateError(
            f"template {str(path)!r}: not a template folder (give the folder holding template.toml)"
        )
    meta_path = root / "template.toml" if root.is_dir() else root
    root = meta_path.parent
    name = root.name
    try:
        meta = tomllib.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemplateError(f"template {str(path)!r}: no template.toml found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TemplateError(f"template {str(meta_path)!r}: unreadable ({exc})") from exc
    if not isinstance(meta.get("subject"), str) or not meta["subject"].strip():
        raise TemplateError(f"template {name!r}: template.toml needs a non-empty 'subject'")

    def read(key: str, default: str | None) -> str | None:
        file_name = meta.get(key, default)
        if file_name is None:
            return None
        file_path = root / str(file_name)
        try:
            return file_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"template {name!r}: cannot read {file_path} ({exc})") from exc

    if "mjml" in meta and "html" in meta:
        raise TemplateError(f"template {name!r}: template.toml names both 'html' and 'mjml'")
    inline = meta.get("inline_css", "mjml" in meta)
    if not isinstance(inline, bool):
        raise TemplateError(f"template {name!r}: 'inline_css' must be true or false")
    blocks = parse_blocks(meta, name)
    body_src = read("mjml", None) if "mjml" in meta else read("html", "body.html")
    assert body_src is not None
    if "mjml" in meta:
        html_src = mjml_to_html(body_src, name)
    else:
        html_src = inline_css(body_src, name) if inline else body_src
    text_src = read("text", None)
    plain_env = _environment(autoescape=False)
    html_env = _environment(autoescape=True)
    sources = {
        "subject": (plain_env, str(meta["subject"])),
        "preheader": (plain_env, meta.get("preheader")),
        "from_name": (plain_env, meta.get("from_name")),
        "html": (html_env, html_src),
        "text": (plain_env, text_src),
    }
    found: set[str] = set()

    def compile_source(env: SandboxedEnvironment, src: str) -> jinja2.Template:
        ast = env.parse(src)
        found.update(apply_blocks(ast, blocks))
        ast.set_environment(env)
        return env.from_string(ast)

    compiled: dict[str, jinja2.Template | None] = {}
    required: set[str] = set()
    digest = hashlib.sha256()
    for key, (env, src) in sources.items():
        if src is None:
            compiled[key] = None
            continue
        if not isinstance(src, str):
            raise TemplateError(f"template {name!r}: {key!r} must be a string")
        digest.update(key.encode() + b"\0" + src.encode() + b"\0")
        try:
            required |= _required_names(env, src)
            compiled[key] = compile_source(env, wire_ready_html(src) if key == "html" else src)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"template {name!r}: syntax error in {key} line {exc.lineno}: {exc.message}"
            ) from exc
    if compiled["text"] is None:
        # no text part given: derive one from the HTML template, once; if the derived
        # source does not compile (a '<' inside a Jinja expression), convert per message
        try:
            compiled["text"] = compile_source(plain_env, html_template_to_text_template(html_src))
        except jinja2.TemplateSyntaxError:
            compiled["text"] = None
    html_marked: jinja2.Template | None = None
    link_slots: LinkSlots | None = None
    wired = wire_ready_html(html_src)
    marking = mark_links(wired, html_env.parse(wired))
    if marking is not None:
        try:
            html_marked = compile_source(html_env, marking[0])
            link_slots = marking[1]
        except jinja2.TemplateSyntaxError:
            pass  # cannot happen for a source that compiled unmarked; scan per message
    missing_blocks = sorted(set(blocks) - found)
    if missing_blocks:
        raise TemplateError(
            f"template {name!r}: [blocks.{missing_blocks[0]}] names no "
            f"{{% block {missing_blocks[0]} %}} in the template"
        )
    digest.update(repr(sorted((k, v.text) for k, v in blocks.items())).encode())
    html_t = compiled["html"]
    subject_t = compiled["subject"]
    assert html_t is not None and subject_t is not None
    heads_src = _HEADS_SEPARATOR.join(
        str(meta.get(key) or "") for key in ("subject", "preheader", "from_name")
    )
    try:
        heads: jinja2.Template | None = compile_source(plain_env, heads_src)
    except jinja2.TemplateSyntaxError:  # a tag spanning two fields: render them apart
        heads = None
    return CompiledTemplate(
        name=name,
        path=root,
        digest=digest.hexdigest(),
        subject=subject_t,
        preheader=compiled["preheader"],
        from_name=compiled["from_name"],
        html=html_t,
        text=compiled["text"],
        variables=frozenset(required),
        blocks=tuple(blocks.values()),
        html_source=html_src,
        meta=meta,
        heads=heads,
        html_marked=html_marked,
        link_slots=link_slots,
    )


def message_id_for(campaign: str, delivery_id: int, sender_domain: str) -> str:
    """Deterministic Message-ID: the same delivery always carries the same id."""
    tag = hashlib.sha256(f"{campaign}\0{delivery_id}".encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9-]", "-", campaign)[:40]
    return f"<{safe}.{delivery_id}.{tag}@{sender_domain}>"


__all__ = [
    "CompiledTemplate",
    "RenderedMessage",
    "header_safe",
    "load_template",
    "message_id_for",
]
