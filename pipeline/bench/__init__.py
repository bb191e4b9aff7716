"""``pipeline bench``: the same generated events through several mechanisms, side by side.

One module per mechanism: :mod:`.data` (events and their exact expected counts),
:mod:`.ceiling` (aiokafka + orjson + dicts, no framework), :mod:`.baseline` (Faust in the
natural per-event style), :mod:`.topology` (the real :func:`pipeline.stages.topology.create_pipeline`
app in a worker process), :mod:`.ingest` (HTTP ``POST /events``), :mod:`.latency`
(webhook to ``/metrics``), :mod:`.memory` (dedupe state in RocksDB), :mod:`.report` (the
table) and :mod:`.run` (the driver). Every mechanism runs in its own process, so its peak RSS
is its own.
"""
