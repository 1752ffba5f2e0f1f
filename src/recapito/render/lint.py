"""``recapito template lint``: what would go wrong with a template, before it is sent.

Errors stop a campaign (``campaign run`` lints before planning anything); warnings are
printed and the campaign goes on. Each finding is one line naming the template.

Errors
    the template does not load (TOML, Jinja syntax, MJML, a ``[blocks]`` entry);
    a placeholder without default that is not a contact column (with ``--contacts``);
    a ``visible_if`` naming an unknown column (with ``--contacts``);
    a sample contact whose message does not render;
    the rendered HTML over 102 KB (Gmail clips it: the footer and the unsubscribe link
    end up behind "View entire message");
    an empty subject; a ``javascript:`` or ``data:`` link.
Warnings
    HTML over 90 KB; images without ``alt``; links or images over plain ``http://``;
    no unsubscribe link in the body; no preheader, or a preheader the HTML never shows;
    a subject over 100 characters.

The rendered checks use the first contacts of ``--contacts`` (or, without it, made-up
values for the placeholders), so placeholders inside links are checked too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl

from recapito.errors import RecapitoError, TemplateError
from recapito.render.template import CompiledTemplate, load_template, message_id_for

GMAIL_CLIP_BYTES = 102 * 1024
SIZE_WARNING_BYTES = 90 * 1024
SUBJECT_WARNING_CHARS = 100
SAMPLE_CONTACTS = 5
# values the campaign supplies per delivery, stood in for when linting and previewing
SAMPLE_BUILTINS = {"unsubscribe_url": "https://example.invalid/u/0"}

_IMG = re.compile(r"<img\b[^>]*>", re.I)
_ALT = re.compile(r"\salt\s*=", re.I)
_SRC = re.compile(r"""\ssrc\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.I)
_LINK = re.compile(r"<(?:a|area)\b[^>]*>", re.I)
_HREF = re.compile(r"""\shref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.I)
_UNSUBSCRIBE = re.compile(
    r"unsubscribe|disiscri|cancella(?:zione|ti|re)?\b|annulla(?:re)? (?:l')?iscrizione|opt-?out"
    r"|newsletter/?off|preferenze",
    re.I,
)
_PREHEADER_USE = re.compile(r"\{\{-?\s*preheader\b")
_ANCHOR_TEXT = re.compile(r"<a\b[^>]*>(.*?)</a\s*>", re.I | re.S)


@dataclass(frozen=True)
class Finding:
    level: Literal["error", "warning"]
    message: str

    def line(self, template: str) -> str:
        return f"template {template!r}: {self.level}: {self.message}"


@dataclass
class LintReport:
    template: str
    findings: list[Finding]
    compiled: CompiledTemplate | None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def lines(self) -> list[str]:
        return [f.line(self.template) for f in self.findings]

    def raise_on_errors(self) -> None:
        """A ``TemplateError`` naming the first error (and how many more) when any."""
        errors = self.errors
        if not errors:
            return
        more = (
            f" (and {len(errors) - 1} more: run recapito template lint)" if len(errors) > 1 else ""
        )
        raise TemplateError(errors[0].line(self.template) + more)


def _attr(pattern: re.Pattern[str], tag: str) -> str | None:
    match = pattern.search(tag)
    if match is None:
        return None
    return next((g for g in match.groups() if g is not None), "")


def _without_template_prefix(message: str, name: str) -> str:
    prefix = f"template {name!r}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _made_up_context(template: CompiledTemplate) -> dict[str, Any]:
    return {name: f"[{name}]" for name in template.variables}


def lint_template(
    template: CompiledTemplate | str | Path,
    contacts: pl.DataFrame | None = None,
    *,
    sender: str = "comunicazioni@example.test",
    campaign: str = "lint",
) -> LintReport:
    """Lint a template (a folder, or one already loaded), against ``contacts`` if given."""
    if not isinstance(template, CompiledTemplate):
        name = Path(template).name if Path(template).name != "template.toml" else ""
        name = name or Path(template).parent.name
        try:
            template = load_template(template)
        except RecapitoError as exc:
            text = _without_template_prefix(str(exc), name)
            return LintReport(name, [Finding("error", text)], None)
    findings: list[Finding] = []
    name = template.name

    def error(message: str) -> None:
        findings.append(Finding("error", message))

    def warn(message: str) -> None:
        findings.append(Finding("warning", message))

    samples: Sequence[Mapping[str, Any]]
    if contacts is not None:
        for check in (template.check_variables, template.check_blocks):
            try:
                check(contacts.columns)
            except TemplateError as exc:
                error(_without_template_prefix(str(exc), name))
        drop = [c for c in contacts.columns if c.startswith("_")]
        samples = contacts.drop(drop).head(SAMPLE_CONTACTS).to_dicts()
    else:
        samples = [_made_up_context(template)]
    if findings:
        return LintReport(name, findings, template)

    rendered: list[tuple[str, str]] = []  # (subject, html)
    for i, sample in enumerate(samples):
        context = {**sample, **SAMPLE_BUILTINS, "campaign": campaign}
        try:
            message = template.render(
                context,
                sender=sender,
                # a made-up sample's "[email]" is no address: only real contacts' are used
                recipient=str(
                    (sample.get("email") if contacts is not None else None) or "lint@example.test"
                ),
                message_id=message_id_for(campaign, i, sender.rpartition("@")[2]),
            )
        except RecapitoError as exc:
            who = f"contact {sample.get('contact_id')!r}" if contacts is not None else "sample"
            error(f"{who} does not render: {_without_template_prefix(str(exc), name)}")
            break
        subject, html, _ = message_parts(message.data)
        rendered.append((subject, html))
    if not rendered:
        return LintReport(name, findings, template)

    size = max(len(html.encode("utf-8")) for _, html in rendered)
    if size > GMAIL_CLIP_BYTES:
        error(
            f"HTML is {size / 1024:.0f} KB: Gmail clips messages over 102 KB, hiding the end "
            "of the message and its unsubscribe link"
        )
    elif size > SIZE_WARNING_BYTES:
        warn(f"HTML is {size / 1024:.0f} KB, close to Gmail's 102 KB clipping limit")
    subject = rendered[0][0]
    if not subject.strip():
        error("the subject renders empty")
    elif len(subject) > SUBJECT_WARNING_CHARS:
        warn(f"subject is {len(subject)} characters: mail clients show about 60")

    findings.extend(_html_findings(rendered[0][1], template))
    return LintReport(name, findings, template)


def message_parts(data: bytes) -> tuple[str, str, str]:
    """``(subject, html, text)`` of a rendered message, read back with the standard
    parser (the way a mail client would see them)."""
    import email
    from email import policy
    from email.message import EmailMessage

    message = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    html = message.get_body(("html",))
    text = message.get_body(("plain",))
    return (
        str(message["Subject"] or ""),
        html.get_content() if isinstance(html, EmailMessage) else "",
        text.get_content() if isinstance(text, EmailMessage) else "",
    )


def _html_findings(html: str, template: CompiledTemplate) -> Iterable[Finding]:
    no_alt = [tag for tag in _IMG.findall(html) if not _ALT.search(tag)]
    if no_alt:
        src = _attr(_SRC, no_alt[0]) or "?"
        yield Finding(
            "warning",
            f"{len(no_alt)} image(s) without alt text (first: {src[:80]}): screen readers and "
            "clients that block images show nothing",
        )
    plain_http: list[str] = []
    for tag in _LINK.findall(html):
        href = (_attr(_HREF, tag) or "").strip()
        scheme = href.split(":", 1)[0].lower() if ":" in href else ""
        if scheme in ("javascript", "data", "vbscript"):
            yield Finding("error", f"link with a {scheme}: URL ({href[:60]})")
        elif scheme == "http":
            plain_http.append(href)
    for tag in _IMG.findall(html):
        src = (_attr(_SRC, tag) or "").strip()
        if src.lower().startswith("http:"):
            plain_http.append(src)
    if plain_http:
        yield Finding(
            "warning",
            f"{len(plain_http)} link(s) or image(s) without https (first: {plain_http[0][:80]})",
        )
    if not _has_unsubscribe(html, template):
        yield Finding(
            "warning",
            "no unsubscribe link in the body (only the List-Unsubscribe header): "
            'add <a href="{{ unsubscribe_url }}">…</a>',
        )
    meta = template.meta or {}
    if not meta.get("preheader"):
        yield Finding("warning", "no preheader: inbox previews will show the first text found")
    elif not _PREHEADER_USE.search(template.html_source):
        yield Finding("warning", "a preheader is set but the HTML never shows {{ preheader }}")


def _has_unsubscribe(html: str, template: CompiledTemplate) -> bool:
    if "unsubscribe_url" in template.html_source:
        return True
    for tag in _LINK.findall(html):
        if _UNSUBSCRIBE.search(_attr(_HREF, tag) or ""):
            return True
    return any(_UNSUBSCRIBE.search(text) for text in _ANCHOR_TEXT.findall(html))


def lint_lines(report: LintReport) -> Sequence[str]:
    if not report.findings:
        return [f"template {report.template!r}: ok"]
    return report.lines()


def lint_before_sending(
    template: CompiledTemplate,
    audience: pl.DataFrame,
    *,
    sender: str,
    campaign: str,
    log_warnings: bool = False,
) -> None:
    """What a campaign runs before planning: errors stop it (one line, ``TemplateError``),
    warnings go to the log."""
    report = lint_template(template, audience, sender=sender, campaign=campaign)
    if log_warnings:
        import logging

        log = logging.getLogger("recapito.template")
        for finding in report.warnings:
            log.warning(finding.line(report.template))
    report.raise_on_errors()
