"""Prometheus metrics of the storage tier: the feed, the store of record and the tailing sinks.

Objects of one ``StorageMetrics`` instance, registered in the registry it is given (tests
give each server a registry of its own); nothing is registered at import. Sinks count what
only they know (values skipped, read-backs) in plain ``counters`` that ``SinkCollector``
reads at scrape time as ``iotpipe_storage_<kind>_<name>_total{sink}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from iotpipe.storage.tail import TailMetrics

__all__ = ["CountingSink", "SinkCollector", "StorageMetrics"]


class StorageMetrics:
    """The storage tier's Prometheus metrics, registered in ``registry`` (one set per server)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.written = Counter("iotpipe_storage_records_written_total",
                               "Readings newly stored, per sink", ["sink"], registry=registry)
        self.duplicates = Counter("iotpipe_storage_duplicates_total",
                                  "Redelivered readings a sink already held", ["sink"],
                                  registry=registry)
        self.write_seconds = Histogram(
            "iotpipe_storage_write_seconds", "Duration of one durable sink write", ["sink"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry)
        self.write_errors = Counter("iotpipe_storage_write_errors_total",
                                    "Failed sink writes (retried)", ["sink"], registry=registry)
        self.rejected = Counter("iotpipe_storage_rejected_records_total",
                                "Feed records that could not be decoded (acked, not stored)",
                                registry=registry)
        self.deliveries = Counter("iotpipe_storage_deliveries_total",
                                  "Feed deliveries received", ["endpoint"], registry=registry)
        self.received = Counter("iotpipe_storage_records_received_total",
                                "Feed records received (redeliveries included)", ["endpoint"],
                                registry=registry)
        self.malformed = Counter("iotpipe_storage_malformed_messages_total",
                                 "Feed messages that did not follow the wire format",
                                 ["endpoint"], registry=registry)
        self.in_flight = Gauge("iotpipe_storage_in_flight_records",
                               "Records delivered and not yet acknowledged", ["endpoint"],
                               registry=registry)
        self.lag = Gauge("iotpipe_storage_feed_lag_seconds",
                         "Age (since ingest received it) of the newest reading stored",
                         ["endpoint"], registry=registry)
        self.last_acked = Gauge("iotpipe_storage_last_acked_seq",
                                "Highest middle log seq acknowledged", ["endpoint"],
                                registry=registry)
        self.tail = TailMetrics(registry, self.written, self.duplicates, self.write_errors,
                                self.write_seconds)
        self.pruned = Counter("iotpipe_storage_store_pruned_total",
                              "Readings removed from the store of record after "
                              "--store-retention", registry=registry)

    def watch_sinks(self, sinks: Sequence[object]) -> None:
        """Expose the ``counters`` of the sinks that keep some."""
        counting = [sink for sink in sinks if isinstance(getattr(sink, "counters", None), dict)]
        if counting:
            self.registry.register(SinkCollector(counting))  # type: ignore[arg-type]


class CountingSink(Protocol):
    kind: str
    counter_help: Mapping[str, str]
    counters: dict[str, int]


class SinkCollector(Collector):
    """The sinks' own counters, read when scraped (no Prometheus objects in the sinks)."""

    def __init__(self, sinks: Sequence[CountingSink]) -> None:
        self._sinks = list(sinks)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily] = {}
        for sink in self._sinks:
            for name, value in sink.counters.items():
                metric = f"iotpipe_storage_{sink.kind}_{name}"
                if metric not in families:
                    families[metric] = CounterMetricFamily(metric, sink.counter_help[name],
                                                           labels=["sink"])
                families[metric].add_metric([sink.kind], value)
        yield from families.values()

