"""The sandbox's authoritative DNS server (UDP and TCP, dnslib), serving a zone built from world.py.

What it answers (every answer carries the AA flag):

- ``MX`` per ``world.Domain.mx``; the null MX ``0 .`` for ``nessuna-posta.test``;
- ``A`` for every MX host (the dead one included) and for ``solo-a.test`` (the implicit-MX
  domain, which has no MX record);
- ``TXT`` ``_mta-sts.<domain>`` and ``A`` ``mta-sts.<domain>`` for ``world.MTA_STS_SITES``;
- ``TXT``/``TLSA``/anything else added through ``ZoneRecord`` (MTA-STS and DANE build on this);
- ``NXDOMAIN`` for ``dominio-inesistente.test`` and every name the zone does not know;
- ``NOERROR`` with an empty answer (NODATA) for a known name without the asked type.
  Negative answers carry the SOA of the name's top-level zone, as RFC 2308 asks.

Catch-all mode: a name the zone does not know gets an MX record pointing at
``world.catch_all_posture(name).host`` and nothing else (NODATA for other types), so a real
contact export can be run with nothing leaving the machine. Names the zone knows, including the
explicit NXDOMAIN ones, answer as without catch-all.

Run it: ``python -m recapito.sandbox.dns '<DNSProcessSpec as JSON>'`` (``Sandbox`` does this).
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import struct
import sys
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

from dnslib import MX, QTYPE, RCODE, RR, SOA, DNSHeader, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer

from recapito.sandbox import _proc, world

DEFAULT_TTL = 300
NEGATIVE_TTL = 60
NS_HOST = "ns.sandbox.test"
HOSTMASTER = "hostmaster.sandbox.test"
# A plain (non-EDNS) UDP answer must fit in 512 octets; with EDNS the client says how much.
CLASSIC_UDP_SIZE = 512

log = logging.getLogger(__name__)


def _norm(name: str) -> str:
    return name.strip().lower().rstrip(".")


@dataclass(frozen=True)
class ZoneRecord:
    """One resource record in zone-file presentation form, e.g.
    ``ZoneRecord("_mta-sts.mailitalia.test", "TXT", '"v=STSv1; id=1"')``."""

    name: str
    rtype: str
    value: str
    ttl: int = DEFAULT_TTL

    def to_rr(self) -> RR:
        text = f"{_norm(self.name)}. {self.ttl} IN {self.rtype.upper()} {self.value}"
        records: list[RR] = RR.fromZone(text)
        if len(records) != 1:
            raise ValueError(f"not exactly one record: {text!r}")
        return records[0]


def txt_record(name: str, text: str, ttl: int = DEFAULT_TTL) -> ZoneRecord:
    """A TXT record; text longer than 255 octets is split into several strings."""
    raw = text.encode("utf-8")
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    quoted = " ".join(
        '"' + c.decode("utf-8", "replace").replace("\\", "\\\\").replace('"', '\\"') + '"'
        for c in chunks
    )
    return ZoneRecord(name, "TXT", quoted, ttl)


def tlsa_record(
    name: str, usage: int, selector: int, matching_type: int, data: bytes, ttl: int = DEFAULT_TTL
) -> ZoneRecord:
    """A TLSA record, e.g. ``tlsa_record("_25._tcp.mx.tls13.sandbox.test", 3, 1, 1, digest)``."""
    return ZoneRecord(name, "TLSA", f"{usage} {selector} {matching_type} {data.hex()}", ttl)


@dataclass
class Answer:
    rcode: int
    answer: list[RR] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)


class Zone:
    """The records the sandbox is authoritative for, plus the catch-all rule."""

    def __init__(self, catch_all: bool = False) -> None:
        self.catch_all = catch_all
        self._records: dict[str, list[RR]] = {}
        self._existing: set[str] = {""}  # names with records, and their ancestors
        self._nonexistent: set[str] = set()

    def add(self, record: ZoneRecord) -> None:
        self.add_rr(record.to_rr())

    def add_rr(self, rr: RR) -> None:
        name = _norm(str(rr.rname))
        self._records.setdefault(name, []).append(rr)
        labels = name.split(".")
        for i in range(len(labels)):
            self._existing.add(".".join(labels[i:]))

    def mark_nonexistent(self, name: str) -> None:
        """Answer NXDOMAIN for ``name`` and everything below it, even in catch-all mode."""
        self._nonexistent.add(_norm(name))

    def records(self, name: str) -> list[RR]:
        return list(self._records.get(_norm(name), ()))

    def _is_nonexistent(self, name: str) -> bool:
        labels = name.split(".")
        return any(".".join(labels[i:]) in self._nonexistent for i in range(len(labels)))

    def _soa(self, name: str) -> RR:
        # The sandbox answers as if it were authoritative for the name's top-level domain.
        apex = name.rpartition(".")[2] if name else ""
        return RR(
            f"{apex}.",
            QTYPE.SOA,
            ttl=NEGATIVE_TTL,
            rdata=SOA(NS_HOST, HOSTMASTER, (1, 3600, 600, 86400, NEGATIVE_TTL)),
        )

    def lookup(self, qname: str, qtype: int) -> Answer:
        name = _norm(qname)
        if name in self._existing and not self._is_nonexistent(name):
            found = [rr for rr in self._records.get(name, ()) if qtype in (QTYPE.ANY, rr.rtype)]
            if found:
                return Answer(RCODE.NOERROR, found)
            return Answer(RCODE.NOERROR, authority=[self._soa(name)])
        if self.catch_all and name and not self._is_nonexistent(name):
            if qtype in (QTYPE.MX, QTYPE.ANY):
                target = world.catch_all_posture(name).host
                return Answer(
                    RCODE.NOERROR, [RR(f"{name}.", QTYPE.MX, ttl=DEFAULT_TTL, rdata=MX(target, 10))]
                )
            return Answer(RCODE.NOERROR, authority=[self._soa(name)])
        return Answer(RCODE.NXDOMAIN, authority=[self._soa(name)])

    def reply(self, request: DNSRecord) -> DNSRecord:
        """The full DNS reply to a request (first question only, as every resolver sends)."""
        header = DNSHeader(id=request.header.id, qr=1, aa=1, ra=0, rd=request.header.rd)
        reply = DNSRecord(header, q=request.q)
        if request.header.opcode != 0 or not request.questions:
            reply.header.rcode = RCODE.NOTIMP if request.questions else RCODE.FORMERR
            return reply
        answer = self.lookup(str(request.q.qname), request.q.qtype)
        reply.header.rcode = answer.rcode
        for rr in answer.answer:
            # The owner name echoes the question's spelling (case), as servers do.
            reply.add_answer(RR(request.q.qname, rr.rtype, rr.rclass, rr.ttl, rr.rdata))
        for rr in answer.authority:
            reply.add_auth(rr)
        return reply


def build_zone(catch_all: bool = False, extra: Iterable[ZoneRecord] = ()) -> Zone:
    """The zone described by world.py, plus ``extra`` records."""
    zone = Zone(catch_all=catch_all)
    zone.add_rr(
        RR(
            "test.",
            QTYPE.SOA,
            ttl=DEFAULT_TTL,
            rdata=SOA(NS_HOST, HOSTMASTER, (1, 3600, 600, 86400, NEGATIVE_TTL)),
        )
    )
    zone.add(ZoneRecord("test", "NS", f"{NS_HOST}."))
    zone.add(ZoneRecord(NS_HOST, "A", "127.0.0.1"))
    zone.add(
        txt_record("sandbox.test", "recapito sandbox: local mail world, nothing leaves 127.0.0.0/8")
    )
    for server in (*world.MX_SERVERS, world.DEAD_MX):
        zone.add(ZoneRecord(server.host, "A", server.address))
    for domain in world.DOMAINS:
        if domain.kind == "nxdomain":
            zone.mark_nonexistent(domain.name)
            continue
        for preference, host in domain.mx:
            target = "." if host == "." else f"{_norm(host)}."
            zone.add(ZoneRecord(domain.name, "MX", f"{preference} {target}"))
        if domain.kind == "implicit_mx":
            zone.add(ZoneRecord(domain.name, "A", world.IMPLICIT_MX_TARGET.address))
    for site in world.MTA_STS_SITES:
        # RFC 8461 §3.1 discovery record, and the policy host the HTTPS server answers for
        zone.add(txt_record(f"_mta-sts.{site.domain}", f"v=STSv1; id={site.policy_id};"))
        zone.add(ZoneRecord(site.policy_host, "A", site.policy_address))
    for record in extra:
        zone.add(record)
    return zone


# -- server ---------------------------------------------------------------------------------


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: Zone) -> None:
        self.zone = zone

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        try:
            return self.zone.reply(request)
        except Exception:  # a resolver bug must not kill the server thread
            log.exception("cannot answer %s", request.q)
            reply = request.reply(ra=0, aa=1)
            reply.header.rcode = RCODE.SERVFAIL
            return reply


class _Handler(DNSHandler):  # type: ignore[misc]
    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply: DNSRecord = self.server.resolver.resolve(request, self)
        packed: bytes = reply.pack()
        if self.protocol == "udp":
            limit = CLASSIC_UDP_SIZE
            for rr in request.ar:
                if rr.rtype == QTYPE.OPT:
                    limit = max(CLASSIC_UDP_SIZE, rr.rclass)
            if len(packed) > limit:
                packed = reply.truncate().pack()
        return packed


class _QuietLogger:
    """dnslib logger that stays silent except for errors (to stderr, i.e. the log file)."""

    def log_recv(self, handler: Any, data: bytes) -> None: ...
    def log_send(self, handler: Any, data: bytes) -> None: ...
    def log_request(self, handler: Any, request: Any) -> None: ...
    def log_reply(self, handler: Any, reply: Any) -> None: ...
    def log_truncated(self, handler: Any, reply: Any) -> None: ...
    def log_data(self, dnsobj: Any) -> None: ...

    def log_error(self, handler: Any, error: Any) -> None:
        log.warning("DNS error from %s: %s", getattr(handler, "client_address", "?"), error)


class AuthoritativeServer:
    """UDP and TCP listeners on one address and port, each served by a background thread."""

    def __init__(self, zone: Zone, address: str, port: int) -> None:
        self.zone = zone
        resolver = ZoneResolver(zone)
        logger = _QuietLogger()
        self._udp = DNSServer(resolver, address=address, port=port, logger=logger, handler=_Handler)
        try:
            self._tcp = DNSServer(
                resolver, address=address, port=port, tcp=True, logger=logger, handler=_Handler
            )
        except OSError:
            self._udp.server.server_close()
            raise
        self.address = address
        self.port = port

    def start(self) -> None:
        for server in (self._udp, self._tcp):
            # A short poll interval keeps stop() quick (socketserver's default is 0.5 s).
            thread = threading.Thread(
                target=server.server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"dns-{self.port}",
                daemon=True,
            )
            thread.start()

    def stop(self) -> None:
        for server in (self._udp, self._tcp):
            server.stop()
            server.server.server_close()


@dataclass(frozen=True)
class DNSProcessSpec:
    address: str
    port: int
    parent_pid: int
    catch_all: bool = False
    extra: tuple[tuple[str, str, str, int], ...] = ()  # ZoneRecord fields

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DNSProcessSpec:
        data = json.loads(text)
        data["extra"] = tuple(tuple(item) for item in data.get("extra", ()))
        return cls(**data)

    def records(self) -> list[ZoneRecord]:
        return [ZoneRecord(name, rtype, value, ttl) for name, rtype, value, ttl in self.extra]


def serve(spec: DNSProcessSpec) -> int:
    try:
        zone = build_zone(spec.catch_all, spec.records())
    except Exception as exc:  # a malformed extra record: say which, do not start
        _proc.report(f"{_proc.ERROR} DNS zone: {exc}")
        return 1
    try:
        server = AuthoritativeServer(zone, spec.address, spec.port)
    except OSError as exc:
        _proc.report(_proc.listen_error("DNS", spec.address, spec.port, exc))
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    _proc.report(_proc.READY)
    while not stop.wait(_proc.PARENT_POLL_SECONDS):
        if _proc.parent_gone(spec.parent_pid):
            log.warning("parent %d exited; stopping", spec.parent_pid)
            break
    # The listener threads are daemons: leaving the interpreter ends them at once, without
    # waiting for socketserver's half-second shutdown poll.
    return 0


def query(
    address: str,
    port: int,
    name: str,
    rtype: str = "A",
    timeout: float = 2.0,
    tcp: bool = False,
) -> DNSRecord:
    """Ask the server one question over UDP or TCP (readiness and status checks)."""
    request = DNSRecord.question(name, rtype)
    packet = request.pack()
    if tcp:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("!H", len(packet)) + packet)
            data = b""
            while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                chunk = sock.recv(65535)
                if not chunk:
                    raise ConnectionError("DNS server closed the TCP connection early")
                data += chunk
        return DNSRecord.parse(data[2:])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (address, port))
        while True:
            data, _ = sock.recvfrom(65535)
            reply = DNSRecord.parse(data)
            if reply.header.id == request.header.id:
                return reply


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m recapito.sandbox.dns '<spec json>'", file=sys.stderr)
        return 2
    _proc.configure_logging("dns")
    return serve(DNSProcessSpec.from_json(_proc.spec_text(args[0])))


if __name__ == "__main__":
    sys.exit(main())
