"""Prometheus metrics of the relay tier, read from the server and its core at scrape time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from iotpipe.relay.core import Fanout

__all__ = ["RelayCollector", "RelayState"]


class RelayState(Protocol):
    """What the collector reads of the running relay (``RelayServer``) at scrape time."""

    fanout: Fanout
    upstreams: dict[str, bool]
    frames_sent: int
    slow_closes: int
    bad_frames: int
    rejected: Counter[str]


class RelayCollector(Collector):
    """Relay counters read from the core at scrape time (no per-message metric calls)."""

    def __init__(self, relay: RelayState) -> None:
        self._relay = relay

    def collect(self) -> Iterator[Metric]:
        fanout = self._relay.fanout
        stats = fanout.stats
        yield GaugeMetricFamily("iotpipe_relay_clients", "Connected client apps",
                                value=len(fanout.sessions))
        yield GaugeMetricFamily("iotpipe_relay_upstreams_connected",
                                "Middle PUB endpoints the relay is subscribed to now",
                                value=sum(self._relay.upstreams.values()))
        yield GaugeMetricFamily("iotpipe_relay_client_queue_frames",
                                "Frames waiting in all client send queues",
                                value=sum(s.pending for s in fanout.sessions.values()))
        for name, text, value in (
            ("iotpipe_relay_events_in", "Live events received from the middle tier",
             stats.events_in),
            ("iotpipe_relay_events_out", "Reading frames queued to clients (sum over clients)",
             stats.frames_queued),
            ("iotpipe_relay_frames_sent", "Frames written to client connections (all kinds)",
             self._relay.frames_sent),
            ("iotpipe_relay_slow_closes", "Clients closed with 4008 for not reading",
             self._relay.slow_closes),
            ("iotpipe_relay_dropped", "Reading frames dropped for slow clients",
             stats.dropped),
            ("iotpipe_relay_upstream_gaps", "Sequence jumps seen on the PUB/SUB hop",
             stats.upstream_gaps),
            ("iotpipe_relay_upstream_missed", "Events missed on the PUB/SUB hop",
             stats.upstream_missed),
            ("iotpipe_relay_duplicates", "Upstream events dropped as duplicates",
             stats.duplicates),
            ("iotpipe_relay_source_resets", "Sources whose sequence restarted at 1",
             stats.resets),
            ("iotpipe_relay_bad_events", "Upstream events that could not be decoded",
             stats.bad_events + self._relay.bad_frames),
        ):
            yield CounterMetricFamily(name, text, value=value)
        rejected = CounterMetricFamily("iotpipe_relay_rejected_connections",
                                       "Client connections refused at the handshake",
                                       labels=["reason"])
        for reason, count in sorted(self._relay.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
