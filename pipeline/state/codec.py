"""Every format that is stored in a table or crosses a topic, and the keys they are stored under.

Nothing else in the package builds or parses these bytes: the dedupe stage, the aggregate
stage, ``/metrics``, ``/campaigns`` and the bench all go through this module. What it owns:

===================  =========================================  ==================================
what                 key                                        value
===================  =========================================  ==================================
subscriber record    :func:`record_key` (JSON array)            :func:`encode_record` (format 3)
partial              :func:`partial_key` ``partition|campaign``  :func:`encode_partial` (format 2)
snapshot (topic)     none (explicit partition)                  :func:`encode_snapshots` (format 3)
campaign (table)     :func:`campaign_key`                       :func:`encode_campaign` (format 2)
window (in values)   :func:`window_key` ``size:start``          --
===================  =========================================  ==================================

**Keys cannot collide** for any ids the schema accepts (any string of 1 to 256 characters):

* a record key is the JSON array ``[channel, campaign, subscriber]`` (or ``[channel, campaign,
  null, event_id]`` for an event without subscriber): JSON string escaping is injective, so
  two different id tuples never give the same bytes, whatever the ids contain;
* a campaign key is ``channel|campaign``: the channel is one of the schema's enum values,
  none of which contains ``|``, so the first ``|`` always ends it and the rest is the
  campaign, whatever it contains (it is also the partials topic's partitioning key, kept as
  it was so campaigns stay on their partitions);
* a partial key is ``partition|campaign key``: the partition is decimal digits;
* a window key is ``size:start``, two integers.

Records of format 2 and earlier were stored under ``channel|campaign|subscriber``, which two
different (campaign, subscriber) pairs could share when an id contained ``|``. They are read
and moved to their new key as they are met (:func:`legacy_record_key`), see the dedupe stage.

**Versions.** Every value written carries its format number; values written before formats
had numbers are recognised by their shape once, here, and upgraded on read. A record also
stores the window sizes its decisions refer to (its *sizes*): the bits of size ``i`` in its
decision and gained words belong to ``sizes[i]`` of the record, not of the configuration, so
``PIPELINE_WINDOWS`` may change between runs, even across a crash (:func:`decode_record`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

_loads = orjson.loads
_dumps = orjson.dumps

RECORD_FORMAT = 3
PARTIAL_FORMAT = 2
SNAPSHOT_FORMAT = 3  # a message of many snapshots; 1 and 2 carried one
CAMPAIGN_FORMAT = 2

Stamp = int  # an event's position: see pipeline.rules.dedupe.stamp_of

UNIQUE_EVENTS = ("click", "open", "human_open", "conversion")
# Bit of each distinct-subscriber count in a record's flag words, in UNIQUE_EVENTS order.
NAME_BITS = {name: 1 << index for index, name in enumerate(UNIQUE_EVENTS)}
NAME_SPAN = len(UNIQUE_EVENTS)  # the flags an event gained in window i: bits (i + 1) * NAME_SPAN on
NAME_BITS_ALL = (1 << NAME_SPAN) - 1

# An id entry's decision word: bit i (i < MAX_WINDOW_SIZES) = too late for window size i;
# HEURISTIC_BOT = a click judged a link scanner's; bit UNDECIDED_SHIFT + i = nothing decided
# for size i yet (a size added to the configuration after the event was first applied).
MAX_WINDOW_SIZES = 8  # gained words stay within 64 bits: (8 + 1) * NAME_SPAN bits
LATE_BITS = (1 << MAX_WINDOW_SIZES) - 1
HEURISTIC_BOT = 1 << 30
UNDECIDED_SHIFT = 32


class FormatError(ValueError):
    """Stored bytes that no known format version describes."""


# ---------------------------------------------------------------------------------------------
# keys


def record_key(channel: str, campaign: str, subscriber: str | None, event_id: str) -> bytes:
    """The subscriber record's key; an event without subscriber has a record of its own."""
    # a right-sized copy: orjson shrinks its output buffer in place, so each result kept alive
    # would hold a heap page of its own (a chunk keeps ~100,000 keys: ~400 MiB)
    if subscriber:
        return memoryview(_dumps((channel, campaign, subscriber))).tobytes()
    return memoryview(_dumps((channel, campaign, None, event_id))).tobytes()


def legacy_record_key(channel: str, campaign: str, subscriber: str | None, event_id: str) -> bytes:
    """The key formats 2 and earlier stored the same record under (ambiguous; read-only)."""
    return f"{channel}|{campaign}|{subscriber or '#' + event_id}".encode()


def parse_record_key(key: bytes) -> tuple[str, str, str | None, str | None]:
    """(channel, campaign, subscriber, event id) of a record key."""
    parts = _loads(key)
    if type(parts) is not list or len(parts) not in (3, 4):
        raise FormatError(f"not a record key: {key[:80]!r}")
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else None


# Legacy record keys start with the channel ("ads|", "email|"), current ones with "[": every
# legacy key sorts at or after this one, every current key before it (RocksDB orders keys
# bytewise), so one seek tells whether a store still holds legacy records.
LEGACY_RECORD_KEYS_FROM = b"a"


def campaign_key(channel: str, campaign: str) -> bytes:
    return f"{channel}|{campaign}".encode()


def parse_campaign_key(key: bytes) -> tuple[str, str]:
    channel, campaign = key.decode().split("|", 1)
    return channel, campaign


def partial_key(partition: int, ckey: bytes) -> bytes:
    return b"%d|%s" % (partition, ckey)


def parse_partial_key(key: bytes) -> tuple[int, bytes]:
    partition, ckey = key.split(b"|", 1)
    return int(partition), ckey


_WINDOW_KEYS: dict[tuple[int, int], str] = {}  # (size, start) -> "size:start"
_SPLIT_KEYS: dict[str, tuple[str, int]] = {}


def window_key(size: int, start: int) -> str:
    key = _WINDOW_KEYS.get((size, start))
    if key is None:
        if len(_WINDOW_KEYS) > 100_000:
            _WINDOW_KEYS.clear()
        key = _WINDOW_KEYS[(size, start)] = f"{size}:{start}"
    return key


def window_key_cache() -> dict[tuple[int, int], str]:
    """The cache behind :func:`window_key`, for a hot loop that looks keys up inline."""
    return _WINDOW_KEYS


def split_window_key(key: str) -> tuple[str, int]:
    """ "size:start" -> ("size", start): the size stays a string, as in ``Partial.evicted``."""
    parts = _SPLIT_KEYS.get(key)
    if parts is None:
        if len(_SPLIT_KEYS) > 100_000:
            _SPLIT_KEYS.clear()
        size, start = key.split(":")
        parts = _SPLIT_KEYS[key] = (size, int(start))
    return parts


# ---------------------------------------------------------------------------------------------
# subscriber records


class SubscriberRecord:
    """What is known of one subscriber in one campaign.

    ``ids``: event id -> [stamp, decision word, seen at (wall-clock seconds), gained];
    ``unique``: flag word of the counts (:data:`NAME_BITS`) the subscriber is part of;
    ``windows``: "size:start" -> the same per window; ``orders``: order id -> stamp;
    ``delivered``: event time of the first delivery (bot-click heuristic).

    *gained* is the flag word of what the event made the subscriber part of: its lifetime
    flags in the low bits, then the flags of window size ``i`` (of the record's sizes, which
    :func:`decode_record` makes the configured ones) at ``(i + 1) * NAME_SPAN``. A replay
    counts exactly those again. Flag words instead of a stamp per name and window keep a
    record at about a dozen objects: every event costs a decode, an encode and a free of its
    record, and that cost is per object.
    """

    __slots__ = ("delivered", "ids", "orders", "sizes", "unique", "windows")

    def __init__(self) -> None:
        self.ids: dict[str, list[int]] = {}
        self.unique: int = 0
        self.windows: dict[str, int] = {}
        self.orders: dict[str, Stamp] = {}
        self.delivered: float | None = None
        # the window sizes its words' bits refer to: the configured ones, then sizes removed
        # from the configuration whose bits are kept (None: the configured ones)
        self.sizes: list[int] | None = None

    def prune(self, now: float, retention: float, evicted: dict[str, int]) -> None:
        """Forget event ids past the redelivery horizon and flags of windows closed for good."""
        horizon = now - retention
        # ids are kept in the order they were first seen, so the oldest is the first (up to
        # clock differences between workers, which only keep an id a little longer)
        for entry in self.ids.values():
            if entry[2] < horizon:
                self.ids = {k: v for k, v in self.ids.items() if v[2] >= horizon}
            break
        if evicted and self.windows:
            for key in list(self.windows):
                size, start = split_window_key(key)
                if start <= evicted.get(size, -1):
                    del self.windows[key]


def encode_record(record: SubscriberRecord, sizes: list[int]) -> bytes:
    """``[3, sizes, ids, unique, windows, orders, delivered]``: ``sizes`` are the record's own
    (:attr:`SubscriberRecord.sizes`), else the configured ``sizes`` given here."""
    own = record.sizes if record.sizes is not None else sizes
    return _dumps(
        [RECORD_FORMAT, own, record.ids, record.unique, record.windows, record.orders, record.delivered]
    )


def decode_record(raw: bytes, sizes: list[int]) -> SubscriberRecord:
    """A stored record whose words' bit ``i`` refers to ``sizes[i]`` (the configured sizes).

    A record written under other sizes is remapped to the configured sizes followed by the
    stored sizes no longer configured: bits of a removed size are kept (at the end, where the
    rules do not read them), so a size removed and added again finds what its events
    decided and gained; every event id gets the *undecided* bit of each size new to the
    record, so a replay of that event decides it then, exactly once. Flags per window are
    kept whatever the sizes: they are dropped only as their windows close.
    """
    doc = _loads(raw)
    record = SubscriberRecord.__new__(SubscriberRecord)  # no empty containers only to be replaced
    if type(doc) is list and doc and doc[0] == RECORD_FORMAT:
        _, stored, record.ids, record.unique, record.windows, record.orders, record.delivered = doc
        if stored[: len(sizes)] == sizes:  # sizes removed from the end only: nothing moves
            record.sizes = stored
        else:
            record.sizes = _remap_sizes(record, stored, sizes)
        return record
    record.sizes = None
    if type(doc) is list and len(doc) == 5 and type(doc[0]) is dict:
        # format 2: the same without format number and sizes (written under today's sizes:
        # changing them needed a clean stop then)
        record.ids, record.unique, record.windows, record.orders, record.delivered = doc
        return record
    if type(doc) is dict:
        record.ids, record.unique, record.windows, record.orders, record.delivered = _upgrade_stamped(
            doc, sizes
        )
        return record
    raise FormatError(f"unknown subscriber record format: {raw[:80]!r}")


def _remap_sizes(record: SubscriberRecord, stored: list[int], sizes: list[int]) -> list[int]:
    """Move every entry's bits from ``stored`` positions to the new list's; return the list."""
    kept = [size for size in stored if size not in sizes]
    new = (sizes + kept)[:MAX_WINDOW_SIZES]  # the oldest removed sizes go when it is full
    moves = [(i, new.index(size)) for i, size in enumerate(stored) if size in new]
    added = 0
    for j, size in enumerate(new):
        if size not in stored:
            added |= 1 << j
    for entry in record.ids.values():
        decision, gained = entry[1], entry[3]
        late, undecided, new_gained = 0, added, gained & NAME_BITS_ALL
        for i, j in moves:
            late |= ((decision >> i) & 1) << j
            undecided |= ((decision >> (UNDECIDED_SHIFT + i)) & 1) << j
            new_gained |= ((gained >> (i + 1) * NAME_SPAN) & NAME_BITS_ALL) << (j + 1) * NAME_SPAN
        entry[1] = late | (decision & HEURISTIC_BOT) | undecided << UNDECIDED_SHIFT
        entry[3] = new_gained
    return new


def _upgrade_stamped(doc: dict[str, Any], sizes: list[int]) -> list[Any]:
    """A record of format 1 or 0: a stamp per count and window instead of flag words.

    Format 0 has stamps as [topic, position] pairs under "i", format 1 int stamps under "e".
    An event's *gained* word is rebuilt from the stamps: it gained the flags that hold its stamp.
    """
    if "i" in doc:
        doc = {
            "e": {k: [_stamp(v[0], v[1]), v[2], v[3]] for k, v in doc.get("i", {}).items()},
            "u": {k: _stamp(*v) for k, v in doc.get("u", {}).items()},
            "w": {w: {k: _stamp(*v) for k, v in f.items()} for w, f in doc.get("w", {}).items()},
            "o": {k: _stamp(*v) for k, v in doc.get("o", {}).items()},
            "d": doc.get("d"),
        }
    unique: dict[str, Stamp] = doc.get("u", {})
    windows: dict[str, dict[str, Stamp]] = doc.get("w", {})
    index = {str(size): i for i, size in enumerate(sizes)}
    ids = {}
    for event_id, (stamp, decision, seen, *_) in doc.get("e", {}).items():
        gained = flags_of(name for name, first in unique.items() if first == stamp)
        for key, flags in windows.items():
            i = index.get(split_window_key(key)[0])
            if i is not None:
                names = (name for name, first in flags.items() if first == stamp)
                gained |= flags_of(names) << (i + 1) * NAME_SPAN
        ids[event_id] = [stamp, decision, seen, gained]
    return [
        ids,
        flags_of(unique),
        {key: flags_of(flags) for key, flags in windows.items()},
        dict(doc.get("o", {})),
        doc.get("d"),
    ]


def _stamp(topic_code: int, position: int) -> Stamp:
    # the stamp formula of pipeline.rules.dedupe, for records stored before stamps were one int
    return (position << 7) | (1 << 6) | topic_code


def flags_of(names: Iterable[str]) -> int:
    word = 0
    for name in names:
        word |= NAME_BITS.get(name, 0)
    return word


# ---------------------------------------------------------------------------------------------
# partials, snapshots and campaigns


@dataclass(slots=True)
class Partial:
    """Cumulative counts of one campaign on one partition; sent whole, so resending is harmless."""

    positions: dict[str, int] = field(default_factory=dict)  # topic code -> last stamp applied
    seq: int = 0  # events applied; a newer snapshot of the same partial has a larger seq
    watermarks: dict[str, float] = field(default_factory=dict)  # topic code -> highest event time
    totals: dict[str, int] = field(default_factory=dict)
    windows: dict[str, dict[str, int]] = field(default_factory=dict)  # "300:start" -> counts
    duplicates: int = 0
    late: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # adapter -> events counted
    evicted: dict[str, int] = field(default_factory=dict)  # window size -> newest start dropped

    @property
    def watermark(self) -> float:
        return max(self.watermarks.values(), default=0.0)

    def prune(self, retention: int, sizes: Iterable[int] = ()) -> None:
        """Keep the newest ``retention`` windows of each configured size; older ones, and all
        of a size no longer configured, are closed for good."""
        configured = {int(size) for size in sizes}
        if len(self.windows) <= retention and not configured:
            return  # no size can have more than that
        by_size: dict[int, list[int]] = {}
        for key in self.windows:
            size, start = split_window_key(key)
            by_size.setdefault(int(size), []).append(start)
        for size, starts in by_size.items():
            starts.sort()
            drop = starts if configured and size not in configured else starts[:-retention]
            for start in drop:
                del self.windows[window_key(size, start)]
                self.evicted[str(size)] = max(self.evicted.get(str(size), -1), start)


def encode_partial(partial: Partial) -> bytes:
    return _dumps(
        {
            "v": partial.positions,
            "q": partial.seq,
            "wm": partial.watermarks,
            "t": partial.totals,
            "w": partial.windows,
            "d": partial.duplicates,
            "l": partial.late,
            "s": partial.sources,
            "x": partial.evicted,
            "f": PARTIAL_FORMAT,
        }
    )


def decode_partial(raw: bytes) -> Partial:
    return _partial_of(_loads(raw))


def _partial_of(doc: Mapping[str, Any]) -> Partial:
    # format 1 is the same without "f"
    if doc.get("f", 1) > PARTIAL_FORMAT:
        raise FormatError(f"partial of format {doc['f']}, newer than this version reads")
    return Partial(doc["v"], doc["q"], doc["wm"], doc["t"], doc["w"], doc["d"], doc["l"], doc["s"], doc["x"])


def encode_snapshots(snapshots: Iterable[tuple[bytes, int, bytes]]) -> bytes:
    """One message of the partials topic: the snapshots of many campaigns (format 3), each a
    (campaign key, stage-1 partition, encoded partial), all on the message's partition."""
    return b'{"f":%d,"m":[%s]}' % (
        SNAPSHOT_FORMAT,
        b",".join(
            b'{"k":%s,"p":%d,"s":%s}' % (_dumps(ckey.decode()), partition, encoded_partial)
            for ckey, partition, encoded_partial in snapshots
        ),
    )


def decode_snapshots(key: bytes | None, raw: bytes) -> list[tuple[bytes, int, Partial]]:
    """(campaign key, stage-1 partition, partial) of every snapshot in a message: format 3
    carries many; formats 1 and 2 (still read) carried one, of the campaign in the key."""
    doc = _loads(raw)
    form = doc.get("f", 1)  # format 1 had no "f"
    if form > SNAPSHOT_FORMAT:
        raise FormatError(f"snapshot of format {form}, newer than this version reads")
    if form < 3:
        if key is None:
            raise FormatError("a snapshot of format 1 or 2 without its campaign key")
        return [(key, doc["p"], _partial_of(doc["s"]))]
    return [(entry["k"].encode(), entry["p"], _partial_of(entry["s"])) for entry in doc["m"]]


_SNAPSHOT_SEQ = re.compile(rb'(?:"k":("(?:[^"\\]|\\.)*"),)?"p":(\d+),"s":\{"v":\{[^}]*\},"q":(\d+)')


def snapshot_seqs(key: bytes | None, raw: bytes) -> list[tuple[bytes | None, int, int]]:
    """(campaign key, partition, seq) of every snapshot in a message without decoding all of
    it (the bench watches many)."""
    found = [
        (_loads(ckey).encode() if ckey else key, int(partition), int(seq))
        for ckey, partition, seq in _SNAPSHOT_SEQ.findall(raw)
    ]
    if not found:
        raise FormatError(f"not a snapshot: {raw[:80]!r}")
    return found


def encode_campaign(partials: Mapping[int, Partial]) -> bytes:
    """A campaign's table value: the newest partial of each stage-1 partition."""
    return b'{"f":%d,"p":{%s}}' % (
        CAMPAIGN_FORMAT,
        b",".join(b'"%d":%s' % (p, encode_partial(partial)) for p, partial in sorted(partials.items())),
    )


def decode_campaign(raw: bytes | None) -> dict[int, Partial]:
    if not raw:
        return {}
    doc = _loads(raw)
    if "f" not in doc:  # format 1: {"partition": partial document, ...}
        return {int(p): _partial_of(snap) for p, snap in doc.items()}
    if doc["f"] > CAMPAIGN_FORMAT:
        raise FormatError(f"campaign of format {doc['f']}, newer than this version reads")
    return {int(p): _partial_of(snap) for p, snap in doc["p"].items()}
