"""The Akumuli stand-in itself: it must refuse what Akumuli refuses, or the sink tests prove
nothing. Parser tests are sans-I/O; server tests use loopback sockets."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator

import pytest
from support.akumuli_standin import (
    AkumuliStandin,
    ParseError,
    StandinPoint,
    WriteParser,
    iso_to_ns,
    ns_to_iso,
)

T0 = 1_764_151_200_000_000_000  # 2025-11-26T10:00:00Z


# --- parser (no sockets) ---------------------------------------------------------------------

@pytest.mark.unit
def test_parser_reads_points_split_anywhere() -> None:
    data = (b"+temp device=a class=x\r\n:100\r\n+21.5\r\n"
            b"+on device=a\r\n+20251126T100000.000000001\r\n:1\r\n")
    parser = WriteParser()
    points: list[StandinPoint] = []
    for i in range(len(data)):  # one byte at a time: framing must not depend on chunking
        points += parser.feed(data[i:i + 1])
    assert points == [StandinPoint("temp class=x device=a", 100, 21.5),
                      StandinPoint("on device=a", T0 + 1, 1.0)]


@pytest.mark.unit
def test_parser_stores_malformed_timestamp_string_as_epoch_zero() -> None:
    points = WriteParser().feed(b"+temp device=a\r\n+2025-11-26 10:00\r\n+1.0\r\n")
    assert points == [StandinPoint("temp device=a", 0, 1.0)]


@pytest.mark.unit
@pytest.mark.parametrize("bad", [
    b"+temp\r\n:1\r\n+1.0\r\n",  # no tag
    b"+temp device=\r\n:1\r\n+1.0\r\n",  # empty tag value
    b"+temp device=a\r\n:12x\r\n+1.0\r\n",  # bad integer timestamp
    b"+temp device=a\r\n:-5\r\n+1.0\r\n",  # RESP integers are unsigned
    b"+temp device=a\r\n:1\r\n:-36\r\n",  # a negative integer value
    b"+temp device=a\r\n:1\r\n+abc\r\n",  # bad float
    b"+temp device=a\r\n:1\r\n$1.0\r\n",  # unknown value type
    b":1\r\n",  # a timestamp where a series name belongs
])
def test_parser_refuses_bad_lines(bad: bytes) -> None:
    with pytest.raises(ParseError):
        WriteParser().feed(bad)


@pytest.mark.unit
def test_parser_error_carries_points_before_the_bad_line() -> None:
    with pytest.raises(ParseError) as caught:
        WriteParser().feed(b"+t device=a\r\n:1\r\n:5\r\n+t\r\n:2\r\n:6\r\n")
    assert caught.value.args[1] == [StandinPoint("t device=a", 1, 5.0)]


@pytest.mark.unit
def test_iso_round_trip() -> None:
    assert ns_to_iso(T0 + 123) == "20251126T100000.000000123"
    assert iso_to_ns(b"20251126T100000.000000123") == T0 + 123
    assert iso_to_ns(b"20251126T100000") == T0
    assert iso_to_ns(b"20251356T100000") is None


# --- server (loopback) -----------------------------------------------------------------------

@pytest.fixture
def standin() -> Iterator[AkumuliStandin]:
    with AkumuliStandin() as server:
        yield server


def _send(server: AkumuliStandin, payload: bytes, wait_s: float = 0.3) -> bytes:
    """Send, then read until the server closes or ``wait_s`` of silence."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(payload)
        sock.settimeout(wait_s)
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except TimeoutError:
            answer += b"<silence>"
        return answer


def _query(server: AkumuliStandin, body: object) -> tuple[int, str]:
    conn = http.client.HTTPConnection(server.host, server.query_port, timeout=5)
    try:
        conn.request("POST", "/api/query", body=json.dumps(body))
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _point(series: str, ts: int, value: str = ":1") -> bytes:
    return f"+{series}\r\n:{ts}\r\n{value}\r\n".encode()


@pytest.mark.integration
def test_success_is_silent_and_points_are_stored(standin: AkumuliStandin) -> None:
    assert _send(standin, _point("t device=a", 1) + _point("t device=a", 2, "+2.5")) == \
        b"<silence>"
    assert standin.series() == {"t device=a": [(1, 1.0), (2, 2.5)]}


@pytest.mark.integration
def test_late_write_is_refused_closes_and_loses_the_rest_of_the_send(
        standin: AkumuliStandin) -> None:
    _send(standin, _point("t device=a", 10))
    answer = _send(standin, _point("t device=b", 1) + _point("t device=a", 9)
                   + _point("t device=b", 2))
    assert answer == b"-DB late write\r\n"  # then closed: no <silence> marker
    assert standin.series() == {"t device=a": [(10, 1.0)], "t device=b": [(1, 1.0)]}


@pytest.mark.integration
def test_equal_timestamp_is_accepted_again(standin: AkumuliStandin) -> None:
    assert _send(standin, _point("t device=a", 10) + _point("t device=a", 10, ":2")) == \
        b"<silence>"
    assert standin.series() == {"t device=a": [(10, 1.0), (10, 2.0)]}


@pytest.mark.integration
def test_series_without_tag_is_an_error(standin: AkumuliStandin) -> None:
    answer = _send(standin, _point("t", 1))
    assert answer.startswith(b"-PARSER") and answer.endswith(b"\r\n")
    assert standin.series() == {}


@pytest.mark.integration
def test_injected_error_after_n_points(standin: AkumuliStandin) -> None:
    standin.fail_next("DB disk full", after_points=1)
    answer = _send(standin, _point("t device=a", 1) + _point("t device=a", 2))
    assert answer == b"-DB disk full\r\n"
    assert standin.series() == {"t device=a": [(1, 1.0)]}
    assert standin.errors_sent == ["DB disk full"]
    assert _send(standin, _point("t device=a", 3)) == b"<silence>"  # one-shot


@pytest.mark.integration
def test_query_select_where_range_and_formats(standin: AkumuliStandin) -> None:
    _send(standin, b"".join([_point("t device=a loc=x", T0), _point("t device=a loc=x", T0 + 5),
                             _point("t device=b loc=y", T0 + 1), _point("u device=a", T0)]))
    status, text = _query(standin, {
        "select": "t", "range": {"from": ns_to_iso(T0), "to": ns_to_iso(T0 + 5)},
        "where": {"device": ["a", "b"]}, "output": {"format": "csv", "timestamp": "raw"}})
    assert status == 200
    # Akumuli's real rows: the raw timestamp carries a "ts=" prefix, lines end in \n.
    assert text == (f"t device=a loc=x,ts={T0},1\n"  # "to" is exclusive
                    f"t device=b loc=y,ts={T0 + 1},1\n")
    _, text = _query(standin, {
        "select": "t", "range": {"from": ns_to_iso(T0), "to": ns_to_iso(T0 + 10)},
        "where": {"loc": "x"}, "output": {"format": "csv"}})
    assert text == (f"t device=a loc=x,{ns_to_iso(T0)},1\n"
                    f"t device=a loc=x,{ns_to_iso(T0 + 5)},1\n")
    _, text = _query(standin, {  # from > to: newest first
        "select": "t", "range": {"from": ns_to_iso(T0 + 10), "to": ns_to_iso(T0)},
        "order-by": "time", "limit": 1, "output": {"format": "csv", "timestamp": "raw"}})
    assert text == f"t device=a loc=x,ts={T0 + 5},1\n"


@pytest.mark.integration
def test_query_matching_no_series_answers_not_found(standin: AkumuliStandin) -> None:
    _send(standin, _point("t device=a", T0))
    window = {"from": ns_to_iso(T0), "to": ns_to_iso(T0 + 10)}
    raw = {"format": "csv", "timestamp": "raw"}
    for body in ({"select": "unknown", "range": window, "output": raw},
                 {"select": "t", "range": window, "where": {"device": "b"}, "output": raw}):
        assert _query(standin, body) == (200, "-not found\r\n")
    # A series that matches but holds nothing in the range is an empty answer, not an error.
    assert _query(standin, {"select": "t", "output": raw, "range": {
        "from": ns_to_iso(T0 + 1), "to": ns_to_iso(T0 + 10)}}) == (200, "")


@pytest.mark.integration
def test_negative_integer_is_refused_and_the_rest_of_the_send_is_lost(
        standin: AkumuliStandin) -> None:
    answer = _send(standin, _point("t device=a", 1) + _point("t device=a", 2, ":-36")
                   + _point("t device=a", 3, "+-36.0"))
    assert answer == b"-PARSER can't parse integer (character value out of range)\r\n"
    assert standin.series() == {"t device=a": [(1, 1.0)]}
    assert _send(standin, _point("t device=a", 3, "+-36.0")) == b"<silence>"  # as a float
    assert standin.series() == {"t device=a": [(1, 1.0), (3, -36.0)]}


@pytest.mark.integration
@pytest.mark.parametrize("body", [
    {"range": {"from": "20251126T100000", "to": "20251126T110000"}},  # no select
    {"select": "t", "output": {"format": "csv"}},  # no range
    {"select": "t", "range": {"from": "yesterday", "to": "20251126T110000"},
     "output": {"format": "csv"}},
])
def test_bad_query_answers_an_error_line(standin: AkumuliStandin, body: object) -> None:
    status, text = _query(standin, body)
    assert status == 200 and text.startswith("-query parsing error")
