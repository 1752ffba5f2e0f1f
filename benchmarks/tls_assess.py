"""Assessing many recipient domains that share MX hosts: connections opened and time.

    .venv/bin/python benchmarks/tls_assess.py [--domains 5000] [--hosts 200] [--json]

Builds a sandbox whose DNS gives DOMAINS domains spread over HOSTS MX host names (all
served by the sandbox MX servers), then runs the ``tls check`` assessment over every
domain. Probing etiquette demands at most one connection per MX host. The baseline in
the same run is the per-domain way (a fresh probe of each domain's MX, no sharing) on a
sample of the domains, extrapolated to all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from recapito.delivery.dns import MXResolver
from recapito.sandbox import world
from recapito.sandbox.dns import ZoneRecord
from recapito.sandbox.runtime import Sandbox
from recapito.security.check import check_domains

POSTURES = ("tls13", "tls12", "selfsigned", "plain", "expired", "wrongname")


def records(domains: int, hosts: int) -> list[ZoneRecord]:
    out: list[ZoneRecord] = []
    for i in range(hosts):
        server = world.MX_BY_POSTURE[POSTURES[i % len(POSTURES)]]
        out.append(ZoneRecord(f"mx{i}.assess.test", "A", server.address))
    for j in range(domains):
        out.append(ZoneRecord(f"d{j}.assess.test", "MX", f"10 mx{j % hosts}.assess.test."))
    return out


async def assess(box: Sandbox, domains: list[str]) -> tuple[list[dict[str, object]], int]:
    return await check_domains(
        domains,
        resolver=MXResolver(box.dns_address),
        port=box.mx_port,
        helo_name="assess.banca-esempio.test",
        extra_ca_file=box.ca_file,
    )


async def per_domain(box: Sandbox, domains: list[str]) -> int:
    """The baseline: every domain probed on its own (no sharing between domains)."""
    total = 0
    for domain in domains:
        _, connections = await assess(box, [domain])
        total += connections
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=5000)
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--baseline-sample", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        Sandbox(Path(tmp), extra_records=records(args.domains, args.hosts)) as box,
    ):
        names = [f"d{j}.assess.test" for j in range(args.domains)]
        started = time.perf_counter()
        results, connections = asyncio.run(assess(box, names))
        seconds = time.perf_counter() - started
        sample = names[: args.baseline_sample]
        started = time.perf_counter()
        baseline_conn = asyncio.run(per_domain(box, sample))
        baseline_s = time.perf_counter() - started
    decided = sum(1 for r in results if r.get("decision"))
    per_domain_conn = baseline_conn / len(sample) * args.domains
    figures = {
        "domains": args.domains,
        "mx_hosts": args.hosts,
        "connections": connections,
        "max_connections_per_host": round(connections / args.hosts, 3),
        "seconds": round(seconds, 2),
        "domains_per_s": round(args.domains / seconds, 1),
        "baseline_connections": round(per_domain_conn),
        "baseline_seconds": round(baseline_s / len(sample) * args.domains, 1),
        "ratio_connections_vs_baseline": round(per_domain_conn / connections, 1),
        "decided": decided,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(
            f"{args.domains:,} domains over {args.hosts} MX hosts: {connections} connections "
            f"({figures['max_connections_per_host']} per host) in {seconds:.1f} s"
        )
        print(
            f"per-domain probing (sample of {len(sample)}, extrapolated): "
            f"{figures['baseline_connections']:,} connections, "
            f"~{figures['baseline_seconds']} s"
        )
        print(f"ratio: {figures['ratio_connections_vs_baseline']}x fewer connections")
    return 0 if connections <= args.hosts and decided == args.domains else 1


if __name__ == "__main__":
    sys.exit(main())
