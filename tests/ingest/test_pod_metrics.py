"""Merging the metrics of a pod's processes into one scrape, without sockets."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from iotpipe.ingest.metrics import IngestCollector, IngestCounters
from iotpipe.observability import QueueDepthCollector, merge_scrapes

pytestmark = pytest.mark.unit


def scrape(connections: int, accepted: int, frames: list[int], depth: int) -> str:
    counters = IngestCounters()
    counters.connections = connections
    counters.accepted = accepted
    counters.rejected["bad_json"] = 1
    for n in frames:
        counters.observe_frame(n)
    registry = CollectorRegistry()
    registry.register(IngestCollector(counters, lambda: []))
    registry.register(QueueDepthCollector("ingest", {"ingest": lambda: (depth, depth * 10,
                                                                       1000)}))

    class Other:
        def collect(self) -> list[GaugeMetricFamily]:
            return [GaugeMetricFamily("process_start_time_seconds", "start", value=100.0)]

    registry.register(Other())
    return generate_latest(registry).decode()


def samples(text_families: list) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_families for s in family.samples}


def test_pod_totals_are_sums_over_processes() -> None:
    merged = samples(merge_scrapes({"0": scrape(3, 10, [1, 5], 4),
                                    "1": scrape(4, 20, [5], 6)}))
    assert merged[("iotpipe_ingest_connections", ())] == 7
    assert merged[("iotpipe_ingest_messages_accepted_total", ())] == 30
    assert merged[("iotpipe_ingest_messages_rejected_total", (("reason", "bad_json"),))] == 2
    assert merged[("iotpipe_ingest_frame_messages_bucket", (("le", "1"),))] == 1
    assert merged[("iotpipe_ingest_frame_messages_bucket", (("le", "+Inf"),))] == 3
    assert merged[("iotpipe_ingest_frame_messages_sum", ())] == 11
    assert merged[("iotpipe_queue_depth_records", (("queue", "ingest"), ("tier", "ingest")))] \
        == 10
    # Not additive: kept per process.
    assert merged[("process_start_time_seconds", (("process", "0"),))] == 100
    assert merged[("process_start_time_seconds", (("process", "1"),))] == 100


def test_merged_families_render_as_valid_exposition() -> None:
    merged = merge_scrapes({"0": scrape(1, 1, [1], 0), "1": scrape(2, 2, [2], 0)})

    class Fixed:
        def collect(self) -> list:
            return merged

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    assert "iotpipe_ingest_connections 3.0" in text
    # The same exposition lines as one process would write.
    assert "# TYPE iotpipe_ingest_messages_accepted_total counter" in text
    assert "# TYPE iotpipe_ingest_messages_accepted_total counter" in scrape(1, 1, [1], 0)
    assert "iotpipe_ingest_messages_accepted_total 3.0" in text
    # Re-merging the rendered text (one process) gives the same totals: nothing lost.
    def totals(families: list) -> dict:
        return {k: v for k, v in samples(families).items() if k[0].startswith("iotpipe_")}

    assert totals(merge_scrapes({"0": text})) == totals(merged)
    assert len(totals(merged)) > 20


def test_no_scrapes_no_samples() -> None:
    assert merge_scrapes({}) == []
