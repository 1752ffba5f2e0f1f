"""``recapito sandbox up | down | status``: run the local mail world from the command line.

``up`` starts a detached supervisor process (``up --foreground`` in a new session) that owns
the DNS and MX server processes until ``down``; it returns once every server answers. With
``--foreground`` the sandbox runs in the calling process until Ctrl-C or SIGTERM.

The home directory is ``recapito.config.home_dir()`` (``$RECAPITO_HOME``, default ``./var``).
A port of 0 means "choose a free one".

``up`` while the sandbox is already running reuses it and says on which ports; if ports
(or ``--catch-all``) were asked for explicitly and differ from the running sandbox's, it
exits non-zero instead, saying they were not applied.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import click
from click.core import ParameterSource

import recapito
from recapito import config
from recapito.errors import RecapitoError
from recapito.sandbox.runtime import (
    STARTUP_TIMEOUT,
    Sandbox,
    SandboxError,
    SandboxState,
    check_ports_free,
    describe,
    pid_alive,
    read_state,
    stop_running,
)

SUPERVISOR_LOG = "supervisor.log"
# How long ``up`` waits for the supervisor's verdict beyond the sandbox's own start-up limit.
READY_GRACE = 15.0
PORT_HINT = "choose another with --mx-port / --dns-port (0 picks a free port)"


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _summary(home: Path) -> dict[str, Any]:
    info = describe(home)
    return {
        "running": info["running"],
        "home": info["home"],
        "owner_pid": info["owner_pid"],
        "dns": f"{info['dns']['address']}:{info['dns']['port']}" if info["dns"]["port"] else None,
        "mx_port": info["mx_port"],
        "ca_file": info["ca_file"],
        "catch_all": info["catch_all"],
        "dane_resolver": info["dane_resolver"],
        "mta_sts": info["mta_sts"],
        "settings": str(config.sandbox_settings_path(home)),
    }


def _echo_summary(home: Path, headline: str) -> None:
    s = _summary(home)
    click.echo(headline)
    click.echo(f"  DNS          {s['dns']}")
    click.echo(f"  MX port      {s['mx_port']} (one loopback address per MX host)")
    click.echo(f"  CA file      {s['ca_file']}")
    if s["mta_sts"]:
        click.echo(f"  MTA-STS      https://{s['mta_sts']} (policies of sts-*.test)")
    if s["dane_resolver"]:
        click.echo(f"  DANE         {s['dane_resolver']} (validating resolver, signed dane-*.test)")
    else:
        click.echo("  DANE         off: nsd/unbound/ldns tools not installed")
    click.echo(f"  settings     {s['settings']}")
    if s["catch_all"]:
        click.echo("  catch-all    every unknown domain gets a sandbox MX")


@click.group(name="sandbox")
def sandbox() -> None:
    """The local mail world: authoritative DNS and MX servers with distinct TLS postures."""


@sandbox.command()
@click.option("--catch-all", is_flag=True, help="Give every unknown domain a sandbox MX.")
@click.option(
    "--mx-port",
    type=click.IntRange(0, 65535),
    default=2525,
    show_default=True,
    help="TCP port of every MX server (0: a free one).",
)
@click.option(
    "--dns-port",
    type=click.IntRange(0, 65535),
    default=5300,
    show_default=True,
    help="UDP/TCP port of the DNS server on 127.0.0.1 (0: a free one).",
)
@click.option("--foreground", is_flag=True, help="Run in this process until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
@click.option("--ready-fd", type=int, default=None, hidden=True)
@click.pass_context
def up(
    ctx: click.Context,
    catch_all: bool,
    mx_port: int,
    dns_port: int,
    foreground: bool,
    as_json: bool,
    ready_fd: int | None,
) -> None:
    """Start the sandbox and write its settings.json."""
    home = config.home_dir()
    state = read_state(home)
    if state is not None and pid_alive(state.owner_pid):
        if ready_fd is not None:
            _notify(ready_fd, {"ok": False, "error": "a sandbox is already running"})
            raise SystemExit(1)
        running = f"MX port {state.mx_port}, DNS port {state.dns_port}"
        ignored = _not_applied(ctx, state, catch_all, mx_port, dns_port)
        if ignored:
            verb, pronoun = ("was", "it") if len(ignored) == 1 else ("were", "them")
            raise click.ClickException(
                f"sandbox already running (pid {state.owner_pid}, home {home}) on {running}; "
                f"the requested {' and '.join(ignored)} {verb} not applied: run "
                f"'recapito sandbox down' first, or leave {pronoun} out to reuse the running one"
            )
        if as_json:
            _echo_json({**_summary(home), "already_running": True})
        else:
            _echo_summary(
                home, f"sandbox already running (pid {state.owner_pid}) on {running}, home {home}"
            )
        return
    if foreground:
        _run_foreground(home, catch_all, mx_port, dns_port, as_json, ready_fd)
    else:
        _start_background(home, catch_all, mx_port, dns_port)
        if as_json:
            _echo_json({**_summary(home), "already_running": False})
        else:
            _echo_summary(home, f"sandbox up, home {home}")


def _not_applied(
    ctx: click.Context, state: SandboxState, catch_all: bool, mx_port: int, dns_port: int
) -> list[str]:
    """What the caller asked for explicitly that the running sandbox does not have.

    Defaults never count (the running sandbox is simply reused), nor does a port of 0,
    which asks for any free port.
    """

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)

    ignored: list[str] = []
    if given("mx_port") and mx_port and mx_port != state.mx_port:
        ignored.append(f"--mx-port {mx_port}")
    if given("dns_port") and dns_port and dns_port != state.dns_port:
        ignored.append(f"--dns-port {dns_port}")
    if catch_all and not state.catch_all:
        ignored.append("--catch-all")
    return ignored


def _notify(fd: int, message: dict[str, Any]) -> None:
    try:
        os.write(fd, (json.dumps(message) + "\n").encode())
        os.close(fd)
    except OSError:
        pass  # the launching ``up`` gave up waiting; nothing else to tell


class _Stop(Exception):
    pass


def _run_foreground(
    home: Path, catch_all: bool, mx_port: int, dns_port: int, as_json: bool, ready_fd: int | None
) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    box = Sandbox(home, mx_port or None, dns_port or None, catch_all, supervisor=True)
    try:
        try:
            box.start()
        except (RecapitoError, OSError) as exc:
            if ready_fd is not None:
                _notify(ready_fd, {"ok": False, "error": str(exc)})
                raise SystemExit(1) from None
            hint = f"; {PORT_HINT}" if "already in use" in str(exc) else ""
            raise click.ClickException(f"{exc}{hint}") from None
        if ready_fd is not None:
            _notify(ready_fd, {"ok": True})
        elif as_json:
            _echo_json({**_summary(home), "already_running": False})
        else:
            _echo_summary(
                home, f"sandbox up in the foreground (pid {os.getpid()}), Ctrl-C stops it"
            )
        while True:
            time.sleep(3600)
    except _Stop:
        pass
    finally:
        # No second signal may interrupt the clean-up.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        box.stop()


def _start_background(home: Path, catch_all: bool, mx_port: int, dns_port: int) -> None:
    try:
        check_ports_free(mx_port or None, dns_port or None)
    except SandboxError as exc:
        raise click.ClickException(f"{exc}; {PORT_HINT}") from None
    sandbox_dir = config.sandbox_dir(home)
    try:
        sandbox_dir.mkdir(parents=True, exist_ok=True)
        log = open(sandbox_dir / SUPERVISOR_LOG, "ab")  # noqa: SIM115 - handed to the child
    except OSError as exc:
        raise click.ClickException(f"cannot use {sandbox_dir}: {exc}") from None
    env = dict(os.environ)
    env["RECAPITO_HOME"] = str(home)
    src = str(Path(recapito.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    read_end, write_end = os.pipe()
    command = [
        sys.executable,
        "-m",
        "recapito.sandbox.cli",
        "up",
        "--foreground",
        "--mx-port",
        str(mx_port),
        "--dns-port",
        str(dns_port),
        "--ready-fd",
        str(write_end),
    ]
    if catch_all:
        command.append("--catch-all")
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=sandbox_dir,
            pass_fds=(write_end,),
            start_new_session=True,
        )
    except OSError as exc:
        raise click.ClickException(f"cannot start the sandbox supervisor: {exc}") from None
    finally:
        os.close(write_end)
        log.close()
    try:
        message = _read_verdict(read_end, STARTUP_TIMEOUT + READY_GRACE)
    finally:
        os.close(read_end)
    if message is None:
        if process.poll() is None:
            process.terminate()
        raise click.ClickException(
            f"the sandbox supervisor did not report back (see {sandbox_dir / SUPERVISOR_LOG})"
        )
    if not message.get("ok"):
        process.wait(10)
        raise click.ClickException(str(message.get("error") or "the sandbox did not start"))


def _read_verdict(fd: int, timeout: float) -> dict[str, Any] | None:
    """The supervisor's one-line JSON verdict, or None on EOF/timeout/garbage."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        message = json.loads(data.split(b"\n", 1)[0] or b"null")
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


@sandbox.command()
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
def down(as_json: bool) -> None:
    """Stop the sandbox and remove its settings.json."""
    home = config.home_dir()
    try:
        state = stop_running(home)
    except (RecapitoError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        _echo_json({"stopped": state is not None, "home": str(home)})
    elif state is None:
        click.echo(f"sandbox not running (home {home})")
    else:
        click.echo(f"sandbox stopped (home {home})")


@sandbox.command()
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
def status(as_json: bool) -> None:
    """Show every server: address, posture, up or down."""
    home = config.home_dir()
    info = describe(home)
    if as_json:
        _echo_json(info)
        return
    if info["running"]:
        click.echo(f"sandbox running (pid {info['owner_pid']}), home {home}")
    else:
        click.echo(f"sandbox not running, home {home}")
    dns = info["dns"]
    where = f"{dns['address']}:{dns['port']}" if dns["port"] else "-"
    click.echo(f"  {'DNS':<28} {where:<22} {'authoritative':<11} {'up' if dns['up'] else 'down'}")
    if info["dane_resolver"]:
        click.echo(f"  {'DANE resolver':<28} {info['dane_resolver']:<22} validating")
    for server in info["servers"]:
        port = server["port"]
        where = f"{server['address']}:{port}" if port else server["address"]
        state = "up" if server["up"] else "down"
        click.echo(f"  {server['host']:<28} {where:<22} {server['posture']:<11} {state}")


if __name__ == "__main__":
    sandbox()
