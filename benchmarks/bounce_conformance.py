"""Conformance of recapito's bounce classifier against Sisimai's labelled corpus.

    .venv/bin/python benchmarks/bounce_conformance.py [CORPUS_DIR] [--json] [--mismatches]

CORPUS_DIR defaults to ``../shared/corpora/sisimai`` relative to the repository root (see its
README for the label format). Every message of ``maildir/`` and ``not-bounces/`` goes through
``recapito.bounces.parse_bounce``; our records are compared with Sisimai's rows:

- reason: Sisimai's reason mapped to ours through ``SISIMAI_TO_RECAPITO`` below (each of
  Sisimai's 34 reasons has exactly one counterpart; several of Sisimai's finer reasons share
  one of ours, e.g. blocked / badreputation / requireptr are all ``reputation_block``);
- status: the enhanced status code, exactly; for rows whose label is a Sisimai-internal
  pseudo code (``X.0.9NN``) only the class digit can be compared, and an empty label status
  (complaints, auto-replies) agrees with no status;
- hard/soft: Sisimai's ``hardbounce`` flag against ours (``is_hard``: the address or its
  domain is dead — user_unknown, domain_invalid, mailbox_moved — and not temporary);
- bounce-or-not, per file: Sisimai reports a failure for the file (any row other than
  delivered / vacation / feedback) vs. our ``is_bounce``; the three ``not-bounces/`` files
  must not be bounces;
- recipient: we emit a record for the row with an address, and, for the 29 multi-recipient
  files whose addresses the corpus README lists, the same address.

Delay warnings: Sisimai reports a DSN with ``Action: delayed`` as a record (reason ``expired``,
or the reason of its diagnostic), so it counts as a failure; DESIGN §7 says a delay is a warning,
never a bounce, and we report it as ``delayed_warning``. Those rows and files stay disagreements
in the headline figures; a second pair of figures (``*_excluding_delays``) leaves out the rows
of files we read as delay warnings, so the reader sees how much of the gap is that deliberate
difference and how much is ours.

Mapping notes (each of Sisimai's reasons has one counterpart; no row-by-row exceptions):
``securityerror`` is Sisimai's name both for SMTP-AUTH demands and for its fallback on generic
X.7.X refusals; half of its rows are authentication, so it maps to ``auth_failure`` and the
generic "Delivery not authorized" rows disagree. ``rejected`` is about the envelope sender, so
``sender_rejected``; ``filtered`` / ``policyviolation`` are the recipient side's own rules,
``recipient_policy``; ``notcompliantrfc`` / ``contenterror`` / ``virusdetected`` concern the
message itself, ``content_rejected``; ``mailererror`` / ``systemerror`` / ``systemfull`` /
``networkerror`` / ``syntaxerror`` are faults at the remote that say nothing about the address,
``remote_temporary``; ``onhold`` / ``undefined`` mean Sisimai could not decide, ``unknown``.

Rows are matched by address where the README lists addresses, by position otherwise. The
unlabelled files (38) count only for the speed figure. A naive baseline (first status code in
the raw text, else the first reply code, mapped by the RFC 3463 subject/detail table) runs
on the same rows to put the figures in proportion.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from recapito.bounces import BounceReport, parse_bounce  # noqa: E402
from recapito.bounces.classify import STATUS_RULES, is_hard, status_subject_detail  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "sisimai"

# Sisimai v5.2.0 reason -> recapito reason (DESIGN §7). Documented mapping, one-to-one from
# Sisimai's side.
SISIMAI_TO_RECAPITO: dict[str, str] = {
    "userunknown": "user_unknown",
    "hostunknown": "domain_invalid",
    "notaccept": "domain_invalid",  # null MX / host that does not accept mail
    "hasmoved": "mailbox_moved",
    "suspend": "mailbox_disabled",
    "mailboxfull": "mailbox_full",
    "exceedlimit": "message_too_large",
    "mesgtoobig": "message_too_large",
    "filtered": "recipient_policy",
    "policyviolation": "recipient_policy",
    "contenterror": "content_rejected",
    "notcompliantrfc": "content_rejected",
    "virusdetected": "content_rejected",
    "spamdetected": "spam_rejected",
    "blocked": "reputation_block",
    "badreputation": "reputation_block",
    "requireptr": "reputation_block",
    "authfailure": "auth_failure",
    "securityerror": "auth_failure",  # SMTP authentication required / failed
    "rejected": "sender_rejected",
    "norelaying": "relay_denied",
    "failedstarttls": "insecure_channel",
    "speeding": "rate_limited",
    "toomanyconn": "rate_limited",
    "systemerror": "remote_temporary",
    "systemfull": "remote_temporary",
    "networkerror": "remote_temporary",
    "mailererror": "remote_temporary",
    "syntaxerror": "remote_temporary",  # an SMTP protocol fault, not about the address
    "expired": "expired",
    "feedback": "complaint",
    "vacation": "auto_reply",
    "delivered": "delivered",  # compared with our record's action, not a reason
    "onhold": "unknown",
    "undefined": "unknown",
}
NOT_FAILURES = {"delivered", "vacation", "feedback"}
_PSEUDO = re.compile(r"^[245]\.0\.9\d\d$")
_ENH = re.compile(rb"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY = re.compile(rb"\b([45][0-5]\d)[ -]")


def load_labels(corpus: Path) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with (corpus / "labels.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                rows[row["file"]].append(row)
    for group in rows.values():
        group.sort(key=lambda r: r["index"])
    return rows


def readme_recipients(corpus: Path) -> dict[str, list[str]]:
    """The README's table of multi-recipient files: file -> addresses in row order."""
    table: dict[str, list[str]] = {}
    readme = corpus / "README.md"
    if not readme.exists():
        return table
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].endswith(".eml") and cells[1].isdigit():
            addresses = re.findall(r"[\w.+-]+@[\w.-]+\w", cells[2].split("(")[0])
            if addresses:
                table[cells[0]] = [a.lower() for a in addresses]
    return table


def family_of(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    parts = stem.split("-")
    return "-".join(parts[:2]) if parts[0] in ("lhost", "rhost") else parts[0]


def baseline(raw: bytes) -> tuple[bool, str, str | None]:
    """Status-code-only classifier: (is_bounce, reason, status)."""
    match = _ENH.search(raw)
    status = b".".join(match.groups()).decode() if match else None
    detail = status_subject_detail(status)
    reason = STATUS_RULES.get(detail or "", "unknown")
    if status is None:
        reply = _REPLY.search(raw)
        if reply:
            status = None
            reason = "remote_temporary" if reply.group(1).startswith(b"4") else "unknown"
            return True, reason, None
        return False, "unknown", None
    return status[0] in "45", reason, status


def _status_agrees(label: str, ours: str | None, permanence: str | None = None) -> bool:
    if not label:
        return ours is None
    if _PSEUDO.match(label):
        klass = ours[:1] if ours else {"permanent": "5", "temporary": "4"}.get(permanence or "")
        return klass == label[:1]
    return ours == label


def run(corpus: Path, show_mismatches: bool = False) -> dict[str, Any]:
    labels = load_labels(corpus)
    expected_rcpts = readme_recipients(corpus)
    files = sorted((corpus / "maildir").glob("*.eml"))
    not_bounces = sorted((corpus / "not-bounces").glob("*.eml"))
    blobs = {p.name: p.read_bytes() for p in files}
    nb_blobs = {p.name: p.read_bytes() for p in not_bounces}
    everything = list(blobs.values()) + list(nb_blobs.values())

    best = best_cpu = float("inf")
    for _ in range(3):
        start, cpu = time.perf_counter(), time.process_time()
        for raw in everything:
            parse_bounce(raw)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    per_second = len(everything) / best
    cpu_us = 1e6 * best_cpu / len(everything)

    reports: dict[str, BounceReport] = {name: parse_bounce(raw) for name, raw in blobs.items()}
    nb_reports = {name: parse_bounce(raw) for name, raw in nb_blobs.items()}

    tally: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    rows_out: list[dict[str, Any]] = []
    mismatches: list[str] = []

    def count(family: str, metric: str, ok: bool) -> None:
        for key in (family, "overall"):
            cell = tally[key][metric]
            cell[0] += int(ok)
            cell[1] += 1

    for name, group in sorted(labels.items()):
        if name not in reports:
            continue
        report = reports[name]
        family = family_of(name)
        records = list(report.recipients)
        addresses = expected_rcpts.get(name)
        by_address: dict[str, list[Any]] = defaultdict(list)
        for record in records:
            by_address[record.recipient or ""].append(record)
        expected_bounce = any(r["reason"] not in NOT_FAILURES for r in group)
        count(family, "bounce", report.is_bounce == expected_bounce)
        delay = report.kind == "delayed_warning"
        if not delay:
            count(family, "bounce_nodelay", report.is_bounce == expected_bounce)
        base_bounce, base_reason, base_status = baseline(blobs[name])
        count(family, "baseline_bounce", base_bounce == expected_bounce)
        for i, row in enumerate(group):
            want_address = addresses[i] if addresses and i < len(addresses) else None
            record = None
            if want_address is not None and by_address.get(want_address):
                record = by_address[want_address].pop(0)
            elif i < len(records):
                record = records[i]
            want = SISIMAI_TO_RECAPITO.get(row["reason"], "unknown")
            if record is None:
                got_reason, got_status, hard, rcpt_ok = None, None, False, False
            else:
                got_reason = "delivered" if record.action == "delivered" else record.reason
                got_status = record.status
                hard = is_hard(record.reason, record.permanence)
                rcpt_ok = bool(record.recipient) and (
                    want_address is None or record.recipient == want_address
                )
            reason_ok = got_reason == want
            status_ok = _status_agrees(
                row["status"], got_status, record.permanence if record else None
            )
            hard_ok = hard == row["hardbounce"]
            count(family, "reason", reason_ok)
            if not delay:
                count(family, "reason_nodelay", reason_ok)
            count(family, "status", status_ok)
            count(family, "hard", hard_ok)
            count(family, "recipient", rcpt_ok)
            count(family, "baseline_reason", base_reason == want)
            count(family, "baseline_status", _status_agrees(row["status"], base_status))
            rows_out.append(
                {
                    "file": name,
                    "index": row["index"],
                    "family": family,
                    "expected_reason": want,
                    "sisimai_reason": row["reason"],
                    "reason": got_reason,
                    "expected_status": row["status"],
                    "status": got_status,
                    "hardbounce": row["hardbounce"],
                    "recipient": record.recipient if record else None,
                    "reason_ok": reason_ok,
                    "status_ok": status_ok,
                }
            )
            if show_mismatches and not (reason_ok and status_ok and rcpt_ok and hard_ok):
                diag = record.diagnostic[:160] if record else ""
                mismatches.append(
                    f"{name}#{row['index']}: want {want}/{row['status']}/"
                    f"{'hard' if row['hardbounce'] else 'soft'} got {got_reason}/{got_status}/"
                    f"{'hard' if hard else 'soft'} rcpt={record.recipient if record else None}"
                    f" [{report.kind}] {diag}"
                )
    for name, report in nb_reports.items():
        count("not-bounces", "bounce", not report.is_bounce)
        count("not-bounces", "bounce_nodelay", not report.is_bounce)
        base_bounce, _, _ = baseline(nb_blobs[name])
        count("not-bounces", "baseline_bounce", not base_bounce)
        if show_mismatches and report.is_bounce:
            mismatches.append(f"not-bounces/{name}: decoded as a bounce ({report.kind})")

    def frac(key: str, metric: str) -> float:
        ok, total = tally[key][metric]
        return ok / total if total else 1.0

    return {
        "corpus": str(corpus),
        "messages": len(everything),
        "labelled_rows": sum(len(g) for g in labels.values()),
        "reason_agreement": frac("overall", "reason"),
        "status_agreement": frac("overall", "status"),
        "hardbounce_agreement": frac("overall", "hard"),
        "bounce_agreement": frac("overall", "bounce"),
        "recipient_agreement": frac("overall", "recipient"),
        "messages_per_s": per_second,
        "cpu_us_per_message": cpu_us,
        "messages_per_cpu_s": 1e6 / cpu_us if cpu_us else 0.0,
        "reason_agreement_excluding_delays": frac("overall", "reason_nodelay"),
        "bounce_agreement_excluding_delays": frac("overall", "bounce_nodelay"),
        "delay_warning_rows": tally["overall"]["reason"][1] - tally["overall"]["reason_nodelay"][1],
        "baseline": {
            "reason_agreement": frac("overall", "baseline_reason"),
            "status_agreement": frac("overall", "baseline_status"),
            "bounce_agreement": frac("overall", "baseline_bounce"),
        },
        "families": {
            key: {metric: {"ok": ok, "total": total} for metric, (ok, total) in cells.items()}
            for key, cells in sorted(tally.items())
            if key != "overall"
        },
        "rows": rows_out,
        "mismatches": mismatches,
    }


def _pct(cell: dict[str, int] | None) -> str:
    if not cell or not cell["total"]:
        return "    -"
    return f"{100 * cell['ok'] / cell['total']:5.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", nargs="?", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.add_argument("--mismatches", action="store_true", help="list disagreeing rows")
    args = parser.parse_args()
    corpus: Path = args.corpus
    if not (corpus / "labels.jsonl").exists():
        print(f"{corpus}: no labels.jsonl (not a labelled bounce corpus)", file=sys.stderr)
        return 2
    result = run(corpus, args.mismatches)
    if args.json:
        out = {k: v for k, v in result.items() if k != "mismatches"}
        print(json.dumps(out))
        return 0
    if args.mismatches:
        for line in result["mismatches"]:
            print(line)
        print()
    print(
        f"corpus {result['corpus']}: {result['messages']} messages, "
        f"{result['labelled_rows']} labelled rows"
    )
    print(
        f"{'family':28} {'rows':>5} {'reason':>6} {'status':>6} {'hard':>6} {'rcpt':>6} "
        f"{'bounce':>6}"
    )
    for family, cells in result["families"].items():
        rows = cells.get("reason", {"total": 0})["total"]
        print(
            f"{family:28} {rows:5d} {_pct(cells.get('reason'))}% {_pct(cells.get('status'))}% "
            f"{_pct(cells.get('hard'))}% {_pct(cells.get('recipient'))}% "
            f"{_pct(cells.get('bounce'))}%"
        )
    b = result["baseline"]
    print()
    print(f"reason agreement      {100 * result['reason_agreement']:5.1f} %  (target >= 95)")
    print(f"status agreement      {100 * result['status_agreement']:5.1f} %")
    print(f"hard/soft agreement   {100 * result['hardbounce_agreement']:5.1f} %")
    print(f"bounce-or-not         {100 * result['bounce_agreement']:5.1f} %  (target >= 98)")
    print(f"recipient agreement   {100 * result['recipient_agreement']:5.1f} %  (target >= 97)")
    print(
        f"speed                 {result['messages_per_s']:7.0f} messages/s  (target >= 1000); "
        f"CPU {result['cpu_us_per_message']:.0f} us/message "
        f"({result['messages_per_cpu_s']:.0f} messages per CPU second)"
    )
    print(
        f"without the {result['delay_warning_rows']} rows of delay warnings (DESIGN §7: not "
        f"bounces): reason {100 * result['reason_agreement_excluding_delays']:.1f} %, "
        f"bounce-or-not {100 * result['bounce_agreement_excluding_delays']:.1f} %"
    )
    ranked = sorted(
        (100 * c["reason"]["ok"] / c["reason"]["total"], c["reason"]["total"], f)
        for f, c in result["families"].items()
        if c.get("reason", {}).get("total")
    )
    print(
        "lowest 10 families by reason: "
        + ", ".join(f"{f} {pct:.0f} % ({n})" for pct, n, f in ranked[:10])
    )
    ratio = result["reason_agreement"] / b["reason_agreement"] if b["reason_agreement"] else 0
    print(
        f"vs. status-code-only baseline: reason {100 * b['reason_agreement']:.1f} % "
        f"(ours x{ratio:.2f}), status {100 * b['status_agreement']:.1f} %, "
        f"bounce-or-not {100 * b['bounce_agreement']:.1f} %"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
