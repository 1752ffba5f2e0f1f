"""``make demo``: the local mail world, a Prefect server, demo contacts and a real campaign.

Starts what is not already running (the sandbox, and a Prefect server on 127.0.0.1:4200
with its SQLite database under ``./var/prefect`` unless ``PREFECT_API_URL`` is set), runs
the campaign flow on generated contacts, checks the sandbox Maildirs against the ledger,
prints the summary and the UI address, then keeps the servers up until Ctrl-C (or stops
them at once with ``--exit``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from recapito.config import Settings, home_dir, sandbox_dir

PREFECT_HOST = "127.0.0.1"
PREFECT_PORT = 4200
TEMPLATE_DIR = Path(__file__).parent / "sandbox" / "demo_template"
RULES_FILE = Path(__file__).parent / "sandbox" / "demo_rules.toml"
PEC_RECEIPTS_TIMEOUT = 90.0  # seconds to wait for the sandbox providers' receipts
TRACKING_PORT = 8800
DEMO_SCANNER_WINDOW = 2.0  # seconds: the simulated people act later than this


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class PrefectServer:
    """A local Prefect server subprocess (SQLite under ``$RECAPITO_HOME/prefect``)."""

    def __init__(self, home: Path, port: int = PREFECT_PORT) -> None:
        self.home = home / "prefect"
        self.port = port
        self.api_url = f"http://{PREFECT_HOST}:{port}/api"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> None:
        if _healthy(self.api_url):
            _say(f"reusing the Prefect server already answering at {self.api_url}")
            return
        with socket.socket() as probe:
            if probe.connect_ex((PREFECT_HOST, self.port)) == 0:
                raise SystemExit(
                    f"port {self.port} is taken by a program that is not a Prefect server: "
                    "choose another with --prefect-port (make demo ARGS='--prefect-port 4300')"
                )
        self.home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        )
        env.pop("PREFECT_API_URL", None)
        log = (self.home / "server.log").open("ab")
        prefect = Path(sys.executable).with_name("prefect")
        cmd = [str(prefect) if prefect.exists() else "prefect", "server", "start"]
        self.proc = subprocess.Popen(
            [*cmd, "--host", PREFECT_HOST, "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _say("starting the Prefect server (about 20 s the first time)…")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the Prefect server exited early; see {self.home / 'server.log'}")
            if _healthy(self.api_url):
                return
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"the Prefect server did not answer in {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


class DemoTracking:
    """The tracking service of the demo, in this process, and its simulated readers."""

    def __init__(self, settings: Settings, port: int) -> None:
        from recapito.ledger import Ledger
        from recapito.tracking.service import ServiceThread, TrackingApp
        from recapito.tracking.store import TrackingStore
        from recapito.tracking.tokens import TokenSigner, tracking_keyring

        self.ledger = Ledger(settings.db_url)
        app = TrackingApp(
            TrackingStore(self.ledger),
            TokenSigner(tracking_keyring(settings)),
            scanner_window=DEMO_SCANNER_WINDOW,
        )
        try:
            self.service = ServiceThread(app, "127.0.0.1", port).start()
        except OSError:  # the port is taken: any free one will do for the demo
            self.service = ServiceThread(app, "127.0.0.1", 0).start()
        self.url = self.service.url

    def read(self, campaign: str, maildir: Path) -> dict[str, Any]:
        from recapito.tracking.reader import simulate_readers

        _say("simulated readers: people, Apple MPP, Gmail's image proxy, link scanners…")
        return simulate_readers(maildir, campaign, human_after=DEMO_SCANNER_WINDOW + 1.0).as_dict()

    def stop(self) -> None:
        self.service.stop()
        self.ledger.close()


def tracking_line(report: dict[str, Any], readers: dict[str, Any], url: str) -> str:
    e = report["engagement"]
    return (
        f"Tracking ({url}): opened by {e['opens']['human']:,} people "
        f"+ {e['opens']['machine']:,} machine opens (Apple MPP, image proxies); "
        f"clicked by {e['clicks']['human']:,} people + {e['clicks']['scanner']:,} "
        f"scanner clicks; {e['unsubscribed']:,} unsubscribed "
        f"[simulated readers of {readers['messages']:,} messages, {readers['errors']} errors]"
    )


LATE_BOUNCE_EVERY = 60  # one contact in 60 has a mailbox that bounces after accepting


def with_late_bounces(frame: Any) -> Any:
    """Give some demo contacts a mailbox the sandbox accepts and then bounces (moved user,
    full or disabled mailbox), so the demo shows the bounce collector at work."""
    import polars as pl

    from recapito.sandbox.world import BOUNCE_LATER_MARKERS

    markers = sorted(BOUNCE_LATER_MARKERS)
    row = pl.int_range(0, pl.len())
    marker = pl.lit(pl.Series(markers)).get((row // LATE_BOUNCE_EVERY) % len(markers))
    local, domain = (
        pl.col("email").str.splitn("@", 2).struct.field(f) for f in ("field_0", "field_1")
    )
    chosen = (row % LATE_BOUNCE_EVERY == 7) & pl.col("email").str.contains("@", literal=True)
    return frame.with_columns(
        pl.when(chosen)
        .then(pl.concat_str([local, pl.lit("."), marker, pl.lit("@"), domain]))
        .otherwise(pl.col("email"))
        .alias("email")
    )


def collect_bounces() -> dict[str, Any] | None:
    """One run of the bounce collector flow over the sandbox's bounce mailbox."""
    from recapito.collect.bounces import MAILBOX_PREFIX
    from recapito.collect.mailbox import MailboxSettings
    from recapito.errors import ConfigError

    try:
        MailboxSettings.load(MAILBOX_PREFIX)
    except ConfigError as exc:  # a sandbox without its IMAP server (no Dovecot here)
        _say(f"no bounce collection: {exc}")
        return None
    from flows.bounce_collector import bounce_collector_flow

    _say("collecting bounces from the sandbox bounce mailbox (IMAP)…")
    result: dict[str, Any] = bounce_collector_flow()
    return result


def bounce_line(report: dict[str, Any], collected: dict[str, Any]) -> str:
    b = report.get("bounces") or {}
    reasons = ", ".join(f"{k} {v['total']:,}" for k, v in (b.get("reasons") or {}).items())
    return (
        f"Bounce collector: {collected['seen']:,} messages in the bounce mailbox, "
        f"{collected['bounced']:,} deliveries bounced after acceptance"
        + (f" ({reasons})" if reasons else "")
        + f", {collected['quarantined']:,} quarantined"
    )


PEC_FAULT_EVERY = 12  # among the legal PEC contacts: one unknown mailbox, one not PEC


def with_message_class(frame: Any) -> Any:
    """A message class per demo contact (``classe``): ``legal`` for business customers
    (their notices go by PEC when they have a PEC address, ``demo_rules.toml``), else
    ``marketing``. A few legal PEC addresses are made to fail, so the demo shows every
    outcome: a mailbox the provider does not know (an error receipt) and an address on an
    ordinary e-mail domain (``esterno``: accepted, never a delivery receipt)."""
    import polars as pl

    legal = pl.col("segmento") == "business"
    with_pec = legal & pl.col("pec").is_not_null()
    rank = pl.when(with_pec).then(with_pec.cast(pl.Int32).cum_sum())
    local, domain = (
        pl.col("pec").str.splitn("@", 2).struct.field(f) for f in ("field_0", "field_1")
    )
    email_domain = pl.col("email").str.splitn("@", 2).struct.field("field_1")
    unknown = rank % PEC_FAULT_EVERY == 5
    esterno = (rank % PEC_FAULT_EVERY == 11) & email_domain.is_not_null()
    return frame.with_columns(
        pl.when(legal).then(pl.lit("legal")).otherwise(pl.lit("marketing")).alias("classe"),
        pl.when(unknown)
        .then(pl.concat_str([local, pl.lit(".inesistente@"), domain]))
        .when(esterno)
        .then(pl.concat_str([local, pl.lit("@"), email_domain]))
        .otherwise(pl.col("pec"))
        .alias("pec"),
    )


def pec_mailboxes_ready(home: Path) -> bool:
    """The sandbox runs its PEC providers (they need Dovecot for the receipts)."""
    from recapito.errors import ConfigError
    from recapito.pec.mailboxes import configured_mailboxes

    try:
        return bool(configured_mailboxes(home))
    except ConfigError:
        return False


def wait_for_pec_receipts(
    home: Path, campaign: str, db_url: str, timeout: float = PEC_RECEIPTS_TIMEOUT
) -> tuple[int, int]:
    """Wait (at most ``timeout`` s) until the sandbox providers have written, for every
    PEC message of the campaign, its acceptance and, for a recipient on a PEC domain, its
    delivery or error receipt (their journal says so). Returns (written, expected)."""
    from recapito.ledger import Ledger
    from recapito.sandbox.pec import journal_path, pec_domains, read_journal

    ledger = Ledger(db_url, run_migrations=False)
    try:
        found = ledger.get_campaign(campaign)
        rows = [] if found is None else ledger.deliveries_of(found.id)
    finally:
        ledger.close()
    submitted = {
        str(r["message_id"]): str(r["address"]).rpartition("@")[2].lower()
        for r in rows
        if r["channel"] == "pec" and r["message_id"] and r["state"] != "failed"
    }
    certified = set(pec_domains())
    expected = len(submitted) + sum(1 for d in submitted.values() if d in certified)
    journal = journal_path(sandbox_dir(home))
    deadline = time.monotonic() + timeout
    written = 0
    while True:
        events = read_journal(journal) if journal.exists() else []
        written = sum(
            1 for e in events if e.get("event") == "receipt" and e.get("msgid") in submitted
        )
        if written >= expected or time.monotonic() >= deadline:
            return written, expected
        time.sleep(0.5)


def collect_pec_receipts() -> dict[str, Any]:
    """One run of the PEC receipt collector flow over the sandbox's PEC mailboxes."""
    from flows.pec_receipts import pec_receipts_flow

    _say("collecting PEC receipts from the sender mailboxes (IMAP, signatures checked)…")
    result: dict[str, Any] = pec_receipts_flow()
    return result


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recapito.cli", *args], text=True, capture_output=True, check=False
    )


def _sandbox_running(home: Path) -> bool:
    from recapito.sandbox.runtime import describe

    info = describe(home)
    return bool(info["running"] and info["dns"]["up"] and all(s["up"] for s in info["servers"]))


def run_demo(
    *,
    n_contacts: int,
    exit_after: bool,
    name: str | None,
    mx_port: int = 2525,
    dns_port: int = 5300,
    prefect_port: int = PREFECT_PORT,
    tls_policy: str = "opportunistic",
    tracking_port: int = TRACKING_PORT,
) -> int:
    home = home_dir()
    started_sandbox = False
    server: PrefectServer | None = None
    tracking: DemoTracking | None = None
    t0 = time.monotonic()
    try:
        if _sandbox_running(home):
            _say("the sandbox is already up")
        else:
            _say("starting the sandbox (DNS + MX servers on 127.0.0.x)…")
            up = _cli("sandbox", "up", "--mx-port", str(mx_port), "--dns-port", str(dns_port))
            if up.returncode != 0:
                sys.stderr.write(up.stderr or up.stdout)
                return 1
            started_sandbox = True
        if not os.environ.get("PREFECT_API_URL"):
            server = PrefectServer(home, prefect_port)
            server.start()
            os.environ["PREFECT_API_URL"] = server.api_url
        ui_url = os.environ["PREFECT_API_URL"].removesuffix("/api")
        settings = Settings.load()
        tracking = DemoTracking(settings, tracking_port)
        # the campaign's messages point at it (the flow's tasks read the settings again)
        os.environ["RECAPITO_TRACKING_URL"] = tracking.url
        _say(f"tracking service (opens, clicks, unsubscribe) on {tracking.url}")
        servers_ready = time.monotonic()

        from recapito.demo_data import generate, write_csv

        demo_dir = home / "demo"
        demo_dir.mkdir(parents=True, exist_ok=True)
        contacts = demo_dir / f"contacts-{n_contacts}.csv"
        pec = pec_mailboxes_ready(home)
        frame = with_message_class(with_late_bounces(generate(n_contacts, seed=42)))
        write_csv(frame, contacts)
        _say(f"generated {n_contacts:,} demo contacts in {contacts}")
        if pec:
            # the PEC receipts are signed by the sandbox CA's provider certificates
            os.environ.setdefault("RECAPITO_PEC_CA_FILE", str(sandbox_dir(home) / "ca.pem"))
            _say(f"legal notices by PEC where there is a PEC address (rules: {RULES_FILE})")
        else:
            _say("no PEC providers in this sandbox (they need Dovecot): e-mail only")

        from recapito.campaign import CampaignParams, campaign_dir
        from recapito.cli import prefect_environment

        prefect_environment(home)
        from flows.campaign import campaign_flow

        campaign_name = name or f"demo-{datetime.now():%Y%m%d-%H%M%S}"
        params = CampaignParams(
            name=campaign_name,
            contacts=str(contacts),
            template=str(TEMPLATE_DIR),
            sender="comunicazioni@banca-esempio.test",
            # the sandbox greylists for about a second: retry inside the run, as an MTA would
            retry_after_seconds=2,
            retry_within_run_seconds=60,
            tls_policy=tls_policy,
            rules=str(RULES_FILE) if pec else None,
        )
        _say(f"running campaign {campaign_name!r}…")
        run_started = time.monotonic()
        state = campaign_flow(params, return_state=True)
        campaign_seconds = time.monotonic() - run_started
        report: dict[str, Any] = state.result()
        flow_run_id = state.state_details.flow_run_id

        from recapito.ledger import Ledger
        from recapito.pec.report import pec_line
        from recapito.report import campaign_report, text_summary
        from recapito.sandbox.check import compare_with_maildirs

        # the sandbox MX servers wrote DSNs for the mailboxes that fail after accepting:
        # the collector reads them from the bounce mailbox, as its deployment would
        bounces = collect_bounces()
        # the PEC providers write an acceptance at once and a delivery receipt shortly after:
        # wait for them, then the collector reads them, as its deployment would
        pec_receipts: dict[str, Any] | None = None
        if pec:
            written, expected = wait_for_pec_receipts(home, campaign_name, settings.db_url)
            _say(f"{written:,} of {expected:,} expected PEC receipts are in the mailboxes")
            pec_receipts = collect_pec_receipts()

        ledger = Ledger(settings.db_url, run_migrations=False)
        try:
            check = compare_with_maildirs(
                ledger, campaign_name, sandbox_dir(settings.home) / "maildir"
            )
        finally:
            ledger.close()
        readers = tracking.read(campaign_name, sandbox_dir(settings.home) / "maildir")
        ledger = Ledger(settings.db_url, run_migrations=False)
        try:
            report = campaign_report(ledger, campaign_name)
        finally:
            ledger.close()
        print()
        print(text_summary(report))
        print(tracking_line(report, readers, tracking.url))
        if bounces is not None:
            print(bounce_line(report, bounces))
        pec_summary = pec_line(report.get("pec"))
        if pec_summary is not None:
            print(pec_summary)
        if pec_receipts is not None:
            print(
                f"PEC receipt collector: {pec_receipts['seen']:,} messages in "
                f"{len(pec_receipts['mailboxes'])} mailboxes, {pec_receipts['correlated']:,} "
                f"receipts correlated, {pec_receipts['quarantined']:,} quarantined"
            )
        if report["insecure_channel"]:
            print(
                f"Secure Email ({report['tls_policy']}): insecure_channel "
                + ", ".join(
                    f"{r['domain']} {r['reason']} x{r['recipients']:,}"
                    for r in report["insecure_channel"]
                )
            )
        if report["rejections"]:
            reasons = ", ".join(
                f"{k} {v:,}" for k, v in sorted(report["rejections"].items(), key=lambda kv: -kv[1])
            )
            rejected_csv = campaign_dir(settings, campaign_name) / "rejected.csv"
            print(f"Rejected at targeting: {reasons} (rows and line numbers: {rejected_csv})")
        print(
            f"Maildir check: {check['accepted']:,} accepted in the ledger, "
            f"{check['stored']:,} stored in the sandbox Maildirs, "
            f"{check['missing']:,} missing, {check['duplicates']:,} duplicated, "
            f"{check['unexpected']:,} unexpected"
        )
        print(
            f"Campaign time {campaign_seconds:.1f} s; servers ready after "
            f"{servers_ready - t0:.1f} s; total {time.monotonic() - t0:.1f} s"
        )
        print(f"Prefect UI: {ui_url}/runs/flow-run/{flow_run_id}")
        print(f"Report again: .venv/bin/recapito campaign report {campaign_name}")
        ok = check["missing"] == 0 and check["duplicates"] == 0 and check["unexpected"] == 0
        if not exit_after:
            print("Servers stay up: open the UI, or press Ctrl-C to stop them.", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print()
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 130
    finally:
        if tracking is not None:
            tracking.stop()
        if server is not None:
            _say("stopping the Prefect server")
            server.stop()
        if started_sandbox:
            _say("stopping the sandbox")
            _cli("sandbox", "down")
