"""Plumbing shared by the sandbox's child processes (MX servers and DNS server).

A child is started as ``python -m recapito.sandbox.<module> '<json spec>'`` with its stdout
connected to a pipe the parent reads: the child writes exactly one line there, ``READY`` once
it listens or ``ERROR <reason>`` when it cannot, and then points stdout at /dev/null. Its
stderr goes to a log file. A child also watches the PID of the process that started it and
exits as soon as that process is gone, so a crashed test run or a killed supervisor never
leaves servers behind.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
from pathlib import Path

READY = "READY"
ERROR = "ERROR"
# Second word of an ERROR line when the address:port is taken (the parent may retry elsewhere).
BUSY = "busy"
PARENT_POLL_SECONDS = 0.25


def report(line: str) -> None:
    """Send the one readiness line to the parent, then detach stdout from its pipe."""
    try:
        sys.stdout.write(line.replace("\n", " ") + "\n")
        sys.stdout.flush()
    except OSError:
        pass  # the parent stopped listening; the watchdog will end this process
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def listen_error(what: str, address: str, port: int, exc: OSError) -> str:
    """The ERROR line for a failed bind, flagged ``busy`` when the port is taken."""
    if exc.errno == errno.EADDRINUSE:
        return f"{ERROR} {BUSY} {what}: port {port} is already in use on {address}"
    return f"{ERROR} {what}: cannot listen on {address}:{port}: {exc.strerror or exc}"


def parent_gone(parent_pid: int) -> bool:
    """True once the process that started us has exited (we were re-parented)."""
    return os.getppid() != parent_pid


async def watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if parent_gone(parent_pid):
            logging.getLogger(__name__).warning("parent %d exited; stopping", parent_pid)
            stop.set()
            return
        await asyncio.sleep(PARENT_POLL_SECONDS)


async def serve_until_stopped(listener: asyncio.AbstractServer, parent_pid: int) -> int:
    """Report READY, then serve until SIGTERM/SIGINT or until the parent process exits."""
    report(READY)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watchdog = asyncio.create_task(watch_parent(parent_pid, stop))
    await stop.wait()
    listener.close()
    watchdog.cancel()
    return 0


def configure_logging(name: str) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def spec_text(argument: str) -> str:
    """A child's spec: JSON given inline, or ``@path`` to a file holding it (the runtime
    passes a file, so a zone with thousands of extra records fits no matter the argv limit)."""
    if argument.startswith("@"):
        return Path(argument[1:]).read_text(encoding="utf-8")
    return argument
