"""End to end: a whole campaign through the Prefect flow and the local sandbox (DESIGN §11).

    .venv/bin/python benchmarks/campaign_e2e.py --recipients 100000 [--json]
                                                [--contacts-format parquet|csv]
                                                [--parallel-chunks 4] [--keep]

In a temporary RECAPITO_HOME it generates N synthetic contacts (the demo generator: Italian
names, the sandbox's realistic mix of domains, so some mail is greylisted, refused or has
no MX), starts the sandbox (DNS + every MX posture, in child processes) and a temporary
Prefect server (SQLite, its own port), then runs the real campaign flow in this process,
exactly as ``make demo`` does (greylisted mail is retried within the run).

Figures: wall time of the flow run (targeting, planning, every chunk, retries, report),
peak RSS of the whole process tree (this process, the sandbox servers and the Prefect
server, sampled every 0.25 s; also this process's own peak from getrusage), the number of
task runs of the flow run (Prefect API), accepted (ledger rows in state accepted) and
duplicates (copies beyond the first of any Message-ID stored by the sandbox MX servers;
the Maildirs hold one file per accepted recipient, scanned header by header).

The ratio line compares the throughput with the target of the issue: 500,000 messages in
15 minutes (556 messages/s). ``--json`` prints one object on stdout (recipients, wall_s,
peak_rss_mb, task_runs, accepted, duplicates); the details go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

TARGET_MESSAGES = 500_000
TARGET_SECONDS = 15 * 60
TARGET_RATE = TARGET_MESSAGES / TARGET_SECONDS  # 556 messages/s
TARGET_RSS_MB = 500
SENDER = "comunicazioni@banca-esempio.test"
TEMPLATE = ROOT / "src" / "recapito" / "sandbox" / "demo_template"
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)


def log(text: str) -> None:
    print(f"[e2e] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TreeRSS:
    """Samples the RSS of this process and all its descendants; keeps the peaks."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_total = 0
        self.peak_self = 0
        self.peak_by_name: dict[str, int] = {}
        self.cpu_by_pid: dict[int, tuple[str, float]] = {}  # latest user+system seconds
        self._procs: list[tuple[str, psutil.Process]] = []
        self._next_scan = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        me = psutil.Process()
        total = me.memory_info().rss
        self.peak_self = max(self.peak_self, total)
        now = time.monotonic()
        if now >= self._next_scan:
            # listing the process tree reads every /proc entry: do it now and then only
            self._next_scan = now + 5 * self.interval
            self._procs = []
            for child in me.children():
                kind = _kind(child)  # a direct child and its whole subtree
                with contextlib.suppress(psutil.Error):
                    for proc in (child, *child.children(recursive=True)):
                        self._procs.append((kind, proc))
        by_name: Counter[str] = Counter()
        for kind, proc in self._procs:
            with contextlib.suppress(psutil.Error):
                rss = proc.memory_info().rss
                total += rss
                by_name[kind] += rss
                cpu = proc.cpu_times()
                self.cpu_by_pid[proc.pid] = (kind, cpu.user + cpu.system)
        self.peak_total = max(self.peak_total, total)
        for name, rss in by_name.items():
            self.peak_by_name[name] = max(self.peak_by_name.get(name, 0), rss)

    def cpu_by_name(self) -> dict[str, float]:
        """CPU seconds per kind of child process (as last sampled), and this process."""
        out: Counter[str] = Counter()
        for kind, seconds in self.cpu_by_pid.values():
            out[kind] += seconds
        mine = psutil.Process().cpu_times()
        out["campaign (this process)"] = mine.user + mine.system
        return {k: round(v, 1) for k, v in sorted(out.items())}

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.sample()
            self._stop.wait(self.interval)


def _kind(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    if "prefect" in cmd:
        return "prefect-server"
    if "recapito.sandbox" in cmd:
        return "sandbox"
    return "other"


def count_duplicates(maildir_root: Path) -> tuple[int, int]:
    """(messages stored, copies beyond the first of any Message-ID)."""
    seen: Counter[bytes] = Counter()
    stored = 0
    for domain in os.scandir(maildir_root):
        if not domain.is_dir():
            continue
        for sub in ("new", "cur"):
            folder = Path(domain.path) / sub
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                with open(entry.path, "rb") as handle:
                    head = handle.read(8192)
                stored += 1
                match = _MESSAGE_ID.search(head.split(b"\r\n\r\n", 1)[0])
                seen[match.group(1) if match else entry.name.encode()] += 1
    return stored, sum(n - 1 for n in seen.values() if n > 1)


def task_run_figures(flow_run_id: Any) -> tuple[int, dict[str, dict[str, float]]]:
    """How many task runs the flow run has, and per task name: count, total and max seconds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    by_task: dict[str, dict[str, float]] = {}
    with get_client(sync_client=True) as client:
        response = client._client.post(
            "/task_runs/count", json={"flow_runs": {"id": {"any_": [str(flow_run_id)]}}}
        )
        response.raise_for_status()
        total = int(response.json())
        offset = 0
        while True:
            runs = client.read_task_runs(flow_run_filter=flow_filter, limit=200, offset=offset)
            if not runs:
                break
            offset += len(runs)
            for run in runs:
                name = run.task_key.rsplit("-", 1)[0] if run.task_key else run.name
                entry = by_task.setdefault(name, {"runs": 0, "seconds": 0.0, "max_s": 0.0})
                seconds = float(run.total_run_time.total_seconds())
                entry["runs"] += 1
                entry["seconds"] += seconds
                entry["max_s"] = max(entry["max_s"], seconds)
    return total, by_task


def write_contacts(n: int, directory: Path, fmt: str) -> Path:
    from recapito.demo_data import generate, write_csv, write_parquet

    frame = generate(n, seed=20_260_501)
    path = directory / f"contacts-{n}.{fmt}"
    if fmt == "csv":
        write_csv(frame, path)
    else:
        write_parquet(frame, path)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="recapito-e2e-"))
    os.environ["RECAPITO_HOME"] = str(home)
    os.environ.pop("RECAPITO_DB_URL", None)
    os.environ["PREFECT_HOME"] = str(home / "prefect-client")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from recapito.sandbox.runtime import Sandbox

    figures: dict[str, Any] = {"recipients": args.recipients}
    try:
        with TreeRSS() as rss:
            t0 = time.monotonic()
            contacts = write_contacts(args.recipients, home, args.contacts_format)
            took = time.monotonic() - t0
            log(f"{args.recipients:,} contacts written to {contacts} in {took:.1f} s")
            with Sandbox(home) as box:
                for key, value in box.env().items():
                    os.environ[key] = value
                from recapito.demo import PrefectServer

                server = PrefectServer(home, free_port())
                with contextlib.redirect_stdout(sys.stderr):
                    server.start()
                try:
                    os.environ["PREFECT_API_URL"] = server.api_url
                    log(f"sandbox and Prefect server up after {time.monotonic() - t0:.1f} s")
                    figures.update(_campaign(args, contacts, box.maildir_root))
                finally:
                    server.stop()
            figures["peak_rss_mb"] = round(rss.peak_total / 2**20, 1)
            figures["peak_rss_self_mb"] = round(rss.peak_self / 2**20, 1)
            figures["cpu_s_by_process"] = rss.cpu_by_name()
            figures["peak_rss_by_process_mb"] = {
                k: round(v / 2**20, 1) for k, v in sorted(rss.peak_by_name.items())
            }
        figures["maxrss_self_getrusage_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        )
    finally:
        if args.keep:
            log(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    return figures


def _campaign(args: argparse.Namespace, contacts: Path, maildir_root: Path) -> dict[str, Any]:
    from recapito.campaign import CampaignParams, chunk_size_for
    from recapito.cli import prefect_environment
    from recapito.config import Settings

    settings = Settings.load()
    prefect_environment(settings.home)
    from flows.campaign import campaign_flow
    from recapito.ledger import Ledger

    params = CampaignParams(
        name=f"e2e-{args.recipients}",
        contacts=str(contacts),
        template=str(TEMPLATE),
        sender=SENDER,
        parallel_chunks=args.parallel_chunks,
        chunk_size=args.chunk_size,
        # as `make demo`: the sandbox greylists for about a second, retried inside the run
        retry_after_seconds=2,
        retry_within_run_seconds=60,
    )
    log(
        f"campaign {params.name}: chunk size {chunk_size_for(args.recipients, args.chunk_size):,},"
        f" {params.parallel_chunks} chunks at once"
    )
    started = time.monotonic()
    state = campaign_flow(params, return_state=True)
    wall = time.monotonic() - started
    report: dict[str, Any] = state.result()
    task_runs, by_task = task_run_figures(state.state_details.flow_run_id)
    ledger = Ledger(settings.db_url, run_migrations=False)
    try:
        campaign = ledger.get_campaign(params.name)
        assert campaign is not None
        accepted = ledger.state_counts(campaign.id).get("accepted", 0)
    finally:
        ledger.close()
    scan = time.monotonic()
    stored, duplicates = count_duplicates(maildir_root)
    log(f"Maildir scan: {stored:,} messages stored, in {time.monotonic() - scan:.1f} s")
    log(f"funnel: {json.dumps(report['funnel'])}")
    for name, entry in sorted(by_task.items()):
        log(
            f"task {name}: {entry['runs']:.0f} runs, {entry['seconds']:.1f} s in all, "
            f"longest {entry['max_s']:.1f} s"
        )
    return {
        "wall_s": round(wall, 1),
        "task_runs": task_runs,
        "accepted": accepted,
        "duplicates": duplicates,
        "stored": stored,
        "targeted": report["funnel"]["targeted"],
        "task_time_s": {k: round(v["seconds"], 1) for k, v in by_task.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--contacts-format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--parallel-chunks", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: automatic")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    args = parser.parse_args(argv)

    figures = run(args)
    rate = figures["targeted"] / figures["wall_s"] if figures["wall_s"] else 0.0
    accepted_rate = figures["accepted"] / figures["wall_s"] if figures["wall_s"] else 0.0
    ratio = (
        f"ratio: {rate:,.0f} recipients/s ({accepted_rate:,.0f} accepted/s) = "
        f"{rate / TARGET_RATE:.2f}x the target {TARGET_RATE:,.0f}/s (500,000 in 15 min); "
        f"at this rate 500,000 take {TARGET_MESSAGES / rate / 60:.1f} min; "
        f"peak RSS {figures['peak_rss_mb']:,.0f} MB = "
        f"{figures['peak_rss_mb'] / TARGET_RSS_MB:.2f}x the {TARGET_RSS_MB} MB budget"
        if rate
        else "ratio: no recipient"
    )
    summary = {
        k: figures[k]
        for k in ("recipients", "wall_s", "peak_rss_mb", "task_runs", "accepted", "duplicates")
    }
    details = {k: v for k, v in figures.items() if k not in summary}
    if args.json:
        log(f"details: {json.dumps(details)}")
        log(ratio)
        print(json.dumps(summary))
    else:
        print(
            f"{figures['recipients']:,} recipients ({figures['targeted']:,} targeted): "
            f"wall {figures['wall_s']:,.1f} s, peak RSS {figures['peak_rss_mb']:,.1f} MB "
            f"(this process {figures['peak_rss_self_mb']:,.1f} MB; "
            + ", ".join(f"{k} {v:,.1f} MB" for k, v in figures["peak_rss_by_process_mb"].items())
            + f"), {figures['task_runs']:,} task runs, {figures['accepted']:,} accepted, "
            f"{figures['stored']:,} stored, {figures['duplicates']:,} duplicates"
        )
        print(f"task time: {json.dumps(figures['task_time_s'])}")
        print(f"CPU seconds by process: {json.dumps(figures['cpu_s_by_process'])}")
        print(ratio)
    return 0 if figures["duplicates"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
