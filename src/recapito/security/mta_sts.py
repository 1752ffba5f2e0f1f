"""MTA-STS (RFC 8461): policy discovery, fetching, parsing and caching, per recipient domain.

A recipient domain announces a policy with a TXT record ``_mta-sts.<domain>``
(``v=STSv1; id=…``) and serves it at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``.
The policy says which MX host names are legitimate (``mx`` patterns) and whether a sender
must refuse MX hosts that are not listed or lack a valid certificate (``mode: enforce``),
should only report them (``testing``), or that the policy is withdrawn (``none``).

Everything here returns data, as ``recapito.delivery.dns`` does:

- ``parse_policy`` gives a ``Policy`` or a ``PolicyError`` (reason ``sts-policy-invalid``);
- ``MTASTSResolver.policy`` gives an ``MTASTSResult``: the policy that applies (if any), where
  it came from (a fresh fetch or the cache) and, when something went wrong, a TLS-RPT reason
  (``sts-policy-fetch-error``, ``sts-policy-invalid``, ``sts-webpki-invalid``) or
  ``temporary`` for a DNS failure.

Caching follows RFC 8461 §5: a fetched policy is kept for ``max_age`` seconds, in memory and
in the ledger (table ``mta_sts_policies``); it is refetched when the TXT id changes or when
the caller asks for a refresh, and kept when a refetch fails. A DNS failure with nothing
cached is ``temporary`` (the engine defers); it is never read as "no policy".

The policy host is resolved through the configured resolver (the one the MX lookups use,
never the system's when one is configured) and reached at that address with SNI and
certificate verification for ``mta-sts.<domain>`` against the system CAs plus
``RECAPITO_TLS_CA_FILE``; redirects are refused and at most 64 KiB of body are read.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import httpx

from recapito.config import Settings
from recapito.delivery.dns import make_resolver
from recapito.ledger.store import MTASTSPolicyRecord

Mode = Literal["enforce", "testing", "none"]
MODES: tuple[Mode, ...] = ("enforce", "testing", "none")
# TLS-RPT (RFC 8460) result types for MTA-STS problems, plus "temporary" for DNS failures.
Reason = Literal["sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid", "temporary"]

POLICY_PATH = "/.well-known/mta-sts.txt"
MAX_POLICY_BYTES = 64 * 1024
MAX_MAX_AGE = 31_557_600  # RFC 8461 §3.2: about one year
USER_AGENT = "recapito-mta-sts/1"

_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DIGITS_RE = re.compile(r"[0-9]{1,10}")


def _as_mode(text: str) -> Mode | None:
    for mode in MODES:
        if text == mode:
            return mode
    return None


def _norm_host(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _dns_domain(domain: str) -> str | None:
    """The domain in lower-case ASCII (A-labels for an IDN), or None if it cannot be one."""
    name = _norm_host(domain)
    try:
        text = dns.name.from_text(name).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError):
        return None
    return text if text not in ("", ".", "@") else None


def _valid_domain(name: str) -> bool:
    labels = name.split(".")
    return 0 < len(name) <= 253 and all(_LABEL_RE.fullmatch(label) for label in labels)


def mx_pattern_matches(pattern: str, mx_host: str) -> bool:
    """RFC 8461 §4.1: ``mail.example.com`` matches itself; ``*.example.com`` matches exactly
    one extra left-most label (``mx1.example.com``), never ``example.com`` nor
    ``a.b.example.com``. Case and trailing dots do not matter."""
    pattern = _norm_host(pattern)
    host = _norm_host(mx_host)
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        head = host[: -len(suffix)] if host.endswith(suffix) else ""
        return bool(head) and "." not in head
    return bool(host) and host == pattern


# -- the policy file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """A parsed MTA-STS policy (version ``STSv1``)."""

    mode: Mode
    mx: tuple[str, ...]  # patterns, lower-case, without trailing dots
    max_age: int  # seconds

    def matches(self, mx_host: str) -> bool:
        """True if ``mx_host`` is listed by one of the ``mx`` patterns."""
        return any(mx_pattern_matches(pattern, mx_host) for pattern in self.mx)


@dataclass(frozen=True)
class PolicyError:
    """Why a policy body was refused."""

    message: str
    reason: Reason = "sts-policy-invalid"


def parse_policy(text: str) -> Policy | PolicyError:
    """Parse a policy body (RFC 8461 §3.2).

    One ``key: value`` per line, LF or CRLF line ends. ``version`` must be ``STSv1``;
    ``mode`` is ``enforce``, ``testing`` or ``none``; ``max_age`` is 0…31557600; ``mx`` is
    repeated, at least once unless the mode is ``none``. Keys and values are case-sensitive
    as the RFC's ABNF says. Unknown keys are ignored; for a repeated key other than ``mx``
    the first occurrence counts. The RFC does not fix the order of the fields, so neither
    does this parser.
    """
    fields: dict[str, str] = {}
    patterns: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r").rstrip(" \t")
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep or not _KEY_RE.fullmatch(key):
            return PolicyError(f"line {number} is not a 'key: value' field: {line[:60]!r}")
        value = value.strip(" \t")
        if key == "mx":
            patterns.append(value)
        else:
            fields.setdefault(key, value)

    version = fields.get("version")
    if version is None:
        return PolicyError("no 'version' field")
    if version != "STSv1":
        return PolicyError(f"unsupported version {version[:20]!r} (expected 'STSv1')")
    mode_text = fields.get("mode")
    if mode_text is None:
        return PolicyError("no 'mode' field")
    mode = _as_mode(mode_text)
    if mode is None:
        return PolicyError(f"unknown mode {mode_text[:20]!r} (expected enforce, testing or none)")
    age_text = fields.get("max_age")
    if age_text is None:
        return PolicyError("no 'max_age' field")
    if not _DIGITS_RE.fullmatch(age_text) or int(age_text) > MAX_MAX_AGE:
        return PolicyError(f"max_age {age_text[:20]!r} is not an integer in 0…{MAX_MAX_AGE}")
    cleaned: list[str] = []
    for pattern in patterns:
        name = _norm_host(pattern)
        bare = name.removeprefix("*.")
        if not _valid_domain(bare):
            return PolicyError(f"mx pattern {pattern[:80]!r} is not a host name or '*.' + domain")
        cleaned.append(name)
    if not cleaned and mode != "none":
        return PolicyError(f"mode {mode} needs at least one 'mx' pattern")
    return Policy(mode=mode, mx=tuple(cleaned), max_age=int(age_text))


# -- the TXT record -------------------------------------------------------------------------------


def parse_sts_record(text: str) -> str | None:
    """The policy id of a ``v=STSv1; id=…`` TXT record (RFC 8461 §3.1), or None if invalid.

    Fields are separated by ``;`` with optional blanks around it; ``v=STSv1`` must come
    first; ``id`` is 1–32 letters and digits; other ``name=value`` fields are ignored.
    """
    parts = [p.strip(" \t") for p in text.split(";")]
    if not parts or parts[0] != "v=STSv1":
        return None
    policy_id: str | None = None
    for part in parts[1:]:
        if not part:
            continue  # the record may end with ";"
        name, sep, value = part.partition("=")
        if not sep or not _KEY_RE.fullmatch(name) or not value:
            return None
        if name == "id" and policy_id is None:
            if not _ID_RE.fullmatch(value):
                return None
            policy_id = value
    return policy_id


def is_sts_record(text: str) -> bool:
    """Whether a TXT string announces MTA-STS at all (starts with ``v=STSv1``)."""
    return text.startswith("v=STSv1") and text[7:8] in ("", ";", " ", "\t")


def select_sts_record(texts: Sequence[str]) -> tuple[str | None, str]:
    """(policy id or None, explanation) from the TXT strings at ``_mta-sts.<domain>``.

    Strings not starting with ``v=STSv1`` are dropped; anything but exactly one valid record
    left means the domain has no usable policy (RFC 8461 §3.1).
    """
    candidates = [t for t in texts if is_sts_record(t)]
    if not candidates:
        return None, "no v=STSv1 TXT record"
    if len(candidates) > 1:
        return None, f"{len(candidates)} v=STSv1 TXT records (exactly one is allowed)"
    policy_id = parse_sts_record(candidates[0])
    if policy_id is None:
        return None, f"malformed MTA-STS TXT record {candidates[0][:80]!r}"
    return policy_id, f"TXT id={policy_id}"


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MTASTSResult:
    """What MTA-STS says about one recipient domain at one moment.

    ``policy``/``mode`` are what applies (None: no policy, deliver as without MTA-STS).
    ``error`` names the problem met during this lookup, if any, *whether or not* a cached
    policy stepped in: a cached policy kept after a failed refetch has both ``policy`` and
    ``error`` set. ``temporary`` means DNS failed and nothing was cached: ask again later.
    """

    domain: str
    mode: Mode | None = None
    policy: Policy | None = None
    policy_id: str | None = None
    error: Reason | None = None
    from_cache: bool = False
    detail: str = ""
    expires_at: datetime | None = None

    @property
    def temporary(self) -> bool:
        return self.error == "temporary" and self.policy is None

    @property
    def enforce(self) -> bool:
        return self.mode == "enforce"

    def lists(self, mx_host: str) -> bool:
        """True if a policy applies and one of its ``mx`` patterns matches ``mx_host``."""
        return self.policy is not None and self.policy.matches(mx_host)

    def allows(self, mx_host: str) -> bool:
        """False only when an ``enforce`` policy applies and does not list ``mx_host``."""
        return not self.enforce or self.lists(mx_host)


class PolicyStore(Protocol):
    """Where fetched policies outlive the process (``recapito.ledger.Ledger`` is one)."""

    def get_mta_sts_policy(self, domain: str) -> MTASTSPolicyRecord | None: ...

    def save_mta_sts_policy(self, record: MTASTSPolicyRecord) -> None: ...


@dataclass
class MTASTSStats:
    """What a resolver did, for reports and tests."""

    txt_lookups: int = 0
    fetches: int = 0
    store_loads: int = 0
    store_saves: int = 0


@dataclass(frozen=True)
class _Entry:
    """A policy in the cache."""

    policy: Policy
    policy_id: str
    fetched_at: datetime
    expires_at: datetime
    sha256: str


@dataclass(frozen=True)
class _Discovery:
    """The outcome of the TXT lookup."""

    policy_id: str | None
    detail: str
    temporary: bool = False


@dataclass(frozen=True)
class _Fetched:
    policy: Policy
    sha256: str


@dataclass(frozen=True)
class _FetchFailure:
    reason: Reason
    detail: str
    next_address: bool = False  # the address did not answer: another address may


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# -- the resolver ---------------------------------------------------------------------------------


@dataclass
class MTASTSResolver:
    """MTA-STS lookups with the RFC 8461 §5 cache (memory, then the ledger).

    ``nameserver`` is ``(host, port)`` of the resolver to ask (None: the system's);
    ``https_port`` the policy hosts' port (443 on the Internet); ``extra_ca_file`` trust
    anchors added to the system CAs; ``store`` the ledger (or None for memory only).
    Within ``recheck_after`` seconds a domain is answered from memory without asking DNS,
    so a campaign run costs one TXT lookup per domain, not one per message.
    """

    nameserver: tuple[str, int] | None = None
    https_port: int = 443
    extra_ca_file: Path | None = None
    store: PolicyStore | None = None
    dns_timeout: float = 5.0
    fetch_timeout: float = 20.0
    recheck_after: float = 300.0
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    stats: MTASTSStats = field(default_factory=MTASTSStats)
    # memory layer: policies by domain (None: the store has none) and recent answers
    _entries: dict[str, _Entry | None] = field(default_factory=dict, init=False, repr=False)
    _memo: dict[str, tuple[datetime, MTASTSResult]] = field(
        default_factory=dict, init=False, repr=False
    )
    _inflight: dict[tuple[str, bool], asyncio.Future[MTASTSResult]] = field(
        default_factory=dict, init=False, repr=False
    )
    _resolver: dns.asyncresolver.Resolver | None = field(default=None, init=False, repr=False)
    _ssl: ssl.SSLContext | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, store: PolicyStore | None = None) -> MTASTSResolver:
        # When a validating resolver is configured every lookup goes through it.
        return cls(
            nameserver=settings.dane_resolver or settings.dns,
            https_port=settings.https_port,
            extra_ca_file=settings.tls_ca_file,
            store=store,
        )

    # -- public --------------------------------------------------------------------------

    async def policy(self, domain: str, *, refresh: bool = False) -> MTASTSResult:
        """The MTA-STS verdict for ``domain``.

        ``refresh=True`` skips the memory answer and refetches the policy even when the TXT
        id is unchanged (the engine does this once after an MX host failed the cached
        policy); if that refetch fails the cached policy still applies.
        """
        key = _dns_domain(domain)
        if key is None:
            return MTASTSResult(_norm_host(domain), detail="not a valid domain name: no policy")
        if not refresh:
            memo = self._memo.get(key)
            if memo is not None and self.clock() < memo[0]:
                return memo[1]
        flight = (key, refresh)
        pending = self._inflight.get(flight)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[MTASTSResult] = asyncio.get_running_loop().create_future()
        self._inflight[flight] = fut
        try:
            result = await self._lookup(key, refresh)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: the caller gets the exception itself
            raise
        finally:
            self._inflight.pop(flight, None)
        self._remember(key, result)
        fut.set_result(result)
        return result

    def forget(self, domain: str | None = None) -> None:
        """Drop the memory layer (one domain or all); the ledger copy stays."""
        if domain is None:
            self._memo.clear()
            self._entries.clear()
        else:
            key = _norm_host(domain)
            self._memo.pop(key, None)
            self._entries.pop(key, None)

    # -- the RFC 8461 §5 flow --------------------------------------------------------------

    def _remember(self, key: str, result: MTASTSResult) -> None:
        if result.temporary:
            self._memo.pop(key, None)  # a DNS failure is asked again next time
            return
        until = self.clock() + timedelta(seconds=self.recheck_after)
        if result.expires_at is not None:
            until = min(until, result.expires_at)
        self._memo[key] = (until, result)

    async def _lookup(self, domain: str, refresh: bool) -> MTASTSResult:
        now = self.clock()
        cached = self._cached(domain, now)
        found = await self._discover(domain)
        policy_id = found.policy_id
        if found.temporary:
            # DNS failed: a cached policy still applies, otherwise try again later
            if cached is not None:
                detail = f"{found.detail}; cached policy applies"
                return self._from_cache(domain, cached, detail, error="temporary")
            return MTASTSResult(domain, error="temporary", detail=found.detail)
        if policy_id is None:
            # RFC 8461 §5.1: without a record a cached policy still applies until it expires
            if cached is not None:
                return self._from_cache(domain, cached, f"{found.detail}; cached policy applies")
            return MTASTSResult(domain, detail=f"no MTA-STS policy ({found.detail})")
        if cached is not None and cached.policy_id == policy_id and not refresh:
            return self._from_cache(domain, cached, "TXT id unchanged")
        fetched = await self._fetch(domain)
        if isinstance(fetched, _FetchFailure):
            if cached is not None:
                return self._from_cache(
                    domain,
                    cached,
                    f"refetch failed ({fetched.detail}); cached policy applies",
                    error=fetched.reason,
                )
            return MTASTSResult(
                domain, policy_id=policy_id, error=fetched.reason, detail=fetched.detail
            )
        entry = _Entry(
            fetched.policy,
            policy_id,
            now,
            now + timedelta(seconds=fetched.policy.max_age),
            fetched.sha256,
        )
        self._entries[domain] = entry
        if self.store is not None:
            self.store.save_mta_sts_policy(
                MTASTSPolicyRecord(
                    domain=domain,
                    policy_id=entry.policy_id,
                    mode=entry.policy.mode,
                    mx_patterns=entry.policy.mx,
                    max_age=entry.policy.max_age,
                    fetched_at=entry.fetched_at,
                    expires_at=entry.expires_at,
                    policy_sha256=entry.sha256,
                )
            )
            self.stats.store_saves += 1
        return MTASTSResult(
            domain,
            mode=entry.policy.mode,
            policy=entry.policy,
            policy_id=policy_id,
            detail=f"policy fetched (id={policy_id}, max_age={entry.policy.max_age})",
            expires_at=entry.expires_at,
        )

    def _from_cache(
        self, domain: str, entry: _Entry, detail: str, error: Reason | None = None
    ) -> MTASTSResult:
        return MTASTSResult(
            domain,
            mode=entry.policy.mode,
            policy=entry.policy,
            policy_id=entry.policy_id,
            error=error,
            from_cache=True,
            detail=f"{detail} (id={entry.policy_id}, expires {entry.expires_at:%Y-%m-%d %H:%M}Z)",
            expires_at=entry.expires_at,
        )

    def _cached(self, domain: str, now: datetime) -> _Entry | None:
        """The unexpired cached policy of ``domain``: memory first, then (once) the store."""
        if domain not in self._entries:
            self._entries[domain] = self._load(domain)
        entry = self._entries[domain]
        if entry is not None and entry.expires_at <= now:
            return None
        return entry

    def _load(self, domain: str) -> _Entry | None:
        if self.store is None:
            return None
        self.stats.store_loads += 1
        record = self.store.get_mta_sts_policy(domain)
        mode = _as_mode(record.mode) if record is not None else None
        if record is None or mode is None:
            return None
        return _Entry(
            Policy(mode, tuple(record.mx_patterns), record.max_age),
            record.policy_id,
            record.fetched_at,
            record.expires_at,
            record.policy_sha256,
        )

    # -- DNS -------------------------------------------------------------------------------

    def _dns(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            self._resolver = make_resolver(self.nameserver, self.dns_timeout)
        return self._resolver

    async def _discover(self, domain: str) -> _Discovery:
        self.stats.txt_lookups += 1
        try:
            answer = await self._dns().resolve(f"_mta-sts.{domain}.", "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return _Discovery(None, "no MTA-STS TXT record")
        except dns.exception.DNSException as exc:
            return _Discovery(None, f"TXT lookup failed: {type(exc).__name__}", temporary=True)
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        policy_id, why = select_sts_record(texts)
        return _Discovery(policy_id, why)

    async def _addresses(self, host: str) -> tuple[str, ...] | str:
        """Addresses of the policy host (A, then AAAA); a string describes a failure."""
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._dns().resolve(f"{host}.", rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                if found:
                    break
                return f"cannot resolve {host}: {type(exc).__name__}"
            found.extend(r.to_text() for r in answer)
        return tuple(found) if found else f"{host} has no address"

    # -- HTTPS -----------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            if self.extra_ca_file is not None:
                ctx.load_verify_locations(cafile=str(self.extra_ca_file))
            self._ssl = ctx
        return self._ssl

    async def _fetch(self, domain: str) -> _Fetched | _FetchFailure:
        self.stats.fetches += 1
        host = f"mta-sts.{domain}"
        addresses = await self._addresses(host)
        if isinstance(addresses, str):
            return _FetchFailure("sts-policy-fetch-error", addresses)
        failure = _FetchFailure("sts-policy-fetch-error", f"{host}: no address to try")
        for address in addresses[:4]:
            outcome = await self._fetch_from(host, address)
            if isinstance(outcome, _Fetched) or not outcome.next_address:
                return outcome
            failure = outcome
        return failure

    async def _fetch_from(self, host: str, address: str) -> _Fetched | _FetchFailure:
        """GET the policy from one address, with SNI and verification for ``host``."""
        where = f"[{address}]" if ":" in address else address
        url = f"https://{where}:{self.https_port}{POLICY_PATH}"
        shown = f"https://{host}{'' if self.https_port == 443 else f':{self.https_port}'}"
        headers = {
            "Host": host if self.https_port == 443 else f"{host}:{self.https_port}",
            "Accept": "text/plain",
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
        }
        # A client per fetch: pooled connections are keyed by address, and one opened with
        # the SNI of another policy host must never be reused for this one.
        client = httpx.AsyncClient(
            verify=self._ssl_context(),
            trust_env=False,  # no proxies from the environment
            follow_redirects=False,
            timeout=httpx.Timeout(self.fetch_timeout),
        )
        try:
            async with asyncio.timeout(self.fetch_timeout), client:
                request = client.build_request(
                    "GET", url, headers=headers, extensions={"sni_hostname": host}
                )
                response = await client.send(request, stream=True)
                try:
                    return await self._read_policy(response, shown)
                finally:
                    await response.aclose()
        except TimeoutError:
            return _FetchFailure("sts-policy-fetch-error", f"{shown}: timed out")
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            return self._classify(exc, shown, address)

    def _classify(self, exc: BaseException, shown: str, address: str) -> _FetchFailure:
        for item in _cause_chain(exc):
            if isinstance(item, ssl.SSLCertVerificationError):
                why = item.verify_message or str(item)
                return _FetchFailure("sts-webpki-invalid", f"{shown}: certificate: {why}")
        if isinstance(exc, httpx.TimeoutException):
            return _FetchFailure("sts-policy-fetch-error", f"{shown}: timed out")
        connect = isinstance(exc, httpx.ConnectError) and not any(
            isinstance(item, ssl.SSLError) for item in _cause_chain(exc)
        )
        text = str(exc) or type(exc).__name__
        if connect:
            text = f"cannot connect to {address}: {text}"
        return _FetchFailure("sts-policy-fetch-error", f"{shown}: {text}", next_address=connect)

    async def _read_policy(self, response: httpx.Response, shown: str) -> _Fetched | _FetchFailure:
        status = response.status_code
        if 300 <= status < 400:
            target = response.headers.get("location", "?")
            return _FetchFailure(
                "sts-policy-fetch-error", f"{shown}: HTTP {status} redirect to {target} refused"
            )
        if status != 200:
            return _FetchFailure("sts-policy-fetch-error", f"{shown}: HTTP {status}")
        media = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "text/plain":
            return _FetchFailure(
                "sts-policy-fetch-error", f"{shown}: Content-Type {media or 'missing'!r}"
            )
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return _FetchFailure("sts-policy-fetch-error", f"{shown}: Content-Encoding {encoding}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_POLICY_BYTES:
            return _FetchFailure(
                "sts-policy-fetch-error", f"{shown}: policy of {declared} bytes exceeds 64 KiB"
            )
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > MAX_POLICY_BYTES:
                return _FetchFailure("sts-policy-fetch-error", f"{shown}: policy exceeds 64 KiB")
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            return _FetchFailure("sts-policy-invalid", f"{shown}: policy is not UTF-8")
        parsed = parse_policy(text)
        if isinstance(parsed, PolicyError):
            return _FetchFailure(parsed.reason, f"{shown}: {parsed.message}")
        return _Fetched(parsed, hashlib.sha256(bytes(body)).hexdigest())
