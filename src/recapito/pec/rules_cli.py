"""``recapito rules explain --campaign C --contact ID [--json]``: which rule chose a contact's
channel and PEC mailbox, and what every rule of the campaign made of the contact."""

from __future__ import annotations

import json

import click


@click.group("rules")
def rules() -> None:
    """Channel rules (pec / email) and PEC mailbox rules."""


@rules.command("explain")
@click.option("--campaign", "campaign", required=True, help="Campaign name.")
@click.option("--contact", "contact", required=True, help="Contact id (contact_id).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def explain_cmd(campaign: str, contact: str, as_json: bool) -> None:
    """Print the rule that fired for the contact (stored in the ledger) and the trace."""
    from recapito.config import Settings
    from recapito.pec.campaign import explain

    result = explain(Settings.load(), campaign, contact)
    if as_json:
        click.echo(json.dumps(result.as_dict(), default=str, sort_keys=True))
    else:
        click.echo(result.text())
