"""Funnel diagnosis: which stage of a campaign's funnel is clogged, and what to fix. Pure.

``diagnose_view(view, settings, unsupported)`` returns
``{"bottleneck": ..., "advice": "...", "evidence": {...}}``.

Each funnel is split into two levers whose product is the outcome:

* ads: ``conversions = impressions x CTR x CVR`` with CTR = human clicks / impressions and
  CVR = conversions / human clicks. Human clicks are clicks minus scanner clicks
  (``bot_click``); the contract's rates (bots included) are shown next to them.
* e-mail: ``unique clickers = delivered x human open rate x human CTOR``. The MPP-adjusted
  rates are used because machine opens (Apple Mail Privacy Protection, proxies) inflate the
  open rate and deflate CTOR; the raw ones are shown next to them.

A lever's verdict compares the Wilson score interval of its rate with the benchmark range
(:mod:`pipeline.diagnosis.benchmarks`): ``low`` when the whole interval is below the range, ``high`` when
it is above, ``ok`` when it starts inside the range (not low), ``undecided`` when it straddles
the bottom of the range (then ``more_needed`` estimates the extra denominator volume after
which the interval, at the current rate, would clear the range's bottom).

Bottleneck (``ads``): ``ctr`` CTR low; ``cvr`` CVR low while CTR is not; ``both``; ``none``
neither low. (``email``): ``ctor`` human CTOR low; ``open_rate`` human open rate low, or CTR
low while CTOR is not; ``both``; ``none``. A lever confidently low is reported even if the
other one is still undecided (the evidence says so); when nothing is confidently low and a
lever is undecided or has no sample, the answer is ``insufficient_data`` with the volume
still needed. Rates named in ``unsupported`` are never judged.

The ads trade-off (CTR up while CVR falls: clicks of poorer quality) compares each most
recent complete window with the rest of the campaign's lifetime, with one-sided
two-proportion z-tests at the benchmark table's confidence; both moves must be significant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

from pipeline.diagnosis.benchmarks import Benchmark, BenchmarkTable, Range, table_for_env
from pipeline.rules.aggregate import CampaignView
from pipeline.settings import Settings, window_label

ADS_BOTTLENECKS = ("ctr", "cvr", "both", "none")
EMAIL_BOTTLENECKS = ("open_rate", "ctor", "both", "none")
INSUFFICIENT = "insufficient_data"

ADVICE = {
    ("ads", "ctr"): "the entrance: creative, headline and targeting",
    ("ads", "cvr"): "the receiving end: landing page, offer, form and traffic quality",
    ("ads", "both"): "raise CTR first (creative, targeting) while removing obvious landing-page drop-offs",
    ("ads", "none"): "healthy funnel: scale it and keep A/B testing",
    ("email", "open_rate"): "subject line, sender name and deliverability",
    ("email", "ctor"): "content: copy, call to action and design",
    ("email", "both"): "opens and content: subject line, sender and deliverability, then copy and CTA",
    ("email", "none"): "healthy funnel: keep A/B testing subject lines and content",
}
TRADE_OFF_ADVICE = "CTR up while CVR falls, check click quality"
MAX_VOLUME = 10**12
SHORTCUT_VOLUME = 10**8  # see volume_needed


def z_value(confidence: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson(successes: float, n: float, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval of ``successes / n``; ``None`` without a sample."""
    if n <= 0:
        return None
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def volume_needed(p: float, n: int, bound: float, z: float) -> int | None:
    """Smallest total ``N >= n`` whose Wilson interval at rate ``p`` no longer contains ``bound``.

    ``None`` when no volume would do (the rate sits on the bound).

    A search: doubling from ``n`` until the interval is clear of the bound, then bisecting.
    The interval at ``N`` contains ``b`` exactly when ``N (p - b)^2 <= z^2 b (1 - b)`` (the
    Wilson interval's defining inequality), which puts the answer next to ``z^2 b (1 - b) /
    (p - b)^2``: below :data:`SHORTCUT_VOLUME` the search skips the doublings under that and
    tries it first, so it takes a handful of interval computations instead of about forty
    (``/metrics`` diagnoses every campaign that changed). Each step is still decided by the
    interval itself, which moves monotonically with ``N`` there, so the answer is the one the
    plain search gives; above it (a rate within a few millionths of the bound) the floating
    point interval wobbles from one ``N`` to the next and the plain search decides alone.
    """

    def separated(total: float) -> bool:
        interval = wilson(p * total, total, z)
        assert interval is not None
        return interval[1] < bound if p < bound else interval[0] >= bound

    if p == bound or not 0 < bound < 1:
        return None
    estimate = z * z * bound * (1 - bound) / ((p - bound) ** 2)
    if estimate > SHORTCUT_VOLUME:
        estimate = 0.0  # no shortcut
    lo, hi = n, max(2 * n, 1)  # not separated at ``lo`` (or no sample there)
    while 2 * hi < estimate and 2 * hi <= MAX_VOLUME:
        lo, hi = hi, hi * 2  # well below the boundary: not separated there either
    while not separated(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_VOLUME:
            return None
    guess = math.floor(estimate) + 1
    if estimate and lo < guess < hi:  # try the boundary's neighbourhood first
        if separated(guess):
            hi = guess
            if lo < guess - 1 and not separated(guess - 1):
                lo = guess - 1
        else:
            lo = guess
            if guess + 1 < hi and separated(guess + 1):
                hi = guess + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if separated(mid):
            hi = mid
        else:
            lo = mid
    return hi


def judge(
    name: str,
    successes: int,
    n: int,
    unit: str,
    benchmark: Range,
    z: float,
    unsupported: bool = False,
) -> dict[str, Any]:
    """A lever's rate, interval, benchmark, verdict and (when undecided) the volume needed."""
    doc: dict[str, Any] = {
        "rate": name,
        "numerator": successes,
        "denominator": n,
        "unit": unit,
        "benchmark": benchmark.as_dict(),
        "value": None,
        "interval": None,
        "verdict": "undecided",
        "more_needed": None,
    }
    if unsupported:
        doc["verdict"] = "unsupported"
        return doc
    if n > 0:
        k = min(successes, n)
        if successes > n:
            doc["note"] = f"numerator {successes} exceeds denominator {n}; capped"
        p = k / n
        low, high = wilson(k, n, z)  # type: ignore[misc]
        doc["value"], doc["interval"] = p, [low, high]
        if high < benchmark.low:
            doc["verdict"] = "low"
        elif low > benchmark.high:
            doc["verdict"] = "high"
        elif low >= benchmark.low:
            doc["verdict"] = "ok"
        if doc["verdict"] != "undecided":
            return doc
        assumed = p
    else:
        assumed = benchmark.mid  # no sample yet: what telling a midpoint rate apart would take
        doc["assumes"] = "rate at the benchmark midpoint"
    total = volume_needed(assumed, n, benchmark.low, z)
    doc["more_needed"] = None if total is None else max(total - n, 1)
    if total is None:
        doc["note"] = "rate sits on the benchmark's bottom: no volume would separate them"
    return doc


def _z_greater(k1: int, n1: int, k2: int, n2: int) -> float | None:
    """One-sided two-proportion z statistic for p1 > p2, or ``None`` when too thin to test."""
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (k1 + k2) / (n1 + n2)
    for n in (n1, n2):  # the usual normal-approximation rule of thumb
        if n * pooled < 5 or n * (1 - pooled) < 5:
            return None
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (k1 / n1 - k2 / n2) / se if se > 0 else None


def _human_clicks(counts: Mapping[str, int]) -> int:
    return max(0, counts.get("click", 0) - counts.get("bot_click", 0))


def trade_off(
    view: CampaignView, settings: Settings, z: float, unsupported: frozenset[str]
) -> dict[str, Any]:
    """CTR up while CVR falls in a recent complete window, against the rest of the lifetime."""
    result: dict[str, Any] = {"flag": False, "windows": {}}
    if {"ctr", "cvr"} & unsupported:
        result["note"] = "ctr or cvr unsupported by the source"
        return result
    totals = view.totals
    for size in settings.windows:
        shown = view.complete_window(size, settings.allowed_lateness)
        if shown is None or not shown.counts:
            continue
        win = shown.counts
        rest = {key: max(0, totals.get(key, 0) - win.get(key, 0)) for key in ("impression", "conversion")}
        w_clicks, r_clicks = _human_clicks(win), max(0, _human_clicks(totals) - _human_clicks(win))
        z_ctr = _z_greater(w_clicks, win.get("impression", 0), r_clicks, rest["impression"])
        z_cvr = _z_greater(
            min(rest["conversion"], r_clicks), r_clicks, min(win.get("conversion", 0), w_clicks), w_clicks
        )
        flagged = z_ctr is not None and z_cvr is not None and z_ctr >= z and z_cvr >= z
        result["windows"][window_label(size)] = {
            "start": shown.start,
            "end": shown.end,
            "ctr_window": w_clicks / win["impression"] if win.get("impression") else None,
            "ctr_rest": r_clicks / rest["impression"] if rest["impression"] else None,
            "cvr_window": win.get("conversion", 0) / w_clicks if w_clicks else None,
            "cvr_rest": rest["conversion"] / r_clicks if r_clicks else None,
            "z_ctr_up": z_ctr,
            "z_cvr_down": z_cvr,
            "flag": flagged,
        }
        result["flag"] = result["flag"] or flagged
    result["test"] = f"one-sided two-proportion z >= {z:.2f} for both, window vs rest of lifetime"
    return result


def _gain(current: float, target: float, scale: float) -> float:
    """What moving a lever from ``current`` to ``target`` adds (never negative), to 0.01."""
    return round(max(0.0, (target - current) * scale), 2)


def _ads(view: CampaignView, bench: Benchmark, z: float, unsupported: frozenset[str]) -> dict[str, Any]:
    t = view.totals
    impressions, clicks, bots, conversions = (
        t.get("impression", 0),
        t.get("click", 0),
        t.get("bot_click", 0),
        t.get("conversion", 0),
    )
    human = _human_clicks(t)
    ctr = judge("ctr", human, impressions, "impression", bench.ranges["ctr"], z, "ctr" in unsupported)
    cvr = judge("cvr", conversions, human, "click", bench.ranges["cvr"], z, "cvr" in unsupported)
    levers: dict[str, Any] = {
        "identity": "conversions = impressions x CTR x CVR (human clicks)",
        "basis": "point estimates moved to the benchmark midpoint",
    }
    c, v = ctr["value"], cvr["value"]
    if c is not None:
        used_v = v if v is not None else bench.ranges["cvr"].mid
        levers["ctr"] = {
            "to": bench.ranges["ctr"].mid,
            "added_conversions": _gain(c, bench.ranges["ctr"].mid, impressions * used_v),
            **({} if v is not None else {"assumes": "CVR at the benchmark midpoint"}),
        }
        if v is not None:
            levers["cvr"] = {
                "to": bench.ranges["cvr"].mid,
                "added_conversions": _gain(v, bench.ranges["cvr"].mid, impressions * c),
            }
    _best_lever(levers, "added_conversions")
    # undecided CVR expressed in impressions too, at the current (or benchmark) CTR
    if cvr["more_needed"]:
        per_click = c if c else bench.ranges["ctr"].mid
        cvr["more_needed_top"] = {"impression": math.ceil(cvr["more_needed"] / per_click)}
    return {
        "volumes": {
            "impression": impressions,
            "click": clicks,
            "bot_click": bots,
            "human_click": human,
            "conversion": conversions,
        },
        "levers_judged": {"ctr": ctr, "cvr": cvr},
        "contract_rates": {
            "ctr": clicks / impressions if impressions else None,
            "cvr": conversions / clicks if clicks else None,
        },
        "levers": levers,
    }


def _email(
    view: CampaignView, bench: Benchmark, z: float, unsupported: frozenset[str], denominator: str
) -> dict[str, Any]:
    t = view.totals
    delivered = t.get(denominator, 0)
    uc, uo, uho = t.get("unique_click", 0), t.get("unique_open", 0), t.get("unique_human_open", 0)
    conversions = t.get("conversion", 0)
    r = bench.ranges
    opens = judge(
        "human_open_rate", uho, delivered, denominator, r["open_rate"], z, "human_open_rate" in unsupported
    )
    ctor = judge("human_ctor", uc, uho, "unique_human_open", r["ctor"], z, "human_ctor" in unsupported)
    ctr = judge("ctr", uc, delivered, denominator, r["ctr"], z, "ctr" in unsupported)
    levers: dict[str, Any] = {
        "identity": "unique clickers = delivered x human open rate x human CTOR",
        "basis": "point estimates moved to the benchmark midpoint",
    }
    o, k = opens["value"], ctor["value"]
    per_clicker = conversions / uc if uc else None
    if o is not None:
        used_k = k if k is not None else r["ctor"].mid
        gain = _gain(o, r["open_rate"].mid, delivered * used_k)
        levers["open_rate"] = {"to": r["open_rate"].mid, "added_unique_clickers": gain}
        if k is None:
            levers["open_rate"]["assumes"] = "CTOR at the benchmark midpoint"
    if k is not None and o is not None:
        levers["ctor"] = {
            "to": r["ctor"].mid,
            "added_unique_clickers": _gain(k, r["ctor"].mid, delivered * o),
        }
    for name in ("open_rate", "ctor"):
        if name in levers and per_clicker is not None:
            levers[name]["added_conversions"] = round(levers[name]["added_unique_clickers"] * per_clicker, 2)
    _best_lever(levers, "added_unique_clickers")
    if ctor["more_needed"]:
        per_open = o if o else r["open_rate"].mid
        ctor["more_needed_top"] = {denominator: math.ceil(ctor["more_needed"] / per_open)}
    return {
        "volumes": {
            denominator: delivered,
            "unique_open": uo,
            "unique_human_open": uho,
            "machine_open": t.get("machine_open", 0),
            "unique_click": uc,
            "click": t.get("click", 0),
            "bot_click": t.get("bot_click", 0),
            "conversion": conversions,
        },
        "levers_judged": {"human_open_rate": opens, "human_ctor": ctor, "ctr": ctr},
        "contract_rates": {
            "open_rate": uo / delivered if delivered else None,
            "human_open_rate": uho / delivered if delivered else None,
            "ctor": uc / uo if uo else None,
            "human_ctor": uc / uho if uho else None,
        },
        "levers": levers,
    }


def _best_lever(levers: dict[str, Any], key: str) -> None:
    gains = {name: doc[key] for name, doc in levers.items() if isinstance(doc, dict) and doc.get(key, 0) > 0}
    levers["best"] = max(gains, key=lambda name: gains[name]) if gains else None


def _decide(channel: str, judged: Mapping[str, Mapping[str, Any]]) -> str:
    def verdict(name: str) -> str:
        return str(judged[name]["verdict"])

    def settled(name: str) -> bool:
        return verdict(name) in ("low", "ok", "high")

    if channel == "ads":
        first, second = "ctr", "cvr"
        first_low, second_low = verdict(first) == "low", verdict(second) == "low"
        names = {"first": "ctr", "second": "cvr"}
    else:
        first, second = "human_open_rate", "human_ctor"
        second_low = verdict(second) == "low"
        first_low = verdict(first) == "low" or (
            verdict("ctr") == "low" and not second_low and settled(second)
        )
        names = {"first": "open_rate", "second": "ctor"}
    if first_low and second_low:
        return "both"
    if first_low:
        return names["first"]
    if second_low:
        return names["second"]
    if settled(first) and settled(second):
        return "none"
    return INSUFFICIENT


def _needed_summary(channel: str, judged: Mapping[str, Mapping[str, Any]], top: str) -> dict[str, Any] | None:
    """The largest top-of-funnel volume still needed by an undecided lever."""
    needed: dict[str, Any] | None = None
    for name, doc in judged.items():
        if doc["verdict"] != "undecided" or doc["more_needed"] is None:
            continue
        if channel == "email" and name == "ctr":
            continue  # CTR only refines the opens verdict; it never blocks a diagnosis
        more_top = doc.get("more_needed_top", {}).get(top, doc["more_needed"] if doc["unit"] == top else None)
        candidate = {"rate": name, "more": doc["more_needed"], "unit": doc["unit"], f"more_{top}": more_top}
        if needed is None or (more_top or 0) > (needed.get(f"more_{top}") or 0):
            needed = candidate
    return needed


def _round(n: int) -> str:
    """Two significant figures, rounded up, so the advice label rarely changes."""
    if n < 100:
        return str(n)
    magnitude = 10 ** (len(str(n)) - 2)
    rounded = math.ceil(n / magnitude) * magnitude
    if rounded >= 1_000_000:
        return f"{rounded / 1_000_000:g}M"
    if rounded >= 1_000:
        return f"{rounded / 1_000:g}k"
    return str(rounded)


def diagnose(
    view: CampaignView,
    settings: Settings,
    unsupported: frozenset[str] = frozenset(),
    table: BenchmarkTable | None = None,
) -> dict[str, Any]:
    """The diagnosis of one campaign against ``table`` (default: the configured one)."""
    table = table if table is not None else table_for_env(settings.env)
    bench = table.for_campaign(view.channel, view.campaign)
    z = z_value(table.confidence)
    if view.channel == "ads":
        found = _ads(view, bench, z, unsupported)
        top = "impression"
    else:
        found = _email(view, bench, z, unsupported, settings.email_denominator)
        top = settings.email_denominator
    judged = found.pop("levers_judged")
    bottleneck = _decide(view.channel, judged)
    evidence: dict[str, Any] = {
        "channel": view.channel,
        "benchmark": {**bench.as_dict(), "confidence": table.confidence, "table": table.origin},
        "volumes": found["volumes"],
        "rates": judged,
        "contract_rates": found["contract_rates"],
        "levers": found["levers"],
        "unsupported": sorted(unsupported),
    }
    needed = _needed_summary(view.channel, judged, top)
    if needed is not None:
        evidence["needed"] = needed
    if view.channel == "ads":
        evidence["trade_off"] = trade_off(view, settings, z, unsupported)
    if bottleneck == INSUFFICIENT:
        if needed is not None and needed.get(f"more_{top}"):
            plural = "impressions" if top == "impression" else f"{top}s" if top == "send" else "deliveries"
            advice = f"not enough data yet: about {_round(needed[f'more_{top}'])} more {plural} needed"
        else:
            unsupported_levers = [name for name, doc in judged.items() if doc["verdict"] == "unsupported"]
            advice = (
                f"cannot judge: {', '.join(unsupported_levers)} not supported by the source"
                if unsupported_levers
                else "not enough data yet"
            )
    else:
        advice = ADVICE[(view.channel, bottleneck)]
    if evidence.get("trade_off", {}).get("flag"):
        advice = f"{advice}; {TRADE_OFF_ADVICE}"
    return {"bottleneck": bottleneck, "advice": advice, "evidence": evidence}


def diagnose_view(view: CampaignView, settings: Settings, unsupported: frozenset[str]) -> dict[str, Any]:
    """The hook the worker calls for ``/campaigns`` and the ``funnel_diagnosis`` gauges."""
    return diagnose(view, settings, unsupported)
