"""A sandbox zone with thousands of extra records starts (its spec no longer rides on argv)."""

from __future__ import annotations

from pathlib import Path

import dns.resolver

from recapito.sandbox.dns import ZoneRecord
from recapito.sandbox.runtime import Sandbox


def test_sandbox_with_five_thousand_extra_records(tmp_path: Path) -> None:
    extra = [
        ZoneRecord(f"d{i}.grande.test", "MX", "10 mx.tls13.sandbox.test.") for i in range(5000)
    ]
    with Sandbox(tmp_path, extra_records=extra) as box:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [box.dns_address[0]]
        resolver.port = box.dns_address[1]
        answer = resolver.resolve("d4999.grande.test", "MX")
        assert [r.exchange.to_text() for r in answer] == ["mx.tls13.sandbox.test."]
