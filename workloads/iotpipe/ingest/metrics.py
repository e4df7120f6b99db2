"""Prometheus metrics of the ingest tier. No per-message labels; counters move per frame."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from iotpipe.protocol.forwarder import ForwarderCore

CONNECTIONS = Gauge("iotpipe_ingest_connections", "Current device connections in this process")
ACCEPTED = Counter("iotpipe_ingest_messages_accepted", "Messages stored and acknowledged")
REJECTED = Counter("iotpipe_ingest_messages_rejected", "Messages refused, by reason", ["reason"])
ACK_FRAMES = Counter("iotpipe_ingest_ack_frames", "Ack frames sent to devices")
BUSY = Counter("iotpipe_ingest_busy", "Messages answered busy because the queue was full")
AUTH_FAILURES = Counter("iotpipe_ingest_auth_failures", "Refused handshakes, by reason",
                        ["reason"])
CLOSES = Counter("iotpipe_ingest_closes", "Connections closed by the server, by code", ["code"])
BATCH_SIZE = Histogram(
    "iotpipe_ingest_frame_messages", "Messages per accepted device frame",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)


class ForwarderCollector(Collector):
    """Forwarder counters read at scrape time from the core(s) (ints: safe across threads)."""

    def __init__(self, cores: Callable[[], list[ForwarderCore]]) -> None:
        self._cores = cores

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        cores = self._cores()
        in_flight = GaugeMetricFamily("iotpipe_forwarder_in_flight_records",
                                      "Records sent to the middle tier and not yet acked")
        in_flight.add_metric([], sum(c.in_flight_records for c in cores))
        yield in_flight
        for name, attr, text in (
            ("iotpipe_forwarder_batches_sent", "batches_sent", "Batches sent (first time)"),
            ("iotpipe_forwarder_batches_resent", "batches_resent",
             "Batches sent again after a timeout or busy reply"),
            ("iotpipe_forwarder_records_acked", "records_acked", "Records acked by the middle"),
            ("iotpipe_forwarder_failovers", "failovers", "Switches to another middle endpoint"),
            ("iotpipe_forwarder_busy_replies", "busy_replies", "Busy replies from the middle"),
            ("iotpipe_forwarder_bad_replies", "bad_replies", "Unparseable replies"),
        ):
            family = CounterMetricFamily(name, text)
            family.add_metric([], sum(getattr(c.stats, attr) for c in cores))
            yield family
