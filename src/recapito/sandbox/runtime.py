"""Starting and stopping the sandbox: certificates, the DNS server and one process per MX server.

``Sandbox`` owns the child processes it starts; used as a context manager (or with
``start()``/``stop()``) it is what the tests use. ``recapito sandbox up`` runs one inside a
detached supervisor process. Either way the running sandbox is described by two files in
``$RECAPITO_HOME/sandbox``:

- ``settings.json``: ``RECAPITO_DNS``, ``RECAPITO_MX_PORT``, ``RECAPITO_TLS_CA_FILE``,
  ``RECAPITO_HTTPS_PORT`` (the MTA-STS policy server), ``RECAPITO_DANE_RESOLVER`` (the
  validating resolver, when nsd/unbound/ldns are installed: see ``recapito.sandbox.dnssec``),
  ``RECAPITO_BOUNCE_IMAP_*`` (the bounce mailbox, when Dovecot is installed: see
  ``recapito.sandbox.imap``; the file is then mode 0600, it holds the mailbox password),
  read by ``recapito.config.Settings.load`` so the CLI and the flows talk to the sandbox;
- ``state.json``: who owns the sandbox and the PID of every server (``SandboxState``).

Every child watches the PID of its owner and exits when the owner is gone, so an owner killed
with SIGKILL leaves nothing listening.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from dnslib import DNSError

import recapito
from recapito import config
from recapito.errors import RecapitoError
from recapito.sandbox import _proc, dnssec, imap, world
from recapito.sandbox import pec as pec_sandbox
from recapito.sandbox.certs import (
    KeyPair,
    SandboxPKI,
    ensure_certificates,
    ensure_policy_host_certificates,
)
from recapito.sandbox.dkimkeys import SandboxDkimKey, dkim_setting, ensure_dkim_keys
from recapito.sandbox.dns import DNSProcessSpec, ZoneRecord, query
from recapito.sandbox.https import HTTPSProcessSpec
from recapito.sandbox.maildir import StoredMessage, read_maildirs
from recapito.sandbox.servers import MXProcessSpec
from recapito.sandbox.twilio import TwilioProcessSpec

__all__ = [
    "DNS_ADDRESS",
    "Sandbox",
    "SandboxError",
    "SandboxState",
    "StoredMessage",
    "read_maildirs",
    "read_state",
]

DNS_ADDRESS = "127.0.0.1"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


class SandboxError(RecapitoError):
    """The sandbox cannot start, stop or be found (ports in use, a child died...)."""


class _PortRace(SandboxError):
    """A port chosen as free was taken before a child could bind it; worth another try."""


@dataclass(frozen=True)
class ServerState:
    host: str
    address: str
    posture: str
    pid: int


@dataclass(frozen=True)
class SandboxState:
    """The content of ``state.json``: enough to find, probe and stop a running sandbox."""

    owner_pid: int
    supervised: bool  # True when the owner is the ``sandbox up`` supervisor process
    home: str
    dns_address: str
    dns_port: int
    dns_pid: int
    mx_port: int
    catch_all: bool
    ca_file: str
    started_at: str
    servers: tuple[ServerState, ...]
    # DNSSEC child (nsd + unbound + the DANE-TA MX) and its resolver port; 0 when not running
    dnssec_pid: int = 0
    dane_resolver_port: int = 0
    https_port: int = 0  # MTA-STS policy server (0 in state files written before it existed)
    https_pid: int = 0
    imap_port: int = 0  # the bounce mailbox (implicit TLS); 0 when Dovecot is not installed
    imap_pid: int = 0
    pec_pid: int = 0  # the PEC providers (recapito.sandbox.pec); 0 when not running
    twilio_port: int = 0  # the Twilio-compatible Messages API (recapito.sandbox.twilio)
    twilio_pid: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SandboxState:
        data: dict[str, Any] = json.loads(text)
        data["servers"] = tuple(ServerState(**s) for s in data["servers"])
        return cls(**data)

    @property
    def child_pids(self) -> list[int]:
        pids = [self.dns_pid, *(s.pid for s in self.servers)]
        extra = (self.https_pid, self.dnssec_pid, self.imap_pid, self.pec_pid, self.twilio_pid)
        return [*pids, *(p for p in extra if p)]


def state_path(home: Path) -> Path:
    return config.sandbox_dir(home) / "state.json"


def read_state(home: Path) -> SandboxState | None:
    """The recorded state of the sandbox under ``home``, or None if there is none (or garbage)."""
    path = state_path(home)
    try:
        return SandboxState.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    fields = stat.rpartition(")")[2].split()
    return not fields or fields[0] not in ("Z", "X")


def is_sandbox_process(pid: int) -> bool:
    """Guard against recycled PIDs: does ``pid`` run recapito's sandbox code?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no procfs to check with
    # ``python -m recapito.sandbox.…`` for servers; ``recapito sandbox up`` or
    # ``python -m recapito.sandbox.cli up`` for a supervisor.
    return b"recapito" in cmdline and b"sandbox" in cmdline


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- ports ----------------------------------------------------------------------------------


def tcp_port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option asyncio and socketserver use, so TIME_WAIT leftovers do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def udp_port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def _kernel_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((DNS_ADDRESS, 0))
        port: int = sock.getsockname()[1]
    return port


def free_mx_port(addresses: Sequence[str]) -> int:
    """A TCP port that is free on 127.0.0.1 and on every MX address."""
    for _ in range(100):
        port = _kernel_port(socket.SOCK_STREAM)
        if all(tcp_port_free(a, port) for a in addresses):
            return port
    raise SandboxError("cannot find a TCP port free on every sandbox MX address")


def free_dns_port(avoid: int = 0) -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(100):
        port = _kernel_port(socket.SOCK_DGRAM)
        if port != avoid and tcp_port_free(DNS_ADDRESS, port):
            return port
    raise SandboxError("cannot find a port free for DNS on 127.0.0.1 (UDP and TCP)")


def free_https_port(avoid: Sequence[int | None] = ()) -> int:
    """A TCP port free on the MTA-STS server's address (and not one of ``avoid``)."""
    for _ in range(100):
        port = _kernel_port(socket.SOCK_STREAM)
        if port not in avoid and tcp_port_free(world.MTA_STS_ADDRESS, port):
            return port
    raise SandboxError(f"cannot find a TCP port free on {world.MTA_STS_ADDRESS} for HTTPS")


def check_ports_free(mx_port: int | None, dns_port: int | None) -> None:
    """Raise SandboxError naming the first requested port that is already taken."""
    if mx_port:
        busy = [s.address for s in world.MX_SERVERS if not tcp_port_free(s.address, mx_port)]
        if busy:
            more = f" (and {len(busy) - 1} more MX addresses)" if len(busy) > 1 else ""
            raise SandboxError(f"MX port {mx_port} is already in use on {busy[0]}{more}")
    if dns_port and not (
        udp_port_free(DNS_ADDRESS, dns_port) and tcp_port_free(DNS_ADDRESS, dns_port)
    ):
        raise SandboxError(f"DNS port {dns_port} is already in use on {DNS_ADDRESS}")


# -- probes ---------------------------------------------------------------------------------


def probe_mx(address: str, port: int, timeout: float = 3.0) -> str | None:
    """The 220 banner line of an MX server, or None if it does not answer with one."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            data = b""
            deadline = time.monotonic() + timeout
            while b"\r\n" not in data and time.monotonic() < deadline:
                chunk = sock.recv(1024)
                if not chunk:
                    break
                data += chunk
            line = data.split(b"\r\n", 1)[0].decode("utf-8", "replace")
            if not line.startswith("220"):
                return None
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return line
    except OSError:
        return None


def probe_tcp(address: str, port: int, timeout: float = 2.0) -> bool:
    """True if something accepts TCP connections on ``address:port``."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def probe_dns(address: str, port: int, timeout: float = 2.0) -> bool:
    """True if the sandbox DNS answers a question over UDP and accepts TCP connections."""
    try:
        by_udp = query(address, port, "sandbox.test", "TXT", timeout=timeout)
        by_tcp = query(address, port, "sandbox.test", "TXT", timeout=timeout, tcp=True)
    except (OSError, ValueError, DNSError):
        return False
    return bool(by_udp.header.aa and by_tcp.header.aa)


# -- the sandbox ----------------------------------------------------------------------------


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    log_file: IO[bytes]


class Sandbox:
    """The local mail world, started in child processes owned by this object.

    ``mx_port``/``dns_port`` None (or 0) means "pick free ports". ``extra_records`` are added
    to the DNS zone (TXT for MTA-STS, TLSA for DANE...). ``supervisor`` marks the owner as the
    ``sandbox up`` supervisor (recorded in ``state.json`` so ``sandbox down`` knows whom to
    stop).
    """

    def __init__(
        self,
        home: Path,
        mx_port: int | None = None,
        dns_port: int | None = None,
        catch_all: bool = False,
        *,
        extra_records: Sequence[ZoneRecord] = (),
        supervisor: bool = False,
        startup_timeout: float = STARTUP_TIMEOUT,
        https_port: int | None = None,
        pec: pec_sandbox.PecWorld | None = None,
    ) -> None:
        self.home = Path(home).resolve()
        # the PEC providers and their sender mailboxes (Dovecot users), when Dovecot runs
        self.pec_world = pec or pec_sandbox.PecWorld()
        self._pec_passwords = self.pec_world.new_passwords()
        self._twilio_sid = "AC" + secrets.token_hex(16)
        self._twilio_token = secrets.token_hex(16)
        self._twilio_port: int | None = None
        self._pec_ports: dict[str, int] = {}
        self.catch_all = catch_all
        self.extra_records = tuple(extra_records)
        self.supervisor = supervisor
        self.startup_timeout = startup_timeout
        self._want_mx_port = mx_port or None
        self._want_dns_port = dns_port or None
        self._mx_port: int | None = self._want_mx_port
        self._dns_port: int | None = self._want_dns_port
        self._want_https_port = https_port or None
        self._https_port: int | None = self._want_https_port
        self._policy_certs: dict[str, KeyPair] = {}
        self._dkim_keys: list[SandboxDkimKey] = []  # the demo sender's, published in DNS
        self._children: list[_Child] = []
        self._pki: SandboxPKI | None = None
        self._dane_port: int | None = None  # unbound, when the DNSSEC tools are installed
        self._dnssec_noted = False
        self._imap_ports: tuple[int, int] | None = None  # (STARTTLS, implicit TLS)
        self._imap_password = secrets.token_urlsafe(18)
        self._running = False

    # -- paths and settings -----------------------------------------------------------------

    @property
    def sandbox_dir(self) -> Path:
        return config.sandbox_dir(self.home)

    @property
    def ca_file(self) -> Path:
        return self.sandbox_dir / "ca.pem"

    @property
    def maildir_root(self) -> Path:
        return self.sandbox_dir / "maildir"

    @property
    def bounce_maildir(self) -> Path:
        """The bounce mailbox's Maildir: the MX servers' DSNs land in its ``new`` folder."""
        return imap.bounce_maildir(self.sandbox_dir)

    @property
    def imap_ports(self) -> tuple[int, int] | None:
        """(STARTTLS port, implicit-TLS port) of the bounce mailbox, None without Dovecot."""
        return self._imap_ports

    @property
    def pec_ports(self) -> dict[str, int]:
        """SMTPS port of each PEC provider (empty when they do not run: no Dovecot)."""
        return dict(self._pec_ports)

    @property
    def pec_mailboxes_file(self) -> Path:
        """The sender PEC mailboxes (recapito.pec.mailboxes), with passwords: mode 0600."""
        return self.sandbox_dir / "pec-mailboxes.json"

    @property
    def pec_journal(self) -> Path:
        """What the PEC providers did, one JSON line per submission, refusal and receipt."""
        return pec_sandbox.journal_path(self.sandbox_dir)

    def pec_maildir(self, login: str) -> Path:
        """The Maildir of a sender PEC mailbox (receipts land in its ``new`` folder)."""
        return imap.mail_root(self.sandbox_dir) / login / "Maildir"

    @property
    def log_dir(self) -> Path:
        return self.sandbox_dir / "logs"

    @property
    def settings_path(self) -> Path:
        return config.sandbox_settings_path(self.home)

    @property
    def mx_port(self) -> int:
        if self._mx_port is None:
            raise SandboxError("the sandbox has not been started: no MX port chosen yet")
        return self._mx_port

    @property
    def dns_port(self) -> int:
        if self._dns_port is None:
            raise SandboxError("the sandbox has not been started: no DNS port chosen yet")
        return self._dns_port

    @property
    def https_port(self) -> int:
        """TCP port of the MTA-STS policy server on ``world.MTA_STS_ADDRESS``."""
        if self._https_port is None:
            raise SandboxError("the sandbox has not been started: no HTTPS port chosen yet")
        return self._https_port

    @property
    def dane_resolver(self) -> tuple[str, int] | None:
        """(host, port) of the validating resolver, or None when DNSSEC tools are missing."""
        return (DNS_ADDRESS, self._dane_port) if self._dane_port else None

    @property
    def dns_address(self) -> tuple[str, int]:
        """(host, port) of the DNS server, the shape of ``config.Settings.dns``."""
        return (DNS_ADDRESS, self.dns_port)

    @property
    def dkim_keys(self) -> tuple[SandboxDkimKey, ...]:
        """The demo sender's DKIM keys, all published in the sandbox DNS."""
        return tuple(self._dkim_keys)

    @property
    def servers(self) -> tuple[world.MXServer, ...]:
        return world.MX_SERVERS

    @property
    def running(self) -> bool:
        return self._running

    @property
    def pids(self) -> dict[str, int]:
        """PID of every child, by MX host name (and ``"dns"``)."""
        return {child.name: child.process.pid for child in self._children}

    def env(self) -> dict[str, str]:
        """The settings that point recapito at this sandbox (the DANE resolver when it runs)."""
        settings = {
            "RECAPITO_DNS": f"{DNS_ADDRESS}:{self.dns_port}",
            "RECAPITO_MX_PORT": str(self.mx_port),
            "RECAPITO_TLS_CA_FILE": str(self.ca_file),
            "RECAPITO_HTTPS_PORT": str(self.https_port),
        }
        if self._dane_port:
            settings["RECAPITO_DANE_RESOLVER"] = f"{DNS_ADDRESS}:{self._dane_port}"
        if self._dkim_keys:
            settings["RECAPITO_DKIM_KEYS"] = dkim_setting(self._dkim_keys)
        if self._imap_ports:
            settings.update(
                {
                    "RECAPITO_BOUNCE_IMAP_HOST": world.IMAP_SERVER.host,
                    "RECAPITO_BOUNCE_IMAP_PORT": str(self._imap_ports[1]),
                    "RECAPITO_BOUNCE_IMAP_SECURITY": "tls",
                    "RECAPITO_BOUNCE_IMAP_USER": world.BOUNCE_MAILBOX_USER,
                    "RECAPITO_BOUNCE_IMAP_PASSWORD": self._imap_password,
                    "RECAPITO_BOUNCE_IMAP_CA_FILE": str(self.ca_file),
                }
            )
        if self._pec_ports:
            settings["RECAPITO_PEC_MAILBOXES_FILE"] = str(self.pec_mailboxes_file)
            # the providers sign their receipts with certificates of the sandbox CA
            settings["RECAPITO_PEC_CA_FILE"] = str(self.ca_file)
        if self._twilio_port is not None:
            settings.update(
                {
                    "RECAPITO_TWILIO_ACCOUNT_SID": self._twilio_sid,
                    "RECAPITO_TWILIO_AUTH_TOKEN": self._twilio_token,
                    "RECAPITO_TWILIO_BASE_URL": f"http://{DNS_ADDRESS}:{self._twilio_port}",
                    "RECAPITO_TWILIO_FROM": "+393330000000",
                }
            )
        return settings

    def messages(self) -> list[StoredMessage]:
        """Everything the MX servers have stored so far."""
        return read_maildirs(self.maildir_root)

    def clear_maildirs(self) -> int:
        """Delete the stored messages (keeping the folders); returns how many were removed."""
        removed = 0
        if not self.maildir_root.is_dir():
            return 0
        for domain in self.maildir_root.iterdir():
            for sub in ("new", "cur"):
                folder = domain / sub
                if folder.is_dir():
                    for entry in folder.iterdir():
                        entry.unlink(missing_ok=True)
                        removed += 1
        return removed

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Sandbox:
        """Start everything and return once every server answers; raises SandboxError."""
        if self._running:
            return self
        self.sandbox_dir.mkdir(parents=True, exist_ok=True)
        self._take_over_stale_state()
        try:
            self._pki = ensure_certificates(self.sandbox_dir)
            self._policy_certs = ensure_policy_host_certificates(self.sandbox_dir)
            self._dkim_keys = ensure_dkim_keys(self.sandbox_dir)
        except (OSError, ValueError) as exc:
            raise SandboxError(
                f"cannot create sandbox certificates in {self.sandbox_dir}: {exc}"
            ) from exc
        self.maildir_root.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            imap.prepare_maildir(self.bounce_maildir)
        except (OSError, KeyError) as exc:
            raise SandboxError(
                f"cannot create the bounce mailbox {self.bounce_maildir}: {exc}"
            ) from exc

        # A port picked as free can be taken by someone else before the child binds it;
        # only then is another try worth it.
        auto = self._want_mx_port is None or self._want_dns_port is None
        attempts = 5 if auto else 1
        for attempt in range(attempts):
            self._choose_ports()
            try:
                self._launch()
                break
            except _PortRace:
                self._terminate_children()
                if attempt == attempts - 1:
                    raise
            except BaseException:
                self._terminate_children()
                raise
        self._running = True
        try:
            self._write_files()
        except OSError as exc:
            self.stop()
            raise SandboxError(
                f"cannot write sandbox settings in {self.sandbox_dir}: {exc}"
            ) from exc
        atexit.register(self._stop_at_exit)
        return self

    def stop(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL) and remove settings.json and state.json."""
        self._terminate_children()
        imap.remove_mail_root(self.sandbox_dir)
        if self._running:
            state = read_state(self.home)
            if state is not None and state.owner_pid == os.getpid():
                state_path(self.home).unlink(missing_ok=True)
                self.settings_path.unlink(missing_ok=True)
        self._running = False
        atexit.unregister(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        # At interpreter exit there is nobody left to tell about a failure.
        with contextlib.suppress(Exception):
            self.stop()

    def wait(self) -> None:
        """Block until a child dies (returns) or the process gets a signal."""
        while self._running and all(c.process.poll() is None for c in self._children):
            time.sleep(0.5)

    # -- internals ------------------------------------------------------------------------------

    def _take_over_stale_state(self) -> None:
        state = read_state(self.home)
        if state is None:
            return
        if pid_alive(state.owner_pid):
            # Possibly another Sandbox object of this very process: never touch its servers.
            raise SandboxError(
                f"a sandbox is already running for {self.home} (owner pid {state.owner_pid}); "
                "stop it first"
            )
        # Left behind by an owner that died: clear its children and its files.
        kill_children(state)
        state_path(self.home).unlink(missing_ok=True)
        self.settings_path.unlink(missing_ok=True)

    def _choose_ports(self) -> None:
        check_ports_free(self._want_mx_port, self._want_dns_port)
        addresses = [s.address for s in world.MX_SERVERS]
        self._mx_port = self._want_mx_port or free_mx_port(addresses)
        self._dns_port = self._want_dns_port or free_dns_port()
        self._https_port = self._want_https_port or free_https_port((self._mx_port, self._dns_port))

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Make sure the children import this very copy of recapito.
        src = str(Path(recapito.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        return env

    def _spawn(self, name: str, module: str, spec_json: str) -> None:
        spec_dir = self.sandbox_dir / "specs"
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec_file = spec_dir / f"{name}.json"
        _atomic_write_text(spec_file, spec_json)
        os.chmod(spec_file, 0o600)  # the IMAP spec holds the mailbox password
        log_file = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", module, f"@{spec_file}"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=self._child_env(),
                cwd=self.sandbox_dir,
            )
        except OSError as exc:
            log_file.close()
            raise SandboxError(f"cannot start {name}: {exc}") from exc
        self._children.append(_Child(name, process, log_file))

    def _launch(self) -> None:
        assert self._pki is not None
        owner = os.getpid()
        dns_spec = DNSProcessSpec(
            address=DNS_ADDRESS,
            port=self.dns_port,
            parent_pid=owner,
            catch_all=self.catch_all,
            extra=tuple(
                (r.name, r.rtype, r.value, r.ttl)
                for r in (*(k.record() for k in self._dkim_keys), *self.extra_records)
            ),
        )
        self._spawn("dns", "recapito.sandbox.dns", dns_spec.to_json())
        self._launch_dnssec(owner)
        https_spec = HTTPSProcessSpec(
            address=world.MTA_STS_ADDRESS,
            port=self.https_port,
            parent_pid=owner,
            certs={h: (str(p.cert), str(p.key)) for h, p in self._policy_certs.items()},
        )
        self._spawn("https", "recapito.sandbox.https", https_spec.to_json())
        self._launch_twilio(owner)
        self._launch_imap(owner)
        self._launch_pec(owner)
        for server in world.MX_SERVERS:
            pair = self._pki.leaves.get(server.host)
            spec = MXProcessSpec(
                host=server.host,
                address=server.address,
                posture=server.posture,
                port=self.mx_port,
                cert_file=str(pair.cert) if pair and server.posture != "plain" else None,
                key_file=str(pair.key) if pair and server.posture != "plain" else None,
                maildir_root=str(self.maildir_root),
                parent_pid=owner,
                bounce_maildir=str(self.bounce_maildir),
            )
            self._spawn(server.host, "recapito.sandbox.servers", spec.to_json())
        self._await_ready(time.monotonic() + self.startup_timeout)
        self._check_answers()

    def _launch_dnssec(self, owner: int) -> None:
        """Signed zones, nsd, unbound and the DANE-TA MX host, when the tools are installed."""
        self._dane_port = None
        missing = dnssec.missing_tools()
        if missing:
            if not self._dnssec_noted:
                self._dnssec_noted = True
                with contextlib.suppress(OSError), open(self.log_dir / "dnssec.log", "a") as log:
                    log.write(
                        f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} "
                        f"no DNSSEC/DANE in this sandbox: {', '.join(missing)} not found; "
                        f"install with {dnssec.INSTALL_HINT}\n"
                    )
            return
        ports: list[int] = []
        taken = {self.dns_port, self.mx_port, self._https_port}  # chosen, maybe not bound yet
        for _ in range(20):
            port = free_dns_port(avoid=self.dns_port)
            if port not in ports and port not in taken:
                ports.append(port)
            if len(ports) == 2:
                break
        else:
            raise SandboxError("cannot find two free ports on 127.0.0.1 for nsd and unbound")
        spec = dnssec.DNSSECProcessSpec(
            address=DNS_ADDRESS,
            nsd_port=ports[0],
            resolver_port=ports[1],
            dns_port=self.dns_port,
            mx_port=self.mx_port,
            catch_all=self.catch_all,
            sandbox_dir=str(self.sandbox_dir),
            log_dir=str(self.log_dir),
            maildir_root=str(self.maildir_root),
            parent_pid=owner,
        )
        self._spawn("dnssec", "recapito.sandbox.dnssec", spec.to_json())
        self._dane_port = spec.resolver_port

    def _launch_imap(self, owner: int) -> None:
        """The bounce mailbox (Dovecot), when Dovecot is installed."""
        self._imap_ports = None
        if not imap.available():
            with contextlib.suppress(OSError), open(self.log_dir / "imap.log", "a") as log:
                log.write(
                    f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} no IMAP bounce "
                    f"mailbox in this sandbox: dovecot not found; install with "
                    f"{imap.INSTALL_HINT}\n"
                )
            return
        assert self._pki is not None
        pki = ensure_certificates(self.sandbox_dir, [world.IMAP_SERVER])
        pair = pki.leaves[world.IMAP_SERVER.host]
        taken = {self.mx_port, self.dns_port, self._https_port}
        ports: list[int] = []
        for _ in range(50):
            port = free_https_port(tuple(taken))
            if port not in ports:
                ports.append(port)
                taken.add(port)
            if len(ports) == 2:
                break
        else:
            raise SandboxError("cannot find two free TCP ports on 127.0.0.1 for IMAP")
        spec = imap.IMAPProcessSpec(
            address=world.IMAP_SERVER.address,
            starttls_port=ports[0],
            tls_port=ports[1],
            work_dir=str(self.sandbox_dir / "imap"),
            log_dir=str(self.log_dir),
            cert_file=str(pair.cert),
            key_file=str(pair.key),
            user=world.BOUNCE_MAILBOX_USER,
            password=self._imap_password,
            parent_pid=owner,
            mail_root=str(imap.mail_root(self.sandbox_dir)),
            extra_users=tuple(self._pec_passwords.items()),
        )
        self._spawn("imap", "recapito.sandbox.imap", spec.to_json())
        self._imap_ports = (ports[0], ports[1])

    def _launch_twilio(self, owner: int) -> None:
        """The Twilio-compatible Messages API (recapito.sandbox.twilio) on 127.0.0.1."""
        self._twilio_port = free_https_port((self._mx_port, self._dns_port, self._https_port))
        spec = TwilioProcessSpec(
            address=DNS_ADDRESS,
            port=self._twilio_port,
            parent_pid=owner,
            account_sid=self._twilio_sid,
            auth_token=self._twilio_token,
        )
        self._spawn("twilio", "recapito.sandbox.twilio", spec.to_json())

    def _launch_pec(self, owner: int) -> None:
        """The PEC providers: only with the IMAP server, where their receipts are read."""
        self._pec_ports = {}
        if self._imap_ports is None or not self.pec_world.providers:
            return
        taken = {self.mx_port, self.dns_port, self._https_port, *self._imap_ports}
        ports: dict[str, int] = {}
        for provider in self.pec_world.providers:
            port = free_https_port(tuple(taken))
            taken.add(port)
            ports[provider.name] = port
        spec = self.pec_world.process_spec(
            self.sandbox_dir,
            ports,
            self._pec_passwords,
            parent_pid=owner,
            mail_root=imap.mail_root(self.sandbox_dir),
            mail_owner=imap.mail_owner(),
        )
        self._spawn("pec", "recapito.sandbox.pec", spec.to_json())
        self._pec_ports = ports

    def _await_ready(self, deadline: float) -> None:
        """Read each child's READY/ERROR line; raise on the first error or at the deadline."""
        selector = selectors.DefaultSelector()
        buffers: dict[str, bytes] = {}
        for child in self._children:
            assert child.process.stdout is not None
            selector.register(child.process.stdout, selectors.EVENT_READ, child)
            buffers[child.name] = b""
        pending = {child.name for child in self._children}
        errors: list[str] = []
        races: list[str] = []
        try:
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SandboxError(
                        f"timed out after {self.startup_timeout:.0f}s waiting for "
                        f"{', '.join(sorted(pending))} to start (see {self.log_dir})"
                    )
                for key, _ in selector.select(remaining):
                    source: _Child = key.data
                    chunk = os.read(key.fd, 4096)
                    buffers[source.name] += chunk
                    if chunk and b"\n" not in buffers[source.name]:
                        continue
                    selector.unregister(key.fileobj)
                    pending.discard(source.name)
                    line = buffers[source.name].split(b"\n", 1)[0].decode("utf-8", "replace")
                    if line == _proc.READY:
                        continue
                    if line.startswith(f"{_proc.ERROR} {_proc.BUSY} "):
                        races.append(line.removeprefix(f"{_proc.ERROR} {_proc.BUSY} "))
                    elif line.startswith(_proc.ERROR):
                        errors.append(line.removeprefix(_proc.ERROR).strip())
                    else:
                        errors.append(f"{source.name} exited at start-up: {self._log_tail(source)}")
                if errors:
                    raise SandboxError(errors[0])
        finally:
            selector.close()
            for child in self._children:
                if child.process.stdout is not None:
                    child.process.stdout.close()
        if races:
            if self._want_mx_port is None or self._want_dns_port is None:
                raise _PortRace(races[0])
            raise SandboxError(races[0])

    def _log_tail(self, child: _Child) -> str:
        try:
            lines = (self.log_dir / f"{child.name}.log").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        return lines[-1] if lines else f"exit status {child.process.poll()}"

    def _check_answers(self) -> None:
        """Every MX server must greet with 220 and the DNS server must answer."""
        for server in world.MX_SERVERS:
            if probe_mx(server.address, self.mx_port) is None:
                raise SandboxError(
                    f"{server.host} ({server.address}:{self.mx_port}) does not greet with 220"
                )
        if self._twilio_port is not None and not probe_tcp(DNS_ADDRESS, self._twilio_port):
            raise SandboxError(
                f"the Twilio API on {DNS_ADDRESS}:{self._twilio_port} does not accept connections"
            )
        if not probe_tcp(world.MTA_STS_ADDRESS, self.https_port):
            raise SandboxError(
                f"the MTA-STS HTTPS server on {world.MTA_STS_ADDRESS}:{self.https_port} "
                "does not accept connections"
            )
        if not probe_dns(DNS_ADDRESS, self.dns_port):
            raise SandboxError(f"the sandbox DNS on {DNS_ADDRESS}:{self.dns_port} does not answer")

    def _write_files(self) -> None:
        settings = self.env()
        _atomic_write_text(self.settings_path, json.dumps(settings, indent=2) + "\n")
        # it holds the Twilio API's auth token (and the bounce mailbox's password)
        os.chmod(self.settings_path, 0o600)
        if self._pec_ports:
            assert self._imap_ports is not None
            document = self.pec_world.mailboxes_document(
                self._pec_ports,
                self._pec_passwords,
                ca_file=self.ca_file,
                imap=(world.IMAP_SERVER.host, self._imap_ports[1]),
            )
            # written 0600 from the start: it holds the mailboxes' passwords
            tmp = self.pec_mailboxes_file.with_name(f".pec-mailboxes.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(document, indent=2) + "\n")
            os.replace(tmp, self.pec_mailboxes_file)
        by_name = {child.name: child.process.pid for child in self._children}
        state = SandboxState(
            owner_pid=os.getpid(),
            supervised=self.supervisor,
            home=str(self.home),
            dns_address=DNS_ADDRESS,
            dns_port=self.dns_port,
            dns_pid=by_name["dns"],
            mx_port=self.mx_port,
            catch_all=self.catch_all,
            ca_file=str(self.ca_file),
            started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            servers=tuple(
                ServerState(s.host, s.address, s.posture, by_name[s.host]) for s in world.MX_SERVERS
            ),
            dnssec_pid=by_name.get("dnssec", 0),
            dane_resolver_port=self._dane_port or 0,
            https_port=self.https_port,
            https_pid=by_name["https"],
            imap_port=self._imap_ports[1] if self._imap_ports else 0,
            imap_pid=by_name.get("imap", 0),
            pec_pid=by_name.get("pec", 0),
            twilio_port=self._twilio_port or 0,
            twilio_pid=by_name.get("twilio", 0),
        )
        _atomic_write_text(state_path(self.home), state.to_json() + "\n")

    def _terminate_children(self) -> None:
        children, self._children = self._children, []
        for child in children:
            if child.process.poll() is None:
                _signal(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            if child.process.stdout is not None:
                child.process.stdout.close()
            child.log_file.close()


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def kill_children(state: SandboxState, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the server processes a state file lists (when they are still sandbox processes)."""
    victims = [p for p in state.child_pids if pid_alive(p) and is_sandbox_process(p)]
    for pid in victims:
        _signal(pid, signal.SIGTERM)
    _wait_gone(victims, timeout)
    for pid in victims:
        if pid_alive(pid):
            _signal(pid, signal.SIGKILL)
    _wait_gone(victims, 1.0)


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return not any(pid_alive(p) for p in pids)


def stop_running(home: Path, timeout: float = 15.0) -> SandboxState | None:
    """Stop the sandbox recorded under ``home``; return its state, or None if none was running.

    A supervised sandbox is asked to stop through its supervisor (SIGTERM), which stops its
    children; a sandbox owned by some other program (a test run) only loses its servers.
    Leftover files are removed either way.
    """
    state = read_state(home)
    if state is None:
        config.sandbox_settings_path(home).unlink(missing_ok=True)
        return None
    owner = state.owner_pid
    if state.supervised and pid_alive(owner) and is_sandbox_process(owner):
        _signal(owner, signal.SIGTERM)
        if not _wait_gone([owner], timeout):
            _signal(owner, signal.SIGKILL)
    kill_children(state)
    state_path(home).unlink(missing_ok=True)
    config.sandbox_settings_path(home).unlink(missing_ok=True)
    return state


def describe(home: Path) -> dict[str, Any]:
    """What ``sandbox status`` reports: each server's address, posture and whether it answers."""
    state = read_state(home)
    running = state is not None and pid_alive(state.owner_pid)
    port = state.mx_port if state is not None else None
    pids = {s.host: s.pid for s in state.servers} if state is not None else {}
    servers = []
    for server in world.MX_SERVERS:
        up = bool(running and port is not None and probe_mx(server.address, port, timeout=2.0))
        servers.append(
            {
                "host": server.host,
                "address": server.address,
                "port": port,
                "posture": server.posture,
                "pid": pids.get(server.host),
                "up": up,
            }
        )
    dns: dict[str, Any] = {"address": None, "port": None, "pid": None, "up": False}
    if state is not None:
        dns = {
            "address": state.dns_address,
            "port": state.dns_port,
            "pid": state.dns_pid,
            "up": bool(running and probe_dns(state.dns_address, state.dns_port)),
        }
    return {
        "running": running,
        "home": str(home),
        "owner_pid": state.owner_pid if state is not None else None,
        "supervised": state.supervised if state is not None else None,
        "catch_all": state.catch_all if state is not None else None,
        "mx_port": port,
        "ca_file": state.ca_file if state is not None else None,
        "started_at": state.started_at if state is not None else None,
        "dns": dns,
        "dane_resolver": (
            f"{state.dns_address}:{state.dane_resolver_port}"
            if state is not None and state.dane_resolver_port
            else None
        ),
        "mta_sts": (
            f"{world.MTA_STS_ADDRESS}:{state.https_port}"
            if state is not None and state.https_port
            else None
        ),
        "servers": servers,
    }
