"""The report's PEC section: the funnel of a campaign's PEC deliveries, time to delivery,
receipts per mailbox and per provider (``gestore-emittente``)."""

from __future__ import annotations

import statistics
from typing import Any

import sqlalchemy as sa

from recapito.ledger import Ledger, State
from recapito.ledger.schema import deliveries, pec_receipts

SUBMITTED = (
    State.ACCEPTED,
    State.BOUNCED,
    State.PEC_ACCEPTED,
    State.PEC_REJECTED,
    State.NOT_PEC,
    State.DELIVERY_WARNING,
    State.DELIVERY_TIMEOUT,
    State.DELIVERED,
    State.DELIVERY_ERROR,
)
ACCEPTED = (
    State.PEC_ACCEPTED,
    State.NOT_PEC,
    State.DELIVERY_WARNING,
    State.DELIVERY_TIMEOUT,
    State.DELIVERED,
    State.DELIVERY_ERROR,
)
PENDING = (State.ACCEPTED, State.PEC_ACCEPTED, State.DELIVERY_WARNING)


def pec_analysis(ledger: Ledger, campaign_id: int) -> dict[str, Any] | None:
    """None when the campaign has no PEC deliveries."""
    with ledger.engine.connect() as conn:
        states = {
            str(s): int(n)
            for s, n in conn.execute(
                sa.select(deliveries.c.state, sa.func.count())
                .where(deliveries.c.campaign_id == campaign_id, deliveries.c.channel == "pec")
                .group_by(deliveries.c.state)
            )
        }
        if not states:
            return None
        delays = [
            float(d)
            for (d,) in conn.execute(
                sa.select(pec_receipts.c.delay_s).where(
                    pec_receipts.c.campaign_id == campaign_id,
                    pec_receipts.c.new_state == State.DELIVERED.value,
                    pec_receipts.c.delay_s.is_not(None),
                )
            )
        ]
        by_mailbox = conn.execute(
            sa.select(pec_receipts.c.mailbox, pec_receipts.c.kind, sa.func.count())
            .where(pec_receipts.c.campaign_id == campaign_id)
            .group_by(pec_receipts.c.mailbox, pec_receipts.c.kind)
        ).all()
        by_provider = conn.execute(
            sa.select(pec_receipts.c.provider, pec_receipts.c.kind, sa.func.count())
            .where(pec_receipts.c.campaign_id == campaign_id)
            .group_by(pec_receipts.c.provider, pec_receipts.c.kind)
        ).all()
        signatures = {
            str(s): int(n)
            for s, n in conn.execute(
                sa.select(pec_receipts.c.signature, sa.func.count())
                .where(pec_receipts.c.campaign_id == campaign_id)
                .group_by(pec_receipts.c.signature)
            )
        }

    def count(group: tuple[State, ...]) -> int:
        return sum(states.get(s.value, 0) for s in group)

    funnel = {
        "pec_recipients": sum(states.values()),
        "submitted": count(SUBMITTED),
        "accepted": count(ACCEPTED),
        "delivered": states.get(State.DELIVERED.value, 0),
        "delivery_error": states.get(State.DELIVERY_ERROR.value, 0),
        "not_accepted": states.get(State.PEC_REJECTED.value, 0),
        "delivery_timeout": states.get(State.DELIVERY_TIMEOUT.value, 0),
        "not_pec": states.get(State.NOT_PEC.value, 0),
        "pending": count(PENDING),
        "warned": states.get(State.DELIVERY_WARNING.value, 0),
    }
    timing = None
    if delays:
        ordered = sorted(delays)
        timing = {
            "deliveries": len(ordered),
            "median_s": round(statistics.median(ordered), 1),
            "p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
            "max_s": round(ordered[-1], 1),
        }
    return {
        "funnel": funnel,
        "states": states,
        "time_to_delivery": timing,
        "by_mailbox": _table(by_mailbox),
        "by_provider": _table(by_provider),
        "signatures": signatures,
    }


def _table(rows: Any) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, kind, n in rows:
        entry = out.setdefault(str(key or "unknown"), {})
        entry[str(kind)] = int(n)
    return dict(sorted(out.items()))


def _human(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def pec_line(pec: dict[str, Any] | None) -> str | None:
    """One line for terminals (the demo, ``recapito campaign report``): the PEC funnel,
    time to delivery and the receipts' signatures (None without PEC deliveries)."""
    if not pec:
        return None
    f = pec["funnel"]
    line = (
        f"PEC: {f['pec_recipients']:,} recipients, {f['submitted']:,} submitted -> "
        f"{f['accepted']:,} accepted -> {f['delivered']:,} delivered, "
        f"{f['delivery_error'] + f['not_accepted'] + f['delivery_timeout']:,} errors, "
        f"{f['not_pec']:,} not_pec, {f['pending']:,} pending"
    )
    t = pec["time_to_delivery"]
    if t:
        line += (
            f"; time to delivery median {_human(t['median_s'])}, p90 {_human(t['p90_s'])}, "
            f"max {_human(t['max_s'])}"
        )
    if pec["signatures"]:
        sig = ", ".join(f"{k} {v:,}" for k, v in sorted(pec["signatures"].items()))
        line += f"; receipt signatures {sig}"
    return line


KINDS = ("acceptance", "delivery", "delivery_error", "delivery_warning", "delivery_timeout")


def pec_markdown(pec: dict[str, Any] | None) -> list[str]:
    """The PEC section of the campaign markdown (nothing without PEC deliveries)."""
    if not pec:
        return []
    f = pec["funnel"]
    base = f["pec_recipients"]

    def pct(n: int) -> str:
        return f"{100 * n / base:.1f}%" if base else "–"

    lines = [
        "",
        "## PEC",
        "",
        "| stage | recipients | share |",
        "|---|---:|---:|",
        f"| PEC recipients | {base:,} | 100% |",
        f"| submitted | {f['submitted']:,} | {pct(f['submitted'])} |",
        f"| accepted (receipt) | {f['accepted']:,} | {pct(f['accepted'])} |",
        f"| delivered | {f['delivered']:,} | {pct(f['delivered'])} |",
        f"| delivery errors | {f['delivery_error']:,} | {pct(f['delivery_error'])} |",
        f"| not accepted | {f['not_accepted']:,} | {pct(f['not_accepted'])} |",
        f"| delivery timeout (24 h) | {f['delivery_timeout']:,} | {pct(f['delivery_timeout'])} |",
        f"| not PEC (esterno) | {f['not_pec']:,} | {pct(f['not_pec'])} |",
        f"| pending | {f['pending']:,} | {pct(f['pending'])} |",
    ]
    t = pec["time_to_delivery"]
    if t:
        lines += [
            "",
            f"Time to delivery over {t['deliveries']:,} receipts: median {_human(t['median_s'])}, "
            f"p90 {_human(t['p90_s'])}, max {_human(t['max_s'])}.",
        ]
    for title, table in (("mailbox", pec["by_mailbox"]), ("provider", pec["by_provider"])):
        if not table:
            continue
        lines += ["", f"| {title} | " + " | ".join(KINDS) + " | other |", "|---|" + "---:|" * 6]
        for name, kinds in table.items():
            other = sum(n for k, n in kinds.items() if k not in KINDS)
            cells = " | ".join(f"{kinds.get(k, 0):,}" for k in KINDS)
            lines.append(f"| {name} | {cells} | {other:,} |")
    if pec["signatures"]:
        sig = ", ".join(f"{k} {v:,}" for k, v in sorted(pec["signatures"].items()))
        lines += ["", f"Receipt signatures: {sig}."]
    return lines
