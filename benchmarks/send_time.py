"""Best-time backtest (issue 9 item 3): does sending at each contact's best time get more
people to open within N hours than random or fixed-hour sending?

A synthetic world (``recapito.sendtime.synthetic``): contacts with hidden preferred local
hours (their segment's tendency plus personal noise), responsiveness, time zones, 35 % behind
Apple Mail Privacy Protection (a machine open minutes after every delivery, whatever the hour:
no signal; their own opens are invisible, only their clicks show) and 10 % behind link
scanners. Several past weekly campaigns are sent at varied times (some blasts, some spread over
the week) and tracked. Then a held-out campaign is planned three ways inside the same window
(Mon–Fri 08:00–21:00 local by default):

- **best**: ``recapito.sendtime.best_times`` on the tracked history (exploration on, as in
  production: 10 % of contacts get a random allowed hour);
- **random**: a uniformly drawn allowed hour per contact;
- **fixed**: everybody at one local hour (Tuesday 10:00 by default).

Every contact is simulated under all three plans (paired: same contacts, same seed for the
outcome draws), and we compare the share who open within N = 2 hours of their send. The 95 %
interval of the relative uplift comes from a bootstrap over contacts. The oracle line (each
contact's true best allowed hour) shows the ceiling.

    .venv/bin/python benchmarks/send_time.py [--contacts 40000] [--campaigns 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import time as dtime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from recapito.sendtime import SendWindow, next_slots, plan_best_times
from recapito.sendtime.synthetic import open_probability, simulate

FloatArray = npt.NDArray[np.float64]
HOURS = 2.0  # the synthetic world's horizon: P(a person opens within 2 h of the send)


def _probabilities(world_contacts: pl.DataFrame, send_at: pl.Series) -> FloatArray:
    rows = np.arange(world_contacts.height)
    at = send_at.dt.replace_time_zone(None).to_numpy().astype("datetime64[us]")
    return open_probability(world_contacts, rows, at)


def bootstrap_uplift(
    a: FloatArray, b: FloatArray, rng: np.random.Generator, rounds: int = 1000
) -> tuple[float, float]:
    """95 % percentile interval of mean(a)/mean(b) - 1 over contacts resampled together."""
    n = a.size
    ups = np.empty(rounds)
    for r in range(rounds):
        idx = rng.integers(0, n, n)
        ups[r] = a[idx].mean() / b[idx].mean() - 1.0
    low, high = np.percentile(ups, [2.5, 97.5])
    return float(low), float(high)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=40_000)
    parser.add_argument("--campaigns", type=int, default=8, help="past campaigns of history")
    parser.add_argument("--explore", type=float, default=0.1)
    parser.add_argument("--fixed", default="1:10", help="fixed plan: weekday:hour (Tue 10)")
    parser.add_argument("--window", default="08:00-21:00", help="local window, Mon-Fri")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    world = simulate(args.contacts, args.campaigns, seed=args.seed)
    simulated = time.perf_counter() - started
    start_s, end_s = args.window.split("-")
    window = SendWindow(start=dtime.fromisoformat(start_s), end=dtime.fromisoformat(end_s))
    audience = world.audience
    zones = window.contact_zones(audience)

    t0 = time.perf_counter()
    plan = plan_best_times(
        audience, world.history, window, campaign="held-out", now=world.now, explore=args.explore
    )
    planning = time.perf_counter() - t0

    rng = np.random.default_rng(args.seed + 1)
    allowed = np.flatnonzero(window.allowed_hours())
    random_how = rng.choice(allowed, size=audience.height)
    day, hour = (int(x) for x in args.fixed.split(":"))
    fixed_how = np.full(audience.height, day * 24 + hour, dtype=np.int64)
    if not window.allowed_hours()[fixed_how[0]]:
        parser.error(f"fixed hour {args.fixed} is outside the window")

    p_best = _probabilities(world.contacts, plan.get_column("send_at"))
    p_random = _probabilities(world.contacts, next_slots(random_how, zones, window, world.now))
    p_fixed = _probabilities(world.contacts, next_slots(fixed_how, zones, window, world.now))
    # oracle: each contact's true best allowed hour (the ceiling no model can pass)
    oracle = np.zeros(audience.height)
    for how in allowed:
        at = next_slots(np.full(audience.height, how), zones, window, world.now)
        oracle = np.maximum(oracle, _probabilities(world.contacts, at))

    # realised opens: one uniform per contact shared by the three plans (paired comparison)
    u = rng.random(audience.height)
    o_best, o_random, o_fixed = ((u < p).astype(np.float64) for p in (p_best, p_random, p_fixed))
    rate = {name: float(o.mean()) for name, o in (("best", o_best), ("random", o_random))}
    rate["fixed"] = float(o_fixed.mean())
    rate["oracle_expected"] = float(oracle.mean())
    up_random = rate["best"] / rate["random"] - 1.0
    up_fixed = rate["best"] / rate["fixed"] - 1.0
    ci_random = bootstrap_uplift(o_best, o_random, rng, args.bootstrap)
    ci_fixed = bootstrap_uplift(o_best, o_fixed, rng, args.bootstrap)
    reasons = dict(plan.get_column("reason").value_counts().iter_rows())
    result = {
        "contacts": audience.height,
        "past_campaigns": args.campaigns,
        "history_sends": world.history.sends.height,
        "window": f"Mon-Fri {args.window} local",
        "open_within_hours": HOURS,
        "open_rate": rate,
        "expected_open_rate": {
            "best": float(p_best.mean()),
            "random": float(p_random.mean()),
            "fixed": float(p_fixed.mean()),
        },
        "uplift_vs_random": up_random,
        "uplift_vs_fixed": up_fixed,
        "ci_low_vs_random": ci_random[0],
        "ci_high_vs_random": ci_random[1],
        "ci_low_vs_fixed": ci_fixed[0],
        "ci_high_vs_fixed": ci_fixed[1],
        "share_of_oracle_gain": (rate["best"] - rate["random"])
        / max(rate["oracle_expected"] - rate["random"], 1e-9),
        "reasons": reasons,
        "seconds": {
            "simulate": round(simulated, 2),
            "plan": round(planning, 2),
            "total": round(time.perf_counter() - started, 2),
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{audience.height:,} contacts, {args.campaigns} past campaigns "
        f"({world.history.sends.height:,} sends), window Mon-Fri {args.window} local, "
        f"open within {HOURS:g} h"
    )
    print(
        f"open rate  best {rate['best']:.2%}  random {rate['random']:.2%}  "
        f"fixed {rate['fixed']:.2%}  (oracle {rate['oracle_expected']:.2%} expected)"
    )
    print(
        f"uplift vs random {up_random:+.1%} (95% CI {ci_random[0]:+.1%} .. {ci_random[1]:+.1%}); "
        f"vs fixed {up_fixed:+.1%} (95% CI {ci_fixed[0]:+.1%} .. {ci_fixed[1]:+.1%})"
    )
    print(
        f"ratio best/random {rate['best'] / rate['random']:.2f}x, "
        f"best/fixed {rate['best'] / rate['fixed']:.2f}x; "
        f"{result['share_of_oracle_gain']:.0%} of the oracle's gain over random"
    )
    total = result["seconds"]["total"]
    print(f"plan reasons {reasons}; planned in {planning:.2f} s, total {total} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
