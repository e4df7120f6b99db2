"""The metrics/health server answers on IPv4 and IPv6 loopback and reflects readiness."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from iotpipe.observability import ObservabilityServer, QueueDepthCollector

pytestmark = pytest.mark.unit


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.parametrize("host,url_host", [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
def test_health_ready_and_metrics(host: str, url_host: str) -> None:
    registry = CollectorRegistry()
    registry.register(QueueDepthCollector("ingest", {"p0": lambda: (3, 384, 1024)}))
    ready = {"value": False}
    server = ObservabilityServer(host, 0, ready=lambda: ready["value"], registry=registry).start()
    try:
        base = f"http://{url_host}:{server.port}"
        assert _get(base + "/healthz") == (200, "ok\n")
        assert _get(base + "/readyz")[0] == 503
        ready["value"] = True
        assert _get(base + "/readyz") == (200, "ready\n")
        status, body = _get(base + "/metrics")
        assert status == 200
        assert 'iotpipe_queue_depth_records{queue="p0",tier="ingest"} 3.0' in body
        assert 'iotpipe_queue_capacity_bytes{queue="p0",tier="ingest"} 1024.0' in body
        assert _get(base + "/nope")[0] == 404
    finally:
        server.stop()
