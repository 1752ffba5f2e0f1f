"""The sandbox's bounce mailbox: a private Dovecot IMAP server (when Dovecot is installed).

``Sandbox`` starts one more child, ``python -m recapito.sandbox.imap '<IMAPProcessSpec>'``,
which writes a Dovecot configuration under ``$RECAPITO_HOME/sandbox/imap`` and runs
``dovecot -F -c <conf>`` in the foreground with:

- one user (``world.BOUNCE_MAILBOX_USER``) in a passwd-file, with a random password chosen
  by the sandbox (handed to the collector through ``settings.json``, never logged);
- ``mail_location = maildir:~/Maildir``; the MX servers drop their DSNs straight into that
  Maildir's ``new`` folder (the Maildir protocol makes that safe while Dovecot runs);
- two listeners on 127.0.0.1: STARTTLS (``imap``) and implicit TLS (``imaps``), both with a
  certificate from the sandbox CA naming ``world.IMAP_SERVER.host``; plaintext login is
  refused before TLS.

Dovecot's own processes run as the current user; mail is read as the current user too, or,
as root, as ``nobody`` (Dovecot never reads mail as uid 0; see ``mail_root``), and the login
processes run as ``dovenull``. Its sockets live in a short temporary directory, removed at
exit. Dovecot gets SIGTERM when this process dies (``PR_SET_PDEATHSIG``) and this process
watches its parent, like every sandbox child. ``READY`` is written once both ports answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from recapito.sandbox import _proc, world
from recapito.sandbox.dnssec import _die_with_parent

INSTALL_HINT = "apt-get install -y dovecot-imapd (or run .ci/run)"
EXTRA_TOOL_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/sbin", "/sbin")
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 3.0
_BUSY_MARKERS = ("address already in use",)

log = logging.getLogger(__name__)


def find_dovecot() -> str | None:
    found = shutil.which("dovecot")
    if found:
        return found
    for folder in EXTRA_TOOL_DIRS:
        candidate = Path(folder) / "dovecot"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def available() -> bool:
    return find_dovecot() is not None


@dataclass(frozen=True)
class IMAPProcessSpec:
    address: str
    starttls_port: int  # ``imap``: STARTTLS required before login
    tls_port: int  # ``imaps``: implicit TLS
    work_dir: str
    log_dir: str
    cert_file: str
    key_file: str
    user: str
    password: str
    parent_pid: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> IMAPProcessSpec:
        data = json.loads(text)
        data["extra_users"] = tuple(tuple(u) for u in data.get("extra_users", ()))
        return cls(**data)

    mail_root: str  # the users' home directories
    # more mailbox users (login, password): the sandbox PEC mailboxes (recapito.sandbox.pec)
    extra_users: tuple[tuple[str, str], ...] = ()


def mail_root(sandbox_dir: Path) -> Path:
    """Where the mailbox users' homes live.

    Under the sandbox directory, except as root: Dovecot never reads mail as uid 0, and the
    unprivileged user it reads mail as (``nobody``) often cannot enter the sandbox home
    (mode 0700), so the homes go to a directory of their own in the temporary directory,
    named after the sandbox directory and removed when the sandbox stops.
    """
    if os.geteuid() != 0:
        return sandbox_dir / "imap" / "home"
    tag = hashlib.sha256(str(sandbox_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"recapito-imap-{tag}"


def bounce_maildir(sandbox_dir: Path, user: str = world.BOUNCE_MAILBOX_USER) -> Path:
    """The Maildir the bounce mailbox's INBOX lives in (MX servers write DSNs to ``new``)."""
    return mail_root(sandbox_dir) / user / "Maildir"


def mail_owner() -> tuple[int, int]:
    """(uid, gid) Dovecot reads mail as: ``nobody`` for root, else the current user."""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid
    return os.geteuid(), os.getegid()


def remove_mail_root(sandbox_dir: Path) -> None:
    """Remove the temporary mail homes of a root-run sandbox (nothing otherwise)."""
    root = mail_root(sandbox_dir)
    if os.geteuid() == 0 and root.name.startswith("recapito-imap-"):
        shutil.rmtree(root, ignore_errors=True)


def prepare_maildir(maildir: Path) -> None:
    """Create the Maildir the MX servers and Dovecot share, owned by the mail user."""
    uid, gid = mail_owner()
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(maildir.parent.parent, 0o711)
        for path in (maildir.parent, maildir, *(maildir / sub for sub in ("tmp", "new", "cur"))):
            os.chown(path, uid, gid)
            os.chmod(path, 0o700)


def dovecot_conf(spec: IMAPProcessSpec, base_dir: Path) -> str:
    """Dovecot's configuration (see the module docstring for who runs as whom).
    ``base_dir`` (sockets) must be short: UNIX socket paths are limited to 108 bytes."""
    work = Path(spec.work_dir)
    me = pwd.getpwuid(os.geteuid())
    user = me.pw_name
    uid, gid = mail_owner()
    login = user
    if os.geteuid() == 0:  # login processes refuse root; they only touch sockets in base_dir
        login = "dovenull" if _user_exists("dovenull") else "nobody"
    return f"""# written by recapito.sandbox.imap: the sandbox bounce mailbox
protocols = imap
listen = {spec.address}
base_dir = {base_dir}
state_dir = {work / "state"}
log_path = {Path(spec.log_dir) / "dovecot.log"}
info_log_path = {Path(spec.log_dir) / "dovecot.log"}
default_internal_user = {user}
default_login_user = {login}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
ssl = required
ssl_cert = <{spec.cert_file}
ssl_key = <{spec.key_file}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {work / "passwd"}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={spec.mail_root}/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = {spec.address}
    port = {spec.starttls_port}
  }}
  inet_listener imaps {{
    address = {spec.address}
    port = {spec.tls_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service auth {{
  user = {user}
}}
service auth-worker {{
  user = {user}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
protocol imap {{
  mail_max_userip_connections = 50
}}
"""


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def write_config(spec: IMAPProcessSpec, base_dir: Path) -> Path:
    work = Path(spec.work_dir)
    (work / "state").mkdir(parents=True, exist_ok=True)
    Path(spec.log_dir).mkdir(parents=True, exist_ok=True)
    passwd = work / "passwd"
    passwd.unlink(missing_ok=True)
    fd = os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(f"{spec.user}:{{PLAIN}}{spec.password}\n")
        for login, password in spec.extra_users:
            handle.write(f"{login}:{{PLAIN}}{password}\n")
    prepare_maildir(Path(spec.mail_root) / spec.user / "Maildir")
    for login, _password in spec.extra_users:
        prepare_maildir(Path(spec.mail_root) / login / "Maildir")
    conf = work / "dovecot.conf"
    conf.write_text(dovecot_conf(spec, base_dir), encoding="utf-8")
    return conf


def greets(address: str, port: int, timeout: float = 1.0) -> bool:
    """True if an IMAP server answers on ``address:port`` (``* OK`` on a plain socket)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            return sock.recv(64).startswith(b"* OK")
    except OSError:
        return False


async def serve(spec: IMAPProcessSpec) -> int:
    binary = find_dovecot()
    if binary is None:
        _proc.report(f"{_proc.ERROR} IMAP: dovecot not found; install with {INSTALL_HINT}")
        return 1
    base_dir = Path(tempfile.mkdtemp(prefix="recapito-dovecot-"))
    try:
        return await _run(spec, binary, base_dir)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


async def _run(spec: IMAPProcessSpec, binary: str, base_dir: Path) -> int:
    try:
        conf = write_config(spec, base_dir)
    except (OSError, KeyError) as exc:
        _proc.report(f"{_proc.ERROR} IMAP set-up: {exc}")
        return 1
    log_path = Path(spec.log_dir) / "dovecot-stderr.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - closed below
    try:
        process = subprocess.Popen(
            [binary, "-F", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            preexec_fn=_die_with_parent,  # no other thread runs yet
        )
    except OSError as exc:
        log_file.close()
        _proc.report(f"{_proc.ERROR} IMAP: cannot start dovecot: {exc}")
        return 1
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if process.poll() is not None:
                text = _log_text(Path(spec.log_dir))
                if any(m in text.lower() for m in _BUSY_MARKERS):
                    _proc.report(
                        f"{_proc.ERROR} {_proc.BUSY} dovecot: port {spec.starttls_port} or "
                        f"{spec.tls_port} is already in use on {spec.address}"
                    )
                else:
                    last = text.strip().splitlines()[-1:] or [f"exit {process.returncode}"]
                    _proc.report(f"{_proc.ERROR} dovecot exited at start-up: {last[0]}")
                return 1
            if greets(spec.address, spec.starttls_port) and _tls_listens(spec):
                break
            if time.monotonic() > deadline:
                _proc.report(f"{_proc.ERROR} dovecot did not answer within {READY_TIMEOUT:.0f}s")
                return 1
            await asyncio.sleep(0.05)
        _proc.report(_proc.READY)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        watchdog = asyncio.create_task(_proc.watch_parent(spec.parent_pid, stop))
        died = asyncio.create_task(_watch(process, stop))
        await stop.wait()
        watchdog.cancel()
        died.cancel()
        return 0
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log_file.close()


def _tls_listens(spec: IMAPProcessSpec) -> bool:
    try:
        with socket.create_connection((spec.address, spec.tls_port), timeout=1.0):
            return True
    except OSError:
        return False


def _log_text(log_dir: Path) -> str:
    parts = []
    for name in ("dovecot.log", "dovecot-stderr.log"):
        with contextlib.suppress(OSError):
            parts.append((log_dir / name).read_text(errors="replace"))
    return "\n".join(parts)


async def _watch(process: subprocess.Popen[bytes], stop: asyncio.Event) -> None:
    while not stop.is_set():
        if process.poll() is not None:
            log.error("dovecot exited unexpectedly (status %s)", process.returncode)
            stop.set()
            return
        await asyncio.sleep(_proc.PARENT_POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m recapito.sandbox.imap '<spec json>'", file=sys.stderr)
        return 2
    _proc.configure_logging("imap")
    return asyncio.run(serve(IMAPProcessSpec.from_json(_proc.spec_text(args[0]))))


if __name__ == "__main__":
    sys.exit(main())
