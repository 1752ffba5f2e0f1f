"""``recapito fallback``: paper letters and the data-cleaning export of a campaign.

``recapito fallback letters --campaign NAME [--batch] [--out DIR] [--product P]`` renders
the campaign's letters (``recapito.fallback.letters``) to PDF with their manifest;
``recapito fallback export --campaign NAME [--out DIR]`` writes the contact centre's
export of the campaign and merges it into the rolling one (``recapito.fallback.exports``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from recapito.fallback.paper import PRODUCTS


@click.group()
def fallback() -> None:
    """Fallback channels: paper letters and data-cleaning exports."""


@fallback.command("letters")
@click.option("--campaign", required=True, help="Campaign name.")
@click.option("--batch", is_flag=True, help="One PDF for every letter, indexed by the manifest.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [default: the campaign's folder /letters].",
)
@click.option("--product", type=click.Choice(sorted(PRODUCTS)), default="posta4", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def letters_cmd(campaign: str, batch: bool, out: Path | None, product: str, as_json: bool) -> None:
    """Render the campaign's paper letters (A4 PDF) and their CSV/JSON manifest."""
    from recapito.config import Settings
    from recapito.fallback.letters import campaign_letters, letters_dir
    from recapito.fallback.paper import render_letters
    from recapito.ledger import Ledger

    settings = Settings.load()
    ledger = Ledger(settings.db_url)
    try:
        letters, source = campaign_letters(ledger, settings, campaign, product=product)
    finally:
        ledger.close()
    folder = out or letters_dir(settings, campaign)
    manifest = render_letters(letters, folder, batch=batch)
    result = {
        "campaign": campaign,
        "selected_by": source,
        "letters": len(manifest.letters),
        "pages": manifest.pages,
        "rejected": len(manifest.rejected),
        "out": str(manifest.out_dir),
        "files": [p.name for p in manifest.files],
        "manifest": [str(manifest.csv_path), str(manifest.json_path)],
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"{campaign}: {result['letters']} letters ({result['pages']} pages), "
        f"{result['rejected']} rejected, chosen by {source}, in {manifest.out_dir}"
    )
    for r in manifest.rejected:
        click.echo(f"  rejected {r.letter_id}: {'; '.join(r.errors)}")
    click.echo(f"  manifest: {manifest.csv_path.name}, {manifest.json_path.name}")


@fallback.command("export")
@click.option("--campaign", required=True, help="Campaign name.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [default: $RECAPITO_HOME/exports/cleaning].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_cmd(campaign: str, out: Path | None, as_json: bool) -> None:
    """Write the contact centre's data-cleaning export (CSV and Parquet, mode 0600)."""
    from recapito.config import Settings
    from recapito.errors import InputError
    from recapito.fallback.exports import write_cleaning_export
    from recapito.ledger import Ledger

    settings = Settings.load()
    folder = out or settings.home / "exports" / "cleaning"
    ledger = Ledger(settings.db_url)
    try:
        camp = ledger.get_campaign(campaign)
        if camp is None:
            raise InputError(f"no campaign named {campaign!r}")
        result = write_cleaning_export(ledger, camp.id, folder, settings=settings)
    finally:
        ledger.close()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "campaign": campaign,
                    "rows": result.rows,
                    "rolling_rows": result.rolling_rows,
                    "files": [str(p) for p in result.paths],
                },
                indent=2,
            )
        )
        return
    click.echo(f"{campaign}: {result.rows} rows ({result.rolling_rows} in the rolling export)")
    for path in result.paths:
        click.echo(f"  {path}")
