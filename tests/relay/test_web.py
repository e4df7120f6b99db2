"""The relay's live page front (iotpipe.relay.web), without sockets: static files, the
token check, the /api/ answers and the pure helpers behind them."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
import pytest
from support.ports import free_port
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from iotpipe.auth import CLIENT_AUDIENCE, DEVICE_AUDIENCE, AuthError, issue_token
from iotpipe.registry import DeviceInfo, Registry
from iotpipe.relay.settings import RelaySettings
from iotpipe.relay.web import (
    MAX_LOOKUP_IDS,
    WebFront,
    check_token,
    device_payload,
    load_static,
    merge_history,
    parse_health_targets,
    registry_payload,
    summarize_health,
)
from iotpipe.settings import parse_settings
from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.readapi import HistoryApp
from iotpipe.storage.sinks import SinkBatch
from iotpipe.storage.sinks.sqlite import SqliteSink

SECRET = b"web-test-secret-0123456789abcdef"
REGISTRY = Registry.from_yaml(
    "devices: {b-1: {class: boiler, location: hall, labels: {line: '3'}}}\n"
    "prefixes: {t-: {class: thermometer, location: roof}}\n")

pytestmark = pytest.mark.unit


def request(path: str, headers: dict[str, str] | None = None) -> Request:
    return Request(path, Headers(list((headers or {}).items())))


def front(history_urls: list[str] | None = None, health: dict[str, str] | None = None,
          secret: bytes | None = SECRET) -> WebFront:
    return WebFront(secret, REGISTRY.lookup, history_urls or [], health or {},
                    lambda: "iotpipe_relay_clients 3.0\n", REGISTRY.devices)


def respond(web: WebFront, path: str, headers: dict[str, str] | None = None) -> Response:
    return asyncio.run(web.respond(request(path, headers)))


def body(response: Response) -> dict[str, object]:
    return dict(orjson.loads(response.body))


def client_token() -> str:
    return issue_token(SECRET, "page", CLIENT_AUDIENCE, 60)


# -- static files ------------------------------------------------------------------------


def test_the_page_and_its_files_ship_in_the_package() -> None:
    files = load_static()
    page = files["/"].body.decode()
    for path in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        assert path in files, f"index.html refers to {path}, which is not served"
    assert "/static/app.js" in page and "/static/vendor/uPlot.iife.min.js" in page
    # The page loads nothing from elsewhere (no CDN): every URL in it is local.
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page)
    uplot = files["/static/vendor/uPlot.iife.min.js"].body
    assert b"uPlot" in uplot and len(uplot) > 20_000  # the real build, not a placeholder
    assert b"MIT License" in files["/static/vendor/uPlot.LICENSE"].body
    assert files["/static/app.js"].content_type.startswith("text/javascript")


def test_static_files_are_served_publicly_with_a_strict_policy_and_etag() -> None:
    web = front()
    response = respond(web, "/?token=whatever")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert int(response.headers["Content-Length"]) == len(response.body)
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert response.headers["Referrer-Policy"] == "no-referrer"  # the URL carries a token
    etag = response.headers["ETag"]
    again = respond(web, "/", {"If-None-Match": etag})
    assert (again.status_code, again.body) == (304, b"")


def test_unknown_paths_are_404() -> None:
    web = front()
    assert respond(web, "/nope").status_code == 404
    assert body(respond(web, "/nope"))["error"] == "not_found"
    assert respond(web, f"/api/nope?token={client_token()}").status_code == 404


# -- tokens ------------------------------------------------------------------------------


def test_the_api_needs_a_client_token() -> None:
    web = front()
    missing = respond(web, "/api/devices?ids=b-1")
    assert missing.status_code == 401 and body(missing)["error"] == "missing"
    device_token = issue_token(SECRET, "b-1", DEVICE_AUDIENCE, 60)
    wrong = respond(web, f"/api/devices?ids=b-1&token={device_token}")
    assert wrong.status_code == 401 and body(wrong)["error"] == "wrong_audience"
    forged = issue_token(b"another-secret-0123456789abcdef0", "p", CLIENT_AUDIENCE, 60)
    assert body(respond(web, f"/api/health?token={forged}"))["error"] == "bad_signature"
    bearer = respond(web, "/api/devices?ids=b-1",
                     {"Authorization": f"Bearer {client_token()}"})
    assert bearer.status_code == 200
    assert check_token(None, None, {}) == "anonymous"  # insecure mode: no check
    with pytest.raises(AuthError):
        check_token(SECRET, None, {"token": [""]})


# -- /api/devices ------------------------------------------------------------------------


def test_devices_come_from_the_registry() -> None:
    answer = body(respond(front(), f"/api/devices?ids=b-1,t-9,zz&token={client_token()}"))
    assert answer == {"devices": {
        "b-1": {"class": "boiler", "location": "hall", "labels": {"line": "3"}},
        "t-9": {"class": "thermometer", "location": "roof", "labels": {}},
        "zz": {"class": "unknown", "location": "unknown", "labels": {}}}}
    ids = ",".join(f"d{i}" for i in range(MAX_LOOKUP_IDS + 1))
    too_many = respond(front(), f"/api/devices?ids={ids}&token={client_token()}")
    assert too_many.status_code == 400 and body(too_many)["error"] == "too_many_ids"
    assert device_payload([], lambda _: DeviceInfo("c", "l")) == {"devices": {}}


def test_registry_lists_the_exact_devices_for_the_fleet_view() -> None:
    answer = body(respond(front(), f"/api/registry?token={client_token()}"))
    assert answer == {"devices": {"b-1": {"class": "boiler", "location": "hall",
                                          "labels": {"line": "3"}}}, "truncated": False}
    assert respond(front(), "/api/registry").status_code == 401
    many = {f"d{i:03d}": DeviceInfo("c", "l") for i in range(5)}
    capped = registry_payload(many, limit=3)
    assert list(capped["devices"]) == ["d000", "d001", "d002"]  # type: ignore[call-overload]
    assert capped["truncated"] is True


# -- /api/history ------------------------------------------------------------------------


def test_history_without_a_storage_read_api_says_so() -> None:
    answer = body(respond(front(), f"/api/history?device=b-1&token={client_token()}"))
    assert answer == {"device": "b-1", "readings": [], "available": False}


@pytest.mark.parametrize(("query", "reason"), [
    ("device=", "bad_device"), ("device=b-1&limit=x", "bad_limit"),
    ("device=b-1&limit=0", "bad_limit"), ("device=b-1&limit=999999", "bad_limit")])
def test_bad_history_requests_name_the_parameter(query: str, reason: str) -> None:
    response = respond(front(), f"/api/history?{query}&token={client_token()}")
    assert response.status_code == 400 and body(response)["error"] == reason


def test_merge_history_orders_by_time_keeps_each_message_once_and_the_newest() -> None:
    a = {"readings": [{"id": "1", "ts_ns": 10, "data": {}}, {"id": "3", "ts_ns": 30, "data": {}}]}
    b = {"readings": [{"id": "2", "ts_ns": 20, "data": {}}, {"id": "3", "ts_ns": 30, "data": {}},
                      "junk", {"id": "4", "ts_ns": "bad"}]}
    merged = merge_history("d", [a, b, {"nothing": 1}], limit=2)
    assert [r["id"] for r in merged["readings"]] == ["2", "3"]  # type: ignore[index]
    assert [r["id"] for r in merge_history("d", [a, b], 10)["readings"]] == ["1", "2", "3"]  # type: ignore[index]


@pytest.fixture
def storage_read_api(tmp_path: Path) -> Iterator[str]:
    """Storage's real read API (a WSGI server on loopback) over a SQLite store."""
    db = tmp_path / "readings.db"
    sink = SqliteSink(db)
    now = time.time_ns()
    sink.write([SinkBatch("m", 1, [
        StoredReading("b-1", f"m{i}", now - (10 - i) * 1_000_000_000, now, "n", i,
                      orjson.dumps({"t": i}).decode(), "boiler", "hall", {})
        for i in range(10)])])
    sink.close()

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    app = HistoryApp(f"sqlite://{db}")
    server = make_server("127.0.0.1", 0, lambda e, s: app(e, s), handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_history_is_read_from_storage_and_a_dead_one_is_reported(storage_read_api: str) -> None:
    web = front(history_urls=[storage_read_api])
    answer = body(respond(web, f"/api/history?device=b-1&limit=3&token={client_token()}"))
    assert answer["available"] is True
    assert [r["data"] for r in answer["readings"]] == [{"t": 7}, {"t": 8}, {"t": 9}]  # type: ignore[union-attr,index]
    # One storage answering and one down: the answer says which failed.
    dead = f"http://127.0.0.1:{free_port()}"
    partial = body(respond(front(history_urls=[storage_read_api, dead]),
                           f"/api/history?device=b-1&limit=3&token={client_token()}"))
    assert len(partial["readings"]) == 3 and dead in str(partial["errors"])  # type: ignore[arg-type]
    down = respond(front(history_urls=[dead]), f"/api/history?device=b-1&token={client_token()}")
    assert down.status_code == 502 and body(down)["error"] == "history_unavailable"


# -- /api/health -------------------------------------------------------------------------

INGEST_METRICS = """\
# HELP iotpipe_queue_depth_records Records not yet acknowledged by every consumer
# TYPE iotpipe_queue_depth_records gauge
iotpipe_queue_depth_records{tier="ingest",queue="ingest"} 250.0
# HELP iotpipe_queue_depth_bytes Bytes not yet acknowledged by every consumer
# TYPE iotpipe_queue_depth_bytes gauge
iotpipe_queue_depth_bytes{tier="ingest",queue="ingest"} 2500.0
# HELP iotpipe_queue_capacity_bytes Configured queue capacity in bytes
# TYPE iotpipe_queue_capacity_bytes gauge
iotpipe_queue_capacity_bytes{tier="ingest",queue="ingest"} 10000.0
# HELP iotpipe_ingest_connections Open device connections
# TYPE iotpipe_ingest_connections gauge
iotpipe_ingest_connections 7.0
# HELP iotpipe_ingest_messages_accepted Messages stored and acked
# TYPE iotpipe_ingest_messages_accepted counter
iotpipe_ingest_messages_accepted_total 1234.0
"""
STORAGE_METRICS = """\
# HELP iotpipe_storage_feed_lag_seconds Age of the newest reading stored
# TYPE iotpipe_storage_feed_lag_seconds gauge
iotpipe_storage_feed_lag_seconds{endpoint="a"} 0.5
iotpipe_storage_feed_lag_seconds{endpoint="b"} 2.5
# HELP iotpipe_storage_write_seconds Duration of one durable sink write
# TYPE iotpipe_storage_write_seconds histogram
iotpipe_storage_write_seconds_bucket{le="0.001",sink="sqlite"} 50.0
iotpipe_storage_write_seconds_bucket{le="0.01",sink="sqlite"} 100.0
iotpipe_storage_write_seconds_bucket{le="+Inf",sink="sqlite"} 100.0
iotpipe_storage_write_seconds_count{sink="sqlite"} 100.0
iotpipe_storage_write_seconds_sum{sink="sqlite"} 0.2
"""


def test_health_summarises_queues_fill_lag_and_write_latency() -> None:
    view = summarize_health({"ingest": INGEST_METRICS, "storage": STORAGE_METRICS,
                             "middle": None, "relay": "not # prometheus {{"})
    tiers = view["tiers"]
    assert isinstance(tiers, dict)
    ingest = tiers["ingest"]
    assert ingest["queues"] == [{"tier": "ingest", "queue": "ingest", "records": 250.0,
                                 "bytes": 2500.0, "capacity": 10000.0, "fill": 0.25}]
    assert ingest["metrics"]["iotpipe_ingest_connections"] == 7.0
    assert ingest["metrics"]["iotpipe_ingest_messages_accepted_total"] == 1234.0
    storage = tiers["storage"]
    assert storage["metrics"]["iotpipe_storage_feed_lag_seconds"] == 2.5  # the worst endpoint
    assert storage["write_seconds"]["p50"] == pytest.approx(0.001)
    assert 0.001 < storage["write_seconds"]["p99"] <= 0.01
    assert tiers["middle"] == {"up": False}
    assert tiers["relay"]["up"] is False


def _ack_metrics(fast: int, slow: int) -> str:
    """An ingest scrape whose ack histogram holds ``fast`` acks <= 1 ms, ``slow`` <= 100 ms."""
    return (
        "# HELP iotpipe_ingest_ack_seconds Time from reading a device frame to its ack\n"
        "# TYPE iotpipe_ingest_ack_seconds histogram\n"
        f'iotpipe_ingest_ack_seconds_bucket{{le="0.001"}} {fast}.0\n'
        f'iotpipe_ingest_ack_seconds_bucket{{le="0.1"}} {fast + slow}.0\n'
        f'iotpipe_ingest_ack_seconds_bucket{{le="+Inf"}} {fast + slow}.0\n'
        f"iotpipe_ingest_ack_seconds_count {fast + slow}.0\n"
        "iotpipe_ingest_ack_seconds_sum 1.0\n")


def test_ack_latency_is_of_the_recent_acks_when_a_previous_view_exists() -> None:
    first = summarize_health({"ingest": _ack_metrics(fast=1000, slow=0)})
    ack = first["tiers"]["ingest"]["ack_seconds"]  # type: ignore[index]
    assert ack["window"] == "since start" and ack["p99"] <= 0.001
    # 100 slow acks since: the recent p50 is slow, though most acks ever were fast.
    second = summarize_health({"ingest": _ack_metrics(fast=1000, slow=100)}, first)
    ack = second["tiers"]["ingest"]["ack_seconds"]  # type: ignore[index]
    assert ack["window"] == "recent" and ack["p50"] > 0.001
    # Nothing new, or a restarted process (counts went down): all its samples again.
    for scrape in (_ack_metrics(fast=1000, slow=100), _ack_metrics(fast=5, slow=0)):
        again = summarize_health({"ingest": scrape}, second)
        assert again["tiers"]["ingest"]["ack_seconds"]["window"] == "since start"  # type: ignore[index]


def test_health_endpoint_scrapes_the_tiers_and_adds_the_relay(storage_read_api: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    web = front(health={"middle": dead})
    answer = body(respond(web, f"/api/health?token={client_token()}"))
    tiers = answer["tiers"]
    assert tiers["middle"] == {"up": False}  # type: ignore[index]
    assert tiers["relay"]["metrics"]["iotpipe_relay_clients"] == 3.0  # type: ignore[index]


def test_health_urls_are_checked_and_bad_ones_named() -> None:
    assert parse_health_targets(["ingest=http://127.0.0.1:9100/metrics"]) == \
        {"ingest": "http://127.0.0.1:9100/metrics"}
    for bad in ("ingest", "=http://x/metrics", "ingest=ftp://x/", "ingest=http://"):
        with pytest.raises(ValueError, match="expected TIER=http"):
            parse_health_targets([bad])
    with pytest.raises(ValueError, match="given twice"):
        parse_health_targets(["a=http://x/m", "a=http://y/m"])
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(RelaySettings, ["--health-urls", "oops"])
    assert exit_info.value.code == 2
