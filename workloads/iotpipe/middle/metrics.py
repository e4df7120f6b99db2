"""Prometheus metrics of the middle tier, read from the server and its cores at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from iotpipe import curve
from iotpipe.middle.feed import FeedCore
from iotpipe.middle.intake import Intake

__all__ = ["MiddleCollector", "MiddleState"]


class MiddleState(Protocol):
    """What the collector reads of the running middle (``MiddleServer``) at scrape time."""

    intake: Intake
    feed: FeedCore
    group_commits: int
    malformed: dict[str, int]
    checkpoint_failures: int
    published: int
    unpublishable: int
    tail: int
    # group -> (lag, consumers), computed on the loop thread that owns the feed state
    feed_snapshot: dict[str, tuple[int, int]]
    gatekeeper: curve.Gatekeeper | None
    handshakes: curve.HandshakeWatch | None


class MiddleCollector(Collector):
    """Counters read from the cores at scrape time: no metric call per message."""

    def __init__(self, server: MiddleState) -> None:
        self._server = server

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self._server
        intake, feed = s.intake.counters, s.feed.counters

        counters: list[tuple[str, str, float]] = [
            ("batches", "Batches acknowledged to ingest nodes", intake.batches),
            ("records", "Records appended to the log", intake.records),
            ("duplicate_records", "Readings dropped as already stored", intake.duplicates),
            ("busy_replies", "Batches answered busy (log full)", intake.busy),
            ("skipped_ahead_batches",
             "Batches that started above the node's high-water mark + 1", intake.skipped_ahead),
            ("group_commits", "Durable appends (each shares one fdatasync)", s.group_commits),
            ("checkpoint_failures", "Marks checkpoint writes that failed",
             s.checkpoint_failures),
            ("pub_messages", "Live events published", s.published),
            ("unpublishable_records", "Records whose reading had no device id",
             s.unpublishable),
            ("feed_requests", "Feed requests received", feed.requests),
            ("feed_deliveries", "Feed deliveries sent", feed.deliveries),
            ("feed_delivered_records", "Records sent in feed deliveries",
             feed.delivered_records),
            ("feed_redelivered_records",
             "Records returned for redelivery (lease expired, consumer gone)",
             feed.redelivered_records),
            ("feed_acked_records", "Records acknowledged by feed consumers",
             feed.acked_records),
        ]
        for name, text, value in counters:
            yield CounterMetricFamily(f"iotpipe_middle_{name}", text, value=value)
        malformed = CounterMetricFamily("iotpipe_middle_malformed_frames",
                                        "Frames that did not follow the wire format",
                                        labels=["socket"])
        for sock_name, value in s.malformed.items():
            malformed.add_metric([sock_name], value)
        yield malformed
        lag = GaugeMetricFamily("iotpipe_middle_feed_lag_records",
                                "Records appended but not yet acknowledged, per group",
                                labels=["group"])
        consumers = GaugeMetricFamily("iotpipe_middle_feed_consumers",
                                      "Feed consumers currently known, per group",
                                      labels=["group"])
        tail = s.tail
        for group, (group_lag, group_consumers) in s.feed_snapshot.items():
            lag.add_metric([group], group_lag)
            consumers.add_metric([group], group_consumers)
        yield lag
        yield consumers
        yield GaugeMetricFamily("iotpipe_middle_log_tail_seq", "Highest log seq appended",
                                value=tail)
        if s.gatekeeper is not None and s.handshakes is not None:
            refused = CounterMetricFamily(
                "iotpipe_middle_refused_handshakes",
                "ZeroMQ connections refused: reason=key (ZAP: not a key of this pipeline), "
                "no_curve, wrong_server_key, protocol", labels=["socket", "reason"])
            for domain, value in s.gatekeeper.refused.items():
                refused.add_metric([domain, "key"], value)
            for (domain, reason), value in list(s.handshakes.failed.items()):
                refused.add_metric([domain, reason], value)
            yield refused
            # Which keys this process runs with and admits right now: the operator's key
            # rotation waits on these before it promotes and before it retires.
            admitted = GaugeMetricFamily(
                "iotpipe_middle_curve_admitted_key",
                "1 per client public key (fingerprint: sha256 hex prefix) each socket admits",
                labels=["socket", "fingerprint"])
            for domain in curve.ADMITTED:
                for key in sorted(s.gatekeeper.admitted(domain)):
                    admitted.add_metric([domain, curve.fingerprint(key)], 1)
            yield admitted
            own = GaugeMetricFamily("iotpipe_middle_curve_own_key",
                                    "1 for this middle's own public key (fingerprint), read "
                                    "at start", labels=["fingerprint"])
            own.add_metric([curve.fingerprint(s.gatekeeper.keys.own.public)], 1)
            yield own
            disk = GaugeMetricFamily("iotpipe_middle_curve_disk_key",
                                     "1 for the middle's own public key (fingerprint) in the "
                                     "keys directory now (used after a restart)",
                                     labels=["fingerprint"])
            disk.add_metric([curve.fingerprint(s.gatekeeper.disk_public)], 1)
            yield disk
