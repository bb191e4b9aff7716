"""The pure dedupe/aggregate rules against the simulator's ground truth (no broker)."""

from __future__ import annotations

import random

import orjson
import pytest
from helpers import late_ids

from pipeline.events import routing_key, validate_event
from pipeline.kafka.topics import TOPIC_CODES, partition_for, partition_of_key, raw_topic
from pipeline.rules.aggregate import combine
from pipeline.rules.dedupe import apply_event, stamp_of
from pipeline.simulation.traffic import generate
from pipeline.state.codec import Partial, SubscriberRecord, decode_record, encode_record

WINDOWS = (300, 3600)


def run_rules(events, partitions=4, replay_every=0, seed=0):
    """Apply events the way the dedupe agent does: per partition, per topic offsets."""
    rng = random.Random(seed)
    records: dict[tuple[int, str], SubscriberRecord] = {}
    partials: dict[tuple[int, str], Partial] = {}
    offsets: dict[tuple[str, int], int] = {}
    log = []
    for raw in events:
        event = validate_event(dict(raw), now=raw["timestamp"] + 10, max_future_skew=300)
        topic = raw_topic(event["type"])
        partition = partition_for(routing_key(event), partitions)
        offset = offsets[(topic, partition)] = offsets.get((topic, partition), -1) + 1
        log.append((event, partition, stamp_of(TOPIC_CODES[topic], offset, 0)))
    for i, (event, partition, stamp) in enumerate(log):
        rkey = (partition, f"{event['channel']}|{event['campaign_id']}|{routing_key(event)}")
        ckey = (partition, f"{event['channel']}|{event['campaign_id']}")
        record = records.setdefault(rkey, SubscriberRecord())
        partial = partials.setdefault(ckey, Partial())
        apply_event(event, stamp, record, partial, now=0, windows=WINDOWS, lateness=300)
        if replay_every and rng.random() < replay_every:
            # a crash replays the last few events: nothing may change
            for event2, partition2, stamp2 in log[max(0, i - 5) : i + 1]:
                rkey2 = (partition2, f"{event2['channel']}|{event2['campaign_id']}|{routing_key(event2)}")
                ckey2 = (partition2, f"{event2['channel']}|{event2['campaign_id']}")
                apply_event(
                    event2, stamp2, records[rkey2], partials[ckey2], now=0, windows=WINDOWS, lateness=300
                )
    by_campaign: dict[str, list] = {}
    for (_partition, ckey), partial in partials.items():
        by_campaign.setdefault(ckey, []).append(partial)
    return {ckey: combine(*ckey.split("|", 1), snaps) for ckey, snaps in by_campaign.items()}


@pytest.mark.parametrize("replay", [0, 0.2])
def test_rules_match_ground_truth(replay):
    traffic = generate(seed=7, subscribers=900, start=1_700_000_000)
    views = run_rules(traffic.events, replay_every=replay)
    for channel, campaign in traffic.campaigns:
        expected = traffic.truth.expected(channel, campaign)
        view = views[f"{channel}|{campaign}"]
        assert {k: v for k, v in view.totals.items() if v} == expected["counts"]
        assert view.late == expected["late"]
        assert view.duplicates == expected["duplicates"]
        got_windows = {
            f"{size}:{start}": {k: v for k, v in counts.items() if v}
            for size, starts in view.windows.items()
            for start, counts in starts.items()
        }
        assert got_windows == {k: v for k, v in expected["windows"].items() if v}


def test_redelivery_dropped_up_to_the_48h_horizon():
    """Event ids are remembered for the retention (48 h by default) in wall-clock time."""
    from pipeline.state.codec import NAME_BITS

    event = validate_event(
        {
            "event_id": "x1",
            "type": "click",
            "channel": "email",
            "campaign_id": "c",
            "subscriber_id": "s",
            "timestamp": 1_700_000_000,
        },
        now=1_700_000_100,
        max_future_skew=300,
    )
    record, partial = SubscriberRecord(), Partial()
    t0 = 1_700_000_100
    apply_event(event, stamp_of(0, 1, 0), record, partial, now=t0, windows=WINDOWS, lateness=300)
    for hours, offset in ((1, 2), (24, 3), (47.9, 4)):
        record.prune(t0 + hours * 3600, 48 * 3600, partial.evicted)
        apply_event(
            event,
            stamp_of(0, offset, 0),
            record,
            partial,
            now=t0 + hours * 3600,
            windows=WINDOWS,
            lateness=300,
        )
    assert partial.totals == {"click": 1, "unique_click": 1, "unique_open": 1, "unique_human_open": 1}
    assert partial.duplicates == 3
    record.prune(t0 + 48.1 * 3600, 48 * 3600, partial.evicted)
    assert "x1" not in record.ids  # forgotten after the horizon: state stays bounded
    assert record.unique & NAME_BITS["click"]  # while uniqueness is kept for the campaign's lifetime


def test_click_seconds_after_delivery_is_a_scanner():
    """The heuristic marks an unflagged e-mail click within 2 s of delivery as a bot's click:
    totals keep it, human counts exclude it, and a replay decides the same."""
    record, partial = SubscriberRecord(), Partial()
    base = {"channel": "email", "campaign_id": "c", "subscriber_id": "s"}
    delivery = {**base, "event_id": "d", "type": "delivery", "timestamp": 1000.0}
    scanner = {**base, "event_id": "k1", "type": "click", "timestamp": 1001.5}
    reader = {**base, "event_id": "k2", "type": "click", "timestamp": 1090.0}
    kwargs = {"now": 0, "windows": WINDOWS, "lateness": 300, "bot_click_seconds": 2.0}
    apply_event(delivery, stamp_of(0, 0, 0), record, partial, **kwargs)
    apply_event(scanner, stamp_of(1, 0, 0), record, partial, **kwargs)
    assert partial.totals == {"delivery": 1, "click": 1, "bot_click": 1, "unique_click": 1, "unique_open": 1}
    # replay after a crash: the partial is older, the record already holds the decision
    replay = Partial()
    apply_event(delivery, stamp_of(0, 0, 0), record, replay, **kwargs)
    apply_event(scanner, stamp_of(1, 0, 0), record, replay, **kwargs)
    assert replay.totals == partial.totals
    apply_event(reader, stamp_of(1, 1, 0), record, partial, **kwargs)
    assert partial.totals["click"] == 2 and partial.totals["bot_click"] == 1
    assert partial.totals["unique_human_open"] == 1  # the reader, not the scanner


def test_records_written_before_int_stamps_keep_their_decisions():
    """A record stored by the earlier format ([topic, position] pairs under "i") is upgraded on
    read: a replay of its event recomputes the same contribution, a redelivery is a duplicate."""
    from pipeline.rules.dedupe import STAMP_SPAN

    old = {
        "i": {"e1": [3, 5 * STAMP_SPAN + 2, 0, 1_700_000_000]},
        "u": {"click": [3, 5 * STAMP_SPAN + 2], "open": [3, 5 * STAMP_SPAN + 2]},
        "w": {"300:1699999800": {"click": [3, 5 * STAMP_SPAN + 2]}},
        "o": {},
    }
    record = decode_record(orjson.dumps(old), [300])
    assert record.ids["e1"][0] == stamp_of(3, 5, 2)
    click = {
        "event_id": "e1",
        "type": "click",
        "channel": "ads",
        "campaign_id": "c",
        "subscriber_id": "s",
        "timestamp": 1_700_000_000.0,
    }
    replay = Partial()
    kwargs = {"now": 1_700_000_000, "windows": (300,), "lateness": 300}
    assert not apply_event(click, stamp_of(3, 5, 2), record, replay, **kwargs)  # nothing new to store
    assert replay.totals == {"click": 1, "unique_click": 1}
    assert replay.windows["300:1699999800"] == {"click": 1, "unique_click": 1}
    redelivery = Partial()
    apply_event(click, stamp_of(3, 9, 0), record, redelivery, **kwargs)
    assert redelivery.totals == {} and redelivery.duplicates == 1
    assert orjson.loads(encode_record(record, [300]))[2]["e1"][0] == stamp_of(3, 5, 2)


def test_records_with_a_stamp_per_flag_keep_their_decisions():
    """A record stored with a stamp per count and window (before flag words) is upgraded on
    read: replaying each of its events recomputes exactly what that event contributed, in the
    lifetime counts and in every window, and later events see the flags it set."""
    first, second = stamp_of(1, 7, 0), stamp_of(1, 8, 0)
    old = {
        "e": {"k1": [first, 0, 1_700_000_000], "o1": [second, 0, 1_700_000_000]},
        # k1 (a click) made the subscriber a clicker, opener and reader, in both windows; o1
        # (an open, a later 5m window) made it an opener and reader of that 5m window only
        "u": {"click": first, "open": first, "human_open": first},
        "w": {
            "300:1699999800": {"click": first, "open": first, "human_open": first},
            "3600:1699999200": {"click": first, "open": first, "human_open": first},
            "300:1700000100": {"open": second, "human_open": second},
        },
        "o": {},
    }
    record = decode_record(orjson.dumps(old), [300, 3600])
    base = {"channel": "email", "campaign_id": "c", "subscriber_id": "s"}
    click = {**base, "event_id": "k1", "type": "click", "timestamp": 1_700_000_000.0}
    opened = {**base, "event_id": "o1", "type": "open", "timestamp": 1_700_000_200.0}
    kwargs = {"now": 1_700_000_300, "windows": (300, 3600), "lateness": 300}
    replay = Partial()
    assert not apply_event(click, first, record, replay, **kwargs)
    assert not apply_event(opened, second, record, replay, **kwargs)
    assert replay.totals == {
        "click": 1,
        "open": 1,
        "unique_click": 1,
        "unique_open": 1,
        "unique_human_open": 1,
    }
    assert replay.windows == {
        "300:1699999800": {"click": 1, "unique_click": 1, "unique_open": 1, "unique_human_open": 1},
        "3600:1699999200": {
            "click": 1,
            "open": 1,
            "unique_click": 1,
            "unique_open": 1,
            "unique_human_open": 1,
        },
        "300:1700000100": {"open": 1, "unique_open": 1, "unique_human_open": 1},
    }
    again = Partial()  # a new open in the same windows adds no unique count
    apply_event({**opened, "event_id": "o2"}, stamp_of(1, 9, 0), record, again, **kwargs)
    assert again.totals == {"open": 1}


def test_the_simulators_truth_equals_the_stream_oracle():
    """The generator counts its stories; the shared oracle counts the stream as sent (with its
    redeliveries and repeated orders): the same truth for every campaign."""
    from pipeline.simulation.truth import from_stream

    traffic = generate(seed=9, subscribers=700, start=1_700_000_000)
    stream = from_stream(traffic.events, traffic.truth.windows, late_ids(traffic))
    for channel, campaign in traffic.campaigns:
        assert stream.expected(channel, campaign) == traffic.truth.expected(channel, campaign)


def test_partitioner_is_kafkas_murmur2() -> None:
    """The C partitioner gives every key the partition aiokafka's (the Java client's) gives it."""
    import random

    from aiokafka.partitioner import murmur2

    rng = random.Random(3)
    keys = ["", "s0001234", "h:" + "ab" * 16, "#ev-1", "Zoë ☃ 𝄞", "\udc80x"]
    keys += ["".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 40))) for _ in range(3000)]
    for key in keys:
        data = key.encode("utf-8", "surrogatepass")
        for partitions in (1, 4, 7, 12):
            assert partition_for(key, partitions) == (murmur2(data) & 0x7FFFFFFF) % partitions, key


def test_snapshots_go_where_a_keyed_send_puts_them() -> None:
    """Snapshots sent as record batches land on the partition aiokafka's default partitioner
    (what a keyed ``topic.send`` uses) chooses for their campaign key."""
    from aiokafka.partitioner import DefaultPartitioner

    from pipeline.state.codec import campaign_key

    keys = [campaign_key(channel, f"camp-{n}") for n in range(500) for channel in ("email", "ads")]
    keys += [campaign_key("email", "Zoë ☃ 𝄞"), b""]
    for key in keys:
        for partitions in (1, 4, 7, 12):
            assert partition_of_key(key, partitions) == DefaultPartitioner()(
                key, list(range(partitions)), []
            ), key


def test_a_snapshot_is_kept_only_when_newer() -> None:
    """An equal seq is the same partial (a resend or a replay): the campaign is not rewritten."""
    from pipeline.rules.aggregate import merge_snapshot
    from pipeline.state.codec import Partial

    stored: dict[int, Partial] = {}
    assert merge_snapshot(stored, 1, Partial(seq=5, totals={"click": 5}))
    assert not merge_snapshot(stored, 1, Partial(seq=5, totals={"click": 5}))
    assert not merge_snapshot(stored, 1, Partial(seq=4, totals={"click": 4}))
    assert merge_snapshot(stored, 1, Partial(seq=6, totals={"click": 6}))
    assert stored[1].totals == {"click": 6}
