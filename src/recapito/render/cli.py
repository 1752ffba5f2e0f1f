"""``recapito template``: ``preview`` writes one contact's message, ``lint`` checks a
template. Bad input ends with a one-line message naming the template, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from recapito.errors import InputError, RecapitoError


def _audience(contacts: str, mapping: str | None) -> Any:
    """The contacts as a campaign would see them (mapped, addresses normalised)."""
    from recapito.contacts.sources import ContactSource, load
    from recapito.contacts.targeting import target

    return target(load(ContactSource.parse(contacts)), mapping, None, None).audience


@click.group("template")
def template() -> None:
    """Preview and check campaign templates."""


@template.command("preview")
@click.argument("template_dir", metavar="TEMPLATE", type=click.Path())
@click.option("--contacts", default=None, help="CSV/Parquet file holding the contact.")
@click.option("--contact", "contact_id", default=None, help="Contact id (default: the first).")
@click.option("--mapping", default=None, help="e.g. email=mail,id=codice_cliente")
@click.option("--sender", default="comunicazioni@banca-esempio.test", show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where to write TEMPLATE-CONTACT.eml and .html.",
)
def preview(
    template_dir: str,
    contacts: str | None,
    contact_id: str | None,
    mapping: str | None,
    sender: str,
    out: Path,
) -> None:
    """Render TEMPLATE for one contact: the .eml as it would be sent, and its HTML."""
    from recapito.render.lint import SAMPLE_BUILTINS, message_parts
    from recapito.render.template import load_template, message_id_for

    try:
        tpl = load_template(template_dir)
        if contacts is not None:
            audience = _audience(contacts, mapping)
            if contact_id is not None:
                import polars as pl

                audience = audience.filter(pl.col("contact_id") == contact_id)
            if audience.height == 0:
                what = f"contact {contact_id!r}" if contact_id else "any valid contact"
                raise InputError(f"{contacts}: no {what} (ids are in the contact_id column)")
            row = {k: v for k, v in audience.row(0, named=True).items() if not k.startswith("_")}
        elif contact_id is not None:
            raise InputError("--contact needs --contacts FILE")
        else:
            row = {"contact_id": "sample", "email": "cliente@example.test"}
            row.update({name: f"[{name}]" for name in tpl.variables if name not in row})
        tpl.check_variables(row)
        who = str(row.get("contact_id") or "contact")
        message = tpl.render(
            {**row, **SAMPLE_BUILTINS, "campaign": "preview"},
            sender=sender,
            recipient=str(row.get("email") or "cliente@example.test"),
            message_id=message_id_for("preview", 0, sender.rpartition("@")[2]),
        )
        _, html, _ = message_parts(message.data)
        out.mkdir(parents=True, exist_ok=True)
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{tpl.name}-{who}")
        eml_path, html_path = out / f"{stem}.eml", out / f"{stem}.html"
        eml_path.write_bytes(message.data)
        html_path.write_text(html, encoding="utf-8")
    except RecapitoError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or out}: {exc.strerror or exc}") from None
    click.echo(f"subject: {message.subject}")
    click.echo(f"wrote {eml_path} ({len(message.data)} bytes)")
    click.echo(f"wrote {html_path}")


@template.command("lint")
@click.argument("template_dir", metavar="TEMPLATE", type=click.Path())
@click.option("--contacts", default=None, help="Check placeholders against this CSV/Parquet.")
@click.option("--mapping", default=None, help="e.g. email=mail,id=codice_cliente")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def lint(template_dir: str, contacts: str | None, mapping: str | None, as_json: bool) -> None:
    """Check TEMPLATE: errors (exit status 1) stop a campaign, warnings do not."""
    import json

    from recapito.render.lint import lint_lines, lint_template

    try:
        audience = _audience(contacts, mapping) if contacts is not None else None
    except RecapitoError as exc:
        raise click.ClickException(str(exc)) from None
    report = lint_template(template_dir, audience)
    if as_json:
        findings = [{"level": f.level, "message": f.message} for f in report.findings]
        click.echo(json.dumps({"template": report.template, "findings": findings}, indent=2))
    else:
        for line in lint_lines(report):
            click.echo(line)
    if report.errors:
        raise SystemExit(1)
