"""``pipeline report``: its table checked as text, from canned ``/campaigns`` documents served
by tiny aiohttp servers on real sockets (the documents are built by the worker's own
``campaign_document`` and ``diagnose_view``)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from pipeline.diagnosis.diagnose import diagnose_view
from pipeline.diagnosis.report import build_rows, fetch_campaigns, format_report
from pipeline.http.server import campaign_document
from pipeline.kafka.tansu import free_port
from pipeline.rules.aggregate import CampaignView
from pipeline.settings import Settings

SETTINGS = Settings()


def document(view: CampaignView, watermark: float = 1000.0, diagnosed: bool = True) -> dict:
    view.watermark = watermark
    diagnosis = diagnose_view(view, SETTINGS, frozenset()) if diagnosed else None
    return json.loads(json.dumps(campaign_document(view, SETTINGS, frozenset(), diagnosis=diagnosis)))


def canned() -> list[dict]:
    return [
        document(
            CampaignView("ads", "display-low-ctr", {"impression": 100_000, "click": 1_000, "conversion": 60})
        ),
        document(CampaignView("ads", "search-thin", {"impression": 200, "click": 8, "conversion": 0})),
        document(
            CampaignView(
                "email",
                "newsletter-mpp",
                {
                    "delivery": 20_000,
                    "unique_open": 9_000,
                    "unique_human_open": 2_000,
                    "machine_open": 7_000,
                    "unique_click": 1_000,
                    "click": 1_300,
                    "conversion": 40,
                },
            )
        ),
    ]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[list[dict]], asyncio.Future]]:
    runners: list[web.AppRunner] = []

    async def start(campaigns: list[dict]) -> str:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response({"campaigns": campaigns})

        app = web.Application()
        app.router.add_get("/campaigns", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def test_table_content_from_canned_campaigns():
    text = format_report(build_rows(canned()))
    lines = text.splitlines()
    assert lines[0].startswith("ADS: rates with 95% Wilson intervals")
    header = lines[1]
    for column in ("campaign", "impressions", "clicks (bots)", "conversions", "CTR", "CVR", "bottleneck"):
        assert column in header
    assert "suggested fix" in header
    row = next(line for line in lines if line.startswith("display-low-ctr"))
    assert "100,000" in row and "1,000 (0)" in row
    assert "1.00% [0.94-1.06] low" in row  # CTR, its Wilson interval and the verdict
    assert "6.00% [4.69-7.65] ok" in row
    assert " ctr " in row and "the entrance: creative, headline and targeting" in row
    thin = next(line for line in lines if line.startswith("search-thin"))
    assert "insufficient_data" in thin and "more impressions needed" in thin
    assert "?" in thin  # undecided verdicts are marked
    assert "  display-low-ctr: benchmark ads:search (default): ctr 3.2-6.4%, cvr 3.8-7%" in lines
    assert any(
        line.startswith("  display-low-ctr: most to gain: ctr to 4.8% adds about 228") for line in lines
    )
    assert any(
        line.startswith("  search-thin: to judge cvr: ") and "more impressions)" in line for line in lines
    )

    email_title = next(i for i, line in enumerate(lines) if line.startswith("EMAIL"))
    assert "MPP-adjusted" in lines[email_title]
    assert "human openers (machine opens)" in lines[email_title + 1]
    row = next(line for line in lines if line.startswith("newsletter-mpp"))
    assert "20,000" in row and "2,000 (7,000)" in row
    assert "10.00% [9.59-10.42] low" in row  # human open rate, not the 45 % raw one
    assert "open_rate" in row and "subject line, sender name and deliverability" in row
    assert "45.00%" not in text


def test_report_without_diagnosis_still_shows_rates_with_intervals():
    doc = document(
        CampaignView("ads", "old-worker", {"impression": 10_000, "click": 300, "conversion": 9}),
        diagnosed=False,
    )
    text = format_report(build_rows([doc]))
    row = next(line for line in text.splitlines() if line.startswith("old-worker"))
    assert "3.00% [2.68-3.35]" in row and "not diagnosed" in row


def test_no_campaigns():
    assert "no campaigns yet" in format_report([])


async def test_fetch_from_several_workers_on_real_sockets(serve):
    docs = canned()
    stale = dict(docs[0], watermark=1.0, counts={**docs[0]["counts"], "impression": 5})
    first = await serve([docs[0], docs[2]])
    second = await serve([docs[1], stale])  # a stale copy of display-low-ctr after a rebalance
    dead = f"http://127.0.0.1:{free_port()}"
    campaigns, errors = await fetch_campaigns([first, second, dead], timeout=5)
    assert [(c["channel"], c["campaign_id"]) for c in campaigns] == [
        ("ads", "display-low-ctr"),
        ("ads", "search-thin"),
        ("email", "newsletter-mpp"),
    ]
    assert campaigns[0]["counts"]["impression"] == 100_000  # the newer copy won
    assert len(errors) == 1 and errors[0].startswith(dead)
    text = format_report(build_rows(campaigns), errors)
    assert f"warning: could not read {dead}" in text


async def test_pipeline_report_command(serve):
    url = await serve(canned())

    async def run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pipeline",
            "report",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await run("--url", url)
    assert code == 0, err
    assert "display-low-ctr" in out and "the entrance: creative, headline and targeting" in out
    assert "newsletter-mpp" in out and "open_rate" in out

    code, out, err = await run("--url", f"{url},127.0.0.1:{free_port()}", "--json")
    assert code == 3, err  # one worker unreadable: still a report, but not a clean exit
    doc = json.loads(out)
    assert len(doc["errors"]) == 1
    rows = {row["campaign"]: row for row in doc["campaigns"]}
    assert rows["display-low-ctr"]["bottleneck"] == "ctr"
    assert rows["display-low-ctr"]["rates"]["ctr"]["verdict"] == "low"
    assert rows["search-thin"]["bottleneck"] == "insufficient_data"
    assert rows["newsletter-mpp"]["rates"]["human_open_rate"]["value"] == pytest.approx(0.1)

    code, out, _ = await run("--url", f"127.0.0.1:{free_port()}")
    assert code == 1 and "warning: could not read" in out
