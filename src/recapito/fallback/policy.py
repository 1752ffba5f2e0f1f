"""Fallback policies as data (DESIGN §8).

A policy is a short text, one rule per ``;``-separated clause::

    email → on insecure_channel|hard_bounce|pec_error|not_pec → sms;
    wait 24h for delivered|opened → sms → wait 48h → paper

- the first clause starts with the primary channel (``email`` or ``pec``);
- ``on A|B`` fires at once when the primary delivery ends in one of the named triggers;
- ``wait 24h for A|B`` fires when none of the named confirmations came within the window;
- what follows is the chain of fallback channels; ``wait 48h`` between two channels means
  "if the previous one is not confirmed delivered within 48 h, go on"; without a wait the
  next channel runs only when the previous one failed for good.

``->`` may stand for ``→``. ``parse_policy`` raises ``PolicyError`` with the clause and the
token at fault. The same text may be given as TOML: ``[policy] text = "…"`` or a table
``[policies]`` of message class → text (``load_policies``).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta

PRIMARY_CHANNELS = frozenset({"email", "pec"})
FALLBACK_CHANNELS = frozenset({"sms", "push", "paper"})

# Triggers read from the primary delivery's state and reason (recapito.fallback.sweeper).
TRIGGERS = frozenset(
    {
        "insecure_channel",  # no MX met the campaign's TLS floor
        "hard_bounce",  # a bounce classified permanent
        "failed",  # a permanent SMTP failure at send time
        "pec_error",  # PEC errore-consegna / non-accettazione
        "not_pec",  # PEC recipient outside the PEC system (esterno)
        "delivery_timeout",  # PEC: no delivery receipt within 24 h
        "suppressed",
    }
)
CONFIRMATIONS = frozenset({"delivered", "opened", "clicked", "accepted"})

_DURATION = re.compile(r"^(\d+)\s*(m|min|h|d)$")
_UNITS = {"m": 60, "min": 60, "h": 3600, "d": 86400}


class PolicyError(ValueError):
    """A policy text that does not parse; the message names the clause and the token."""


@dataclass(frozen=True)
class Step:
    channel: str
    wait: timedelta | None = None  # confirmation window before the next step (None: on failure)


@dataclass(frozen=True)
class Rule:
    triggers: frozenset[str] = frozenset()  # ``on …``: fires at once on these outcomes
    window: timedelta | None = None  # ``wait … for …``: fires when unconfirmed after this
    confirm: frozenset[str] = frozenset()
    steps: tuple[Step, ...] = ()

    @property
    def kind(self) -> str:
        return "on" if self.triggers else "wait"


@dataclass(frozen=True)
class Policy:
    primary: str
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    text: str = ""

    def trigger_rule(self, trigger: str) -> int | None:
        for i, rule in enumerate(self.rules):
            if trigger in rule.triggers:
                return i
        return None

    def window_rule(self) -> int | None:
        for i, rule in enumerate(self.rules):
            if rule.window is not None:
                return i
        return None


def parse_duration(text: str) -> timedelta:
    m = _DURATION.match(text.strip())
    if not m:
        raise PolicyError(f"bad duration {text!r}: use e.g. 30m, 24h, 2d")
    value = int(m.group(1))
    if value <= 0:
        raise PolicyError(f"bad duration {text!r}: must be positive")
    return timedelta(seconds=value * _UNITS[m.group(2)])


def _names(text: str, allowed: frozenset[str], what: str, clause: str) -> frozenset[str]:
    names = [n.strip() for n in text.split("|")]
    if not names or any(not n for n in names):
        raise PolicyError(f"clause {clause!r}: empty {what} in {text!r}")
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise PolicyError(
            f"clause {clause!r}: unknown {what} {', '.join(unknown)} "
            f"(known: {', '.join(sorted(allowed))})"
        )
    return frozenset(names)


def parse_policy(text: str) -> Policy:
    """Parse a policy text (see the module docstring); raises ``PolicyError``."""
    source = text.strip()
    if not source:
        raise PolicyError("empty policy")
    primary: str | None = None
    rules: list[Rule] = []
    for n, raw in enumerate(source.split(";")):
        clause = " ".join(raw.split())
        if not clause:
            raise PolicyError(f"empty clause #{n + 1} (a stray ';'?)")
        tokens = [t.strip() for t in re.split(r"→|->", clause)]
        if any(not t for t in tokens):
            raise PolicyError(f"clause {clause!r}: an arrow with nothing on one side")
        if tokens[0] in PRIMARY_CHANNELS:
            if primary is not None and tokens[0] != primary:
                raise PolicyError(
                    f"clause {clause!r}: primary channel {tokens[0]!r} differs from {primary!r}"
                )
            primary = tokens[0]
            tokens = tokens[1:]
        elif n == 0:
            raise PolicyError(
                f"clause {clause!r}: must start with the primary channel "
                f"({' or '.join(sorted(PRIMARY_CHANNELS))}), not {tokens[0]!r}"
            )
        if not tokens:
            raise PolicyError(f"clause {clause!r}: no condition and no fallback channel")
        head = tokens[0]
        triggers: frozenset[str] = frozenset()
        window: timedelta | None = None
        confirm: frozenset[str] = frozenset()
        if head.startswith("on "):
            triggers = _names(head[3:], TRIGGERS, "trigger", clause)
        elif head.startswith("wait ") and " for " in head:
            dur, _, names = head[5:].partition(" for ")
            window = parse_duration(dur)
            confirm = _names(names, CONFIRMATIONS, "confirmation", clause)
        else:
            raise PolicyError(
                f"clause {clause!r}: expected 'on A|B' or 'wait 24h for A|B', got {head!r}"
            )
        steps: list[Step] = []
        for token in tokens[1:]:
            if token.startswith("wait"):
                if not steps:
                    raise PolicyError(f"clause {clause!r}: {token!r} before any channel")
                if steps[-1].wait is not None:
                    raise PolicyError(f"clause {clause!r}: two waits in a row")
                steps[-1] = Step(steps[-1].channel, parse_duration(token[4:]))
            elif token in FALLBACK_CHANNELS:
                steps.append(Step(token))
            else:
                raise PolicyError(
                    f"clause {clause!r}: unknown channel {token!r} "
                    f"(known: {', '.join(sorted(FALLBACK_CHANNELS))})"
                )
        if not steps:
            raise PolicyError(f"clause {clause!r}: no fallback channel after {head!r}")
        if steps[-1].wait is not None:
            raise PolicyError(f"clause {clause!r}: ends with a wait and no channel after it")
        rules.append(Rule(triggers, window, confirm, tuple(steps)))
    assert primary is not None
    seen: set[str] = set()
    for rule in rules:
        dup = seen & rule.triggers
        if dup:
            raise PolicyError(f"trigger {sorted(dup)[0]!r} appears in two clauses")
        seen |= rule.triggers
    if sum(1 for r in rules if r.window is not None) > 1:
        raise PolicyError("more than one 'wait … for …' clause")
    return Policy(primary, tuple(rules), " ".join(source.split()))


def load_policies(toml_text: str) -> dict[str, Policy]:
    """Policies from TOML: ``[policies]`` (message class → text) or ``[policy] text``."""
    try:
        data = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy TOML: {exc}") from None
    out: dict[str, Policy] = {}
    if isinstance(data.get("policy"), dict):
        text = data["policy"].get("text")
        if not isinstance(text, str):
            raise PolicyError("policy TOML: [policy] needs text = '…'")
        out["default"] = parse_policy(text)
    table = data.get("policies", {})
    if not isinstance(table, dict):
        raise PolicyError("policy TOML: [policies] must be a table of class = 'policy'")
    for name, text in table.items():
        if not isinstance(text, str):
            raise PolicyError(f"policy TOML: policies.{name} must be a string")
        try:
            out[name] = parse_policy(text)
        except PolicyError as exc:
            raise PolicyError(f"policies.{name}: {exc}") from None
    if not out:
        raise PolicyError("policy TOML: no [policy] or [policies] given")
    return out
