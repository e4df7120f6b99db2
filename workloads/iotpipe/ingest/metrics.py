"""Prometheus metrics of the ingest tier, read at scrape time.

The per-frame path only bumps plain integers on an ``IngestCounters`` object (a
prometheus_client ``Counter.inc`` takes a lock: four of them per frame cost ~5% of
throughput); ``IngestCollector`` turns them into metric families when scraped. No label
ever carries a device or message id.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from iotpipe.ingest.core.forwarder import ForwarderCore

if TYPE_CHECKING:
    from iotpipe.ingest.drain import QueueDrainer
    from iotpipe.queue import PersistentQueue

__all__ = ["ACK_SECONDS_BUCKETS", "FRAME_SIZE_BUCKETS", "IngestCollector", "IngestCounters",
           "RetiredCollector", "queue_depth", "retired_depth"]

FRAME_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# Frame read -> ack ready: a group-committed fdatasync is tens of microseconds to a few
# milliseconds; a full queue's busy wait is a second.
ACK_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                       2.5)


class IngestCounters:
    """Plain counters of one ingest process (touched only from its event loop)."""

    def __init__(self) -> None:
        self.connections = 0
        self.accepted = 0
        self.ack_frames = 0
        self.busy = 0
        self.rejected: Counter[str] = Counter()
        self.auth_failures: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.frame_buckets = [0] * (len(FRAME_SIZE_BUCKETS) + 1)  # last: +Inf
        self.frame_sum = 0
        self.ack_buckets = [0] * (len(ACK_SECONDS_BUCKETS) + 1)  # last: +Inf
        self.ack_sum = 0.0

    def observe_frame(self, messages: int) -> None:
        self.frame_buckets[bisect_left(FRAME_SIZE_BUCKETS, messages)] += 1
        self.frame_sum += messages

    def observe_acked(self, messages: int, seconds: float) -> None:
        """One ack frame for ``messages`` ids, ``seconds`` after its frame was read."""
        self.accepted += messages
        self.ack_frames += 1
        self.frame_buckets[bisect_left(FRAME_SIZE_BUCKETS, messages)] += 1
        self.frame_sum += messages
        self.ack_buckets[bisect_left(ACK_SECONDS_BUCKETS, seconds)] += 1
        self.ack_sum += seconds

    def observe_ack(self, seconds: float) -> None:
        self.ack_buckets[bisect_left(ACK_SECONDS_BUCKETS, seconds)] += 1
        self.ack_sum += seconds


class IngestCollector(Collector):
    def __init__(self, counters: IngestCounters,
                 cores: Callable[[], list[ForwarderCore]]) -> None:
        self._counters = counters
        self._cores = cores

    def collect(self) -> Iterator[Metric]:
        c = self._counters
        gauge = GaugeMetricFamily("iotpipe_ingest_connections",
                                  "Current device connections (of the pod, when a "
                                  "parent serves several processes)")
        gauge.add_metric([], c.connections)
        yield gauge
        for name, value, text in (
            ("iotpipe_ingest_messages_accepted", c.accepted, "Messages stored and acked"),
            ("iotpipe_ingest_ack_frames", c.ack_frames, "Ack frames sent to devices"),
            ("iotpipe_ingest_busy", c.busy, "Messages answered busy (queue full)"),
        ):
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], value)
            yield counter
        for name, values, label, text in (
            ("iotpipe_ingest_messages_rejected", c.rejected, "reason", "Refused messages"),
            ("iotpipe_ingest_auth_failures", c.auth_failures, "reason", "Refused handshakes"),
            ("iotpipe_ingest_closes", c.closes, "code", "Connections closed by the server"),
        ):
            counter = CounterMetricFamily(name, text, labels=[label])
            for key, value in sorted(values.items()):
                counter.add_metric([key], value)
            yield counter
        cumulative, buckets = 0, []
        for bound, count in zip((*FRAME_SIZE_BUCKETS, "+Inf"), c.frame_buckets, strict=True):
            cumulative += count
            buckets.append((str(bound), cumulative))
        yield HistogramMetricFamily("iotpipe_ingest_frame_messages",
                                    "Messages per accepted device frame",
                                    buckets=buckets, sum_value=c.frame_sum)
        yield HistogramMetricFamily(
            "iotpipe_ingest_ack_seconds",
            "Time from reading an accepted device frame to its ack (append durable)",
            buckets=_cumulative(ACK_SECONDS_BUCKETS, c.ack_buckets), sum_value=c.ack_sum)
        yield from _forwarder_metrics(self._cores())


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    cumulative, buckets = 0, []
    for bound, count in zip((*(str(b) for b in bounds), "+Inf"), counts, strict=True):
        cumulative += count
        buckets.append((bound, float(cumulative)))
    return buckets


def _forwarder_metrics(cores: list[ForwarderCore]) -> Iterator[Metric]:
    in_flight = GaugeMetricFamily("iotpipe_forwarder_in_flight_records",
                                  "Records sent to the middle tier and not yet acked")
    in_flight.add_metric([], sum(core.in_flight_records for core in cores))
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
        family.add_metric([], sum(getattr(core.stats, attr) for core in cores))
        yield family


def queue_depth(queue: PersistentQueue | None) -> tuple[int, int, int]:
    """(records, bytes, capacity) of the process's queue, zeros before it is open."""
    if queue is None:
        return (0, 0, 0)
    depth = queue.depth()
    return (depth.records, depth.bytes, queue.capacity_bytes)


def retired_depth(drainers: Sequence[QueueDrainer]) -> tuple[int, int, int]:
    """(records, bytes, capacity) summed over the retired queues being drained."""
    depths = [d.depth() for d in drainers]
    return (sum(d[0] for d in depths), sum(d[1] for d in depths), sum(d[2] for d in depths))


class RetiredCollector(Collector):
    """The retired queues (``p<i>`` of processes this pod no longer runs) being drained."""

    def __init__(self, drainers: Callable[[], Sequence[QueueDrainer]],
                 removed: Callable[[], int]) -> None:
        self._drainers = drainers
        self._removed = removed

    def collect(self) -> Iterator[Metric]:
        drainers = self._drainers()
        yield GaugeMetricFamily("iotpipe_ingest_retired_queues",
                                "Queues of processes no longer run, being drained",
                                value=len(drainers))
        records = GaugeMetricFamily("iotpipe_ingest_retired_queue_records",
                                    "Records left in the retired queues being drained")
        records.add_metric([], sum(d.depth()[0] for d in drainers))
        yield records
        yield CounterMetricFamily("iotpipe_ingest_retired_queues_removed",
                                  "Retired queues drained and deleted", value=self._removed())
