"""Assertions shared by the integration tests: compare a worker's numbers with ground truth."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pipeline.simulation.traffic import Traffic, expected_rates, send


def late_ids(traffic: Traffic) -> list[str]:
    """The ids of the events the simulator sent late on purpose."""
    return [e["event_id"] for e in traffic.events if e["event_id"].endswith("-late")]


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


def metric_sum(url: str, name: str, **labels: str) -> float:
    """``name`` on ``url``'s ``/metrics``, summed over the samples that carry ``labels``."""
    wanted = set(labels.items())
    samples = scrape(url).items()
    return sum(value for (sample, tags), value in samples if sample == name and wanted <= set(tags))


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux /proc); none once it is gone."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


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


async def read_raw_topics(bootstrap: str) -> list[tuple[Any, int, Any]]:
    """Every record of the raw topics, each partition read to its end: (topic partition, the
    topic's partition count, aiokafka record), in offset order per partition."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from pipeline.bench.common import partitions_of
    from pipeline.kafka.tansu import true_end_offsets
    from pipeline.kafka.topics import RAW_TOPICS

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[Any, int, Any]] = []
    try:
        partitions = await partitions_of(bootstrap, list(RAW_TOPICS))
        tps = [TopicPartition(topic, p) for topic in RAW_TOPICS for p in partitions[topic]]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await true_end_offsets(bootstrap, await consumer.end_offsets(tps))
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            for tp, records in (await consumer.getmany(*pending, timeout_ms=1000)).items():
                out += [(tp, len(partitions[tp.topic]), record) for record in records]
                if records and records[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    return out


async def stored_events(bootstrap: str) -> Counter[tuple[str, str, str]]:
    """(channel, campaign, event id) of every event stored in the raw topics, copies included."""
    import orjson

    stored: Counter[tuple[str, str, str]] = Counter()
    for _tp, _count, record in await read_raw_topics(bootstrap):
        doc = orjson.loads(record.value)
        for event in doc if isinstance(doc, list) else [doc]:
            stored[(event["channel"], event["campaign_id"], event["event_id"])] += 1
    return stored


def count_stored_copies(bootstrap: str, traffic: Traffic) -> int:
    """Check that the broker holds every sent event, and add to the truth's duplicates every
    copy it holds beyond what was sent; returns how many such copies there were.

    A request answered 503 (the broker did not acknowledge in time) may still have been
    stored in part; the sender retries it, which is safe: the dedupe stage drops the second
    copy and counts it as a duplicate. Read from the log itself, event id by event id, so
    the expected duplicate counts stay exact and a lost event cannot hide behind a copy.
    """
    sent = Counter((e["channel"], e["campaign_id"], e["event_id"]) for e in traffic.events)
    stored = asyncio.run(stored_events(bootstrap))
    missing = {key: n - stored[key] for key, n in sent.items() if stored[key] < n}
    assert not missing, f"{len(missing)} acknowledged events not in the raw topics, e.g. {list(missing)[:3]}"
    extra = 0
    for (channel, campaign, event_id), n in stored.items():
        if (channel, campaign) not in traffic.campaigns:
            continue  # another run's, on the same broker
        copies = n - sent[(channel, campaign, event_id)]
        traffic.truth.duplicates[(channel, campaign)] += copies
        extra += copies
    return extra


COUNTED_EVENTS = ("impression", "click", "send", "delivery", "bounce", "open", "conversion")


def report(
    name: str, traffic: Traffic, acknowledged: int, docs: dict, stored_twice: int | None = None
) -> None:
    """Print a fault's figures, and append them to $PIPELINE_FAULT_REPORT when set."""
    compared = [
        (
            traffic.truth.expected(channel, campaign)["counts"],
            nonzero(docs[f"{channel}/{campaign}"]["counts"]),
        )
        for channel, campaign in traffic.campaigns
    ]
    report_counts(name, len(traffic.events), acknowledged, compared, stored_twice)


def report_counts(
    name: str,
    sent: int,
    acknowledged: int,
    compared: list[tuple[dict[str, int], dict[str, int]]],
    stored_twice: int | None = None,
) -> None:
    """The figures of :func:`report` from (expected counts, counted) pairs, one per campaign."""
    lost = doubled = counted = 0
    for want, got in compared:
        counted += sum(got.get(k, 0) for k in COUNTED_EVENTS)
        for key in set(want) | set(got):
            lost += max(0, want.get(key, 0) - got.get(key, 0))
            doubled += max(0, got.get(key, 0) - want.get(key, 0))
    figures = {
        "fault": name,
        "sent": sent,
        "acknowledged": acknowledged,
        "distinct_events_counted": counted,
        "lost": lost,
        "doubled": doubled,
    }
    if stored_twice is not None:  # copies of retried requests, dropped as duplicates
        figures["stored_twice_and_dropped"] = stored_twice
    print(json.dumps(figures))
    if os.environ.get("PIPELINE_FAULT_REPORT"):
        with open(os.environ["PIPELINE_FAULT_REPORT"], "a") as out:
            out.write(json.dumps(figures) + "\n")


class Sender(threading.Thread):
    """Sends a traffic run in order, retrying on 503 and dropped connections (always safe).

    With ``stops=n`` the run is cut into n + 1 equal parts, and after each of the first n the
    sender waits: :meth:`wait_stop` returns once part i is acknowledged, :meth:`resume` lets
    part i + 1 go. A fault injected between the two is one that events then stream through.
    """

    def __init__(self, url: str, events: list[dict], batch: int = 200, stops: int = 0) -> None:
        super().__init__(daemon=True)
        self.url, self.events, self.batch = url, events, batch
        self.acknowledged = 0
        self.error: BaseException | None = None
        self.reached = [threading.Event() for _ in range(stops)]
        self.resumed = [threading.Event() for _ in range(stops)]

    def run(self) -> None:
        parts = len(self.reached) + 1
        size = -(-len(self.events) // parts)
        try:
            for index in range(parts):
                part = self.events[index * size : (index + 1) * size]
                self.acknowledged += asyncio.run(send(self.url, part, self.batch, timeout=240))
                if index < len(self.reached):
                    self.reached[index].set()
                    self.resumed[index].wait()
        except BaseException as exc:
            self.error = exc
            for event in self.reached:
                event.set()

    def wait_stop(self, index: int, timeout: float = 300.0) -> None:
        assert self.reached[index].wait(timeout), f"part {index} not acknowledged within {timeout} s"
        assert self.error is None, self.error

    def resume(self, index: int) -> None:
        self.resumed[index].set()
