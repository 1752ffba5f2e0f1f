"""The sandbox's MTA-STS policy server: one HTTPS listener for every ``mta-sts.<domain>`` host.

It listens on ``world.MTA_STS_ADDRESS`` and one port (``RECAPITO_HTTPS_PORT`` in the sandbox
settings). The TLS certificate is chosen by SNI among the policy hosts' certificates
(``certs.ensure_policy_host_certificates``); the answer is chosen by the Host header and shaped
by the site's posture (see ``world.MTASTSPosture``):

- ``valid`` / ``selfsigned``: ``200`` ``text/plain`` with the site's policy;
- ``broken``: ``200`` ``text/plain`` with a policy that does not parse;
- ``oversize``: ``200`` ``text/plain``, a valid policy padded with ignorable lines past 64 KiB,
  sent chunked (no Content-Length to refuse it by);
- ``redirect``: ``302`` to the policy URL of ``sts-enforce.test``;
- ``wrongtype``: ``200`` with the site's policy labelled ``text/html``.

Only ``GET``/``HEAD`` of ``/.well-known/mta-sts.txt`` are served; anything else is a 404 (or
405). Every answer closes the connection.

Run it: ``python -m recapito.sandbox.https '<HTTPSProcessSpec as JSON>'`` (``Sandbox`` does
this), with the same READY/ERROR handshake and parent watchdog as the other sandbox servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import sys
from dataclasses import asdict, dataclass, field

from recapito.sandbox import _proc, world

POLICY_PATH = "/.well-known/mta-sts.txt"
# A little over RFC 8461's 64 KiB ceiling, so a client that reads it all is caught out.
OVERSIZE_BYTES = 70 * 1024
REDIRECT_TARGET = "https://mta-sts.sts-enforce.test/.well-known/mta-sts.txt"
MAX_HEAD_BYTES = 16 * 1024
REQUEST_TIMEOUT = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    chunked: bool = False  # no Content-Length: the size shows only while reading

    def encode(self, head_only: bool = False) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {self.reason}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append(f"Content-Length: {len(self.body)}")
        lines += ["Connection: close", "", ""]
        head = "\r\n".join(lines).encode("latin-1")
        if head_only:
            return head
        if not self.chunked:
            return head + self.body
        step = 4096
        pieces = [
            b"%x\r\n%s\r\n" % (len(part), part)
            for part in (self.body[i : i + step] for i in range(0, len(self.body), step))
        ]
        return head + b"".join(pieces) + b"0\r\n\r\n"


def _text(status: int, reason: str, body: str, content_type: str) -> Response:
    return Response(status, reason, (("Content-Type", content_type),), body.encode("utf-8"))


NOT_FOUND = _text(404, "Not Found", "not found\n", "text/plain; charset=utf-8")


def policy_response(site: world.MTASTSSite) -> Response:
    """What the policy host of ``site`` answers to a GET of the policy URL."""
    plain = "text/plain; charset=utf-8"
    if site.posture == "broken":
        # no version line, an unknown mode and an mx line without its colon
        return _text(200, "OK", f"mode: enforced\r\nmx {site.mx_patterns[0]}\r\n", plain)
    if site.posture == "oversize":
        text = site.policy_text()
        filler = "x-padding: " + "0" * 100 + "\r\n"
        repeat = OVERSIZE_BYTES // len(filler) + 1
        body = (text + filler * repeat).encode("utf-8")
        # chunked, so a client cannot refuse it from a Content-Length: it must stop reading
        return Response(200, "OK", (("Content-Type", plain),), body, chunked=True)
    if site.posture == "redirect":
        return Response(302, "Found", (("Location", REDIRECT_TARGET),))
    if site.posture == "wrongtype":
        return _text(200, "OK", site.policy_text(), "text/html; charset=utf-8")
    return _text(200, "OK", site.policy_text(), plain)


def answer(method: str, target: str, host_header: str) -> Response:
    """The response to one request line and Host header."""
    # policy hosts are names, never IP literals: whatever follows a colon is the port
    host = host_header.strip().lower().partition(":")[0].rstrip(".")
    site = next((s for s in world.MTA_STS_SITES if s.policy_host == host), None)
    path = target.split("?", 1)[0]
    if site is None or path != POLICY_PATH:
        return NOT_FOUND
    if method not in ("GET", "HEAD"):
        return Response(405, "Method Not Allowed", (("Allow", "GET, HEAD"),))
    return policy_response(site)


@dataclass(frozen=True)
class HTTPSProcessSpec:
    """Everything the policy server process needs, passed as JSON on its command line."""

    address: str
    port: int
    parent_pid: int
    certs: dict[str, tuple[str, str]] = field(default_factory=dict)  # host -> (cert, key)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HTTPSProcessSpec:
        data = json.loads(text)
        data["certs"] = {str(h): (str(c), str(k)) for h, (c, k) in data.get("certs", {}).items()}
        return cls(**data)


def server_context(certs: dict[str, tuple[str, str]]) -> ssl.SSLContext:
    """A server context that presents the certificate of the host named in SNI."""
    if not certs:
        raise ValueError("no policy host certificates")
    by_host: dict[str, ssl.SSLContext] = {}
    for host, (cert_file, key_file) in certs.items():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_file, key_file)
        by_host[host.lower()] = ctx
    # Without SNI (or with an unknown name) the first host's certificate is shown.
    default = next(iter(by_host.values()))

    def pick(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        chosen = by_host.get((name or "").lower().rstrip("."))
        if chosen is not None:
            sock.context = chosen

    default.sni_callback = pick
    return default


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, str] | None:
    """(method, target, Host) of one request, or None when it is not a readable request."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    host = ""
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "host":
            host = value.strip()
            break
    return parts[0].upper(), parts[1], host


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await asyncio.wait_for(_read_head(reader), REQUEST_TIMEOUT)
        if request is None:
            writer.write(Response(400, "Bad Request").encode())
        else:
            method, target, host = request
            writer.write(answer(method, target, host).encode(head_only=method == "HEAD"))
        await writer.drain()
    except (TimeoutError, OSError, ssl.SSLError):
        pass  # a client that went away or never spoke: nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2.0)


async def serve(spec: HTTPSProcessSpec) -> int:
    """Listen until SIGTERM/SIGINT or until the parent process exits."""
    try:
        context = server_context(spec.certs)
    except (OSError, ValueError) as exc:  # unreadable certificate or key (SSLError included)
        _proc.report(f"{_proc.ERROR} MTA-STS HTTPS: cannot load certificates: {exc}")
        return 1
    try:
        listener = await asyncio.start_server(
            handle, host=spec.address, port=spec.port, ssl=context, limit=MAX_HEAD_BYTES
        )
    except OSError as exc:
        _proc.report(_proc.listen_error("MTA-STS HTTPS", spec.address, spec.port, exc))
        return 1
    return await _proc.serve_until_stopped(listener, spec.parent_pid)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m recapito.sandbox.https '<spec json>'", file=sys.stderr)
        return 2
    _proc.configure_logging("https")
    return asyncio.run(serve(HTTPSProcessSpec.from_json(_proc.spec_text(args[0]))))


if __name__ == "__main__":
    sys.exit(main())
