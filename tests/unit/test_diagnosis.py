"""Scenario tests of the funnel diagnosis: each ads quadrant, each e-mail case, MPP
and scanner clicks, the CTR/CVR trade-off, thin data, unsupported rates and the benchmarks file.

Default benchmarks: ads ``search`` (CTR 3.2-6.4 %, CVR 3.8-7.0 %); e-mail ``all`` (human open
rate 18.13-24.53 %, CTOR 10-14 %).
"""

from __future__ import annotations

import json

import pytest

from pipeline.diagnosis.benchmarks import DEFAULT_TABLE, BenchmarkError, table_for_env, table_from_mapping
from pipeline.diagnosis.diagnose import diagnose, diagnose_view, volume_needed, wilson
from pipeline.rules.aggregate import CampaignView
from pipeline.settings import Settings, SettingsError
from pipeline.worker import build_worker

SETTINGS = Settings(windows=(3600,), allowed_lateness=300)


def ads(**counts: int) -> CampaignView:
    return CampaignView("ads", "spring", totals=counts)


def email(
    delivery: int, human_openers: int, clickers: int, machine_only: int = 0, **more: int
) -> CampaignView:
    """An e-mail campaign; ``machine_only`` recipients were opened by a machine and nobody else."""
    counts = {
        "delivery": delivery,
        "unique_human_open": human_openers,
        "unique_open": human_openers + machine_only,
        "machine_open": machine_only,
        "unique_click": clickers,
        "click": clickers,
        "open": human_openers + machine_only,
        **more,
    }
    return CampaignView("email", "newsletter", totals=counts)


def check(doc: dict) -> dict:
    """What every diagnosis must satisfy, whatever its outcome."""
    assert set(doc) == {"bottleneck", "advice", "evidence"}
    assert doc["bottleneck"] in {"ctr", "cvr", "both", "none", "open_rate", "ctor", "insufficient_data"}
    advice = doc["advice"]
    # it becomes a Prometheus label read by the alert summaries: one short line, no quotes
    assert advice and "\n" not in advice and '"' not in advice and "'" not in advice
    assert len(advice) <= 120 and not advice.endswith(".")
    json.dumps(doc)  # /campaigns serialises it
    return doc


def run(view: CampaignView, unsupported: frozenset[str] = frozenset(), settings: Settings = SETTINGS) -> dict:
    return check(diagnose_view(view, settings, unsupported))


# ---- ads quadrants ----------------------------------------------------------------------


def test_ads_ctr_low_points_at_the_entrance():
    doc = run(ads(impression=100_000, click=1_000, conversion=60))  # CTR 1 %, CVR 6 %
    assert doc["bottleneck"] == "ctr"
    assert "creative" in doc["advice"] and "targeting" in doc["advice"]
    ev = doc["evidence"]
    assert ev["rates"]["ctr"]["verdict"] == "low" and ev["rates"]["cvr"]["verdict"] == "ok"
    assert ev["rates"]["ctr"]["interval"][1] < ev["rates"]["ctr"]["benchmark"]["low"]
    assert ev["levers"]["best"] == "ctr"
    # CTR to the 4.8 % midpoint at the current 6 % CVR: 100k x (4.8 % - 1 %) x 6 % = 228 more
    assert ev["levers"]["ctr"]["added_conversions"] == pytest.approx(228, abs=0.5)
    assert ev["levers"]["cvr"]["added_conversions"] == 0


def test_ads_cvr_low_points_at_the_receiving_end():
    doc = run(ads(impression=100_000, click=5_000, conversion=50))  # CTR 5 %, CVR 1 %
    assert doc["bottleneck"] == "cvr"
    assert "landing page" in doc["advice"] and "offer" in doc["advice"]
    assert doc["evidence"]["levers"]["best"] == "cvr"


def test_ads_both_low_fixes_ctr_first_and_landing_page_drop_offs():
    doc = run(ads(impression=200_000, click=2_000, conversion=10))  # CTR 1 %, CVR 0.5 %
    assert doc["bottleneck"] == "both"
    assert "CTR first" in doc["advice"] and "landing-page" in doc["advice"]
    levers = doc["evidence"]["levers"]
    assert levers["ctr"]["added_conversions"] > 0 and levers["cvr"]["added_conversions"] > 0


def test_ads_both_in_range_or_high_is_none():
    doc = run(ads(impression=100_000, click=5_000, conversion=300))  # CTR 5 %, CVR 6 %
    assert doc["bottleneck"] == "none"
    assert "scale" in doc["advice"]
    high = run(ads(impression=100_000, click=9_000, conversion=900))  # CTR 9 %, CVR 10 %: above
    assert high["bottleneck"] == "none"
    assert high["evidence"]["rates"]["ctr"]["verdict"] == "high"
    assert high["evidence"]["levers"]["best"] is None


def test_ads_conversion_identity_holds_in_the_evidence():
    doc = run(ads(impression=80_000, click=2_400, conversion=96))
    ev = doc["evidence"]
    ctr, cvr = ev["rates"]["ctr"]["value"], ev["rates"]["cvr"]["value"]
    assert ev["volumes"]["impression"] * ctr * cvr == pytest.approx(ev["volumes"]["conversion"])


def test_scanner_clicks_do_not_fake_a_receiving_end_problem():
    # 4 000 of the 8 000 clicks are link scanners: with them CTR looks high (8 %) and CVR low
    # (2.75 %); without them both are in range
    doc = run(ads(impression=100_000, click=8_000, bot_click=4_000, conversion=220))
    assert doc["bottleneck"] == "none"
    ev = doc["evidence"]
    assert ev["contract_rates"]["cvr"] == pytest.approx(0.0275)  # shown side by side
    assert ev["rates"]["cvr"]["value"] == pytest.approx(0.055)
    assert ev["volumes"]["human_click"] == 4_000


# ---- the trade-off ------------------------------------------------------------------------


def _with_window(view: CampaignView, window: dict[str, int], size: int = 3600) -> CampaignView:
    """Put ``window`` in the most recent complete window and add it to the totals."""
    view.watermark = 50 * size + 10
    shown = view.complete_window(size, SETTINGS.allowed_lateness)
    assert shown is not None
    view.windows = {size: {shown.start: dict(window)}}
    for key, value in window.items():
        view.totals[key] = view.totals.get(key, 0) + value
    return view


def test_trade_off_ctr_up_while_cvr_falls_is_flagged():
    rest = ads(impression=180_000, click=7_200, conversion=432)  # CTR 4 %, CVR 6 %
    view = _with_window(rest, {"impression": 20_000, "click": 1_600, "conversion": 24})  # 8 %, 1.5 %
    doc = run(view)
    trade = doc["evidence"]["trade_off"]
    assert trade["flag"] is True
    assert trade["windows"]["1h"]["z_ctr_up"] > 3 and trade["windows"]["1h"]["z_cvr_down"] > 3
    assert "CTR up while CVR falls" in doc["advice"]


def test_trade_off_not_flagged_when_steady_or_thin():
    steady = _with_window(
        ads(impression=180_000, click=7_200, conversion=432),
        {"impression": 20_000, "click": 820, "conversion": 48},
    )
    assert run(steady)["evidence"]["trade_off"]["flag"] is False
    # the window moves the same way but on a handful of clicks: not statistically meaningful
    thin = _with_window(
        ads(impression=180_000, click=7_200, conversion=432), {"impression": 100, "click": 8, "conversion": 0}
    )
    doc = run(thin)
    assert doc["evidence"]["trade_off"]["flag"] is False
    assert "CTR up" not in doc["advice"]


# ---- e-mail -------------------------------------------------------------------------------


def test_email_low_ctr_with_good_ctor_is_an_opens_problem():
    doc = run(email(20_000, human_openers=2_000, clickers=240))  # open 10 %, CTOR 12 %, CTR 1.2 %
    assert doc["bottleneck"] == "open_rate"
    assert "subject line" in doc["advice"] and "deliverability" in doc["advice"]
    rates = doc["evidence"]["rates"]
    assert rates["ctr"]["verdict"] == "low" and rates["human_ctor"]["verdict"] == "ok"
    assert doc["evidence"]["levers"]["best"] == "open_rate"


def test_email_low_ctor_is_a_content_problem():
    doc = run(email(20_000, human_openers=4_400, clickers=220))  # open 22 %, CTOR 5 %
    assert doc["bottleneck"] == "ctor"
    assert "copy" in doc["advice"] and "call to action" in doc["advice"]
    assert doc["evidence"]["levers"]["best"] == "ctor"


def test_email_both_low():
    doc = run(email(20_000, human_openers=2_000, clickers=100))  # open 10 %, CTOR 5 %
    assert doc["bottleneck"] == "both"


def test_email_healthy_is_none():
    doc = run(email(20_000, human_openers=4_400, clickers=550))  # open 22 %, CTOR 12.5 %
    assert doc["bottleneck"] == "none"


def test_machine_opens_do_not_make_a_campaign_look_fine():
    # 7 000 machine-only opens: raw open rate 45 % (above the range) and raw CTOR 11 % (in it)
    # would say "fine"; human open rate is 10 %
    doc = run(email(20_000, human_openers=2_000, clickers=1_000, machine_only=7_000))
    assert doc["bottleneck"] == "open_rate"
    ev = doc["evidence"]
    ranges = ev["benchmark"]["ranges"]
    assert ev["contract_rates"]["open_rate"] > ranges["open_rate"]["high"]
    assert ranges["ctor"]["low"] <= ev["contract_rates"]["ctor"] <= ranges["ctor"]["high"]
    assert ev["rates"]["human_open_rate"]["value"] == pytest.approx(0.10)


def test_machine_opens_do_not_fake_a_content_problem():
    # raw CTOR 550 / 12 000 = 4.6 % would blame the content; human CTOR is 12.5 %
    doc = run(email(20_000, human_openers=4_400, clickers=550, machine_only=7_600))
    assert doc["evidence"]["contract_rates"]["ctor"] < 0.05
    assert doc["bottleneck"] == "none"


def test_email_send_denominator_is_used_when_configured():
    view = email(0, human_openers=2_000, clickers=240, send=20_000)
    doc = run(view, settings=Settings(windows=(3600,), email_denominator="send"))
    assert doc["bottleneck"] == "open_rate"
    assert doc["evidence"]["rates"]["human_open_rate"]["unit"] == "send"


# ---- thin data ----------------------------------------------------------------------------


def test_thin_ads_data_is_insufficient_with_the_volume_still_needed():
    doc = run(ads(impression=200, click=8, conversion=0))
    assert doc["bottleneck"] == "insufficient_data"
    needed = doc["evidence"]["needed"]
    assert needed["more"] > 0 and needed["more_impression"] > 0
    assert "more impressions" in doc["advice"]
    for rate in doc["evidence"]["rates"].values():
        assert rate["verdict"] in ("undecided", "ok")


def test_thin_email_data_is_insufficient():
    doc = run(email(60, human_openers=9, clickers=1))
    assert doc["bottleneck"] == "insufficient_data"
    assert doc["evidence"]["needed"]["more_delivery"] > 0
    assert "more deliveries" in doc["advice"]


@pytest.mark.parametrize("channel", ["ads", "email"])
def test_a_campaign_without_events_is_insufficient_not_an_error(channel):
    doc = run(CampaignView(channel, "new", totals={}))
    assert doc["bottleneck"] == "insufficient_data"
    assert doc["evidence"]["needed"]["more"] > 0  # at a rate at the benchmark midpoint


def test_a_clearly_low_ctr_is_reported_while_cvr_is_still_undecided():
    doc = run(ads(impression=50_000, click=250, conversion=10))  # CTR 0.5 %, CVR 4 % on 250 clicks
    assert doc["bottleneck"] == "ctr"
    assert doc["evidence"]["rates"]["cvr"]["verdict"] == "undecided"
    assert doc["evidence"]["needed"]["rate"] == "cvr"


def test_volume_needed_is_the_volume_that_separates_the_interval():
    z = 1.959964
    p, low = 0.04, 0.032
    total = volume_needed(p, 100, low, z)
    assert total is not None and total > 100
    assert wilson(p * total, total, z)[0] >= low
    assert wilson(p * (total - 1), total - 1, z)[0] < low
    below = volume_needed(0.02, 50, low, z)
    assert below is not None and wilson(0.02 * below, below, z)[1] < low
    assert volume_needed(low, 100, low, z) is None  # on the bound: no volume will do


def _volume_by_plain_search(p: float, n: int, bound: float, z: float) -> int | None:
    """The search without its shortcut: doubling from ``n``, then bisecting."""

    def separated(total: float) -> bool:
        interval = wilson(p * total, total, z)
        assert interval is not None
        return interval[1] < bound if p < bound else interval[0] >= bound

    if p == bound or not 0 < bound < 1:
        return None
    lo, hi = n, max(2 * n, 1)
    while not separated(hi):
        lo, hi = hi, hi * 2
        if hi > 10**12:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if separated(mid):
            hi = mid
        else:
            lo = mid
    return hi


def test_volume_needed_gives_what_the_plain_search_gives():
    import random

    rng = random.Random(5)
    cases = [(0.04, 100, 0.032), (0.02, 50, 0.032), (0.5, 0, 0.3), (0.0, 10, 0.01), (1.0, 10, 0.99)]
    for _ in range(3000):
        n = rng.choice([0, 1, 7, 100, 2_500, 10**5, 10**7])
        k = rng.randint(0, n) if n else 0
        p = k / n if n else rng.random()
        cases.append((p, n, rng.choice([rng.random(), p + 1e-9, p - 1e-6, 0.5, 0.03])))
    for p, n, bound in cases:
        for z in (1.959964, 1.644854):
            assert volume_needed(p, n, bound, z) == _volume_by_plain_search(p, n, bound, z), (p, n, bound)


def test_more_data_at_the_same_rate_turns_insufficient_into_a_diagnosis():
    thin = run(ads(impression=2_000, click=56, conversion=3))  # CTR 2.8 %, CVR 5.4 %
    assert thin["bottleneck"] == "insufficient_data"
    more = thin["evidence"]["rates"]["ctr"]["more_needed"]
    n = 2_000 + more
    grown = run(ads(impression=n, click=round(n * 0.028), conversion=round(n * 0.028 * 0.054)))
    assert grown["evidence"]["rates"]["ctr"]["verdict"] == "low"
    assert grown["bottleneck"] == "ctr"


# ---- unsupported rates --------------------------------------------------------------------


def test_unsupported_rates_are_never_judged():
    doc = run(ads(impression=100_000, click=5_000, conversion=300), unsupported=frozenset({"ctr"}))
    assert doc["bottleneck"] == "insufficient_data"
    assert doc["evidence"]["rates"]["ctr"]["verdict"] == "unsupported"
    assert doc["evidence"]["rates"]["ctr"]["value"] is None
    assert "not supported" in doc["advice"]
    # postmark's unsupported total_ctr is not used by the diagnosis at all
    ok = run(email(20_000, human_openers=4_400, clickers=550), unsupported=frozenset({"total_ctr"}))
    assert ok["bottleneck"] == "none"


# ---- benchmarks ---------------------------------------------------------------------------


def test_default_table_carries_the_published_ctor_ranges():
    expected = {
        "nonprofit": (0.14, 0.18),
        "government": (0.13, 0.17),
        "education": (0.12, 0.16),
        "b2b_services": (0.12, 0.15),
        "healthcare": (0.11, 0.15),
        "finance": (0.10, 0.14),
        "media": (0.10, 0.14),
        "retail": (0.09, 0.13),
        "ecommerce": (0.08, 0.12),
        "travel": (0.08, 0.12),
    }
    for industry, (low, high) in expected.items():
        ctor = DEFAULT_TABLE.email[industry]["ctor"]
        assert (ctor.low, ctor.high) == (low, high)
        assert ctor.source and DEFAULT_TABLE.email[industry]["open_rate"].source
    table = table_from_mapping({"channels": {"email": {"email_type": "transactional"}}})
    ctor = table.for_campaign("email", "x").ranges["ctor"]
    assert (ctor.low, ctor.high) == (0.15, 0.25)
    for kind in ("search", "display", "social"):
        assert all(r.source for r in DEFAULT_TABLE.ads[kind].values())


def test_benchmarks_per_channel_and_per_campaign_from_the_env_file(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text(
        "channels:\n"
        "  email: {industry: nonprofit}\n"
        "campaigns:\n"
        "  email/receipts: {email_type: transactional}\n"
        "  display-7: {ads_type: display, ranges: {cvr: ['0.4%', '0.9%']}}\n"
    )
    settings = Settings.from_env({"PIPELINE_BENCHMARKS": str(path)})
    view = email(20_000, human_openers=5_000, clickers=600)  # CTOR 12 %: fine in general
    assert run(view, settings=settings)["bottleneck"] == "ctor"  # but low for a nonprofit (14-18 %)
    assert run(view, settings=Settings())["bottleneck"] == "none"
    receipts = CampaignView("email", "receipts", totals=dict(view.totals))
    doc = run(receipts, settings=settings)
    assert doc["evidence"]["benchmark"]["profile"] == "email:transactional"
    assert doc["evidence"]["benchmark"]["chosen_by"] == "campaign"
    display = CampaignView(
        "ads", "display-7", totals={"impression": 1_000_000, "click": 5_000, "conversion": 30}
    )
    doc = run(display, settings=settings)
    assert doc["evidence"]["benchmark"]["ranges"]["cvr"]["low"] == pytest.approx(0.004)
    assert doc["bottleneck"] == "none"  # CTR 0.5 % and CVR 0.6 % are in range for display ads


def test_json_benchmarks_file_with_explicit_ranges_and_a_custom_industry(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(
        json.dumps(
            {
                "confidence": 0.99,
                "industries": {"saas": {"open_rate": ["19%", "25%"], "ctor": [0.10, 0.13]}},
                "campaigns": {"newsletter": {"industry": "saas"}},
            }
        )
    )
    table = table_for_env({"PIPELINE_BENCHMARKS": str(path)})
    bench = table.for_campaign("email", "newsletter")
    assert bench.profile == "email:saas"
    assert bench.ranges["ctr"].low == pytest.approx(0.019)  # derived: 19 % x 10 %
    doc = diagnose(email(20_000, 4_400, 550), SETTINGS, table=table)
    assert doc["evidence"]["benchmark"]["confidence"] == 0.99


@pytest.mark.parametrize(
    "content",
    [
        '{"channels": {"email": {"industry": "astrology"}}}',
        '{"campaigns": {"x": {"ranges": {"ctr": [14, 18]}}}}',
        '{"campaigns": {"x": {"ranges": {"ctr": [0.2, 0.1]}}}}',
        '{"campaigns": {"ads/x": {"ranges": {"ctor": [0.1, 0.2]}}}}',
        '{"colour": "blue"}',
        "{not json",
    ],
)
def test_a_bad_benchmarks_file_stops_the_start(tmp_path, content):
    path = tmp_path / "bench.json"
    path.write_text(content)
    with pytest.raises(SettingsError):
        build_worker(Settings.from_env({"PIPELINE_BENCHMARKS": str(path)}))
    with pytest.raises(BenchmarkError):
        table_from_mapping(json.loads(content)) if content.startswith('{"') else table_for_env(
            {"PIPELINE_BENCHMARKS": str(path)}
        )


def test_missing_benchmarks_file_stops_the_start(tmp_path):
    with pytest.raises(SettingsError):
        build_worker(Settings.from_env({"PIPELINE_BENCHMARKS": str(tmp_path / "absent.yaml")}))
