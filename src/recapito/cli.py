"""The ``recapito`` command line.

Errors the user can fix (bad input, bad settings, unknown campaign, a database or a
Prefect server that cannot be reached, a state directory that cannot be written) print
one line and exit with status 1; they never show a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from recapito.bounces.cli import bounce
from recapito.contacts.cli import contacts, demo_data
from recapito.errors import RecapitoError
from recapito.fallback.cli import fallback
from recapito.pec.cli import pec
from recapito.pec.rules_cli import rules
from recapito.render.cli import template as template_group
from recapito.sandbox.cli import sandbox
from recapito.tracking.cli import tracking


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        import sqlalchemy.exc

        try:
            return super().invoke(ctx)
        except RecapitoError as exc:
            raise click.ClickException(str(exc)) from None
        except BrokenPipeError:
            # the reader went away (`… | head`): nothing more to say, and no error to print
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise SystemExit(0) from None
        except sqlalchemy.exc.OperationalError as exc:
            raise click.ClickException(
                f"ledger database unreachable ({_first_line(exc.orig or exc)}): "
                "check RECAPITO_DB_URL"
            ) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or _first_line(exc)}") from None
        except RuntimeError as exc:
            if "Failed to reach API" in str(exc):
                raise click.ClickException(
                    f"{_first_line(exc)}: check PREFECT_API_URL, or unset it to use a "
                    "temporary local Prefect server"
                ) from None
            raise


@click.group(cls=_Group)
@click.version_option(package_name="recapito")
def main() -> None:
    """Secure, provable campaign delivery."""


@main.group(cls=_Group)
def campaign() -> None:
    """Run campaigns and read their figures."""


# CampaignParams fields whose command-line option has another name
_OPTION_OF_FIELD = {
    "retry_after_seconds": "retry-after",
    "retry_within_run_seconds": "retry-within-run",
    "filter": "filter",
    "tls_policy_by_class": "tls-policy-for",
    "rate_per_minute": "rate",
    "rate_per_hour": "rate",
    "wave_interval_minutes": "wave-interval",
    "domain_limits": "domain-limit",
    "mx_limits": "mx-limit",
}


def _pairs(option: str, pairs: tuple[str, ...], what: str) -> dict[str, str]:
    """``KEY=VALUE`` options (VALUE may itself hold '=') into a dict."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise click.ClickException(f"--{option} {pair!r}: expected {what}")
        out[key.strip()] = value.strip()
    return out


def _rate(text: str | None) -> tuple[float | None, float | None]:
    """``--rate 600/min`` or ``--rate 20000/h`` → (per minute, per hour)."""
    if text is None:
        return None, None
    from recapito.delivery.pacing import parse_rate
    from recapito.errors import InputError

    try:
        per_minute = parse_rate(text, "--rate")
    except InputError as exc:
        raise click.ClickException(str(exc)) from None
    if text.strip().lower().endswith(("/h", "/hour")):
        return None, per_minute * 60
    return per_minute, None


def _class_policies(pairs: tuple[str, ...]) -> dict[str, str]:
    policies: dict[str, str] = {}
    for pair in pairs:
        cls, sep, policy = pair.partition("=")
        if not sep or not cls.strip() or not policy.strip():
            raise click.ClickException(f"--tls-policy-for {pair!r}: expected CLASS=POLICY")
        policies[cls.strip()] = policy.strip()
    return policies


def _sigterm_like_ctrl_c() -> None:
    """SIGTERM (timeout, systemd, docker stop) unwinds like Ctrl-C, so the servers this
    process started (sandbox, Prefect) are stopped by the same clean-up code. Either one
    also tells the delivery runs of this process to stop: they finish the messages in
    flight and give back the rest (the chunk threads would otherwise go on sending)."""
    from recapito.delivery.engine import STOP

    def handler(signum: int, frame: object) -> None:
        if not STOP.is_set():
            STOP.set()
            sys.stderr.write("stopping: messages in flight finish, the rest is released\n")
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def prefect_environment(home: Path) -> None:
    """Offline-friendly Prefect defaults, set before Prefect is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(home / "prefect" / "storage"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@campaign.command("run")
@click.option("--name", required=True, help="Campaign name (running it again resumes it).")
@click.option("--contacts", required=True, help="CSV/Parquet file, or a database URL.")
@click.option("--template", required=True, type=click.Path(), help="Template folder.")
@click.option("--sender", default="comunicazioni@banca-esempio.test", show_default=True)
@click.option("--filter", "filter_", default=None, help='e.g. provincia in ("MI","RM")')
@click.option("--mapping", default=None, help="e.g. email=mail,phone=cellulare")
@click.option("--query", default=None, help="SQL query when --contacts is a database URL.")
@click.option("--encoding", default=None, help="CSV encoding (detected when omitted).")
@click.option("--delimiter", default=None, help="CSV delimiter (detected when omitted).")
@click.option(
    "--chunk-size",
    default=None,
    type=int,
    help="Recipients per chunk task (default: automatic, at most 1,500 chunks).",
)
@click.option("--parallel-chunks", default=4, show_default=True, type=int)
@click.option(
    "--tls-policy",
    default="opportunistic",
    show_default=True,
    help="opportunistic, or secure:L1 … secure:L4 (Secure Email).",
)
@click.option(
    "--message-class-column",
    default=None,
    help="Contact column holding each message's class (legal, marketing...).",
)
@click.option(
    "--tls-policy-for",
    "tls_policy_for",
    multiple=True,
    metavar="CLASS=POLICY",
    help="Transport policy of one message class, e.g. legal=secure:L3 (repeatable).",
)
@click.option(
    "--retry-after",
    default=300,
    show_default=True,
    type=int,
    help="Seconds before deferred mail (4xx, greylisting) is retried.",
)
@click.option(
    "--retry-within-run",
    default=0,
    show_default=True,
    type=int,
    help="Seconds this run waits to retry deferred mail itself.",
)
@click.option("--rate", default=None, help="Campaign pace, e.g. 600/min or 20000/h.")
@click.option("--wave-size", default=None, type=int, help="Waves: messages per wave.")
@click.option(
    "--wave-interval", default=None, type=float, help="Waves: minutes between wave starts."
)
@click.option(
    "--domain-limit",
    "domain_limit",
    multiple=True,
    metavar="DOMAIN=LIMIT",
    help="A provider's limit, e.g. libero.it=conn=2,rate=120/min (repeatable).",
)
@click.option(
    "--mx-limit",
    "mx_limit",
    multiple=True,
    metavar="HOST=LIMIT",
    help="Limit per MX host, e.g. .mail.protection.outlook.com=conn=5 (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def campaign_run(
    name: str,
    contacts: str,
    template: str,
    sender: str,
    filter_: str | None,
    mapping: str | None,
    query: str | None,
    encoding: str | None,
    delimiter: str | None,
    chunk_size: int | None,
    parallel_chunks: int,
    tls_policy: str,
    message_class_column: str | None,
    tls_policy_for: tuple[str, ...],
    retry_after: int,
    retry_within_run: int,
    rate: str | None,
    wave_size: int | None,
    wave_interval: float | None,
    domain_limit: tuple[str, ...],
    mx_limit: tuple[str, ...],
    as_json: bool,
) -> None:
    """Target, render and deliver a campaign (runs the Prefect flow)."""
    from pydantic import ValidationError

    from recapito.campaign import CampaignParams
    from recapito.config import Settings

    per_minute, per_hour = _rate(rate)
    try:
        params = CampaignParams(
            name=name,
            contacts=contacts,
            template=template,
            sender=sender,
            filter=filter_,
            mapping=mapping,
            query=query,
            encoding=encoding,
            delimiter=delimiter,
            chunk_size=chunk_size,
            parallel_chunks=parallel_chunks,
            tls_policy=tls_policy,
            message_class_column=message_class_column,
            tls_policy_by_class=_class_policies(tls_policy_for),
            retry_after_seconds=retry_after,
            retry_within_run_seconds=retry_within_run,
            rate_per_minute=per_minute,
            rate_per_hour=per_hour,
            wave_size=wave_size,
            wave_interval_minutes=wave_interval,
            domain_limits=_pairs("domain-limit", domain_limit, "DOMAIN=conn=N,rate=N/min"),
            mx_limits=_pairs("mx-limit", mx_limit, "HOST=conn=N,rate=N/min"),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        option = _OPTION_OF_FIELD.get(field, field.replace("_", "-"))
        message = str(first["msg"]).removeprefix("Value error, ")
        if not field:  # a rule across several options
            raise click.ClickException(message) from None
        raise click.ClickException(f"--{option}: {message}") from None
    report = run_campaign(params, Settings.load().home)
    _print_report(report, as_json)


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; for errors the user can
    fix (bad input, bad template) the one-line message says everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RecapitoError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_error_tracebacks() -> None:
    names = ["", *[n for n in logging.root.manager.loggerDict if n.startswith("prefect")]]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _UserErrorsWithoutTraceback) for f in handler.filters):
                handler.addFilter(_UserErrorsWithoutTraceback())


def run_campaign(params: Any, home: Path) -> dict[str, Any]:
    """Run the campaign flow in this process and return its report."""
    from recapito.campaign import preflight

    _sigterm_like_ctrl_c()
    preflight(params)
    prefect_environment(home)
    from flows.campaign import campaign_flow

    quiet_user_error_tracebacks()
    result: dict[str, Any] = campaign_flow(params)
    return result


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    from recapito.report import text_summary

    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(text_summary(report))
    f = report["funnel"]
    width = max(len(k) for k in f)
    for key, value in f.items():
        click.echo(f"  {key:<{width}}  {value:>9,}")
    from recapito.pec.report import pec_line

    pec = pec_line(report.get("pec"))
    if pec is not None:
        click.echo(f"  {pec}")
    if report["tls_versions"]:
        click.echo("  TLS: " + ", ".join(f"{k} {v:,}" for k, v in report["tls_versions"].items()))
    if report["levels"]:
        levels = ", ".join(f"{k} {v:,}" for k, v in sorted(report["levels"].items()))
        click.echo(f"  levels ({report['tls_policy']}): {levels}")
    for row in report["insecure_channel"]:
        click.echo(
            f"  insecure_channel: {row['domain']} {row['reason']} "
            f"(best {row['best_level']}) x{row['recipients']:,}"
        )


@campaign.command("report")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def campaign_report_cmd(name: str, as_json: bool) -> None:
    """Print a campaign's funnel, TLS mix and domains from the ledger."""
    from recapito.config import Settings
    from recapito.ledger import Ledger
    from recapito.report import campaign_report

    ledger = Ledger(Settings.load().db_url)
    try:
        _print_report(campaign_report(ledger, name), as_json)
    finally:
        ledger.close()


@campaign.command("resend")
@click.argument("name")
@click.option("--uncertain", is_flag=True, help="Deliveries whose reply was lost (uncertain).")
@click.option("--failed", is_flag=True, help="Failed deliveries (use with --reason).")
@click.option("--reason", default=None, help="Only failed deliveries with this reason.")
@click.option("--json", "as_json", is_flag=True)
def campaign_resend(
    name: str, uncertain: bool, failed: bool, reason: str | None, as_json: bool
) -> None:
    """Operator decision: put uncertain or failed deliveries back in the queue.

    An uncertain delivery may already be in the recipient's mailbox: resending it may
    deliver it twice, which is why it is never done without this command. The next run of
    the campaign sends what was put back.
    """
    import getpass

    from recapito.config import Settings
    from recapito.ledger import Ledger, State

    if uncertain == failed:
        raise click.ClickException("choose exactly one of --uncertain or --failed")
    if reason is not None and not failed:
        raise click.ClickException("--reason goes with --failed")
    ledger = Ledger(Settings.load().db_url)
    try:
        found = ledger.get_campaign(name)
        if found is None:
            raise click.ClickException(f"no campaign named {name!r} in the ledger")
        state = State.UNCERTAIN if uncertain else State.FAILED
        if reason is not None:
            # a mistyped reason would quietly put nothing back: name the ones there are
            present = ledger.count_by_state_reason(found.id, State.FAILED)
            if reason not in present:
                known = ", ".join(f"{k} ({v})" for k, v in sorted(present.items())) or "none"
                raise click.ClickException(
                    f"--reason {reason!r}: no failed delivery of {name!r} has it; "
                    f"failed reasons here: {known}"
                )
        count = ledger.requeue(found.id, state=state, reason=reason, operator=getpass.getuser())
    finally:
        ledger.close()
    if as_json:
        click.echo(json.dumps({"campaign": name, "requeued": count, "state": state.value}))
    else:
        click.echo(
            f"{count:,} {state.value} deliveries of {name!r} put back in the queue; "
            "run the campaign again to send them"
        )


@main.group(cls=_Group)
def tls() -> None:
    """Transport security diagnostics."""


@tls.command("check")
@click.argument("domains", nargs=-1, required=True)
@click.option("--dns", "dns_server", default=None, help="Resolver HOST:PORT (default: settings).")
@click.option("--mx-port", type=int, default=None, help="MX port (default: settings, else 25).")
@click.option("--timeout", type=float, default=15.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per domain, one per line.")
def tls_check(
    domains: tuple[str, ...],
    dns_server: str | None,
    mx_port: int | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Each MX of each DOMAIN: level, TLS version, cipher, certificate, recipient policies,
    and what every policy (opportunistic, L1…L4) would decide. Nothing is sent."""
    import asyncio

    from recapito.config import Settings, parse_hostport
    from recapito.security.check import check_domains
    from recapito.security.recipient import mx_resolver, recipient_policies

    settings = Settings.load()
    nameserver = parse_hostport(dns_server, "--dns") if dns_server else settings.dns
    port = mx_port or settings.mx_port

    async def run() -> tuple[list[dict[str, Any]], int]:
        policies = recipient_policies(settings, nameserver)
        return await check_domains(
            list(domains),
            resolver=mx_resolver(settings, nameserver, timeout),
            port=port,
            helo_name=settings.helo_name,
            extra_ca_file=settings.tls_ca_file,
            policies=policies,
            timeout=timeout,
        )

    results, connections = asyncio.run(run())
    if as_json:
        for result in results:
            click.echo(json.dumps(result, sort_keys=True))
        return
    for result in results:
        click.echo(f"{result['domain']}")
        if "error" in result:
            click.echo(f"  DNS: {result['error']}")
        for mx in result["mx"]:
            facts = " ".join(
                str(x) for x in (mx["tls_version"], mx["cipher"], mx["certificate"]) if x
            )
            reason = f" [{mx['reason']}]" if mx["reason"] else ""
            click.echo(
                f"  MX {mx['preference']:>3} {mx['host']:<34} {mx['level'] or '--'}  "
                f"{facts or 'no TLS'}{reason}"
            )
        click.echo(f"  MTA-STS: {result['mta_sts'] or '-'}   DANE: {result['dane'] or '-'}")
        decision = "  ".join(f"{k}={v}" for k, v in result["decision"].items())
        click.echo(f"  decision: {decision}")
    click.echo(f"({connections} MX connection(s) opened)")


@main.command("demo")
@click.option("--contacts", "n_contacts", default=10_000, show_default=True, type=int)
@click.option("--exit", "exit_after", is_flag=True, help="Stop everything when the run ends.")
@click.option("--name", default=None, help="Campaign name (default: demo-<timestamp>).")
@click.option("--mx-port", default=2525, show_default=True, help="Sandbox MX port (0: any).")
@click.option("--dns-port", default=5300, show_default=True, help="Sandbox DNS port (0: any).")
@click.option("--prefect-port", default=4200, show_default=True, help="Local Prefect server port.")
@click.option(
    "--tracking-port", default=8800, show_default=True, help="Tracking service port (0: any)."
)
@click.option(
    "--tls-policy",
    default="opportunistic",
    show_default=True,
    help="opportunistic, or secure:L1 … secure:L4 (Secure Email).",
)
def demo_cmd(
    n_contacts: int,
    exit_after: bool,
    name: str | None,
    mx_port: int,
    dns_port: int,
    prefect_port: int,
    tls_policy: str,
    tracking_port: int,
) -> None:
    """Sandbox + Prefect server + demo contacts + a real campaign, end to end."""
    from recapito.demo import run_demo

    _sigterm_like_ctrl_c()
    sys.exit(
        run_demo(
            n_contacts=n_contacts,
            exit_after=exit_after,
            name=name,
            mx_port=mx_port,
            dns_port=dns_port,
            prefect_port=prefect_port,
            tls_policy=tls_policy,
            tracking_port=tracking_port,
        )
    )


main.add_command(sandbox)
main.add_command(demo_data, name="demo-data")
main.add_command(contacts)
main.add_command(template_group)
main.add_command(bounce)
main.add_command(tracking)
main.add_command(pec)
main.add_command(rules)
main.add_command(fallback)

if __name__ == "__main__":
    main()
