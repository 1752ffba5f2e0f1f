"""Pacing: campaign rate, waves, and per-domain / per-MX limits, shared inside a process.

Several chunk runs of one campaign execute at once in one process (one thread and one
event loop each), so every limit lives in a process-wide registry and is thread-safe:

* ``TokenBucket`` is a GCRA rate limiter. ``reserve()`` books the next free slot and
  says how long to wait for it, so callers never busy-wait and never exceed the rate,
  however many threads ask at once.
* ``WaveGate`` lets ``size`` messages through, then holds the rest until the next
  interval starts (wave k opens at ``start + k * interval``).
* ``SharedSlots`` is a counting semaphore usable from any event loop in the process:
  connections to one MX host or one recipient domain, across chunk runs.

A ``Pacer`` combines them for one campaign. Limits across several worker processes or
hosts come from Prefect global concurrency limits in the tasks layer (this module knows
nothing of Prefect).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from recapito.errors import InputError


@dataclass(frozen=True)
class Limit:
    """A provider's limit: concurrent connections and/or messages per minute."""

    connections: int | None = None
    per_minute: float | None = None

    @classmethod
    def parse(cls, text: str, what: str) -> Limit:
        """``"conn=5,rate=120/min"`` (either part optional; rate also ``/h`` or ``/s``)."""
        connections: int | None = None
        per_minute: float | None = None
        if not what.strip(".").strip():
            raise InputError(f"{what!r}: expected a domain or host name")
        seen: set[str] = set()
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, eq, value = part.partition("=")
            key = key.strip().lower()
            if not eq:
                raise InputError(f"{what}: {part!r} should be conn=N or rate=N/min")
            if key in seen:
                raise InputError(f"{what}: {key} given twice")
            seen.add(key)
            if key in ("conn", "connections"):
                try:
                    connections = int(value)
                except ValueError:
                    raise InputError(f"{what}: {value!r} is not a number of connections") from None
                if connections < 1:
                    raise InputError(f"{what}: connections must be at least 1")
            elif key == "rate":
                per_minute = parse_rate(value, what)
            else:
                raise InputError(f"{what}: unknown limit {key!r} (use conn or rate)")
        if connections is None and per_minute is None:
            raise InputError(f"{what}: give conn=N and/or rate=N/min")
        return cls(connections, per_minute)


_UNITS = {"s": 60.0, "sec": 60.0, "min": 1.0, "m": 1.0, "h": 1 / 60, "hour": 1 / 60}


def parse_rate(text: str, what: str) -> float:
    """``"120/min"``, ``"5/s"``, ``"10000/h"`` → messages per minute."""
    count, slash, unit = text.strip().partition("/")
    factor = _UNITS.get(unit.strip().lower() if slash else "min")
    if factor is None:
        raise InputError(f"{what}: unknown rate unit {unit!r} (use /s, /min or /h)")
    try:
        value = float(count)
    except ValueError:
        raise InputError(f"{what}: {count!r} is not a number") from None
    if math.isnan(value) or math.isinf(value):
        raise InputError(f"{what}: {count!r} is not a finite number")
    if not value > 0:
        raise InputError(f"{what}: the rate must be above zero")
    return value * factor


@dataclass(frozen=True)
class PacingOptions:
    """Every pacing rule of one delivery run; all empty means "as fast as allowed"."""

    per_minute: float | None = None  # campaign-wide messages per minute
    per_hour: float | None = None  # campaign-wide messages per hour
    wave_size: int | None = None  # messages per wave ...
    wave_interval: float | None = None  # ... one wave every so many seconds
    # keyed by recipient domain, or by MX host name; ".example.net" matches subdomains
    domain_limits: Mapping[str, Limit] = field(default_factory=dict)
    mx_limits: Mapping[str, Limit] = field(default_factory=dict)
    scope: str = ""  # campaign identity: runs with the same scope share campaign limits

    def __post_init__(self) -> None:
        if (self.wave_size is None) != (self.wave_interval is None):
            raise InputError("waves need both a size and an interval")
        if self.wave_size is not None and self.wave_size < 1:
            raise InputError("wave size must be at least 1")
        if self.wave_interval is not None and self.wave_interval <= 0:
            raise InputError("wave interval must be above zero")

    @property
    def active(self) -> bool:
        return bool(
            self.per_minute
            or self.per_hour
            or self.wave_size
            or any(v.per_minute for v in self.domain_limits.values())
            or any(v.per_minute for v in self.mx_limits.values())
        )

    def domain_limit(self, domain: str) -> tuple[str, Limit] | None:
        return _lookup(self.domain_limits, domain)

    def mx_limit(self, host: str) -> tuple[str, Limit] | None:
        return _lookup(self.mx_limits, host)


def _lookup(table: Mapping[str, Limit], name: str) -> tuple[str, Limit] | None:
    name = name.lower().rstrip(".")
    if name in table:
        return name, table[name]
    for key, limit in table.items():
        if key.startswith(".") and (name.endswith(key) or name == key[1:]):
            return key, limit
    return None


class TokenBucket:
    """Generic cell rate algorithm: ``per_second`` on average, ``burst`` back to back."""

    def __init__(self, per_second: float, burst: int = 1) -> None:
        if per_second <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / per_second
        self.tolerance = self.interval * (max(1, burst) - 1)
        self._tat = 0.0  # theoretical arrival time of the next message
        self._lock = threading.Lock()

    def reserve(self, now: float | None = None) -> float:
        """Book the next slot; seconds to wait before using it (0 when it is free now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tat = max(self._tat, now)
            delay = max(0.0, tat - self.tolerance - now)
            self._tat = tat + self.interval
        return delay


class WaveGate:
    """``size`` messages per wave, one wave per ``interval`` seconds from the first one."""

    def __init__(self, size: int, interval: float) -> None:
        self.size = size
        self.interval = interval
        self._start: float | None = None
        self._count = 0
        self._lock = threading.Lock()

    def reserve(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._start is None:
                self._start = now
            # a wave whose window passed unused is gone: never more than size per window
            current = int((now - self._start) // self.interval)
            self._count = max(self._count, current * self.size)
            wave = self._count // self.size
            self._count += 1
            opens = self._start + wave * self.interval
        return max(0.0, opens - now)

    def status(self, now: float | None = None) -> dict[str, float | int | None]:
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._start is None:
                return {"wave": 0, "in_wave": 0, "next_wave_in_s": None}
            current = max(0, int((now - self._start) // self.interval))
            next_opens = self._start + (current + 1) * self.interval
            booked = max(0, self._count - current * self.size)
            return {
                "wave": current + 1,
                "in_wave": min(self.size, booked),
                "next_wave_in_s": round(next_opens - now, 1),
            }


class SharedSlots:
    """A counting semaphore shared by every event loop (and thread) of the process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._used < self.limit and not self._waiters:
                self._used += 1
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            with self._lock:
                try:
                    self._waiters.remove((loop, waiter))
                    handed = False
                except ValueError:
                    handed = True  # the slot was handed to us as we were cancelled
            if handed:
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                if waiter.done() or loop.is_closed():
                    continue
                # the slot passes straight to the waiter: _used stays the same
                loop.call_soon_threadsafe(_hand_over, waiter)
                return
            self._used -= 1

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._used


def _hand_over(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass
class PacingStats:
    """How much pacing held a run back (for the progress artifact)."""

    paced_messages: int = 0
    waited_seconds: float = 0.0
    pauses: int = 0  # connections closed to sit out a long wait

    def merge(self, other: PacingStats) -> None:
        self.paced_messages += other.paced_messages
        self.waited_seconds += other.waited_seconds
        self.pauses += other.pauses


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[tuple[object, ...], TokenBucket] = {}
        self._waves: dict[tuple[object, ...], WaveGate] = {}
        self._slots: dict[tuple[object, ...], SharedSlots] = {}

    def bucket(self, key: tuple[object, ...], per_minute: float) -> TokenBucket:
        with self._lock:
            found = self._buckets.get((*key, per_minute))
            if found is None:
                found = self._buckets[(*key, per_minute)] = TokenBucket(per_minute / 60.0)
            return found

    def wave(self, key: tuple[object, ...], size: int, interval: float) -> WaveGate:
        with self._lock:
            full = (*key, size, interval)
            found = self._waves.get(full)
            if found is None:
                found = self._waves[full] = WaveGate(size, interval)
            return found

    def slots(self, key: tuple[object, ...], limit: int) -> SharedSlots:
        with self._lock:
            full = (*key, limit)
            found = self._slots.get(full)
            if found is None:
                found = self._slots[full] = SharedSlots(limit)
            return found

    def clear(self) -> None:
        with self._lock:
            self._buckets.clear()
            self._waves.clear()
            self._slots.clear()


REGISTRY = _Registry()


class Pacer:
    """The pacing rules of one campaign, backed by the process-wide registry."""

    def __init__(self, options: PacingOptions, registry: _Registry = REGISTRY) -> None:
        self.options = options
        self._registry = registry
        scope = ("campaign", options.scope)
        self._campaign: list[TokenBucket] = []
        if options.per_minute:
            self._campaign.append(registry.bucket(scope, options.per_minute))
        if options.per_hour:
            self._campaign.append(registry.bucket(scope, options.per_hour / 60.0))
        self._wave: WaveGate | None = None
        if options.wave_size and options.wave_interval:
            self._wave = registry.wave(scope, options.wave_size, options.wave_interval)

    def reserve(self, domain: str, mx_host: str, now: float | None = None) -> float:
        """Book a slot for one message under every rule; seconds until it may leave."""
        now = time.monotonic() if now is None else now
        delay = 0.0
        for bucket in self._campaign:
            delay = max(delay, bucket.reserve(now))
        if self._wave is not None:
            delay = max(delay, self._wave.reserve(now))
        # provider limits belong to the receiving side: shared by every campaign
        found = self.options.domain_limit(domain)
        if found is not None and found[1].per_minute:
            delay = max(
                delay, self._registry.bucket(("domain", found[0]), found[1].per_minute).reserve(now)
            )
        found = self.options.mx_limit(mx_host)
        if found is not None and found[1].per_minute:
            delay = max(
                delay, self._registry.bucket(("mx", found[0]), found[1].per_minute).reserve(now)
            )
        return delay

    def domain_slots(self, domain: str) -> SharedSlots | None:
        found = self.options.domain_limit(domain)
        if found is None or found[1].connections is None:
            return None
        return self._registry.slots(("domain", found[0]), found[1].connections)

    def mx_slots(self, host: str, default: int) -> SharedSlots:
        """Connections to one MX host, shared by every run of the process."""
        found = self.options.mx_limit(host)
        if found is not None and found[1].connections is not None:
            return self._registry.slots(("mx", found[0]), found[1].connections)
        return self._registry.slots(("mx-host", host.lower()), default)

    def status(self) -> dict[str, object]:
        """What pacing is doing now, for the progress artifact."""
        out: dict[str, object] = {}
        if self.options.per_minute:
            out["rate_per_minute"] = self.options.per_minute
        if self.options.per_hour:
            out["rate_per_hour"] = self.options.per_hour
        if self._wave is not None:
            out.update(
                wave_size=self._wave.size,
                wave_interval_s=self._wave.interval,
                **self._wave.status(),
            )
        for kind, table in (
            ("domain_limits", self.options.domain_limits),
            ("mx_limits", self.options.mx_limits),
        ):
            if table:
                out[kind] = {name: _describe(limit) for name, limit in sorted(table.items())}
        return out


def _describe(limit: Limit) -> str:
    parts = []
    if limit.connections is not None:
        parts.append(f"{limit.connections} connections")
    if limit.per_minute is not None:
        parts.append(f"{limit.per_minute:g} a minute")
    return ", ".join(parts)
