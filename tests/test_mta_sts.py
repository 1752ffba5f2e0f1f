"""MTA-STS (RFC 8461): the parser, discovery and fetch against the sandbox, the cache.

The sandbox serves one policy host per ``world.MTA_STS_SITES`` entry. The caching tests run
their own in-process DNS server whose zone they can swap (to change the TXT id or send the
policy host somewhere dead) while the policies still come from the sandbox HTTPS server.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from recapito.config import Settings
from recapito.delivery.dns import MXResolver
from recapito.ledger import Ledger
from recapito.ledger.schema import metadata
from recapito.ledger.store import MTASTSPolicyRecord
from recapito.sandbox import world
from recapito.sandbox.dns import AuthoritativeServer, Zone, ZoneRecord, txt_record
from recapito.sandbox.https import POLICY_PATH, answer, policy_response
from recapito.sandbox.runtime import Sandbox, free_dns_port
from recapito.security.mta_sts import (
    MAX_POLICY_BYTES,
    MTASTSResolver,
    MTASTSResult,
    Policy,
    PolicyError,
    mx_pattern_matches,
    parse_policy,
    parse_sts_record,
    select_sts_record,
)

GOOD = (
    "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    "max_age: 604800\r\n"
)
FETCH_ERROR = "sts-policy-fetch-error"
PLAIN = {"content-type": "text/plain"}


def invalid(text: str) -> str:
    parsed = parse_policy(text)
    assert isinstance(parsed, PolicyError), parsed
    assert parsed.reason == "sts-policy-invalid"
    return parsed.message


# -- the policy parser ----------------------------------------------------------------------


def test_parse_good_policy() -> None:
    policy = parse_policy(GOOD)
    assert policy == Policy("enforce", ("mail.example.com", "*.example.net"), 604800)


def test_lf_and_crlf_parse_alike_and_blanks_are_tolerated() -> None:
    lf = GOOD.replace("\r\n", "\n")
    assert parse_policy(lf) == parse_policy(GOOD)
    padded = "version:STSv1  \nmode:   testing\t\nmx: MAIL.Example.COM.\nmax_age: 0\n\n"
    assert parse_policy(padded) == Policy("testing", ("mail.example.com",), 0)


def test_unknown_keys_ignored_and_first_duplicate_wins() -> None:
    text = (
        "version: STSv1\nx-vendor: anything: at all\nmode: testing\nmode: enforce\n"
        "mx: a.example.com\nmx: b.example.com\nmax_age: 60\nmax_age: 99\n"
    )
    assert parse_policy(text) == Policy("testing", ("a.example.com", "b.example.com"), 60)


def test_field_order_is_free() -> None:
    # RFC 8461's ABNF lists the fields in any order; only the TXT record fixes v= first
    text = "mode: enforce\nmx: mail.example.com\nmax_age: 86400\nversion: STSv1\n"
    assert parse_policy(text) == Policy("enforce", ("mail.example.com",), 86400)


def test_missing_or_wrong_version() -> None:
    assert "version" in invalid("mode: enforce\nmx: m.example.com\nmax_age: 10\n")
    assert "STSv2" in invalid("version: STSv2\nmode: enforce\nmx: m.example.com\nmax_age: 10\n")
    # keys and values are case-sensitive: "Version"/"stsv1" do not count
    invalid("Version: STSv1\nmode: enforce\nmx: m.example.com\nmax_age: 10\n")
    invalid("version: stsv1\nmode: enforce\nmx: m.example.com\nmax_age: 10\n")


@pytest.mark.parametrize("mode", ["enforced", "Enforce", "report", ""])
def test_bad_mode(mode: str) -> None:
    assert "mode" in invalid(f"version: STSv1\nmode: {mode}\nmx: m.example.com\nmax_age: 10\n")


def test_missing_mode_and_missing_max_age() -> None:
    assert "mode" in invalid("version: STSv1\nmx: m.example.com\nmax_age: 10\n")
    assert "max_age" in invalid("version: STSv1\nmode: enforce\nmx: m.example.com\n")


@pytest.mark.parametrize("mode", ["enforce", "testing"])
def test_mx_required_unless_mode_none(mode: str) -> None:
    assert "mx" in invalid(f"version: STSv1\nmode: {mode}\nmax_age: 10\n")
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 10\n") == Policy("none", (), 10)


@pytest.mark.parametrize(
    "value", ["-1", "31557601", "99999999999", "12345678901", "abc", "1e5", "10 days", ""]
)
def test_bad_max_age(value: str) -> None:
    text = f"version: STSv1\nmode: enforce\nmx: m.example.com\nmax_age: {value}\n"
    assert "max_age" in invalid(text)


def test_max_age_bounds_accepted() -> None:
    for value in (0, 31557600):
        text = f"version: STSv1\nmode: enforce\nmx: m.example.com\nmax_age: {value}\n"
        parsed = parse_policy(text)
        assert isinstance(parsed, Policy) and parsed.max_age == value


@pytest.mark.parametrize(
    "line",
    [
        "mx m.example.com",  # no colon
        "mx: *.*.example.com",
        "mx: mail.*.example.com",
        "mx: -bad-.example.com",
        "mx: exa mple.com",
        "mx: ",
        "<html>: <body>",
    ],
)
def test_malformed_lines_and_patterns(line: str) -> None:
    invalid(f"version: STSv1\nmode: enforce\n{line}\nmx: ok.example.com\nmax_age: 10\n")


def test_wildcard_matches_exactly_one_label() -> None:
    assert mx_pattern_matches("*.example.com", "mx1.example.com")
    assert mx_pattern_matches("*.Example.com.", "MX1.EXAMPLE.COM.")
    assert not mx_pattern_matches("*.example.com", "example.com")
    assert not mx_pattern_matches("*.example.com", "a.b.example.com")
    assert not mx_pattern_matches("*.example.com", "mx1.example.com.evil.test")
    assert not mx_pattern_matches("*.example.com", "mx1example.com")
    assert mx_pattern_matches("mail.example.com", "Mail.Example.Com.")
    assert not mx_pattern_matches("mail.example.com", "x.mail.example.com")
    policy = parse_policy(GOOD)
    assert isinstance(policy, Policy)
    assert policy.matches("MAIL.example.com.") and policy.matches("mx7.example.net")
    assert not policy.matches("example.net") and not policy.matches("a.mx.example.net")


# -- the TXT record -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
        ("v=STSv1;id=abc123", "abc123"),
        ("v=STSv1 ; id=abc ; ext=val", "abc"),
        ("v=STSv1; id=" + "a" * 32, "a" * 32),
        ("v=STSv1; id=" + "a" * 33, None),  # too long
        ("v=STSv1; id=2016-08-31", None),  # not alphanumeric
        ("v=STSv1; id=", None),
        ("v=STSv1;", None),  # no id
        ("v=STSv1; junk", None),
        ("v=STSv2; id=1", None),
        ("id=1; v=STSv1", None),  # v= must come first
    ],
)
def test_parse_sts_record(text: str, expected: str | None) -> None:
    assert parse_sts_record(text) == expected


def test_select_sts_record() -> None:
    assert select_sts_record(["v=spf1 -all", "v=STSv1; id=abc"])[0] == "abc"
    none, why = select_sts_record(["v=STSv1; id=abc", "v=STSv1; id=def"])
    assert none is None and "2" in why
    assert select_sts_record(["v=spf1 -all"])[0] is None
    assert select_sts_record(["v=STSv1; id=bad-id"])[0] is None
    assert select_sts_record(["v=STSv10; id=abc"])[0] is None


# -- the sandbox policy server (no network) --------------------------------------------------


def test_policy_server_answers_by_host_and_path() -> None:
    ok = answer("GET", POLICY_PATH, "mta-sts.sts-enforce.test:8443")
    assert ok.status == 200 and b"mode: enforce" in ok.body
    assert answer("GET", "/", "mta-sts.sts-enforce.test").status == 404
    assert answer("GET", POLICY_PATH, "mta-sts.mailitalia.test").status == 404
    assert answer("POST", POLICY_PATH, "mta-sts.sts-enforce.test").status == 405
    oversize = policy_response(world.MTA_STS_BY_DOMAIN["sts-oversize.test"])
    assert len(oversize.body) > MAX_POLICY_BYTES
    # read in full the oversize body would even parse: only the size limit refuses it
    assert isinstance(parse_policy(oversize.body.decode()), Policy)


@pytest.mark.parametrize(
    ("status", "headers", "body", "reason", "words"),
    [
        (200, PLAIN, GOOD, None, ""),
        (200, {"content-type": "TEXT/PLAIN; charset=utf-8"}, GOOD, None, ""),
        (200, {}, GOOD, FETCH_ERROR, "Content-Type"),
        (200, {**PLAIN, "content-length": "70000"}, "", FETCH_ERROR, "70000"),
        (200, {**PLAIN, "content-encoding": "gzip"}, GOOD, FETCH_ERROR, "gzip"),
        (200, PLAIN, "x" * (MAX_POLICY_BYTES + 1), FETCH_ERROR, "64 KiB"),
        (200, PLAIN, "version: STSv1\xff", "sts-policy-invalid", ""),
        (301, {"location": "https://elsewhere.test/"}, "", FETCH_ERROR, "elsewhere"),
        (404, PLAIN, GOOD, FETCH_ERROR, "404"),
    ],
)
def test_response_checks(
    status: int, headers: dict[str, str], body: str, reason: str | None, words: str
) -> None:
    data = body.encode("latin-1" if "\xff" in body else "utf-8")
    # a stream, as in a real fetch; the headers are exactly the ones given
    response = httpx.Response(status, headers=headers, stream=httpx.ByteStream(data))
    resolver = MTASTSResolver()
    outcome = asyncio.run(resolver._read_policy(response, "https://mta-sts.x.test"))
    if reason is None:
        assert getattr(outcome, "policy", None) == parse_policy(GOOD)
    else:
        assert getattr(outcome, "reason", None) == reason and words in outcome.detail


# -- discovery and fetch against the sandbox ------------------------------------------------


def sandbox_resolver(box: Sandbox, **kwargs: object) -> MTASTSResolver:
    return MTASTSResolver(
        box.dns_address,
        box.https_port,
        box.ca_file,
        **kwargs,  # type: ignore[arg-type]
    )


# domain -> (mode, error, an MX host the policy must list or None)
POSTURES: dict[str, tuple[str | None, str | None, str | None]] = {
    "sts-enforce.test": ("enforce", None, "mx.tls13.sandbox.test"),
    "sts-testing.test": ("testing", None, "mx.tls12.sandbox.test"),
    "sts-none.test": ("none", None, "mx.tls13.sandbox.test"),
    "sts-enforce-badcert.test": ("enforce", None, "mx.wrongname.sandbox.test"),
    "sts-enforce-mismatch.test": ("enforce", None, None),
    "sts-broken.test": (None, "sts-policy-invalid", None),
    "sts-oversize.test": (None, "sts-policy-fetch-error", None),
    "sts-redirect.test": (None, "sts-policy-fetch-error", None),
    "sts-wrongtype.test": (None, "sts-policy-fetch-error", None),
    "sts-badwebcert.test": (None, "sts-webpki-invalid", None),
    "sts-unreachable.test": (None, "sts-policy-fetch-error", None),
    "mailitalia.test": (None, None, None),  # no TXT record: no policy
    "dominio-inesistente.test": (None, None, None),
}


def test_every_sandbox_site_has_an_expectation() -> None:
    assert {s.domain for s in world.MTA_STS_SITES} <= set(POSTURES)
    for site in world.MTA_STS_SITES:
        assert world.DOMAINS_BY_NAME[site.domain].weight == 0


def test_sandbox_postures(sandbox: Sandbox) -> None:
    async def run() -> dict[str, MTASTSResult]:
        resolver = sandbox_resolver(sandbox, fetch_timeout=10.0)
        results = await asyncio.gather(*(resolver.policy(d) for d in POSTURES))
        return dict(zip(POSTURES, results, strict=True))

    results = asyncio.run(run())
    for domain, (mode, error, listed) in POSTURES.items():
        result = results[domain]
        assert (result.mode, result.error) == (mode, error), (domain, result)
        assert not result.from_cache and not result.temporary
        if listed is not None:
            assert result.lists(listed), (domain, result)
        if mode is None:
            assert result.policy is None and result.allows("anything.test")
    assert results["sts-enforce.test"].policy_id == "20261201"
    assert results["sts-enforce.test"].enforce
    mismatch = results["sts-enforce-mismatch.test"]
    assert not mismatch.lists("mx.tls13.sandbox.test")
    assert not mismatch.allows("mx.tls13.sandbox.test")
    assert results["sts-testing.test"].allows("mx.elsewhere.test")  # testing never blocks
    assert "64 KiB" in results["sts-oversize.test"].detail
    assert "redirect" in results["sts-redirect.test"].detail
    assert "text/html" in results["sts-wrongtype.test"].detail
    assert "certificate" in results["sts-badwebcert.test"].detail
    assert "key: value" in results["sts-broken.test"].detail


def test_sandbox_mx_records_of_sts_domains(sandbox: Sandbox) -> None:
    async def run() -> dict[str, list[str]]:
        mx = MXResolver(sandbox.dns_address)
        out = {}
        for site in world.MTA_STS_SITES:
            result = await mx.resolve(site.domain)
            out[site.domain] = [h.name for h in result.hosts]
        return out

    hosts = asyncio.run(run())
    assert hosts["sts-enforce.test"] == ["mx.tls13.sandbox.test"]
    assert hosts["sts-enforce-badcert.test"] == ["mx.wrongname.sandbox.test"]
    assert hosts["sts-enforce-mismatch.test"] == ["mx.tls13.sandbox.test"]
    assert hosts["sts-testing.test"] == ["mx.tls12.sandbox.test"]


def test_policy_host_certificate_must_chain_to_a_trusted_root(sandbox: Sandbox) -> None:
    # without the sandbox CA the policy host cannot be authenticated
    resolver = MTASTSResolver(sandbox.dns_address, sandbox.https_port, None)
    result = asyncio.run(resolver.policy("sts-enforce.test"))
    assert result.policy is None and result.error == "sts-webpki-invalid"


def test_settings_from_the_sandbox_reach_the_policy_server(sandbox: Sandbox) -> None:
    settings = Settings.load(env={**os.environ, "RECAPITO_HOME": str(sandbox.home)})
    assert settings.https_port == sandbox.https_port
    resolver = MTASTSResolver.from_settings(settings)
    result = asyncio.run(resolver.policy("STS-Enforce.test."))
    assert result.domain == "sts-enforce.test" and result.mode == "enforce"


def test_dns_failure_is_temporary() -> None:
    dead = ("127.0.0.1", free_dns_port())  # nothing answers there
    resolver = MTASTSResolver(dead, 443, None, dns_timeout=1.0)
    result = asyncio.run(resolver.policy("sts-enforce.test"))
    assert result.temporary and result.error == "temporary" and result.mode is None


# -- caching, with a DNS zone the test controls ----------------------------------------------

DOMAIN = "sts-enforce.test"


class ZoneSwitch:
    """Stands in for a Zone in AuthoritativeServer; answers from whichever zone is current."""

    def __init__(self, zone: Zone) -> None:
        self.current = zone

    def reply(self, request: object) -> object:
        return self.current.reply(request)  # type: ignore[arg-type]


def sts_zone(*txt: str, address: str = world.MTA_STS_ADDRESS) -> Zone:
    zone = Zone()
    for text in txt:
        zone.add(txt_record(f"_mta-sts.{DOMAIN}", text))
    zone.add(ZoneRecord(f"mta-sts.{DOMAIN}", "A", address))
    return zone


@pytest.fixture
def switch() -> Iterator[tuple[ZoneSwitch, int]]:
    zones = ZoneSwitch(sts_zone("v=STSv1; id=one"))
    port = free_dns_port()
    server = AuthoritativeServer(zones, "127.0.0.1", port)  # type: ignore[arg-type]
    server.start()
    try:
        yield zones, port
    finally:
        server.stop()


@dataclass
class Clock:
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now


def cache_resolver(
    sandbox: Sandbox, port: int, store: Ledger | None = None, clock: Clock | None = None
) -> MTASTSResolver:
    # recheck_after=0: every call asks DNS, so the TXT id is compared on every call
    return MTASTSResolver(
        ("127.0.0.1", port),
        sandbox.https_port,
        sandbox.ca_file,
        store,
        recheck_after=0.0,
        clock=clock or Clock(),
    )


def test_second_call_is_served_from_cache(sandbox: Sandbox, switch: tuple[ZoneSwitch, int]) -> None:
    _, port = switch
    resolver = cache_resolver(sandbox, port)

    async def run() -> tuple[MTASTSResult, MTASTSResult]:
        return await resolver.policy(DOMAIN), await resolver.policy(DOMAIN)

    first, second = asyncio.run(run())
    assert not first.from_cache and first.policy_id == "one" and first.mode == "enforce"
    assert second.from_cache and second.policy == first.policy
    assert resolver.stats.fetches == 1 and resolver.stats.txt_lookups == 2


def test_memory_answer_within_recheck_interval(
    sandbox: Sandbox, switch: tuple[ZoneSwitch, int]
) -> None:
    _, port = switch
    clock = Clock()
    resolver = MTASTSResolver(
        ("127.0.0.1", port), sandbox.https_port, sandbox.ca_file, recheck_after=300, clock=clock
    )

    async def run() -> list[MTASTSResult]:
        out = [await resolver.policy(DOMAIN) for _ in range(5)]
        # concurrent callers share one lookup
        out += await asyncio.gather(*(resolver.policy(DOMAIN.upper()) for _ in range(5)))
        clock.now += timedelta(seconds=301)
        out.append(await resolver.policy(DOMAIN))
        return out

    results = asyncio.run(run())
    assert all(r.mode == "enforce" for r in results)
    assert resolver.stats.txt_lookups == 2 and resolver.stats.fetches == 1


def test_id_change_refetches(sandbox: Sandbox, switch: tuple[ZoneSwitch, int]) -> None:
    zones, port = switch
    resolver = cache_resolver(sandbox, port)

    async def run() -> list[MTASTSResult]:
        out = [await resolver.policy(DOMAIN)]
        zones.current = sts_zone("v=STSv1; id=two")
        out.append(await resolver.policy(DOMAIN))
        out.append(await resolver.policy(DOMAIN))
        return out

    first, changed, again = asyncio.run(run())
    assert first.policy_id == "one"
    assert changed.policy_id == "two" and not changed.from_cache
    assert again.policy_id == "two" and again.from_cache
    assert resolver.stats.fetches == 2


def test_refresh_forces_a_refetch(sandbox: Sandbox, switch: tuple[ZoneSwitch, int]) -> None:
    _, port = switch
    resolver = MTASTSResolver(("127.0.0.1", port), sandbox.https_port, sandbox.ca_file)

    async def run() -> list[MTASTSResult]:
        return [
            await resolver.policy(DOMAIN),
            await resolver.policy(DOMAIN),  # memory
            await resolver.policy(DOMAIN, refresh=True),
            await resolver.policy(DOMAIN),  # the refreshed answer, from memory
        ]

    first, memo, refreshed, after = asyncio.run(run())
    assert not first.from_cache and memo is first
    assert not refreshed.from_cache and refreshed.mode == "enforce"
    assert after is refreshed
    assert resolver.stats.fetches == 2


def test_expired_policy_is_refetched(sandbox: Sandbox, switch: tuple[ZoneSwitch, int]) -> None:
    _, port = switch
    clock = Clock()
    resolver = cache_resolver(sandbox, port, clock=clock)
    max_age = world.MTA_STS_BY_DOMAIN[DOMAIN].max_age

    async def run() -> list[MTASTSResult]:
        out = [await resolver.policy(DOMAIN)]
        clock.now += timedelta(seconds=max_age - 1)
        out.append(await resolver.policy(DOMAIN))
        clock.now += timedelta(seconds=2)
        out.append(await resolver.policy(DOMAIN))
        return out

    first, cached, expired = asyncio.run(run())
    assert first.expires_at == clock.now - timedelta(seconds=max_age + 1) + timedelta(
        seconds=max_age
    )
    assert cached.from_cache
    assert not expired.from_cache and expired.mode == "enforce"
    assert expired.expires_at is not None and expired.expires_at > first.expires_at
    assert resolver.stats.fetches == 2


def test_failed_refetch_keeps_the_cached_policy(
    sandbox: Sandbox, switch: tuple[ZoneSwitch, int]
) -> None:
    zones, port = switch
    resolver = cache_resolver(sandbox, port)

    async def run() -> list[MTASTSResult]:
        out = [await resolver.policy(DOMAIN)]
        # a new id, but the policy host now points at an address where nothing listens
        zones.current = sts_zone("v=STSv1; id=two", address=world.DEAD_MX.address)
        out.append(await resolver.policy(DOMAIN))
        out.append(await resolver.policy(DOMAIN, refresh=True))
        # the TXT record disappears: the cached policy applies until it expires
        zones.current = sts_zone()
        out.append(await resolver.policy(DOMAIN))
        # two STSv1 records: no valid record, same as none
        zones.current = sts_zone("v=STSv1; id=a", "v=STSv1; id=b")
        out.append(await resolver.policy(DOMAIN))
        return out

    first, failed, refresh_failed, no_txt, two_txt = asyncio.run(run())
    assert first.policy_id == "one"
    for kept in (failed, refresh_failed):
        assert kept.from_cache and kept.mode == "enforce" and kept.policy_id == "one"
        assert kept.error == "sts-policy-fetch-error" and "cached policy applies" in kept.detail
    for kept in (no_txt, two_txt):
        assert kept.from_cache and kept.mode == "enforce" and kept.error is None


def test_without_cache_a_bad_txt_means_no_policy(
    sandbox: Sandbox, switch: tuple[ZoneSwitch, int]
) -> None:
    zones, port = switch
    zones.current = sts_zone("v=STSv1; id=a", "v=STSv1; id=b")
    resolver = cache_resolver(sandbox, port)
    result = asyncio.run(resolver.policy(DOMAIN))
    assert result.mode is None and result.error is None and "2 v=STSv1" in result.detail
    zones.current = sts_zone("v=STSv1; id=not-alnum")
    result = asyncio.run(resolver.policy(DOMAIN))
    assert result.mode is None and result.error is None and resolver.stats.fetches == 0


def test_dns_failure_with_cache_keeps_the_policy(sandbox: Sandbox, tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        now = datetime.now(UTC)
        ledger.save_mta_sts_policy(
            MTASTSPolicyRecord(DOMAIN, "one", "enforce", ("mx.tls13.sandbox.test",), 600, now,
                               now + timedelta(seconds=600), "0" * 64)
        )  # fmt: skip
        dead = ("127.0.0.1", free_dns_port())
        resolver = MTASTSResolver(dead, sandbox.https_port, sandbox.ca_file, ledger, dns_timeout=1)
        result = asyncio.run(resolver.policy(DOMAIN))
        assert result.from_cache and result.mode == "enforce" and not result.temporary
        assert result.error == "temporary"
    finally:
        ledger.close()


# -- persistence in the ledger ----------------------------------------------------------------


def test_policy_persists_across_resolvers(
    sandbox: Sandbox, switch: tuple[ZoneSwitch, int], tmp_path: Path
) -> None:
    _, port = switch
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        clock = Clock()
        first = cache_resolver(sandbox, port, ledger, clock)
        fetched = asyncio.run(first.policy(DOMAIN))
        assert not fetched.from_cache and first.stats.store_saves == 1
        row = ledger.get_mta_sts_policy(DOMAIN)
        assert row is not None
        assert (row.policy_id, row.mode, row.mx_patterns) == (
            "one",
            "enforce",
            ("mx.tls13.sandbox.test",),
        )
        assert row.max_age == 86400 and len(row.policy_sha256) == 64
        assert row.expires_at - row.fetched_at == timedelta(seconds=86400)

        second = cache_resolver(sandbox, port, ledger, clock)
        again = asyncio.run(second.policy(DOMAIN))
        assert again.from_cache and again.policy == fetched.policy
        assert second.stats.fetches == 0 and second.stats.store_loads == 1

        # a stored policy that has expired is refetched (and the row renewed)
        clock.now += timedelta(days=2)
        third = cache_resolver(sandbox, port, ledger, clock)
        renewed = asyncio.run(third.policy(DOMAIN))
        assert not renewed.from_cache and third.stats.fetches == 1
        newer = ledger.get_mta_sts_policy(DOMAIN)
        assert newer is not None and newer.fetched_at > row.fetched_at
    finally:
        ledger.close()


def test_ledger_policy_roundtrip_and_migration(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    try:
        now = datetime.now(UTC).replace(microsecond=0)
        record = MTASTSPolicyRecord(
            "Example.TEST.", "id1", "testing", ("*.example.test",), 60, now, now, "a" * 64
        )
        assert ledger.get_mta_sts_policy("example.test") is None
        ledger.save_mta_sts_policy(record)
        ledger.save_mta_sts_policy(
            MTASTSPolicyRecord("example.test", "id2", "enforce", ("mx.example.test",), 90, now,
                               now + timedelta(seconds=90), "b" * 64)
        )  # fmt: skip
        stored = ledger.get_mta_sts_policy("EXAMPLE.test")
        assert stored is not None
        assert (stored.domain, stored.policy_id, stored.mode, stored.mx_patterns) == (
            "example.test",
            "id2",
            "enforce",
            ("mx.example.test",),
        )
        assert stored.expires_at == now + timedelta(seconds=90)
        with ledger.engine.connect() as conn:
            assert "mta_sts_policies" in sa.inspect(conn).get_table_names()
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = [d for d in compare_metadata(context, metadata) if "mta_sts" in repr(d)]
        assert diffs == []  # the migration creates exactly what schema.py declares
    finally:
        ledger.close()
