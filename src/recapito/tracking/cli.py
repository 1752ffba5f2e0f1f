"""``recapito tracking serve``: the open/click/unsubscribe service."""

from __future__ import annotations

import click

from recapito.tracking.classify import DEFAULT_SCANNER_WINDOW


@click.group()
def tracking() -> None:
    """Open and click tracking, one-click unsubscribe."""


@tracking.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8800, show_default=True, type=int, help="TCP port.")
@click.option(
    "--scanner-window",
    default=DEFAULT_SCANNER_WINDOW,
    show_default=True,
    type=float,
    help="Seconds after delivery within which a click is a scanner's, an open a machine's.",
)
@click.option(
    "--forwarded-allow-ips",
    default="127.0.0.1",
    show_default=True,
    help="Reverse proxies whose X-Forwarded-For is trusted (comma-separated, or '*').",
)
def serve(host: str, port: int, scanner_window: float, forwarded_allow_ips: str) -> None:
    """Serve /o (open pixel), /c (click redirect), /u (unsubscribe) and, with a Twilio auth
    token configured, /twilio/status and /twilio/inbound (signed webhooks) until Ctrl-C."""
    import uvicorn

    from recapito.config import Settings
    from recapito.fallback.run import twilio_hook
    from recapito.ledger import Ledger
    from recapito.tracking.service import TrackingApp, uvicorn_config
    from recapito.tracking.store import TrackingStore
    from recapito.tracking.tokens import TokenSigner, tracking_keyring

    settings = Settings.load()
    signer = TokenSigner(tracking_keyring(settings))
    ledger = Ledger(settings.db_url)
    app = TrackingApp(
        TrackingStore(ledger),
        signer,
        scanner_window=scanner_window,
        twilio=twilio_hook(ledger, settings.tracking_url),
    )
    click.echo(
        f"tracking service on http://{host}:{port} (keys {', '.join(signer.keyring.key_ids)}; "
        f"messages point at {settings.tracking_url or 'nothing: set RECAPITO_TRACKING_URL'})",
        err=True,
    )
    try:
        uvicorn.Server(uvicorn_config(app, host, port, forwarded_allow_ips)).run()
    finally:
        ledger.close()
