"""The ingest ack-latency histogram: plain counters in the hot path, a histogram at scrape."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from iotpipe.ingest.metrics import ACK_SECONDS_BUCKETS, IngestCollector, IngestCounters

pytestmark = pytest.mark.unit


def test_ack_latencies_land_in_cumulative_buckets() -> None:
    counters = IngestCounters()
    for seconds in (0.0002, 0.0005, 0.003, 0.003, 0.2, 9.0):
        counters.observe_ack(seconds)
    assert len(counters.ack_buckets) == len(ACK_SECONDS_BUCKETS) + 1
    registry = CollectorRegistry()
    registry.register(IngestCollector(counters, list))
    text = generate_latest(registry).decode()
    assert 'iotpipe_ingest_ack_seconds_bucket{le="0.0005"} 2.0' in text  # le is inclusive
    assert 'iotpipe_ingest_ack_seconds_bucket{le="0.001"} 2.0' in text
    assert 'iotpipe_ingest_ack_seconds_bucket{le="0.005"} 4.0' in text
    assert 'iotpipe_ingest_ack_seconds_bucket{le="0.25"} 5.0' in text
    assert 'iotpipe_ingest_ack_seconds_bucket{le="2.5"} 5.0' in text
    assert 'iotpipe_ingest_ack_seconds_bucket{le="+Inf"} 6.0' in text
    assert "iotpipe_ingest_ack_seconds_count 6.0" in text
    assert "iotpipe_ingest_ack_seconds_sum 9.2067" in text
