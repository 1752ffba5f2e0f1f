"""DNSSEC for the sandbox: signed zones served by nsd, validated by unbound (for DANE tests).

When ``nsd``, ``unbound``, ``ldns-keygen`` and ``ldns-signzone`` are installed, ``Sandbox``
starts one more child, ``python -m recapito.sandbox.dnssec '<DNSSECProcessSpec as JSON>'``,
which

1. signs one zone per ``world.SIGNED_DOMAINS`` entry (keys made once with ``ldns-keygen`` and
   kept in ``$RECAPITO_HOME/sandbox/dnssec/keys``; signatures valid for ten years). The TLSA
   records name the MX port, which is chosen at start-up, so the zones are rebuilt and
   re-signed on every start. In ``dane-bogus.test`` the TLSA record, the MX record of
   ``world.BOGUS_MX_DOMAIN`` and the address of ``world.BOGUS_A_HOST`` are altered after
   signing, so all three fail validation;
2. runs ``nsd`` as the authoritative server of those zones and ``unbound`` as a validating
   resolver with their keys as trust anchors. unbound sends the signed zones to nsd (stub
   zones), ``test.`` (or, in catch-all mode, every other name) to the sandbox's dnslib server
   (a forward zone), which it treats as unsigned (``domain-insecure``), and refuses any other
   name, so no query leaves the machine;
3. serves ``world.DANE_TA_MX``, the MX host of the DANE-TA case, whose certificate chain ends
   with the sandbox CA.

nsd and unbound get SIGTERM when this process dies (``PR_SET_PDEATHSIG``), and this process
watches its own parent like every sandbox child, so nothing outlives the sandbox owner.

The readiness line (``READY``) is written once unbound answers a signed name with the AD bit.
"""

from __future__ import annotations

import asyncio
import ctypes
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from recapito.sandbox import _proc, world
from recapito.sandbox.certs import ensure_certificates

TOOLS = ("nsd", "unbound", "ldns-keygen", "ldns-signzone")
# nsd and unbound live in /usr/sbin on Debian, which is not on every user's PATH.
EXTRA_TOOL_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/sbin", "/sbin")
INSTALL_HINT = "apt-get install -y nsd unbound ldnsutils (or run .ci/run)"
ALGORITHM = "ECDSAP256SHA256"
SIGNATURE_LIFETIME = dt.timedelta(days=3650)
ZONE_TTL = 300
NEGATIVE_TTL = 60
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 3.0
TOOL_TIMEOUT = 30.0
# What nsd and unbound print when their port is taken (then the sandbox tries other ports).
_BUSY_MARKERS = ("address already in use", "could not open ports", "can't bind")
# TLSA data that no server key hashes to (the ``mismatch`` case).
_NOBODY_KEY = b"recapito sandbox: a key nobody holds"

log = logging.getLogger(__name__)


def find_tool(name: str) -> str | None:
    """Where a DNSSEC program is: PATH first, then the sbin directories Debian uses."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *EXTRA_TOOL_DIRS])
    return shutil.which(name, path=search)


def missing_tools() -> list[str]:
    """The DNSSEC programs that cannot be found (empty when the sandbox can sign zones)."""
    return [tool for tool in TOOLS if find_tool(tool) is None]


def available() -> bool:
    return not missing_tools()


@dataclass(frozen=True)
class DNSSECProcessSpec:
    """Everything the DNSSEC child needs, passed on its command line as JSON."""

    address: str  # where nsd and unbound listen (127.0.0.1)
    nsd_port: int
    resolver_port: int
    dns_port: int  # the sandbox's dnslib server, authoritative for ``test.``
    mx_port: int
    catch_all: bool
    sandbox_dir: str
    log_dir: str
    maildir_root: str
    parent_pid: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DNSSECProcessSpec:
        return cls(**json.loads(text))

    @property
    def work_dir(self) -> Path:
        return Path(self.sandbox_dir) / "dnssec"


# -- zones ----------------------------------------------------------------------------------


def tlsa_owner(mx_host: str, port: int) -> str:
    """The TLSA owner name of an SMTP server (RFC 7672 §2.2.3)."""
    return f"_{port}._tcp.{mx_host.rstrip('.')}"


def spki_sha256(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def cert_sha256(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


@dataclass(frozen=True)
class TLSAInputs:
    """The certificates the TLSA records are computed from."""

    ee_cert: x509.Certificate  # the leaf of the server that DANE-EE records pin
    ca_cert: x509.Certificate  # the sandbox CA, the DANE-TA trust anchor


def tlsa_rdata(domain: world.SignedDomain, inputs: TLSAInputs) -> str | None:
    """The TLSA record data a signed domain publishes for its MX host (None: no TLSA)."""
    if domain.dane in ("ee", "bogus"):
        return f"3 1 1 {spki_sha256(inputs.ee_cert).hex()}"
    if domain.dane == "ta":
        return f"2 0 1 {cert_sha256(inputs.ca_cert).hex()}"
    if domain.dane == "mismatch":
        return f"3 1 1 {hashlib.sha256(_NOBODY_KEY).hexdigest()}"
    return None


def zone_text(domain: world.SignedDomain, mx_port: int, inputs: TLSAInputs, serial: int) -> str:
    """The unsigned zone file of a signed domain."""
    apex = f"{domain.name}."
    mx = f"{domain.mx_host}."
    lines = [
        f"$ORIGIN {apex}",
        f"$TTL {ZONE_TTL}",
        f"@ IN SOA ns.{apex} hostmaster.{apex} {serial} 3600 600 86400 {NEGATIVE_TTL}",
        f"@ IN NS ns.{apex}",
        "ns IN A 127.0.0.1",
        f"@ IN MX 10 {mx}",
        f"{mx} IN A {domain.address}",
    ]
    rdata = tlsa_rdata(domain, inputs)
    if rdata is not None:
        lines.append(f"{tlsa_owner(domain.mx_host, mx_port)}. IN TLSA {rdata}")
    if domain.dane == "bogus":
        # mail domains inside the zone whose MX record, or MX host address, will not validate
        lines.append(f"{world.BOGUS_MX_DOMAIN}. IN MX 10 {mx}")
        lines.append(f"{world.BOGUS_A_DOMAIN}. IN MX 10 {world.BOGUS_A_HOST}.")
        lines.append(f"{world.BOGUS_A_HOST}. IN A {domain.address}")
    return "\n".join(lines) + "\n"


def tamper(signed_text: str, owner: str, rtype: str) -> str:
    """Alter the data of the ``owner``/``rtype`` records of a signed zone, not their RRSIG.

    The record still parses but no longer matches its signature, so a validating resolver
    answers SERVFAIL for it. TLSA: the last hex digit changes; MX: the preference goes up;
    A: the last octet goes up.
    """
    wanted = owner.rstrip(".").lower() + "."
    out: list[str] = []
    changed = 0
    for line in signed_text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0].lower() == wanted and fields[3] == rtype:
            if rtype == "TLSA" and re.fullmatch(r"[0-9A-Fa-f]+", fields[-1]):
                last = fields[-1]
                fields[-1] = last[:-1] + format(int(last[-1], 16) ^ 0x1, "x")
            elif rtype == "MX" and fields[4].isdigit():
                fields[4] = str(int(fields[4]) + 1)
            elif rtype == "A" and fields[4].count(".") == 3:
                network, _, last = fields[4].rpartition(".")
                fields[4] = f"{network}.{(int(last) + 1) % 256}"
            else:
                raise ValueError(f"cannot tamper with {rtype} record {line!r}")
            line = "\t".join(fields)
            changed += 1
        out.append(line)
    if not changed:
        raise ValueError(f"no {owner} {rtype} record to tamper with in the signed zone")
    return "\n".join(out) + "\n"


# -- keys and signing -----------------------------------------------------------------------


def _run_tool(args: Sequence[str], cwd: Path) -> str:
    try:
        done = subprocess.run(
            [find_tool(args[0]) or args[0], *args[1:]],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{args[0]}: {exc}") from exc
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"{' '.join(args)}: {message[-1] if message else done.returncode}")
    return done.stdout


@dataclass(frozen=True)
class ZoneKeys:
    """Base names (without .key/.private) of a zone's key-signing and zone-signing keys."""

    ksk: Path
    zsk: Path

    def dnskey_lines(self) -> list[str]:
        """The KSK's DNSKEY record, the trust anchor of the zone."""
        text = self.ksk.with_name(self.ksk.name + ".key").read_text(encoding="ascii")
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(";")]


def _key_ok(base: Path) -> bool:
    return all(base.with_name(base.name + ext).is_file() for ext in (".key", ".private"))


def ensure_keys(zone: str, keys_dir: Path) -> ZoneKeys:
    """The zone's KSK and ZSK, made with ldns-keygen the first time and reused afterwards."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    keys = ZoneKeys(keys_dir / f"{zone}.ksk", keys_dir / f"{zone}.zsk")
    for base, flags in ((keys.ksk, ["-k"]), (keys.zsk, [])):
        if _key_ok(base):
            continue
        made = _run_tool(["ldns-keygen", "-a", ALGORITHM, *flags, zone], keys_dir).split()
        if not made:
            raise RuntimeError(f"ldns-keygen printed no key name for {zone}")
        generated = keys_dir / made[-1]
        for ext in (".key", ".private"):
            generated.with_name(generated.name + ext).replace(base.with_name(base.name + ext))
        generated.with_name(generated.name + ".ds").unlink(missing_ok=True)
    return keys


def _ldns_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S")


def sign_zone(
    zone: str, unsigned: Path, keys: ZoneKeys, out: Path, now: dt.datetime | None = None
) -> None:
    moment = now or dt.datetime.now(dt.UTC)
    _run_tool(
        [
            "ldns-signzone",
            "-i",
            _ldns_time(moment - dt.timedelta(days=1)),
            "-e",
            _ldns_time(moment + SIGNATURE_LIFETIME),
            "-o",
            zone,
            "-f",
            str(out),
            str(unsigned),
            str(keys.zsk),
            str(keys.ksk),
        ],
        unsigned.parent,
    )


def load_tlsa_inputs(sandbox_dir: Path) -> TLSAInputs:
    """The tls13 server's leaf and the sandbox CA (both created by ``ensure_certificates``)."""
    ee_file = sandbox_dir / "certs" / f"{world.MX_BY_POSTURE['tls13'].host}.pem"
    ee = x509.load_pem_x509_certificate(ee_file.read_bytes())
    ca = x509.load_pem_x509_certificate((sandbox_dir / "ca.pem").read_bytes())
    return TLSAInputs(ee_cert=ee, ca_cert=ca)


def build_signed_zones(
    work_dir: Path,
    mx_port: int,
    inputs: TLSAInputs,
    domains: Iterable[world.SignedDomain] = world.SIGNED_DOMAINS,
) -> dict[str, tuple[Path, ZoneKeys]]:
    """Write and sign every zone; returns zone -> (signed file, keys)."""
    zones_dir = work_dir / "zones"
    zones_dir.mkdir(parents=True, exist_ok=True)
    serial = int(time.time())
    built: dict[str, tuple[Path, ZoneKeys]] = {}
    for domain in domains:
        keys = ensure_keys(domain.name, work_dir / "keys")
        unsigned = zones_dir / f"{domain.name}.zone"
        signed = zones_dir / f"{domain.name}.zone.signed"
        unsigned.write_text(zone_text(domain, mx_port, inputs, serial), encoding="ascii")
        sign_zone(domain.name, unsigned, keys, signed)
        if domain.dane == "bogus":
            text = signed.read_text(encoding="ascii")
            text = tamper(text, tlsa_owner(domain.mx_host, mx_port), "TLSA")
            text = tamper(text, world.BOGUS_MX_DOMAIN, "MX")
            text = tamper(text, world.BOGUS_A_HOST, "A")
            signed.write_text(text, encoding="ascii")
        built[domain.name] = (signed, keys)
    return built


# -- configuration files --------------------------------------------------------------------


def nsd_conf(spec: DNSSECProcessSpec, zones: dict[str, tuple[Path, ZoneKeys]]) -> str:
    work = spec.work_dir
    lines = [
        "server:",
        f"  ip-address: {spec.address}",
        f"  port: {spec.nsd_port}",
        "  do-ip6: no",
        "  server-count: 1",
        "  verbosity: 1",
        "  hide-version: yes",
        '  database: ""',
        '  username: ""',
        '  chroot: ""',
        f'  zonesdir: "{work / "zones"}"',
        f'  zonelistfile: "{work / "nsd.zonelist"}"',
        f'  xfrdfile: "{work / "nsd.xfrd.state"}"',
        f'  xfrdir: "{work}"',
        f'  pidfile: "{work / "nsd.pid"}"',
        "remote-control:",
        "  control-enable: no",
    ]
    for name, (signed, _) in sorted(zones.items()):
        lines += ["zone:", f"  name: {name}", f'  zonefile: "{signed}"']
    return "\n".join(lines) + "\n"


def unbound_conf(spec: DNSSECProcessSpec, anchors_file: Path, zones: Iterable[str]) -> str:
    work = spec.work_dir
    # Names outside the signed zones go to the dnslib server and are treated as unsigned.
    plain_apex = "." if spec.catch_all else "test."
    lines = [
        "server:",
        f"  interface: {spec.address}",
        f"  port: {spec.resolver_port}",
        "  do-ip6: no",
        "  num-threads: 1",
        f'  directory: "{work}"',
        '  chroot: ""',
        '  username: ""',
        f'  pidfile: "{work / "unbound.pid"}"',
        "  use-syslog: no",
        '  logfile: ""',
        "  verbosity: 0",
        "  val-log-level: 2",
        "  ede: yes",
        "  do-not-query-localhost: no",
        "  qname-minimisation: no",
        "  access-control: 127.0.0.0/8 allow",
        '  module-config: "validator iterator"',
        f'  trust-anchor-file: "{anchors_file}"',
        f'  domain-insecure: "{plain_apex}"',
        # unbound answers test. itself by default (RFC 6761 special name): look it up instead
        '  local-zone: "test." transparent',
    ]
    if not spec.catch_all:
        # Nothing is ever looked up on the Internet: names outside test. are refused. (In
        # catch-all mode every name goes to the sandbox's dnslib server instead.)
        lines.append('  local-zone: "." refuse')
    lines += [
        "remote-control:",
        "  control-enable: no",
    ]
    for name in sorted(zones):
        lines += [
            "stub-zone:",
            f'  name: "{name}."',
            f"  stub-addr: {spec.address}@{spec.nsd_port}",
        ]
    # A forward zone rather than a stub: unbound would prime a stub for "." with a root NS
    # query the sandbox zone has no answer for; forwarded names are simply passed on.
    lines += [
        "forward-zone:",
        f'  name: "{plain_apex}"',
        f"  forward-addr: {spec.address}@{spec.dns_port}",
    ]
    return "\n".join(lines) + "\n"


def write_configs(
    spec: DNSSECProcessSpec, zones: dict[str, tuple[Path, ZoneKeys]]
) -> tuple[Path, Path]:
    work = spec.work_dir
    anchors = work / "trust-anchors"
    anchor_lines = [line for _, keys in sorted(zones.items()) for line in keys[1].dnskey_lines()]
    anchors.write_text("\n".join(anchor_lines) + "\n", encoding="ascii")
    nsd = work / "nsd.conf"
    nsd.write_text(nsd_conf(spec, zones), encoding="utf-8")
    unbound = work / "unbound.conf"
    unbound.write_text(unbound_conf(spec, anchors, zones), encoding="utf-8")
    return nsd, unbound


# -- the child process ----------------------------------------------------------------------


def _load_prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    return prctl


# Looked up once here, so the forked child only makes the system call.
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a forked child: ask Linux for SIGTERM when the parent (this DNSSEC process) dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@dataclass
class _Daemon:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return lines[-1] if lines else f"exit status {self.process.poll()}"

    def busy(self) -> bool:
        try:
            text = self.log_path.read_text(errors="replace").lower()
        except OSError:
            return False
        return any(marker in text for marker in _BUSY_MARKERS)


def _start_daemon(name: str, args: list[str], log_dir: Path) -> _Daemon:
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in _stop_daemons()
    try:
        process = subprocess.Popen(
            [find_tool(args[0]) or args[0], *args[1:]],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            # safe with preexec_fn: no other thread runs yet (see serve())
            preexec_fn=_die_with_parent,
        )
    except OSError:
        log_file.close()
        raise
    return _Daemon(name, process, log_path, log_file)


def _stop_daemons(daemons: Sequence[_Daemon]) -> None:
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for daemon in daemons:
        try:
            daemon.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
        daemon.log_file.close()


async def resolver_answers(address: str, port: int, timeout: float = 1.0) -> bool:
    """True once the validating resolver returns a signed sandbox name with the AD bit."""
    name = world.SIGNED_DOMAINS[0].name
    query = dns.message.make_query(name, "SOA", want_dnssec=True, use_edns=0, payload=1232)
    try:
        reply = await dns.asyncquery.udp(query, address, port=port, timeout=timeout)
    except (OSError, dns.exception.DNSException):
        return False
    return reply.rcode() == dns.rcode.NOERROR and bool(reply.flags & dns.flags.AD)


async def _await_resolver(spec: DNSSECProcessSpec, daemons: Sequence[_Daemon]) -> str | None:
    """None once unbound validates a signed name; otherwise the ERROR line to report."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        for daemon in daemons:
            if daemon.process.poll() is not None:
                await asyncio.sleep(0.05)  # let it finish writing its log
                if daemon.busy():
                    port = spec.nsd_port if daemon.name == "nsd" else spec.resolver_port
                    return (
                        f"{_proc.ERROR} {_proc.BUSY} {daemon.name}: port {port} is already in "
                        f"use on {spec.address}"
                    )
                return f"{_proc.ERROR} {daemon.name} exited at start-up: {daemon.log_tail()}"
        if await resolver_answers(spec.address, spec.resolver_port, timeout=0.5):
            return None
        await asyncio.sleep(0.05)
    return f"{_proc.ERROR} DNSSEC: unbound gave no validated answer within {READY_TIMEOUT:.0f}s"


def _chain_file(sandbox_dir: Path) -> tuple[Path, Path]:
    """Certificate chain (leaf then CA) and key of the DANE-TA MX host."""
    pki = ensure_certificates(sandbox_dir, [world.DANE_TA_MX])
    pair = pki.leaves[world.DANE_TA_MX.host]
    chain = pair.cert.with_name(f"{world.DANE_TA_MX.host}.chain.pem")
    chain.write_bytes(pair.cert.read_bytes() + pki.ca.cert.read_bytes())
    return chain, pair.key


async def _start_ta_mx(
    spec: DNSSECProcessSpec, chain: Path, key: Path
) -> asyncio.AbstractServer | str:
    """Listen as the DANE-TA MX host; a string is the ERROR line when that fails."""
    # Imported here: the server module pulls in aiosmtpd, which the zone helpers do not need.
    from recapito.sandbox.maildir import MaildirWriter
    from recapito.sandbox.servers import BANNER_IDENT, SandboxHandler, SandboxSMTP, tls_context

    server = world.DANE_TA_MX
    context = tls_context(server.posture, str(chain), str(key))
    handler = SandboxHandler(server, MaildirWriter(Path(spec.maildir_root), server.host))
    loop = asyncio.get_running_loop()

    def factory() -> SandboxSMTP:
        return SandboxSMTP(
            handler,
            hostname=server.host,
            ident=BANNER_IDENT,
            tls_context=context,
            require_starttls=False,
            enable_SMTPUTF8=True,
            timeout=300,
            loop=loop,
        )

    try:
        return await loop.create_server(factory, host=server.address, port=spec.mx_port)
    except OSError as exc:
        return _proc.listen_error(server.host, server.address, spec.mx_port, exc)


async def serve(spec: DNSSECProcessSpec) -> int:
    sandbox_dir = Path(spec.sandbox_dir)
    log_dir = Path(spec.log_dir)
    work = spec.work_dir
    try:
        work.mkdir(parents=True, exist_ok=True)
        zones = build_signed_zones(work, spec.mx_port, load_tlsa_inputs(sandbox_dir))
        nsd_file, unbound_file = write_configs(spec, zones)
        chain, key = _chain_file(sandbox_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        _proc.report(f"{_proc.ERROR} DNSSEC set-up: {exc}")
        return 1
    daemons: list[_Daemon] = []
    listener: asyncio.AbstractServer | None = None
    try:
        # The daemons are forked before anything (such as the listener's address lookup)
        # starts a helper thread in this process.
        try:
            daemons.append(_start_daemon("nsd", ["nsd", "-d", "-c", str(nsd_file)], log_dir))
            daemons.append(
                _start_daemon("unbound", ["unbound", "-d", "-c", str(unbound_file)], log_dir)
            )
        except OSError as exc:
            _proc.report(f"{_proc.ERROR} DNSSEC: cannot start a daemon: {exc}")
            return 1
        started = await _start_ta_mx(spec, chain, key)
        if isinstance(started, str):
            _proc.report(started)
            return 1
        listener = started
        problem = await _await_resolver(spec, daemons)
        if problem is not None:
            _proc.report(problem)
            return 1
        _proc.report(_proc.READY)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        watchdog = asyncio.create_task(_proc.watch_parent(spec.parent_pid, stop))
        died = asyncio.create_task(_watch_daemons(daemons, stop))
        await stop.wait()
        watchdog.cancel()
        died.cancel()
        return 0
    finally:
        if listener is not None:
            listener.close()
        _stop_daemons(daemons)


async def _watch_daemons(daemons: Sequence[_Daemon], stop: asyncio.Event) -> None:
    """Stop everything when nsd or unbound dies, so the sandbox notices (its child exits)."""
    while not stop.is_set():
        for daemon in daemons:
            if daemon.process.poll() is not None:
                log.error("%s exited unexpectedly: %s", daemon.name, daemon.log_tail())
                stop.set()
                return
        await asyncio.sleep(_proc.PARENT_POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m recapito.sandbox.dnssec '<spec json>'", file=sys.stderr)
        return 2
    _proc.configure_logging("dnssec")
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    return asyncio.run(serve(DNSSECProcessSpec.from_json(_proc.spec_text(args[0]))))


if __name__ == "__main__":
    sys.exit(main())
