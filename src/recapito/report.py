"""Campaign figures from the ledger, as data (CLI ``--json``) and as markdown (artifacts)."""

from __future__ import annotations

from typing import Any

from recapito.collect.analysis import bounce_analysis
from recapito.errors import InputError
from recapito.ledger import Ledger
from recapito.pec.report import pec_analysis, pec_markdown
from recapito.pec.rules import rules_markdown
from recapito.tracking.store import engagement

FUNNEL_STATES = ("accepted", "deferred", "failed", "insecure_channel", "uncertain")


def campaign_report(ledger: Ledger, name: str) -> dict[str, Any]:
    campaign = ledger.get_campaign(name)
    if campaign is None:
        campaigns = ledger.list_campaigns()
        known = ", ".join(c.name for c in campaigns[-10:]) or "none yet"
        if len(campaigns) > 10:
            known = f"latest 10 of {len(campaigns)}: {known}"
        raise InputError(f"no campaign named {name!r} in the ledger (known: {known})")
    states = ledger.state_counts(campaign.id)
    counts = campaign.counts
    targeted = sum(states.values())
    pending = states.get("planned", 0)
    # held by a worker: being sent now, or by a worker that died (released or made
    # uncertain once its lease expires; see expire_stale_claims)
    in_flight = states.get("claimed", 0) + states.get("sending", 0)
    funnel = {
        "contacts": int(counts.get("contacts", targeted)),
        "rejected": int(counts.get("rejected", 0)),
        "filtered_out": int(counts.get("filtered_out", 0)),
        "targeted": targeted,
        **{s: states.get(s, 0) for s in FUNNEL_STATES},
        "pending": pending,
        "in_flight": in_flight,
    }
    return {
        "campaign": campaign.name,
        "status": campaign.status,
        "sender": campaign.sender,
        "created_at": campaign.created_at.isoformat(),
        "funnel": funnel,
        "states": states,
        "rejections": ledger.rejection_counts(campaign.id),
        "reasons": ledger.reply_reasons(campaign.id),
        "tls_versions": ledger.tls_mix(campaign.id),
        "tls_policy": campaign.params.get("tls_policy", "opportunistic"),
        "levels": ledger.level_mix(campaign.id),
        "insecure_channel": ledger.insecure_by_domain(campaign.id),
        "domains": ledger.domain_table(campaign.id),
        "bounces": bounce_analysis(ledger, campaign.id),
        "engagement": engagement(ledger, campaign.id),
        "rules": ledger.rule_table(campaign.id),
        "pec": pec_analysis(ledger, campaign.id),
    }


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def funnel_markdown(report: dict[str, Any]) -> str:
    f = report["funnel"]
    lines = [
        f"# Campaign `{report['campaign']}`",
        "",
        f"Status **{report['status']}** · sender `{report['sender']}`",
        "",
        "## Funnel",
        "",
        "| stage | recipients | share of targeted |",
        "|---|---:|---:|",
        f"| contacts read | {f['contacts']:,} | |",
        f"| rejected at targeting | {f['rejected']:,} | |",
        f"| excluded by filter | {f['filtered_out']:,} | |",
        f"| targeted | {f['targeted']:,} | 100% |",
    ]
    for state in (*FUNNEL_STATES, "pending", "in_flight"):
        lines.append(f"| {state} | {f[state]:,} | {_pct(f[state], f['targeted'])} |")
    tls = report["tls_versions"]
    accepted = sum(tls.values())
    lines += [
        "",
        "## TLS on accepted messages",
        "",
        "| version | messages | share |",
        "|---|---:|---:|",
    ]
    for version, n in sorted(tls.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {version} | {n:,} | {_pct(n, accepted)} |")
    levels = report["levels"]
    lines += [
        "",
        f"## Security levels (policy `{report['tls_policy']}`)",
        "",
        "| level | deliveries |",
        "|---|---:|",
    ]
    for level in sorted(levels):
        lines.append(f"| {level} | {levels[level]:,} |")
    if report["insecure_channel"]:
        lines += [
            "",
            "## insecure_channel by domain",
            "",
            "| domain | reason | best level offered | recipients |",
            "|---|---|---|---:|",
        ]
        for row in report["insecure_channel"]:
            lines.append(
                f"| {row['domain']} | {row['reason']} | {row['best_level']} | "
                f"{row['recipients']:,} |"
            )
    lines += engagement_markdown(report, f["accepted"])
    if report["rejections"]:
        lines += ["", "## Rejected at targeting", "", "| reason | rows |", "|---|---:|"]
        for reason, n in sorted(report["rejections"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {reason} | {n:,} |")
    if report["reasons"]:
        lines += ["", "## Not accepted, by reason", "", "| reason | deliveries |", "|---|---:|"]
        for reason, n in sorted(report["reasons"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {reason} | {n:,} |")
    lines += bounces_markdown(report.get("bounces"))
    lines += rules_markdown(report.get("rules"))
    lines += pec_markdown(report.get("pec"))
    return "\n".join(lines) + "\n"


def bounces_markdown(bounces: dict[str, Any] | None) -> list[str]:
    """Bounced deliveries by reason x permanence, plus complaints, auto-replies, warnings."""
    if not bounces or not (bounces["bounced"] or bounces["events"]):
        return []
    lines = [
        "",
        "## Bounces",
        "",
        f"{bounces['bounced']:,} bounced after acceptance · "
        f"{bounces['suppressed']:,} addresses suppressed by the collector",
        "",
        "| reason | permanent | temporary | unknown | total |",
        "|---|---:|---:|---:|---:|",
    ]
    for reason, row in bounces["reasons"].items():
        lines.append(
            f"| {reason} | {row.get('permanent', 0):,} | {row.get('temporary', 0):,} | "
            f"{row.get('unknown', 0):,} | {row['total']:,} |"
        )
    others = {k: v for k, v in bounces["events"].items() if k != "bounced"}
    if others:
        lines += ["", "| collector event | messages |", "|---|---:|"]
        lines += [f"| {kind} | {n:,} |" for kind, n in sorted(others.items())]
    return lines


def engagement_markdown(report: dict[str, Any], accepted: int) -> list[str]:
    """Opens and clicks by people, with machine opens and scanner clicks beside."""
    e = report.get("engagement")
    if not e:
        return []
    opens, clicks = e["opens"], e["clicks"]
    lines = [
        "",
        "## Engagement (unique recipients)",
        "",
        "| | people | share of accepted | machines beside |",
        "|---|---:|---:|---:|",
        f"| opened | {opens['human']:,} | {_pct(opens['human'], accepted)} | "
        f"{opens['machine']:,} machine opens |",
        f"| clicked | {clicks['human']:,} | {_pct(clicks['human'], accepted)} | "
        f"{clicks['scanner']:,} scanner clicks |",
        f"| unsubscribed | {e['unsubscribed']:,} | {_pct(e['unsubscribed'], accepted)} | |",
    ]
    reasons = [
        f"{kind} {reason} {n:,}"
        for kind, by_reason in sorted(e["machine_reasons"].items())
        for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1])
    ]
    if reasons:
        lines += ["", "Set aside as machines: " + ", ".join(reasons) + "."]
    return lines


def domain_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per recipient domain with a column per state (for a table artifact)."""
    columns = [
        "domain",
        "total",
        "accepted",
        "deferred",
        "failed",
        "insecure_channel",
        "uncertain",
        "pending",
        "in_flight",
    ]
    rows = []
    for entry in report["domains"]:
        row = {c: entry.get(c, 0) for c in columns}
        row["pending"] = entry.get("planned", 0)
        row["in_flight"] = entry.get("claimed", 0) + entry.get("sending", 0)
        rows.append(row)
    return rows


def text_summary(report: dict[str, Any]) -> str:
    f = report["funnel"]
    tls = ", ".join(f"{k} {v:,}" for k, v in sorted(report["tls_versions"].items())) or "none"
    return (
        f"campaign {report['campaign']}: {f['contacts']:,} contacts, {f['rejected']:,} rejected, "
        f"{f['filtered_out']:,} filtered out, {f['targeted']:,} targeted -> "
        f"{f['accepted']:,} accepted, {f['deferred']:,} deferred, {f['failed']:,} failed, "
        f"{f['insecure_channel']:,} insecure_channel, "
        f"{f['uncertain']:,} uncertain, {f['pending']:,} pending"
        + (f", {f['in_flight']:,} held by a worker" if f["in_flight"] else "")
        + f"; TLS: {tls}"
        + _engagement_summary(report)
    )


def _engagement_summary(report: dict[str, Any]) -> str:
    e = report.get("engagement")
    if not e or (not any(e["hits"].get(k) for k in ("open", "click")) and not e["unsubscribed"]):
        return ""
    return (
        f"; opened by {e['opens']['human']:,} people (+{e['opens']['machine']:,} machine opens), "
        f"clicked by {e['clicks']['human']:,} (+{e['clicks']['scanner']:,} scanner clicks), "
        f"{e['unsubscribed']:,} unsubscribed"
    )


def pacing_markdown(status: dict[str, Any], totals: dict[str, float], done: int, total: int) -> str:
    """The pacing state of a running campaign (progress artifact companion)."""
    lines = [f"### Pacing — {done} of {total} chunks done", ""]
    rules = []
    if "rate_per_minute" in status:
        rules.append(f"{status['rate_per_minute']:g} messages a minute")
    if "rate_per_hour" in status:
        rules.append(f"{status['rate_per_hour']:g} messages an hour")
    if "wave_size" in status:
        minutes = float(status["wave_interval_s"]) / 60
        rules.append(f"waves of {status['wave_size']} every {minutes:g} min")
    lines.append("| | |")
    lines.append("|---|---|")
    lines.append(f"| campaign rules | {'; '.join(rules) or 'none'} |")
    for kind, label in (("domain_limits", "domain limit"), ("mx_limits", "MX limit")):
        for name, text in (status.get(kind) or {}).items():
            lines.append(f"| {label} {name} | {text} |")
    if "wave" in status:
        nxt = status.get("next_wave_in_s")
        when = "—" if nxt is None else f"in {float(nxt):.0f} s"
        lines.append(f"| current wave | {status['wave']} ({status['in_wave']} booked) |")
        lines.append(f"| next wave | {when} |")
    lines.append(f"| messages held back | {int(totals.get('paced_messages', 0))} |")
    lines.append(f"| time spent waiting | {totals.get('paced_seconds', 0.0):.1f} s |")
    lines.append(f"| connections closed to wait | {int(totals.get('paced_pauses', 0))} |")
    return "\n".join(lines) + "\n"
