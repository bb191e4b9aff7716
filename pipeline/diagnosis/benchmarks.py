"""Benchmark ranges the diagnosis compares a campaign's rates with.

A *range* is ``[low, high]`` as fractions (0.12 = 12 %). A rate is "low" only when its whole
confidence interval lies below ``low`` and "high" only when it lies above ``high`` (see
:mod:`pipeline.diagnosis.diagnose`).

Default table
-------------
E-mail, marketing mail, per industry. Every e-mail rate is the MPP-adjusted one
(``human_open_rate``, ``human_ctor``), so open-rate ranges come from data collected before
Apple Mail Privacy Protection (Sept 2021) inflated opens.

* ``ctor`` (click-to-open): the published CTOR ranges per industry: nonprofit 14-18 %,
  government 13-17 %, education 12-16 %, B2B services 12-15 %, healthcare 11-15 %,
  finance 10-14 %, media 10-14 %, retail 9-13 %, e-commerce 8-12 %, travel 8-12 %;
  transactional mail 15-25 %. ``all`` (no industry configured) is 10-14 %, the median range.
* ``open_rate``: Mailchimp, "Email Marketing Benchmarks and Statistics by Industry" (2019
  data, all customers, pre-MPP), industry average +/- 15 % relative (e.g. retail 18.39 % ->
  15.6-21.1 %). Transactional mail is opened far more than marketing mail; 40-60 % is an
  approximate band from providers' published transactional figures (Postmark, Mailgun), not
  one authoritative study: configure your own if you rely on it.
* ``ctr`` (unique clickers / delivered): derived as ``open_rate x ctor`` (low x low,
  high x high), so that the diagnosis' identity CTR = open rate x CTOR holds for the
  benchmark too. Published CTR averages (Mailchimp: 2.62 % over all industries) sit inside or
  slightly below these products because they come from different panels than the CTOR ranges.

Ads, per profile (``ads_type``), the default being ``search``:

* ``search``: WordStream, "Google Ads Benchmarks for YOUR Industry" (2019, all industries:
  CTR 3.17 %, CVR 3.75 %) to LocalIQ/WordStream "Search Advertising Benchmarks" (2024: CTR
  6.42 %, CVR 6.96 %): CTR 3.2-6.4 %, CVR 3.8-7.0 %.
* ``display``: WordStream Google Display Network averages (CTR 0.46 %, CVR 0.77 %),
  +/- 25 % relative: CTR 0.35-0.6 %, CVR 0.55-1.0 %.
* ``social``: WordStream Facebook Ads benchmarks (2019: CTR 0.90 %, CVR 9.21 %) and
  LocalIQ/WordStream 2024 Facebook benchmarks (traffic CTR about 1.6 %, leads CVR about 7.7 %):
  CTR 0.9-1.6 %, CVR 7.7-9.2 %.

These are starting points. Your own history beats any industry average: put explicit ranges
in the benchmarks file.

Configuration (``PIPELINE_BENCHMARKS``)
---------------------------------------
``PIPELINE_BENCHMARKS`` names a JSON or YAML file (``.yml``/``.yaml``)::

    confidence: 0.95              # of the Wilson intervals, default 0.95
    channels:                     # per channel
      email: {industry: retail}
      ads: {ads_type: search}
    campaigns:                    # per campaign: "channel/campaign" or the bare campaign id
      email/receipts: {email_type: transactional}
      email/newsletter-7: {industry: nonprofit, ranges: {open_rate: ["20%", "28%"]}}
      spring-sale: {ads_type: display, ranges: {cvr: [0.004, 0.009]}}
    industries:                   # optional: add or replace e-mail industries
      saas: {open_rate: ["19%", "25%"], ctor: ["10%", "13%"]}

A campaign entry wins over its channel's entry, which wins over the built-in default
(``industry: all``, ``email_type: marketing``; ``ads_type: search``). ``ranges`` entries
override single rates; a value is a fraction (``0.12``) or a percentage string (``"12%"``).
Rate names: ``open_rate``, ``ctor``, ``ctr`` (e-mail); ``ctr``, ``cvr`` (ads).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.settings import SettingsError

log = logging.getLogger(__name__)

ENV_VAR = "PIPELINE_BENCHMARKS"
EMAIL_RATES = ("open_rate", "ctor", "ctr")
ADS_RATES = ("ctr", "cvr")

CTOR_SOURCE = "published CTOR ranges by industry"
MAILCHIMP = "Mailchimp 2019 industry average open rate (pre-MPP) +/- 15%"
DERIVED = "derived: open_rate range x ctor range"


class BenchmarkError(SettingsError):
    """The benchmarks file cannot be used."""


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    source: str = ""

    @property
    def mid(self) -> float:
        return round((self.low + self.high) / 2, 6)

    def as_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "mid": self.mid, "source": self.source}


def _around(mean: float, relative: float, source: str) -> Range:
    return Range(round(mean * (1 - relative), 4), round(mean * (1 + relative), 4), source)


# industry -> (Mailchimp 2019 average open rate, CTOR low, CTOR high)
_EMAIL_INDUSTRIES: dict[str, tuple[float, float, float]] = {
    "all": (0.2133, 0.10, 0.14),
    "nonprofit": (0.2517, 0.14, 0.18),
    "government": (0.2877, 0.13, 0.17),
    "education": (0.2342, 0.12, 0.16),
    "b2b_services": (0.2194, 0.12, 0.15),  # Mailchimp "Professional Services"
    "healthcare": (0.2172, 0.11, 0.15),  # Mailchimp "Medical, Dental, and Healthcare"
    "finance": (0.2156, 0.10, 0.14),  # Mailchimp "Business and Finance"
    "media": (0.2215, 0.10, 0.14),  # Mailchimp "Media and Publishing"
    "retail": (0.1839, 0.09, 0.13),
    "ecommerce": (0.1568, 0.08, 0.12),
    "travel": (0.2044, 0.08, 0.12),  # Mailchimp "Travel and Transportation"
}
_ALIASES = {
    "e-commerce": "ecommerce",
    "b2b": "b2b_services",
    "b2b services": "b2b_services",
    "b2b-services": "b2b_services",
    "non-profit": "nonprofit",
}


def _email_profile(open_rate: Range, ctor: Range) -> dict[str, Range]:
    ctr = Range(round(open_rate.low * ctor.low, 5), round(open_rate.high * ctor.high, 5), DERIVED)
    return {"open_rate": open_rate, "ctor": ctor, "ctr": ctr}


DEFAULT_EMAIL: dict[str, dict[str, Range]] = {
    name: _email_profile(_around(mean, 0.15, MAILCHIMP), Range(low, high, CTOR_SOURCE))
    for name, (mean, low, high) in _EMAIL_INDUSTRIES.items()
}
TRANSACTIONAL: dict[str, Range] = _email_profile(
    Range(0.40, 0.60, "approximate transactional open-rate band (Postmark, Mailgun reports)"),
    Range(0.15, 0.25, "published transactional CTOR range"),
)
DEFAULT_ADS: dict[str, dict[str, Range]] = {
    "search": {
        "ctr": Range(0.032, 0.064, "WordStream 2019 (3.17%) to LocalIQ/WordStream 2024 (6.42%) search CTR"),
        "cvr": Range(0.038, 0.070, "WordStream 2019 (3.75%) to LocalIQ/WordStream 2024 (6.96%) search CVR"),
    },
    "display": {
        "ctr": Range(0.0035, 0.006, "WordStream Google Display Network average CTR 0.46% +/- 25%"),
        "cvr": Range(0.0055, 0.010, "WordStream Google Display Network average CVR 0.77% +/- 25%"),
    },
    "social": {
        "ctr": Range(0.009, 0.016, "WordStream 2019 (0.90%) to LocalIQ 2024 (about 1.6%) Facebook CTR"),
        "cvr": Range(0.077, 0.092, "LocalIQ 2024 (about 7.7%) to WordStream 2019 (9.21%) Facebook CVR"),
    },
}


@dataclass(frozen=True)
class Benchmark:
    """The ranges that apply to one campaign, and how they were chosen."""

    profile: str  # e.g. "email:retail", "email:transactional", "ads:search"
    ranges: Mapping[str, Range]
    chosen_by: str = "default"  # "default", "channel" or "campaign"

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "chosen_by": self.chosen_by,
            "ranges": {rate: r.as_dict() for rate, r in self.ranges.items()},
        }


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError as exc:
            raise BenchmarkError(f"{where}: not a rate: {value!r}") from exc
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        raise BenchmarkError(f"{where}: not a rate: {value!r}")
    if not 0 <= number <= 1:
        raise BenchmarkError(f"{where}: {value!r} is not within 0..1 (write 0.12 or '12%')")
    return number


def _range(value: Any, where: str, source: str) -> Range:
    if isinstance(value, Mapping):
        low, high = value.get("low"), value.get("high")
        source = str(value.get("source", source))
    elif isinstance(value, list | tuple) and len(value) == 2:
        low, high = value
    else:
        raise BenchmarkError(f"{where}: a range is [low, high] or {{low: .., high: ..}}, not {value!r}")
    lo, hi = _fraction(low, where), _fraction(high, where)
    if not 0 < lo < hi < 1:
        raise BenchmarkError(f"{where}: need 0 < low < high < 1, got {lo} and {hi}")
    return Range(lo, hi, source)


@dataclass(frozen=True)
class BenchmarkTable:
    """Built-in ranges plus the per-channel and per-campaign choices of the benchmarks file."""

    email: Mapping[str, Mapping[str, Range]] = field(default_factory=lambda: DEFAULT_EMAIL)
    ads: Mapping[str, Mapping[str, Range]] = field(default_factory=lambda: DEFAULT_ADS)
    channels: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    campaigns: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    confidence: float = 0.95
    origin: str = "built-in defaults"

    def for_campaign(self, channel: str, campaign: str) -> Benchmark:
        entry: Mapping[str, Any] = {}
        chosen_by = "default"
        if channel in self.channels:
            entry, chosen_by = self.channels[channel], "channel"
        for key in (f"{channel}/{campaign}", campaign):
            if key in self.campaigns:
                entry, chosen_by = {**entry, **self.campaigns[key]}, "campaign"
                break
        if channel == "ads":
            kind = str(entry.get("ads_type", "search"))
            ranges = dict(self.ads[kind])
            profile = f"ads:{kind}"
        else:
            if entry.get("email_type", "marketing") == "transactional":
                kind = "transactional"
                ranges = dict(TRANSACTIONAL)
            else:
                kind = _industry(entry.get("industry", "all"))
                ranges = dict(self.email[kind])
            profile = f"email:{kind}"
        overrides = entry.get("ranges") or {}
        ranges.update(overrides)
        if (
            channel == "email"
            and ("open_rate" in overrides or "ctor" in overrides)
            and "ctr" not in overrides
        ):
            ranges["ctr"] = _email_profile(ranges["open_rate"], ranges["ctor"])["ctr"]
        return Benchmark(profile, ranges, chosen_by)

    def as_dict(self) -> dict[str, Any]:
        return {"confidence": self.confidence, "origin": self.origin}


def _industry(name: Any) -> str:
    key = str(name).strip().lower()
    return _ALIASES.get(key, key.replace(" ", "_").replace("-", "_"))


def _entry(value: Any, where: str, table: BenchmarkTable, channel: str | None) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise BenchmarkError(f"{where}: expected a mapping, got {value!r}")
    known = {"industry", "email_type", "ads_type", "ranges"}
    unknown = set(value) - known
    if unknown:
        raise BenchmarkError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    entry: dict[str, Any] = {}
    if "industry" in value:
        industry = _industry(value["industry"])
        if industry not in table.email:
            raise BenchmarkError(
                f"{where}: unknown industry {value['industry']!r} (known: {sorted(table.email)})"
            )
        entry["industry"] = industry
    if "email_type" in value:
        if value["email_type"] not in ("marketing", "transactional"):
            raise BenchmarkError(f"{where}: email_type is 'marketing' or 'transactional'")
        entry["email_type"] = value["email_type"]
    if "ads_type" in value:
        if value["ads_type"] not in table.ads:
            raise BenchmarkError(
                f"{where}: unknown ads_type {value['ads_type']!r} (known: {sorted(table.ads)})"
            )
        entry["ads_type"] = value["ads_type"]
    ranges = value.get("ranges") or {}
    if not isinstance(ranges, Mapping):
        raise BenchmarkError(f"{where}.ranges: expected a mapping")
    allowed = {"email": set(EMAIL_RATES), "ads": set(ADS_RATES)}.get(
        channel or "", set(EMAIL_RATES + ADS_RATES)
    )
    for rate in ranges:
        if rate not in allowed:
            raise BenchmarkError(f"{where}.ranges: unknown rate {rate!r} (known: {sorted(allowed)})")
    entry["ranges"] = {
        rate: _range(v, f"{where}.ranges.{rate}", f"configured ({where})") for rate, v in ranges.items()
    }
    return entry


def table_from_mapping(doc: Any, origin: str = "mapping") -> BenchmarkTable:
    """Validate a parsed benchmarks document into a table; raises :class:`BenchmarkError`."""
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise BenchmarkError(f"{origin}: the top level must be a mapping")
    unknown = set(doc) - {"confidence", "channels", "campaigns", "industries"}
    if unknown:
        raise BenchmarkError(f"{origin}: unknown keys {sorted(unknown)}")
    confidence = float(doc.get("confidence", 0.95))
    if not 0.5 <= confidence < 1:
        raise BenchmarkError(f"{origin}: confidence must be within 0.5..1, got {confidence}")
    email = dict(DEFAULT_EMAIL)
    for name, value in (doc.get("industries") or {}).items():
        where = f"industries.{name}"
        if not isinstance(value, Mapping) or "open_rate" not in value or "ctor" not in value:
            raise BenchmarkError(f"{where}: needs open_rate and ctor ranges")
        source = f"configured ({origin})"
        profile = _email_profile(
            _range(value["open_rate"], where, source), _range(value["ctor"], where, source)
        )
        if "ctr" in value:
            profile["ctr"] = _range(value["ctr"], where, source)
        email[_industry(name)] = profile
    table = BenchmarkTable(email=email, confidence=confidence, origin=origin)
    channels = {}
    for channel, value in (doc.get("channels") or {}).items():
        if channel not in ("ads", "email"):
            raise BenchmarkError(f"channels: unknown channel {channel!r}")
        channels[channel] = _entry(value, f"channels.{channel}", table, channel)
    campaigns = {}
    for key, value in (doc.get("campaigns") or {}).items():
        key = str(key)
        channel = key.split("/", 1)[0] if key.split("/", 1)[0] in ("ads", "email") and "/" in key else None
        campaigns[key] = _entry(value, f"campaigns.{key}", table, channel)
    return BenchmarkTable(
        email=email,
        channels=channels,
        campaigns=campaigns,
        confidence=confidence,
        origin=origin,
    )


def load_file(path: str | Path) -> BenchmarkTable:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BenchmarkError(f"{ENV_VAR}: cannot read {path}: {exc}") from exc
    try:
        if path.suffix.lower() in (".yml", ".yaml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:
        raise BenchmarkError(f"{ENV_VAR}: {path} does not parse: {exc}") from exc
    return table_from_mapping(doc, origin=str(path))


DEFAULT_TABLE = BenchmarkTable()
_cache: dict[str, tuple[int, BenchmarkTable]] = {}


def table_for_env(env: Mapping[str, str]) -> BenchmarkTable:
    """The table ``PIPELINE_BENCHMARKS`` names (re-read when the file changes), or the defaults."""
    path = env.get(ENV_VAR)
    if not path:
        return DEFAULT_TABLE
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError as exc:
        cached = _cache.get(path)
        if cached is not None:
            return cached[1]  # the file went away while running: keep the last good table
        raise BenchmarkError(f"{ENV_VAR}: cannot read {path}: {exc}") from exc
    cached = _cache.get(path)
    if cached is None or cached[0] != stamp:
        try:
            _cache[path] = (stamp, load_file(path))
        except BenchmarkError as exc:
            if cached is None:
                raise
            log.warning("%s; keeping the benchmarks loaded before", exc)
            return cached[1]  # an edit in progress or a typo: keep serving the last good table
    return _cache[path][1]
