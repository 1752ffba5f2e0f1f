"""``make serve``: the operator's mode. A Prefect server, the sandbox, a process worker and
every deployment of deployments/prefect.yaml, up until Ctrl-C (or SIGTERM).

Campaigns are then launched from the UI (the campaign deployment's parameter form, in any
sending mode), through the API, or by their schedules; the worker runs them from this
checkout. Everything started here is stopped on the way out; a Prefect server or sandbox
that was already running is reused and left running.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

from recapito.config import home_dir
from recapito.demo import PREFECT_PORT, PrefectServer, _cli, _sandbox_running

WORK_POOL = "recapito-local"
DEPLOYMENTS = "deployments/prefect.yaml"


def _say(text: str) -> None:
    print(f"[serve] {text}", flush=True)


def project_dir() -> Path:
    """The checkout holding deployments/prefect.yaml (RECAPITO_PROJECT_DIR wins)."""
    for candidate in (os.environ.get("RECAPITO_PROJECT_DIR"), os.getcwd()):
        if candidate and (Path(candidate) / "deployments" / "prefect.yaml").exists():
            return Path(candidate).resolve()
    return Path(__file__).resolve().parents[2]


def _prefect() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else "prefect"


def prefect_env(home: Path, api_url: str, project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOCAL_STORAGE_PATH=str(home / "prefect" / "storage"),
        RECAPITO_HOME=str(home),
        RECAPITO_PROJECT_DIR=str(project),
    )
    env.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    return env


def register(env: dict[str, str], project: Path) -> None:
    """Create the process work pool (once) and deploy every deployment of prefect.yaml."""
    pool = subprocess.run(
        [_prefect(), "work-pool", "create", WORK_POOL, "--type", "process"],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    if pool.returncode != 0 and "already exists" not in (pool.stdout + pool.stderr):
        raise SystemExit(f"could not create the work pool:\n{pool.stdout}{pool.stderr}")
    deploy = subprocess.run(
        [_prefect(), "--no-prompt", "deploy", "--all", "--prefect-file", DEPLOYMENTS],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    if deploy.returncode != 0:
        raise SystemExit(f"prefect deploy failed:\n{deploy.stdout}{deploy.stderr}")


def deployments(api_url: str) -> list[dict[str, object]]:
    request = urllib.request.Request(
        f"{api_url}/deployments/filter",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        found: list[dict[str, object]] = json.load(resp)
    return found


def _schedules(deployment: dict[str, object]) -> str:
    parts = []
    for item in deployment.get("schedules") or []:  # type: ignore[attr-defined]
        sched = item.get("schedule") or {}
        if "cron" in sched:
            parts.append(f"cron {sched['cron']} {sched.get('timezone') or 'UTC'}")
    return ", ".join(parts) or "on demand"


class Worker:
    def __init__(self, env: dict[str, str], project: Path, log: Path) -> None:
        self.proc = subprocess.Popen(
            [_prefect(), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
            env=env,
            cwd=project,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the worker ignores SIGINT
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_serve(*, prefect_port: int, mx_port: int, dns_port: int, exit_after: float | None) -> int:
    home = home_dir()
    project = project_dir()
    signal.signal(signal.SIGTERM, _terminate)
    started_sandbox = False
    server: PrefectServer | None = None
    worker: Worker | None = None
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
        server = PrefectServer(home, prefect_port)
        # the UI's own idea of where the API is (it defaults to port 4200)
        os.environ["PREFECT_UI_API_URL"] = server.api_url
        server.start()
        env = prefect_env(home, server.api_url, project)
        _say("registering the deployments (deployments/prefect.yaml)…")
        register(env, project)
        worker = Worker(env, project, home / "prefect" / "worker.log")
        _say(f"process worker on pool {WORK_POOL} (log: {home / 'prefect' / 'worker.log'})")
        ui = server.api_url.removesuffix("/api")
        for dep in sorted(deployments(server.api_url), key=lambda d: str(d["name"])):
            _say(f"  {dep['name']:<18} {_schedules(dep)}")
        print(f"Prefect UI: {ui}/deployments  (Ctrl-C stops everything)", flush=True)
        deadline = None if exit_after is None else time.monotonic() + exit_after
        while deadline is None or time.monotonic() < deadline:
            if worker.proc.poll() is not None:
                _say("the worker stopped; see its log")
                return 1
            time.sleep(1)
        return 0
    except KeyboardInterrupt:
        print()
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if worker is not None:
            _say("stopping the worker")
            worker.stop()
        if server is not None and server.proc is not None:
            _say("stopping the Prefect server")
            server.stop()
        if started_sandbox:
            _say("stopping the sandbox")
            _cli("sandbox", "down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recapito-serve", description=__doc__)
    parser.add_argument("--prefect-port", type=int, default=PREFECT_PORT)
    parser.add_argument("--mx-port", type=int, default=2525, help="sandbox MX port (0 = any)")
    parser.add_argument("--dns-port", type=int, default=5300, help="sandbox DNS port (0 = any)")
    parser.add_argument("--exit-after", type=float, default=None, help="stop after N seconds")
    args = parser.parse_args(argv)
    return run_serve(
        prefect_port=args.prefect_port,
        mx_port=args.mx_port,
        dns_port=args.dns_port,
        exit_after=args.exit_after,
    )


if __name__ == "__main__":
    raise SystemExit(main())
