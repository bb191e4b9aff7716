"""Assertions shared by the integration tests: compare a worker's numbers with ground truth."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pipeline.simulate import Traffic, expected_rates


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def campaign_doc(urls: list[str], channel: str, campaign: str) -> dict[str, Any] | None:
    """The campaign as its owner reports it (exactly one worker owns it)."""
    found = []
    for url in urls:
        resp = httpx.get(f"{url}/campaigns/{channel}/{quote(campaign, safe='')}", timeout=10)
        if resp.status_code == 200:
            found.append(resp.json())
        else:
            assert resp.status_code == 404, resp.text
    assert len(found) <= 1, f"{channel}/{campaign} exported by {len(found)} workers"
    return found[0] if found else None


def wait_for_counts(urls: list[str], traffic: Traffic, timeout: float = 120.0) -> dict[str, dict[str, Any]]:
    """Poll until every campaign's lifetime counts, duplicates and late events equal the truth;
    return the documents."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while True:
        docs = {}
        for channel, campaign in traffic.campaigns:
            doc = campaign_doc(urls, channel, campaign)
            expected = traffic.truth.expected(channel, campaign)
            got = doc and (nonzero(doc["counts"]), doc["duplicates_dropped"], doc["late_events"])
            want = (expected["counts"], expected["duplicates"], expected["late"])
            if got != want:  # redeliveries may still be on their way after the last original
                last = {"campaign": campaign, "got (counts, duplicates, late)": got, "want": want}
                break
            docs[f"{channel}/{campaign}"] = doc
        else:
            return docs
        if time.monotonic() > deadline:
            raise AssertionError(f"counts did not converge: {last}")
        time.sleep(0.5)


def assert_exact(docs: dict[str, dict[str, Any]], traffic: Traffic, denominator: str = "delivery") -> None:
    """Every count, every retained window and every rate equals the ground truth."""
    for channel, campaign in traffic.campaigns:
        doc = docs[f"{channel}/{campaign}"]
        want = traffic.truth.expected(channel, campaign)
        assert nonzero(doc["counts"]) == want["counts"]
        assert doc["duplicates_dropped"] == want["duplicates"], (campaign, doc["duplicates_dropped"])
        assert doc["late_events"] == want["late"], (campaign, doc["late_events"])
        assert rates_equal(doc["rates"]["all"], expected_rates(channel, doc["counts"], denominator))
        assert rates_equal(doc["rates"]["all"], expected_rates(channel, want["counts"], denominator))
        checked = 0
        for label, windows in doc["window_history"].items():
            for window in windows:
                size = window["end"] - window["start"]
                key = f"{size}:{window['start']}"
                assert nonzero(window["counts"]) == want["windows"].get(key, {}), (
                    label,
                    key,
                    nonzero(window["counts"]),
                    want["windows"].get(key),
                )
                assert rates_equal(
                    window["rates"], expected_rates(channel, want["windows"].get(key, {}), denominator)
                )
                checked += 1
        assert checked >= 5, "too few windows retained to mean anything"
        for label, shown in doc["windows"].items():
            key = f"{shown['end'] - shown['start']}:{shown['start']}"
            assert nonzero(shown["counts"]) == want["windows"].get(key, {}), label


def rates_equal(got: dict[str, float | None], want: dict[str, float | None]) -> bool:
    assert set(got) == set(want), (got, want)
    for name, value in want.items():
        if value is None:
            assert got[name] is None, name
        else:
            assert got[name] is not None and abs(got[name] - value) < 1e-12, (name, got[name], value)
    return True


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False
