"""How fast the sandbox MX servers take mail: a quick load probe, not a product benchmark.

    python -m recapito.sandbox.throughput [--messages 2000] [--connections 3] [--json]

Starts a sandbox in a temporary home, then sends ~20 KB HTML messages with aiosmtplib over
verified STARTTLS to the TLS 1.3 and the TLS 1.2 servers at the same time, on a few reused
connections per server, and prints messages per second (client and servers share the CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from recapito.sandbox import world
from recapito.sandbox.maildir import iter_maildirs
from recapito.sandbox.runtime import Sandbox

SENDER = "campagne@banca-esempio.test"
TARGETS = (("tls13", "mailitalia.test"), ("tls12", "casella.test"))
PARAGRAPH = "<p>Gentile cliente, le scriviamo per una comunicazione importante sul suo conto.</p>\n"


def build_message(index: int, domain: str, size_kb: int) -> bytes:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = f"cliente{index}@{domain}"
    message["Subject"] = f"Comunicazione {index}"
    message["Message-ID"] = f"<{index}.{domain}@banca-esempio.test>"
    html = "<html><body>" + PARAGRAPH * (size_kb * 1024 // len(PARAGRAPH)) + "</body></html>"
    message.set_content("Versione testuale della comunicazione.")
    message.add_alternative(html, subtype="html")
    return message.as_bytes().replace(b"\n", b"\r\n")


async def _sender(
    box: Sandbox, server: world.MXServer, jobs: list[tuple[str, bytes]], ctx: ssl.SSLContext
) -> None:
    client = aiosmtplib.SMTP(
        hostname=server.address, port=box.mx_port, start_tls=False, local_hostname="bench.test"
    )
    await client.connect()
    await client.ehlo()
    await client.starttls(tls_context=ctx, server_hostname=server.host)
    await client.ehlo()
    for rcpt, data in jobs:
        await client.sendmail(SENDER, [rcpt], data)
    await client.quit()


async def _run(box: Sandbox, messages: int, connections: int, size_kb: int) -> float:
    ctx = ssl.create_default_context(cafile=str(box.ca_file))
    tasks = []
    per_connection = max(1, messages // (len(TARGETS) * connections))
    index = 0
    for posture, domain in TARGETS:
        server = world.MX_BY_POSTURE[posture]
        samples = [build_message(i, domain, size_kb) for i in range(20)]
        for _ in range(connections):
            jobs = []
            for _ in range(per_connection):
                jobs.append((f"cliente{index}@{domain}", samples[index % len(samples)]))
                index += 1
            tasks.append(_sender(box, server, jobs, ctx))
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=3, help="per server")
    parser.add_argument("--size-kb", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="recapito-sandbox-") as tmp, Sandbox(Path(tmp)) as box:
        seconds = asyncio.run(_run(box, args.messages, args.connections, args.size_kb))
        stored = sum(1 for _ in iter_maildirs(box.maildir_root))
    figures = {
        "messages": stored,
        "seconds": round(seconds, 2),
        "msgs_per_s": round(stored / seconds, 1),
        "servers": [world.MX_BY_POSTURE[p].host for p, _ in TARGETS],
        "connections_per_server": args.connections,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(
            f"{stored} messages stored in {seconds:.2f} s: {stored / seconds:.0f} msgs/s "
            f"({len(TARGETS)} servers x {args.connections} STARTTLS connections)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
