"""``pipeline report``: the campaign funnel table, with rates, intervals and the diagnosis.

It reads ``GET /campaigns`` from every worker named (each worker serves the campaigns of the
partitions it owns), and prints one table per channel:

* volumes (ads: impressions, clicks with scanner clicks in brackets, conversions; e-mail:
  delivered or sent, human openers with machine opens in brackets, clickers, conversions),
  ads rates use human clicks (clicks minus scanner clicks), e-mail rates human openers,
* the rates the diagnosis judges, each with its Wilson interval and verdict against the
  benchmark range (``low``, ``ok``, ``high``, ``?`` = not enough data yet, ``n/a`` = the
  source cannot support it),
* the bottleneck and the suggested fix,

then, per campaign, the benchmark used, the lever worth most, the volume still needed and any
CTR/CVR trade-off. ``--json`` prints the same rows as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.diagnosis.diagnose import wilson, z_value

VERDICT_MARK = {"low": "low", "ok": "ok", "high": "high", "undecided": "?", "unsupported": "n/a"}
# rates shown per channel: (key in the diagnosis evidence, column title, fallback contract rate)
SHOWN = {
    "ads": (("ctr", "CTR", "ctr"), ("cvr", "CVR", "cvr")),
    "email": (
        ("human_open_rate", "open rate (human)", "human_open_rate"),
        ("human_ctor", "CTOR (human)", "human_ctor"),
        ("ctr", "CTR", "ctr"),
    ),
}


async def _fetch_one(session: Any, url: str) -> list[dict[str, Any]]:
    async with session.get(url.rstrip("/") + "/campaigns") as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        doc = await response.json(content_type=None)
    campaigns = doc.get("campaigns") if isinstance(doc, dict) else None
    if not isinstance(campaigns, list):
        raise RuntimeError("not a /campaigns document")
    return [{**c, "_worker": url} for c in campaigns if isinstance(c, dict)]


async def fetch_campaigns(
    urls: Sequence[str], timeout: float = 10.0
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every campaign from every worker (one copy each, the newest), and the errors met."""
    from aiohttp import ClientSession, ClientTimeout

    async with ClientSession(timeout=ClientTimeout(total=timeout)) as session:
        results = await asyncio.gather(*(_fetch_one(session, url) for url in urls), return_exceptions=True)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    errors: list[str] = []
    for url, result in zip(urls, results, strict=True):
        if isinstance(result, BaseException):
            errors.append(f"{url}: {type(result).__name__}: {result}".rstrip(": "))
            continue
        for doc in result:
            key = (str(doc.get("channel")), str(doc.get("campaign_id")))
            # during a rebalance two workers may both answer for a campaign: keep the newer view
            if key not in found or doc.get("watermark", 0) > found[key].get("watermark", 0):
                found[key] = doc
    return [found[key] for key in sorted(found)], errors


def _pct(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.2f}%"


def _num(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, int | float) else "-"


def _rate_cell(rate: dict[str, Any] | None) -> str:
    if not rate:
        return "-"
    if rate.get("verdict") == "unsupported":
        return "n/a (source)"
    if rate.get("value") is None:
        return "- (no sample)"
    text = _pct(rate["value"])
    interval = rate.get("interval")
    if interval:
        text += f" [{interval[0] * 100:.2f}-{interval[1] * 100:.2f}]"
    verdict = rate.get("verdict")
    if verdict:
        text += f" {VERDICT_MARK.get(verdict, verdict)}"
    return text


def _fallback_rate(doc: dict[str, Any], name: str, z: float) -> dict[str, Any] | None:
    """A rate with its interval from the document's counts, when the worker sent no evidence."""
    definition = (doc.get("rate_definitions") or {}).get(name)
    counts = doc.get("counts") or {}
    if not definition:
        return None
    if name in (doc.get("unsupported_rates") or []):
        return {"verdict": "unsupported"}
    k, n = counts.get(definition["numerator"], 0), counts.get(definition["denominator"], 0)
    interval = wilson(min(k, n), n, z)
    return {"value": k / n if n else None, "interval": list(interval) if interval else None}


def build_rows(campaigns: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's rows: what the table shows, as plain data (also the ``--json`` output)."""
    rows = []
    for doc in campaigns:
        channel = str(doc.get("channel"))
        counts = doc.get("counts") or {}
        diagnosis = doc.get("diagnosis") or {}
        evidence = diagnosis.get("evidence") or {}
        confidence = (evidence.get("benchmark") or {}).get("confidence", 0.95)
        z = z_value(confidence)
        rates = {}
        for key, title, contract in SHOWN.get(channel, ()):
            judged = (evidence.get("rates") or {}).get(key)
            if judged is not None:
                rates[key] = {
                    "title": title,
                    "value": judged.get("value"),
                    "interval": judged.get("interval"),
                    "verdict": judged.get("verdict"),
                    "benchmark": judged.get("benchmark"),
                }
            else:
                fallback = _fallback_rate(doc, contract, z)
                if fallback is not None:
                    rates[key] = {"title": title, **fallback}
        denominator = doc.get("denominator", "delivery")
        if channel == "ads":
            volumes = {
                "impression": counts.get("impression", 0),
                "click": counts.get("click", 0),
                "bot_click": counts.get("bot_click", 0),
                "conversion": counts.get("conversion", 0),
            }
        else:
            volumes = {
                denominator: counts.get(denominator, 0),
                "unique_human_open": counts.get("unique_human_open", 0),
                "machine_open": counts.get("machine_open", 0),
                "unique_click": counts.get("unique_click", 0),
                "conversion": counts.get("conversion", 0),
            }
        rows.append(
            {
                "channel": channel,
                "campaign": doc.get("campaign_id"),
                "worker": doc.get("_worker"),
                "denominator": denominator,
                "volumes": volumes,
                "rates": rates,
                "confidence": confidence,
                "bottleneck": diagnosis.get("bottleneck", "not diagnosed"),
                "advice": diagnosis.get("advice", ""),
                "notes": _notes(evidence),
            }
        )
    return rows


def _notes(evidence: dict[str, Any]) -> list[str]:
    notes = []
    bench = evidence.get("benchmark") or {}
    if bench:
        ranges = ", ".join(
            f"{name} {r['low'] * 100:.4g}-{r['high'] * 100:.4g}%"
            for name, r in (bench.get("ranges") or {}).items()
        )
        notes.append(f"benchmark {bench.get('profile')} ({bench.get('chosen_by')}): {ranges}")
    levers = evidence.get("levers") or {}
    best = levers.get("best")
    if best and isinstance(levers.get(best), dict):
        lever = levers[best]
        what = "conversions" if "added_conversions" in lever else "clickers"
        gain = lever.get("added_conversions", lever.get("added_unique_clickers")) or 0
        if gain >= 0.5:
            notes.append(
                f"most to gain: {best} to {lever['to'] * 100:.3g}% adds about {gain:,.0f} {what}"
                " (point estimates)"
            )
    needed = evidence.get("needed")
    if needed:
        top = [key for key in needed if key.startswith("more_") and key != "more"]
        extra = ""
        if top and needed[top[0]]:
            extra = f" (about {_num(needed[top[0]])} more {_plural(top[0][5:])})"
        notes.append(
            f"to judge {needed['rate']}: {_num(needed['more'])} more {_plural(needed['unit'])}{extra}"
        )
    trade = evidence.get("trade_off") or {}
    for label, window in (trade.get("windows") or {}).items():
        if window.get("flag"):
            notes.append(
                f"trade-off in the last {label} window: CTR {_pct(window['ctr_rest'])} -> "
                f"{_pct(window['ctr_window'])} while CVR {_pct(window['cvr_rest'])} -> "
                f"{_pct(window['cvr_window'])}"
            )
    return notes


PLURALS = {
    "impression": "impressions",
    "click": "clicks",
    "delivery": "deliveries",
    "send": "sends",
    "unique_human_open": "human openers",
}


def _plural(unit: str) -> str:
    return PLURALS.get(unit, unit)


def _table(header: Sequence[str], body: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(row[i])) for row in (header, *body)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in body)]


def format_report(rows: Sequence[dict[str, Any]], errors: Sequence[str] = ()) -> str:
    """The terminal text of the report."""
    out: list[str] = []
    for channel in ("ads", "email"):
        chosen = [row for row in rows if row["channel"] == channel]
        if not chosen:
            continue
        confidence = chosen[0]["confidence"]
        shown = SHOWN[channel]
        if channel == "ads":
            header = ["campaign", "impressions", "clicks (bots)", "conversions"]
        else:
            unit = "sent" if chosen[0]["denominator"] == "send" else "delivered"
            header = ["campaign", unit, "human openers (machine opens)", "clickers", "conversions"]
        header += [title for _, title, _ in shown] + ["bottleneck", "suggested fix"]
        body = []
        for row in chosen:
            v = row["volumes"]
            if channel == "ads":
                cells = [
                    row["campaign"],
                    _num(v["impression"]),
                    f"{_num(v['click'])} ({_num(v['bot_click'])})",
                    _num(v["conversion"]),
                ]
            else:
                cells = [
                    row["campaign"],
                    _num(v[row["denominator"]]),
                    f"{_num(v['unique_human_open'])} ({_num(v['machine_open'])})",
                    _num(v["unique_click"]),
                    _num(v["conversion"]),
                ]
            cells += [_rate_cell(row["rates"].get(key)) for key, _, _ in shown]
            cells += [row["bottleneck"], row["advice"]]
            body.append(cells)
        volumes = 4 if channel == "ads" else 5
        title = "ADS" if channel == "ads" else "EMAIL (MPP-adjusted: human opens, machine opens excluded)"
        out.append(f"{title}: rates with {confidence * 100:g}% Wilson intervals in %, verdict vs benchmark")
        out.extend(_table(header, body, right=set(range(1, volumes))))
        for row in chosen:
            for note in row["notes"]:
                out.append(f"  {row['campaign']}: {note}")
        out.append("")
    if not rows:
        out.append("no campaigns yet")
    for err in errors:
        out.append(f"warning: could not read {err}")
    return "\n".join(out).rstrip() + "\n"


def _urls(values: Sequence[str] | None) -> list[str]:
    urls = [u.strip() for value in values or () for u in value.split(",") if u.strip()]
    if not urls:  # /campaigns is on the admin listener when there is one
        port = os.environ.get("PIPELINE_ADMIN_PORT") or os.environ.get("PIPELINE_PORT", "8080")
        urls = [f"http://127.0.0.1:{port}"]
    return [u if "://" in u else f"http://{u}" for u in urls]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        action="append",
        help="worker base URL(s), comma-separated or repeated "
        "(default http://127.0.0.1:$PIPELINE_ADMIN_PORT, else $PIPELINE_PORT)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per worker")


def main(args: argparse.Namespace) -> int:
    urls = _urls(args.url)
    campaigns, errors = asyncio.run(fetch_campaigns(urls, args.timeout))
    rows = build_rows(campaigns)
    if args.json:
        print(json.dumps({"campaigns": rows, "errors": errors}, indent=2))
    else:
        sys.stdout.write(format_report(rows, errors))
    if errors and len(errors) == len(urls):
        return 1  # nothing could be read
    return 3 if errors else 0
