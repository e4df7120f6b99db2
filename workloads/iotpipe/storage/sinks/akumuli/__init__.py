"""Akumuli sink: RESP-style writes on TCP (default port 8282), one point per numeric field.

URL: ``akumuli://host[:8282]``. Options, all optional (the operator's CRD passes none):
``?query_port=8181`` (the HTTP API, used to read back what the server holds),
``?marks=/path/file.db`` (the high-water-mark file, default
``<storage data dir>/akumuli-<host>-<port>.marks.db``) and ``?confirm_ms=50`` (how long to
listen for an error after each send).

Modules: ``points`` (readings to points, and what to send: sans-I/O), ``marks`` (the
high-water marks file), ``client`` (the TCP write connection and the query API); this module
is the sink that ties them together. Late points are returned to the storage tier, which
keeps them in the store of record's ``late_points`` (``iotpipe query --late``).

Exactly once. The sink tails the store of record (``iotpipe.storage.tail``), which hands it
every row once; only a range whose write may have been cut short comes again, with
``recovering=True``. Whenever the sink cannot be sure what a send stored (a recovering
write, an error line, a close, a socket error), it reads back the points of the write's
series between its oldest and newest timestamp (after a ``-DB late write``: from the oldest
on, without end), moves the marks up to the newest point the server holds, and sends only
points the server does not hold (matched by series, timestamp and value). After an error
line it does that at once, up to 3 rounds per write, then fails the write (the storage tier
retries the range with backoff). If the query API cannot be reached the write fails: the
sink never sends blind. An error that arrives after the confirm window, or a connection the
server closed since, is found before the next write, which then reads back the previous
send's series and resends its missing points too.

Known limits. The read-back assumes this sink is the only writer of its series. A point
counts as held when the server has its series, nanosecond timestamp and value (within a
relative 1e-9): two readings of one series with the same timestamp and value, one in an
interrupted range and one in an earlier range, are taken for one by the read-back. Several
storage replicas writing the same series each keep their own marks; a point one of them
finds older than the server's newest is kept as late.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from iotpipe.storage.sinks import LatePoint, SinkBatch, SinkError, WriteResult
from iotpipe.storage.sinks.akumuli.client import AkumuliClient, ServerError
from iotpipe.storage.sinks.akumuli.marks import MarksStore
from iotpipe.storage.sinks.akumuli.points import (
    Held,
    Point,
    format_points,
    plan_write,
    points_for,
    sanitise_name,
)

__all__ = ["DEFAULT_CONFIRM_S", "DEFAULT_PORT", "DEFAULT_QUERY_PORT", "AkumuliSink"]

log = logging.getLogger("iotpipe.storage.akumuli")

DEFAULT_PORT = 8282
DEFAULT_QUERY_PORT = 8181
DEFAULT_CONFIRM_S = 0.05
_LATE_LOG_INTERVAL_S = 60.0
_ERROR_ROUNDS = 3

class AkumuliSink:
    kind = "akumuli"
    # Read at scrape time by iotpipe.storage.metrics.SinkCollector.
    counter_help = {
        "skipped_values": "Data values that are not numbers or booleans (strings, nulls, "
                          "lists), not sent",
        "reconciles": "Times the sink read back what the server holds (recovery or after an "
                      "error)",
    }

    def __init__(self, host: str, port: int = DEFAULT_PORT, *,
                 query_port: int = DEFAULT_QUERY_PORT, marks_path: str | Path | None = None,
                 confirm_s: float = DEFAULT_CONFIRM_S, url: str | None = None,
                 state_dir: Path | None = None) -> None:
        self.url = url or f"akumuli://{host}:{port}"
        self.client = AkumuliClient(host, port, query_port, confirm_s, self.url)
        if marks_path is None:
            if state_dir is None:
                raise SinkError(f"sink {self.url}: no marks file: give ?marks=/path/file.db, "
                                f"or run it in the storage tier (marks go to its --data-dir)")
            marks_path = state_dir / f"akumuli-{sanitise_name(host)}-{port}.marks.db"
        self._store = MarksStore(Path(marks_path), self.url)
        self._marks = self._store.load()
        # The points of the last send and its series' marks before it: checked again if
        # its error arrives after the confirm window.
        self._last_points: list[Point] = []
        self._last_marks_before: dict[str, int | None] = {}
        self._resend: list[Point] = []  # points of an earlier send the server may have lost
        self._late_unlogged = 0
        self._late_logged_at = 0.0
        self.counters = dict.fromkeys(self.counter_help, 0)

    @classmethod
    def from_url(cls, url: str, state_dir: Path | None = None) -> AkumuliSink:
        parsed = urllib.parse.urlsplit(url)
        try:
            port = parsed.port or DEFAULT_PORT
        except ValueError:
            raise SinkError(f"sink URL {url!r}: bad port") from None
        if not parsed.hostname:
            raise SinkError(f"sink URL {url!r}: no host (expected akumuli://host:8282)")
        if parsed.path not in ("", "/"):
            raise SinkError(f"sink URL {url!r}: unexpected path {parsed.path!r} "
                            f"(expected akumuli://host:8282)")
        options = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        unknown = set(options) - {"query_port", "marks", "confirm_ms"}
        if unknown:
            raise SinkError(f"sink URL {url!r}: unknown option(s) {sorted(unknown)} "
                            f"(known: confirm_ms, marks, query_port)")
        try:
            query_port = int(options.get("query_port", [DEFAULT_QUERY_PORT])[-1])
            confirm_ms = float(options.get("confirm_ms", [DEFAULT_CONFIRM_S * 1000])[-1])
        except ValueError:
            raise SinkError(f"sink URL {url!r}: query_port and confirm_ms must be numbers"
                            ) from None
        if not 0 < query_port < 65536:
            raise SinkError(f"sink URL {url!r}: query_port {query_port} is out of range")
        if not 0 < confirm_ms <= 10_000:
            raise SinkError(f"sink URL {url!r}: confirm_ms must be in (0, 10000]")
        marks = options.get("marks", [None])[-1]
        if marks == "":
            raise SinkError(f"sink URL {url!r}: empty marks path")
        return cls(parsed.hostname, port, query_port=query_port, marks_path=marks,
                   confirm_s=confirm_ms / 1000, url=url, state_dir=state_dir)

    def held_points(self, points: Sequence[Point], *, newer: bool = False) -> Held:
        """What the server holds of ``points``' series (see ``AkumuliClient.held_points``)."""
        self.counters["reconciles"] += 1
        return self.client.held_points(points, newer=newer)

    def _raise_marks(self, held: Held) -> None:
        newest: dict[str, int] = {}
        for series, ts in held:
            if ts > newest.get(series, -(1 << 63)):
                newest[series] = ts
        raised = {s: ts for s, ts in newest.items() if ts > self._marks.get(s, -(1 << 63))}
        if raised:
            self._store.save(raised)
            self._marks.update(raised)

    # --- the write ------------------------------------------------------------------------

    def _count_late(self, late: int) -> None:
        if not late:
            return
        self._late_unlogged += late
        now = time.monotonic()
        if now - self._late_logged_at >= _LATE_LOG_INTERVAL_S:
            log.warning("points older than their series' newest point in Akumuli were not "
                        "sent; they are kept in the store of record's late_points",
                        extra={"fields": {"sink": self.url, "points": self._late_unlogged}})
            self._late_unlogged = 0
            self._late_logged_at = now

    def _suspect_last_send(self, why: str) -> None:
        """The last send was taken as done but may not be stored (an error or a close came
        after its confirm window): keep its points to be read back and resent with the
        next sends until one succeeds, and put its marks back to before it (the read-back
        raises them to what the server really holds)."""
        if not self._last_points:
            return
        log.warning("Akumuli may have lost the last confirmed send; reading back its series "
                    "and resending what is missing",
                    extra={"fields": {"sink": self.url, "error": why}})
        self._resend = self._last_points + self._resend
        self._last_points = []
        restored = {s: m for s, m in self._last_marks_before.items() if m is not None}
        forget = [s for s, m in self._last_marks_before.items() if m is None]
        self._store.save(restored, forget)
        self._marks.update(restored)
        for series in forget:
            self._marks.pop(series, None)

    def write(self, batches: Sequence[SinkBatch], *, recovering: bool = False) -> WriteResult:
        points: list[Point] = []
        skipped_values = 0
        for batch in batches:
            for reading in batch.readings:
                reading_points, skipped = points_for(reading)
                points += reading_points
                skipped_values += skipped
        if skipped_values:
            self.counters["skipped_values"] += skipped_values

        stale_error = self.client.check_idle()
        if stale_error is not None:
            self._suspect_last_send(stale_error)

        already = 0
        late: list[Point] = []
        late_write = False  # the server holds newer points than the marks say
        for round_number in range(1, _ERROR_ROUNDS + 1):
            if self._resend:
                recovering = True
            all_points = self._resend + points
            if not all_points:
                return WriteResult(0, 0)
            held: Held = {}
            if recovering:
                # Raises if the query API is down: the write fails and is retried later.
                held = self.held_points(all_points, newer=late_write)
                self._raise_marks(held)
            plan = plan_write(all_points, self._marks, held)
            already, late = plan.held, plan.late
            if not plan.send:
                self._last_points = []
                self._resend = []
                break
            try:
                self.client.send(format_points(plan.send))
            except ServerError as exc:
                # Some prefix of the send was stored and the rest lost: read back, resend.
                # The previous send on this connection is suspect too: the server may have
                # gone down after it took those bytes.
                self._suspect_last_send(str(exc))
                recovering = True
                late_write = late_write or "late write" in (exc.server_message or "")
                if exc.server_message is not None and round_number < _ERROR_ROUNDS:
                    log.warning("Akumuli refused a send; reading back what it stored",
                                extra={"fields": {"sink": self.url,
                                                  "error": exc.server_message}})
                    continue
                raise SinkError(str(exc)) from None
            self._last_marks_before = {s: self._marks.get(s) for s in plan.new_marks}
            self._store.save(plan.new_marks)
            self._marks.update(plan.new_marks)
            self._last_points = plan.send
            self._resend = []
            break
        else:  # pragma: no cover - the loop always breaks or raises
            raise AssertionError("unreachable")
        self._count_late(len(late))
        reason = "older than its series' newest point in Akumuli (late write refused)"
        # The value as a number (the RESP type marker dropped), as a user would query it.
        late_points = [LatePoint(p.reading, p.field, p.value[1:], reason)
                       for p in late if p.reading is not None]
        return WriteResult(len(plan.send), already, tuple(late_points))

    def close(self) -> None:
        self.client.drop_connection()
        self._store.close()
