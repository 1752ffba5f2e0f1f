"""Best time per contact (DESIGN §9): an hour-of-week engagement model.

For every past send we know the contact's local hour of the week it went out at and whether
a person (never a machine or a scanner) opened or clicked within ``response_window``. The
model estimates, for each contact ``c`` and hour ``h``, the chance that a message sent at
``h`` is engaged with soon after — a rate over **sends at that hour**, so it is
exposure-corrected by construction: a contact only ever sent at 09:00 has evidence at 09:00
and nowhere else, and cannot show a 19:00 preference it was never given a chance to show.

Estimation, from the top down (all beta-binomial style posterior means):

1. counts of sends ``n`` and engaged sends ``k`` per hour are smoothed over the week: the hours
   one and two away count ``neighbour_weights`` each, the same hour on other days
   ``same_hour_weight`` (a 19:00 reader on Tuesday is likely one on Wednesday too);
2. global rate per hour ``g_h = (k_h + G·p) / (n_h + G)`` toward the overall rate ``p``;
3. segment rate ``s_h = (k_sh + S·g_h) / (n_sh + S)`` toward the global profile;
4. each contact's overall responsiveness ``λ_c = (K_c + A) / (E_c + A)``: engaged sends over
   those expected from its segment at the hours it was actually sent (exposure-corrected
   again); ``A`` is estimated from the data by the method of moments (empirical Bayes);
5. contact rate ``r_ch = (k_ch + C·λ_c·s_h) / (n_ch + C)``.

The chosen hour is the argmax of ``r_c`` over the window's allowed hours. Contacts with fewer
than ``min_contact_sends`` sends get the argmax of their segment's profile (``prior``); when
the whole history has fewer than ``min_history_sends`` sends everybody gets the window's
fallback time (``fallback``). A share ``explore`` of contacts, drawn deterministically from
(campaign, contact id), gets a uniformly drawn allowed hour instead (``explore``): that is
what lets later campaigns learn about hours the model would never try.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt
import polars as pl

from recapito.errors import InputError
from recapito.ledger import Ledger
from recapito.sendtime.history import EngagementHistory
from recapito.sendtime.window import HOURS_PER_WEEK, SendWindow, next_slots

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
SEGMENT_COLUMNS = ("segment", "segmento")
REASONS = ("model", "prior", "fallback", "explore")


@dataclass(frozen=True)
class BestTimeModel:
    """Tuning of the best-time model (the defaults are what benchmarks/send_time.py uses)."""

    response_window: timedelta = timedelta(hours=3)
    neighbour_weights: tuple[float, ...] = (0.5, 0.25)
    same_hour_weight: float = 0.1
    contact_strength: float = 10.0  # C: prior pseudo-sends in each hour of a contact
    segment_strength: float = 50.0  # S
    global_strength: float = 20.0  # G
    level_strength: float | None = None  # A; None: method-of-moments estimate
    min_contact_sends: int = 1
    min_history_sends: int = 100
    lookback: timedelta = timedelta(days=365)
    block: int = 32_768  # contacts per dense block (memory: block × 168 × 8 bytes per array)


@dataclass
class Profiles:
    """The fitted population profiles (168 local hours of the week each)."""

    sends: FloatArray
    engaged: FloatArray
    global_rate: FloatArray
    segment_rate: dict[str, FloatArray] = field(default_factory=dict)
    level_strength: float = 0.0
    history_sends: int = 0

    def frame(self) -> pl.DataFrame:
        """Long table: hour_of_week, weekday, hour, sends, engaged, global_rate and one
        ``rate_<segment>`` column per segment."""
        how = np.arange(HOURS_PER_WEEK)
        data: dict[str, object] = {
            "hour_of_week": how,
            "weekday": how // 24,
            "hour": how % 24,
            "sends": self.sends,
            "engaged": self.engaged,
            "global_rate": self.global_rate,
        }
        for name, rate in self.segment_rate.items():
            data[f"rate_{name}"] = rate
        return pl.DataFrame(data)


def _count(keys: IntArray, weights: FloatArray | None = None, minlength: int = 0) -> FloatArray:
    counted = np.bincount(keys, weights=weights, minlength=minlength)
    return counted.astype(np.float64, copy=False)


def _smooth(x: FloatArray, model: BestTimeModel) -> FloatArray:
    """Counts per hour of the week (rows × 168) spread to neighbouring hours and to the same
    hour on the other days."""
    out = x.copy()
    for k, w in enumerate(model.neighbour_weights, start=1):
        if w:
            out += w * (np.roll(x, k, axis=1) + np.roll(x, -k, axis=1))
    if model.same_hour_weight:
        days = x.reshape(x.shape[0], 7, 24)
        other = days.sum(axis=1, keepdims=True) - days
        out += model.same_hour_weight * other.reshape(x.shape[0], HOURS_PER_WEEK)
    return out


_QUARTER_US = 15 * 60 * 1_000_000


def _local_hours_of_week(sent_at: pl.Series, zones: pl.Series) -> IntArray:
    """Local hour of the week (Monday 00 = 0) of UTC instants, each in its row's zone.

    Every zone offset in use is a multiple of 15 minutes, so the local hour of an instant is
    that of its UTC quarter-hour: each zone converts the (few thousand) quarter-hours the
    history spans once, and the rows look theirs up."""
    how = np.zeros(len(sent_at), dtype=np.int64)
    if not len(sent_at):
        return how
    micros = sent_at.dt.replace_time_zone(None).dt.cast_time_unit("us").to_physical().to_numpy()
    quarter = micros // _QUARTER_US
    first, last = int(quarter.min()), int(quarter.max())
    span = pl.Series(
        "q", np.arange(first, last + 1, dtype=np.int64) * _QUARTER_US, dtype=pl.Int64
    ).cast(pl.Datetime("us", "UTC"))
    zone_of = zones.to_numpy()
    for zone in zones.unique().to_list():
        local = span.dt.convert_time_zone(str(zone))
        table = (
            local.dt.weekday().to_numpy().astype(np.int64) - 1
        ) * 24 + local.dt.hour().to_numpy()
        rows = np.flatnonzero(zone_of == zone)
        how[rows] = table[quarter[rows] - first]
    return how


def _segment_column(audience: pl.DataFrame, segment_column: str | None) -> str | None:
    if segment_column is None:
        return None
    if segment_column != "auto":
        if segment_column not in audience.columns:
            raise InputError(f"audience has no segment column {segment_column!r}")
        return segment_column
    return next((c for c in SEGMENT_COLUMNS if c in audience.columns), None)


@dataclass
class _Fit:
    profiles: Profiles
    seg_rate: FloatArray  # (segments + 1, 168); the last row is the global profile
    unique: pl.DataFrame  # contact_id, cidx, seg, tz (one row per distinct contact)
    cidx: IntArray  # per labelled send: compact contact index, -1 when not in the audience
    how: IntArray
    engaged: FloatArray


def _fit(
    audience: pl.DataFrame,
    labelled: pl.DataFrame,
    zones: pl.Series,
    window: SendWindow,
    model: BestTimeModel,
    segment_column: str | None,
) -> _Fit:
    seg_col = _segment_column(audience, segment_column)
    seg_values = (
        audience.get_column(seg_col).cast(pl.String).fill_null("")
        if seg_col
        else pl.Series([""] * audience.height, dtype=pl.String)
    )
    seg_names = sorted(v for v in seg_values.unique().to_list() if v)
    codes = {name: i for i, name in enumerate(seg_names)}
    nseg = len(seg_names)
    unique = (
        pl.DataFrame(
            {
                "contact_id": audience.get_column("contact_id").cast(pl.String),
                "seg": seg_values.replace_strict(codes, default=nseg, return_dtype=pl.Int64),
                "tz": zones,
            }
        )
        .unique("contact_id", keep="first", maintain_order=True)
        .with_row_index("cidx")
        .with_columns(pl.col("cidx").cast(pl.Int64))
    )
    sends = labelled.join(unique, on="contact_id", how="left").with_columns(
        pl.col("cidx").fill_null(-1),
        pl.col("seg").fill_null(nseg),
        pl.col("tz").fill_null(window.timezone),
    )
    cidx = sends.get_column("cidx").to_numpy().astype(np.int64)
    seg = sends.get_column("seg").to_numpy().astype(np.int64)
    how = _local_hours_of_week(sends.get_column("sent_at"), sends.get_column("tz"))
    y = sends.get_column("engaged").to_numpy().astype(np.float64)

    n_g = _count(how, minlength=HOURS_PER_WEEK)
    k_g = _count(how, weights=y, minlength=HOURS_PER_WEEK)
    total = float(n_g.sum())
    p = float(k_g.sum()) / total if total else 0.0
    ns_g = _smooth(n_g[None, :], model)[0]
    ks_g = _smooth(k_g[None, :], model)[0]
    glob = (ks_g + model.global_strength * p) / (ns_g + model.global_strength)

    key = seg * HOURS_PER_WEEK + how
    size = (nseg + 1) * HOURS_PER_WEEK
    n_s = _count(key, minlength=size).reshape(nseg + 1, -1)
    k_s = _count(key, weights=y, minlength=size).reshape(nseg + 1, -1)
    ns_s, ks_s = _smooth(n_s, model), _smooth(k_s, model)
    m_s = model.segment_strength
    seg_rate = (ks_s + m_s * glob[None, :]) / (ns_s + m_s)
    seg_rate[nseg] = glob  # contacts without a segment: the global profile

    profiles = Profiles(
        sends=n_g,
        engaged=k_g,
        global_rate=glob,
        segment_rate={name: seg_rate[i] for i, name in enumerate(seg_names)},
        history_sends=int(total),
    )
    return _Fit(profiles, seg_rate, unique, cidx, how, y)


def _level_strength(k: FloatArray, e: FloatArray, v: FloatArray) -> float:
    """Method of moments for the spread of contacts' responsiveness around their segment's:
    Var(K - E) = V + τ² E² (binomial noise plus a gamma-distributed multiplier), A = 1/τ²."""
    denominator = float((e * e).sum())
    if denominator <= 0:
        return 1.0
    tau2 = float(((k - e) ** 2 - v).sum()) / denominator
    return float(np.clip(1.0 / max(tau2, 1e-3), 0.5, 200.0))


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64's finaliser: every input bit reaches every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _explore_draws(contact_ids: pl.Series, campaign: str) -> tuple[FloatArray, FloatArray]:
    """Two uniforms per contact from a hash of (campaign, contact id): FNV-1a over the id's
    UTF-8 bytes, seeded by blake2b(campaign), finalised by SplitMix64 — our own code, so
    the same draws on every run, machine and library version."""
    seed = np.frombuffer(hashlib.blake2b(campaign.encode(), digest_size=8).digest(), "<u8")[0]
    binary = contact_ids.cast(pl.String).fill_null("").cast(pl.Binary).to_arrow()
    if hasattr(binary, "combine_chunks"):
        binary = binary.combine_chunks()
    buffers = binary.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[
        binary.offset : binary.offset + len(binary) + 1
    ]
    data = (
        np.frombuffer(buffers[2], dtype=np.uint8)
        if buffers[2] is not None
        else np.zeros(1, np.uint8)
    )
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(binary), _FNV_OFFSET ^ seed, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max()) if lengths.size else 0):
            live = lengths > j
            byte = data[np.where(live, starts + j, 0)].astype(np.uint64)
            h = np.where(live, (h ^ byte) * _FNV_PRIME, h)
        first = _mix64(h)
        second = _mix64(first ^ seed)
    scale = 2.0**-53
    return (first >> np.uint64(11)).astype(np.float64) * scale, (second >> np.uint64(11)).astype(
        np.float64
    ) * scale


def plan_best_times(
    audience: pl.DataFrame,
    history: EngagementHistory | Ledger | None,
    window: SendWindow,
    *,
    campaign: str | None = None,
    now: datetime,
    explore: float = 0.1,
    model: BestTimeModel | None = None,
    segment_column: str | None = "auto",
) -> pl.DataFrame:
    """The best-time plan, one row per audience row (same order): ``contact_id``,
    ``timezone``, ``hour_of_week`` (local; ``-1`` for the fallback), ``reason`` (model,
    prior, fallback, explore), ``score`` (estimated engagement rate at that hour) and
    ``send_at`` (UTC)."""
    model = model or BestTimeModel()
    if "contact_id" not in audience.columns:
        raise InputError("audience has no contact_id column")
    if now.tzinfo is None:
        raise InputError("now must be timezone-aware")
    if not 0.0 <= explore <= 1.0:
        raise InputError("explore must be between 0 and 1")
    if history is None:  # no ledger: nothing learnt, everybody at the fallback time
        history = EngagementHistory.empty()
    elif isinstance(history, Ledger):
        history = EngagementHistory.from_ledger(history, since=now - model.lookback)
    labelled = history.labelled(model.response_window).filter(
        pl.col("sent_at").is_between(now - model.lookback, now, closed="left")
    )
    zones = window.contact_zones(audience)
    fit = _fit(audience, labelled, zones, window, model, segment_column)
    allowed = window.allowed_hours()
    allowed_idx = np.flatnonzero(allowed)
    ncontacts = fit.unique.height
    choice = np.full(ncontacts, -1, dtype=np.int64)
    score = np.full(ncontacts, np.nan)
    reason = np.full(ncontacts, "fallback", dtype=object)
    seg_of = fit.unique.get_column("seg").to_numpy().astype(np.int64)

    if fit.profiles.history_sends >= model.min_history_sends:
        # tie-break toward the fallback hour (a flat profile then means the usual time)
        bonus = np.where(np.arange(HOURS_PER_WEEK) % 24 == window.fallback_hour(), 1e-12, 0.0)
        masked = np.where(allowed[None, :], fit.seg_rate + bonus[None, :], -np.inf)
        seg_best = masked.argmax(axis=1)
        choice = seg_best[seg_of]
        score = fit.seg_rate[seg_of, choice]
        reason[:] = "prior"
        _contact_choices(fit, model, allowed, bonus, seg_of, choice, score, reason)

    seed = campaign if campaign is not None else now.astimezone(UTC).isoformat()
    draw_u, draw_v = _explore_draws(fit.unique.get_column("contact_id"), seed)
    explored = draw_u < explore
    picks = allowed_idx[
        np.minimum((draw_v * allowed_idx.size).astype(np.int64), allowed_idx.size - 1)
    ]
    choice = np.where(explored, picks, choice)
    reason = np.where(explored, "explore", reason)
    if fit.profiles.history_sends >= model.min_history_sends:
        score = np.where(explored, fit.seg_rate[seg_of, picks], score)

    per_contact = fit.unique.select("contact_id", "cidx").with_columns(
        pl.Series("hour_of_week", choice),
        pl.Series("reason", reason.astype(str), dtype=pl.String),
        pl.Series("score", score, dtype=pl.Float64),
    )
    rows = (
        audience.select(pl.col("contact_id").cast(pl.String))
        .with_columns(zones.alias("timezone"))
        .join(per_contact, on="contact_id", how="left", maintain_order="left")
    )
    rows = rows.with_columns(pl.col("hour_of_week").fill_null(-1))  # a null id: the fallback
    send_at = next_slots(rows.get_column("hour_of_week").to_numpy(), zones, window, now)
    return rows.drop("cidx").with_columns(send_at)


def _contact_choices(
    fit: _Fit,
    model: BestTimeModel,
    allowed: npt.NDArray[np.bool_],
    bonus: FloatArray,
    seg_of: IntArray,
    choice: IntArray,
    score: FloatArray,
    reason: npt.NDArray[np.object_],
) -> None:
    """Contacts with enough sends of their own: the posterior argmax (in place)."""
    inside = fit.cidx >= 0
    cidx, how, y = fit.cidx[inside], fit.how[inside], fit.engaged[inside]
    if cidx.size == 0:
        return
    ncontacts = choice.size
    expected = fit.seg_rate[seg_of[cidx], how]
    n_c = _count(cidx, minlength=ncontacts)
    k_c = _count(cidx, weights=y, minlength=ncontacts)
    e_c = _count(cidx, weights=expected, minlength=ncontacts)
    v_c = _count(cidx, weights=expected * (1 - expected), minlength=ncontacts)
    strength = model.level_strength
    if strength is None:
        strength = _level_strength(k_c, e_c, v_c)
    fit.profiles.level_strength = strength
    level = (k_c + strength) / (e_c + strength)

    eligible = np.flatnonzero(n_c >= max(model.min_contact_sends, 1))
    if eligible.size == 0:
        return
    compact = np.full(ncontacts, -1, dtype=np.int64)
    compact[eligible] = np.arange(eligible.size)
    keep = compact[cidx] >= 0
    order = np.argsort(compact[cidx][keep], kind="stable")
    rows_c = compact[cidx][keep][order]
    rows_h = how[keep][order]
    rows_y = y[keep][order]
    bounds = np.searchsorted(rows_c, np.arange(0, eligible.size + model.block, model.block))
    # only the allowed hours are ever chosen: evidence is spread straight onto them
    allowed_idx = np.flatnonzero(allowed)
    width = allowed_idx.size
    position = np.full(HOURS_PER_WEEK, -1, dtype=np.int64)
    position[allowed_idx] = np.arange(width)
    kernel = _kernel(model)
    offsets = np.array([o for o, _ in kernel], dtype=np.int64)
    table_weight = np.array([w for _, w in kernel])
    table_pos = position[(np.arange(HOURS_PER_WEEK)[:, None] + offsets[None, :]) % HOURS_PER_WEEK]
    seg_allowed = fit.seg_rate[:, allowed_idx]
    tie = bonus[allowed_idx]
    m_c = model.contact_strength
    for b, start in enumerate(range(0, eligible.size, model.block)):
        who = eligible[start : start + model.block]
        lo, hi = bounds[b], bounds[b + 1]
        local_c = rows_c[lo:hi] - start
        spread = table_pos[rows_h[lo:hi]]  # (sends, kernel): where each send's evidence goes
        inside_window = spread >= 0
        key = (local_c[:, None] * width + spread)[inside_window]
        weight = np.broadcast_to(table_weight, spread.shape)[inside_window]
        hit = (rows_y[lo:hi][:, None] * table_weight[None, :])[inside_window]
        n = _count(key, weights=weight, minlength=who.size * width)
        k = _count(key, weights=hit, minlength=who.size * width)
        prior = level[who, None] * seg_allowed[seg_of[who]]
        post = (k.reshape(who.size, width) + m_c * prior) / (n.reshape(who.size, width) + m_c)
        best = (post + tie[None, :]).argmax(axis=1)
        choice[who] = allowed_idx[best]
        score[who] = post[np.arange(who.size), best]
        reason[who] = "model"


def _kernel(model: BestTimeModel) -> list[tuple[int, float]]:
    """(offset in hours, weight) of the smoothing over the week (see ``_smooth``)."""
    kernel = [(0, 1.0)]
    for k, w in enumerate(model.neighbour_weights, start=1):
        if w:
            kernel += [(k, w), (-k, w)]
    if model.same_hour_weight:
        kernel += [(24 * d, model.same_hour_weight) for d in range(1, 7)]
    return kernel


def best_times(
    audience: pl.DataFrame,
    history: EngagementHistory | Ledger | None,
    window: SendWindow,
    *,
    campaign: str | None = None,
    now: datetime,
    explore: float = 0.1,
    model: BestTimeModel | None = None,
    segment_column: str | None = "auto",
) -> pl.Series:
    """When to send to each audience row (same order): UTC datetimes, the first allowed slot
    at or after ``now`` at each contact's chosen local hour of the week (see
    ``plan_best_times`` for the reasons and scores).

    ``history``: an ``EngagementHistory``, a ``Ledger`` to read it from (the last
    ``model.lookback``), or None (no history: the fallback time). ``campaign`` seeds the
    exploration draws (the campaign's name; when omitted, ``now``): the same campaign and
    contact always get the same draw."""
    plan = plan_best_times(
        audience,
        history,
        window,
        campaign=campaign,
        now=now,
        explore=explore,
        model=model,
        segment_column=segment_column,
    )
    return plan.get_column("send_at")


def profiles(
    history: EngagementHistory | Ledger,
    *,
    audience: pl.DataFrame | None = None,
    window: SendWindow | None = None,
    now: datetime | None = None,
    model: BestTimeModel | None = None,
    segment_column: str | None = "auto",
) -> Profiles:
    """The population profiles the model would use (for notebooks and reports)."""
    model = model or BestTimeModel()
    window = window or SendWindow()
    if isinstance(history, Ledger):
        since = now - model.lookback if now else None
        history = EngagementHistory.from_ledger(history, since=since)
    labelled = history.labelled(model.response_window)
    if now is not None:
        labelled = labelled.filter(pl.col("sent_at") < now)
    if audience is None:
        audience = pl.DataFrame({"contact_id": pl.Series([], dtype=pl.String)})
    zones = window.contact_zones(audience)
    return _fit(audience, labelled, zones, window, model, segment_column).profiles
