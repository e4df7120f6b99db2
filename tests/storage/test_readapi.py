"""Storage's read API (/v1/history) over the store of record, as a WSGI app without sockets."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.readapi import (
    MAX_LIMIT,
    HistoryApp,
    HistoryQuery,
    history,
    parse_history_query,
)
from iotpipe.storage.sinks import SinkBatch
from iotpipe.storage.sinks.sqlite import SqliteSink

pytestmark = pytest.mark.unit

NOW_NS = 1_796_000_000_000_000_000
S = 1_000_000_000


def store(path: Path, readings: list[tuple[str, int, object]]) -> None:
    sink = SqliteSink(path)
    sink.write([SinkBatch("m", 1, [
        StoredReading(device, f"m{i}", ts, ts, "n", i, orjson.dumps(data).decode(),
                      "c", "l", {}) for i, (device, ts, data) in enumerate(readings)])])
    sink.close()


def call(app: HistoryApp, query: str, method: str = "GET") -> tuple[str, dict[str, Any]]:
    status: list[str] = []

    def start_response(code: str, headers: list[tuple[str, str]]) -> None:
        status.append(code)
        assert ("Content-Type", "application/json") in headers

    chunks: Iterable[bytes] = app({"REQUEST_METHOD": method, "QUERY_STRING": query,
                                   "wsgi.input": io.BytesIO()}, start_response)
    return status[0], orjson.loads(b"".join(chunks))


def test_history_is_the_newest_readings_in_the_window_oldest_first(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store(db, [("d", NOW_NS - 7200 * S, {"v": -1}),  # outside the default hour
               *[("d", NOW_NS - (100 - i) * S, {"v": i}) for i in range(100)],
               ("other", NOW_NS - S, {"v": 999}),
               ("d", NOW_NS - 50 * S, "not an object")])
    sink = SqliteSink(db, read_only=True)
    try:
        answer = history(sink, HistoryQuery("d", limit=5), NOW_NS)
        assert [r["data"] for r in answer["readings"]] == [{"v": i} for i in range(95, 100)]  # type: ignore[index]
        assert answer["device"] == "d"
        everything = history(sink, HistoryQuery("d", limit=MAX_LIMIT, window_s=3 * 3600), NOW_NS)
        assert len(everything["readings"]) == 102  # type: ignore[arg-type]
        ts = [r["ts_ns"] for r in everything["readings"]]  # type: ignore[union-attr]
        assert ts == sorted(ts)
    finally:
        sink.close()


def test_the_app_answers_json_and_refuses_bad_parameters_by_name(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store(db, [("d", NOW_NS - i * S, {"v": i}) for i in range(3)])
    app = HistoryApp(f"sqlite://{db}", clock_ns=lambda: NOW_NS)
    status, body = call(app, "device=d&limit=2")
    assert status == "200 OK"
    assert [r["data"] for r in body["readings"]] == [{"v": 1}, {"v": 0}]
    for query, word in (("", "device"), ("device=d&limit=0", "limit"),
                        ("device=d&limit=abc", "limit"), ("device=d&window=-1", "window"),
                        ("device=d&window=x", "window")):
        status, body = call(app, query)
        assert status.startswith("400"), query
        assert body["detail"].startswith(word), body
    assert call(app, "device=d", method="POST")[0].startswith("405")


def test_nothing_stored_yet_is_an_empty_history(tmp_path: Path) -> None:
    app = HistoryApp(f"sqlite://{tmp_path / 'missing.db'}")
    assert call(app, "device=d") == ("200 OK", {"device": "d", "readings": []})


def test_parse_history_query_defaults() -> None:
    assert parse_history_query({"device": ["x"]}) == HistoryQuery("x")
