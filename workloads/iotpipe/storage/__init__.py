"""The storage tier: consumes the middle tier's durable feed, enriches, writes to sinks.

Modules: ``core`` (sans-I/O feed client state: credit window, heartbeats, acks),
``enrich`` (log records -> denormalised ``StoredReading`` rows), ``sinks`` (the ``Sink``
protocol and the sqlite / victoriametrics / parquet / akumuli implementations), ``tail``
(sinks copying the store of record on their own cursors), ``server`` (the I/O
shell, ``iotpipe storage``), ``settings`` and ``metrics`` (its settings model and
Prometheus metrics) and ``query`` (``iotpipe query``). Its benchmark, ``iotpipe bench
storage``, is in the tools package.

Operating notes
- Identity: a reading is stored once per ``(device_id, msg_id)``; ``(node, node_seq)`` is
  kept alongside. A device that reuses a message id for a different reading has the later
  one dropped as a duplicate, so ids must be unique per device.
- Unknown devices (not in the registry) are stored with class and location ``unknown``
  and empty labels, never dropped.
- Acknowledgement: a delivery is acknowledged to its middle once the store of record (the
  embedded SQLite sink) has committed it, so SIGKILL at any instant loses nothing
  acknowledged; what was written but not acknowledged comes again and is ignored as a
  duplicate. Every other sink tails the store of record on its own durable cursor
  (``tail``), so one sink's trouble stalls neither the feed nor the other sinks; each sink
  holds every reading once after kills (see ``sinks`` and docs/storage-sinks.md). Values a
  sink refuses for good (Akumuli's late writes) are kept in the store's ``late_points``.
- Metrics (``iotpipe_storage_*``): ``records_written_total{sink}``,
  ``duplicates_total{sink}``, ``write_seconds{sink}`` (histogram),
  ``write_errors_total{sink}``, ``rejected_records_total``, ``deliveries_total{endpoint}``,
  ``records_received_total{endpoint}``, ``malformed_messages_total{endpoint}``,
  ``in_flight_records{endpoint}``, ``feed_lag_seconds{endpoint}`` (age of the newest
  stored reading since ingest received it), ``last_acked_seq{endpoint}``; per tailing
  sink ``sink_lag_rows``, ``sink_lag_seconds``, ``sink_up``, ``sink_cursor``,
  ``sink_recoveries_total`` and ``late_points_total`` (``{sink}``). The record lag per
  group is the middle's ``iotpipe_middle_feed_lag_records{group}``.
"""
