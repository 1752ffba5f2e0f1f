"""Postfix as a baseline for ``benchmarks/delivery.py``: private instances in a temp dir.

Two kinds of private Postfix instance (own ``config_directory``, queue and data
directories, log file; the system instance is never touched):

- ``TLSSink``: a Postfix ``smtpd`` on 127.0.0.1 that offers STARTTLS (TLS 1.3 only, a
  certificate signed by a CA the clients trust) and hands every transaction to a plain
  ``smtp-sink`` through ``smtpd_proxy_filter``. Mail never enters that instance's queue,
  so the sink stays C-speed: TLS termination in ``smtpd``, discard in ``smtp-sink``.
- ``PostfixRelay``: a Postfix that takes mail on its own ``smtpd`` (every message put on
  hold), then, when released, delivers the queue to a sink with its ``smtp`` client:
  plain to ``smtp-sink``, or with ``smtp_tls_security_level = secure`` (certificate
  verified against the CA, name ``mx.bench.test``) and ``smtp_tls_connection_reuse``
  through ``tlsproxy`` to the TLS sink. Only queue → sink is timed: from the release
  (``postsuper -H ALL`` + ``postqueue -f``) to the last ``status=sent`` in its log.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTSUPER = "/usr/sbin/postsuper"
POSTQUEUE = "/usr/sbin/postqueue"

# Services every instance needs; chroot off so no files have to be copied into a jail.
# service type private unpriv chroot wakeup maxproc command
_BASE_MASTER = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
tlsproxy  unix  -       -       n       -       0       tlsproxy
"""


def ensure_postfix() -> None:
    """Install Debian's postfix package if ``/usr/sbin/postfix`` is missing."""
    if Path(POSTFIX).exists() and shutil.which("smtp-sink"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(
            "Postfix is not installed and cannot be installed here (needs root and apt-get): "
            "apt-get install -y --no-install-recommends postfix"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n",
        check=False,
    )
    done = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "postfix"], env=env, check=False
    )
    if done.returncode != 0 or not Path(POSTFIX).exists():
        raise SystemExit("apt-get install postfix failed; install it by hand and re-run")


class PostfixInstance:
    """One private Postfix instance under ``root``; ``start()`` / ``stop()``."""

    def __init__(self, root: Path, name: str, main: dict[str, str], master: str) -> None:
        self.root = root
        self.config = root / "etc"
        self.queue = root / "queue"
        self.data = root / "data"
        self.log = root / "maillog"
        for d in (self.config, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        # the postfix user must reach the queue and read config, CA and log directory
        for d in (root, self.config):
            d.chmod(0o755)
        shutil.chown(self.data, "postfix", "postfix")
        settings = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config),
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": f"{name}.bench.test",
            "mydomain": "bench.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "disable_dns_lookups": "yes",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(root),
            "syslog_name": f"postfix-{name}",
            "biff": "no",
            "message_size_limit": "50000000",
            "default_process_limit": "200",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_event_limit_exceptions": "$mynetworks",
            "alias_maps": "",
            "alias_database": "",
        }
        settings.update(main)
        (self.config / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in settings.items())
        )
        (self.config / "master.cf").write_text(_BASE_MASTER + master)
        self.env = dict(os.environ, MAIL_CONFIG=str(self.config))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
        )

    def start(self) -> None:
        done = self._postfix("start")
        if done.returncode != 0:
            raise SystemExit(
                f"postfix -c {self.config} start failed:\n{done.stdout}{done.stderr}"
                f"{self.log.read_text() if self.log.exists() else ''}"
            )

    def stop(self) -> None:
        self._postfix("stop")
        # master exits after its children; wait for the pid file to go
        pid_file = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 0)
            except (OSError, ValueError, IndexError):
                break
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_banner(port: int, timeout: float = 15.0) -> None:
    """Wait until an SMTP server answers with a 220 banner on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answers SMTP on 127.0.0.1:{port}")


_TLS_IN = re.compile(
    r"postfix-\w+/smtpd\[\d+\]: (?:\w+ )?TLS connection established from .*?: (\S+)"
)


class TLSSink:
    """STARTTLS (TLS 1.3 only) in Postfix ``smtpd``, discard in ``smtp-sink`` behind it."""

    def __init__(self, root: Path, port: int, sink_port: int, cert: Path, key: Path) -> None:
        self.port = port
        master = (
            f"127.0.0.1:{port} inet n - n - 200 smtpd\n"
            "  -o smtpd_tls_security_level=may\n"
            f"  -o smtpd_proxy_filter=127.0.0.1:{sink_port}\n"
        )
        self.instance = PostfixInstance(
            root,
            "tlssink",
            {
                "smtpd_tls_cert_file": str(cert),
                "smtpd_tls_key_file": str(key),
                "smtpd_tls_protocols": ">=TLSv1.3",
                "smtpd_tls_mandatory_protocols": ">=TLSv1.3",
                "smtpd_tls_loglevel": "1",
                "smtpd_tls_received_header": "yes",
                "smtpd_proxy_timeout": "60s",
                "smtpd_banner": "$myhostname ESMTP bench TLS sink",
                "default_transport": "discard",
                "smtpd_peername_lookup": "no",
                # DSN parameters would be passed through to the plain sink (aiosmtpd refuses them)
                "smtpd_discard_ehlo_keywords": "dsn",
            },
            master,
        )

    def start(self) -> None:
        self.instance.start()
        wait_banner(self.port)

    def stop(self) -> None:
        self.instance.stop()

    def tls_versions(self, since: int = 0) -> dict[str, int]:
        """TLS handshakes the sink's smtpd logged (log text from offset ``since``), by version."""
        counts: dict[str, int] = {}
        for m in _TLS_IN.finditer(self.instance.log_text()[since:]):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        return counts

    def log_offset(self) -> int:
        return len(self.instance.log_text())


@dataclass
class RelayResult:
    msgs_per_s: float
    seconds: float
    sent: int
    tls: dict[str, int]  # client-side handshakes by "Verified TLSv1.3" etc.
    log: str


# with connection reuse the handshake is tlsproxy's (smtp repeats the line for its use)
_TLS_OUT = re.compile(
    r"postfix-\w+/tlsproxy\[\d+\]: (\w+) TLS connection established to .*?: (\S+)"
)


class PostfixRelay:
    """Postfix taking mail on hold via SMTP, then delivering the queue to a sink on release."""

    def __init__(
        self,
        root: Path,
        submit_port: int,
        routes: dict[str, str],
        ca_file: Path,
        concurrency: int,
        tls_name: str,
    ) -> None:
        """``routes``: recipient domain → transport:nexthop (``smtp`` plain, ``smtptls``)."""
        self.submit_port = submit_port
        transport = root / "transport"
        root.mkdir(parents=True, exist_ok=True)
        transport.write_text("".join(f"{d} {t}\n" for d, t in routes.items()))
        policy = root / "tls_policy"
        policy.write_text(
            "".join(
                f"{t.split(':', 1)[1]} secure match={tls_name}\n"
                for t in routes.values()
                if t.startswith("smtptls:")
            )
        )
        master = (
            f"127.0.0.1:{submit_port} inet n - n - - smtpd\n"
            # every message received is put on hold: the timed run starts at its release
            "  -o smtpd_client_restrictions=check_client_access,static:HOLD\n"
            "smtptls   unix  -       -       n       -       -       smtp\n"
            "  -o smtp_tls_security_level=secure\n"
            f"  -o smtp_tls_policy_maps=texthash:{policy}\n"
            "  -o smtp_tls_connection_reuse=yes\n"
        )
        conc = str(concurrency)
        self.instance = PostfixInstance(
            root,
            "relay",
            {
                "transport_maps": f"texthash:{transport}",
                "default_transport": "error:no route in benchmark",
                "smtp_destination_concurrency_limit": conc,
                "smtptls_destination_concurrency_limit": conc,
                "default_destination_concurrency_limit": conc,
                "initial_destination_concurrency": conc,
                "smtp_connection_cache_on_demand": "yes",
                # Postfix 3.7.11: without a client security level of its own, tlsproxy
                # skips its pre-jail client setup and then segfaults (strcmp on NULL) on
                # the first reused-TLS request; the real level comes from smtptls above.
                "tlsproxy_client_security_level": "may",
                "smtp_tls_CAfile": str(ca_file),
                "smtp_tls_loglevel": "1",
                "smtp_tls_mandatory_protocols": ">=TLSv1.3",
                "smtp_tls_session_cache_database": f"btree:{root / 'data'}/smtp_scache",
                "smtp_helo_name": "postfix.banca-esempio.test",
                "qmgr_message_active_limit": "100000",
                "qmgr_message_recipient_limit": "100000",
                "smtpd_peername_lookup": "no",
            },
            master,
        )

    def start(self) -> None:
        self.instance.start()
        wait_banner(self.submit_port)

    def stop(self) -> None:
        self.instance.stop()

    def inject(self, messages: Sequence[tuple[str, str, bytes]], threads: int = 4) -> None:
        """Submit (sender, recipient, data) over a few SMTP connections; all go on hold."""
        errors: list[BaseException] = []

        def worker(chunk: Sequence[tuple[str, str, bytes]]) -> None:
            try:
                with smtplib.SMTP("127.0.0.1", self.submit_port, local_hostname="inject") as s:
                    for sender, rcpt, data in chunk:
                        s.sendmail(sender, [rcpt], data)
            except Exception as exc:  # reported below, in the main thread
                errors.append(exc)

        workers = [
            threading.Thread(target=worker, args=(messages[i::threads],)) for i in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise SystemExit(f"injecting into Postfix failed: {errors[0]!r}")
        # cleanup has written every queue file once smtpd answered 250; wait until they are all held
        deadline = time.monotonic() + 60
        while self.held() < len(messages):
            if time.monotonic() > deadline:
                raise SystemExit(f"only {self.held()} of {len(messages)} messages on hold")
            time.sleep(0.1)

    def held(self) -> int:
        hold = self.instance.queue / "hold"
        return sum(len(files) for _, _, files in os.walk(hold)) if hold.exists() else 0

    def deliver_held(self, n: int, timeout: float = 600.0) -> RelayResult:
        """Release the hold queue and time until ``n`` deliveries are logged as sent."""
        offset = len(self.instance.log_text())
        env = self.instance.env
        cfg = str(self.instance.config)
        started = time.perf_counter()
        subprocess.run(
            [POSTSUPER, "-c", cfg, "-H", "ALL"], env=env, check=True, capture_output=True
        )
        subprocess.run([POSTQUEUE, "-c", cfg, "-f"], env=env, check=True, capture_output=True)
        deadline = started + timeout
        sent = 0
        text = ""
        while True:
            text = self.instance.log_text()[offset:]
            sent = text.count("status=sent")
            if sent >= n:
                break
            failed = text.count("status=deferred") + text.count("status=bounced")
            if failed:
                raise SystemExit(
                    f"postfix: {failed} deliveries failed; log:\n"
                    + "\n".join(
                        line
                        for line in text.splitlines()
                        if "status=" in line and "sent" not in line
                    )[:3000]
                )
            if time.perf_counter() > deadline:
                raise SystemExit(f"postfix: only {sent} of {n} delivered in {timeout:.0f} s")
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        tls: dict[str, int] = {}
        for m in _TLS_OUT.finditer(text):
            key = f"{m.group(1)} {m.group(2)}"
            tls[key] = tls.get(key, 0) + 1
        return RelayResult(n / seconds, seconds, sent, tls, text)
