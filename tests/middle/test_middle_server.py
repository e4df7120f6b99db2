"""A real ``iotpipe middle`` process on loopback ports, driven by DEALER/SUB sockets."""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq
from support.ports import free_port
from support.processes import ProcessGroup
from support.waiting import exited, wait_for, wait_ready

from iotpipe import wire
from iotpipe.queue import PersistentQueue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPLY_TIMEOUT_MS = 10_000


def reading(device: str, n: int, pad: int = 0) -> bytes:
    return wire.encode_reading(device, f"{device}/{n}", n, b'{"v":%d}' % n + b" " * pad, n)


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


@dataclass
class Middle:
    procs: ProcessGroup
    data_dir: Path
    extra: list[str]
    router_port: int = field(default_factory=free_port)
    pub_port: int = field(default_factory=free_port)
    feed_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    ctx: zmq.Context = field(default_factory=zmq.Context)  # type: ignore[type-arg]
    proc: object = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = self.procs.iotpipe(
            "middle", "--host", "127.0.0.1", "--router-port", str(self.router_port),
            "--pub-port", str(self.pub_port), "--feed-port", str(self.feed_port),
            "--metrics-port", str(self.metrics_port), "--data-dir", str(self.data_dir),
            "--middle-id", "mid-0", "--checkpoint-interval", "0.1", *self.extra,
            name=f"middle-{self.starts}",
        )
        wait_ready(f"http://127.0.0.1:{self.metrics_port}/readyz", 20,
                   abort=exited(self.proc, f"middle-{self.starts}"),
                   details=lambda: self.procs.log(f"middle-{self.starts}"))

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        self.proc.wait(timeout=10)  # type: ignore[attr-defined]

    def terminate(self) -> int:
        os.killpg(self.proc.pid, signal.SIGTERM)  # type: ignore[attr-defined]
        return int(self.proc.wait(timeout=15))  # type: ignore[attr-defined]

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def metric(self, name: str) -> float:
        match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", self.metrics(), re.M)
        assert match, f"metric {name} not exported"
        return float(match.group(1))

    def depth(self) -> float:
        match = re.search(r"^iotpipe_queue_depth_records\{[^}]*\} ([0-9.e+]+)$",
                          self.metrics(), re.M)
        assert match, "queue depth not exported"
        return float(match.group(1))

    def wait_metrics(self, text: str, timeout: float = 20.0) -> str:
        """Poll /metrics (bounded) until it contains ``text``: the middle processed what
        the test sent (an ack is fire-and-forget, nothing else says it arrived)."""
        def containing() -> str | None:
            metrics = self.metrics()
            return metrics if text in metrics else None

        return wait_for(containing, timeout, f"{text!r} in /metrics", details=self.metrics)

    def dealer(self, port: int) -> zmq.Socket:  # type: ignore[type-arg]
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        return sock


def recv(sock: zmq.Socket, timeout_ms: int = REPLY_TIMEOUT_MS) -> list[bytes]:  # type: ignore[type-arg]
    if not sock.poll(timeout_ms):
        raise AssertionError(f"no message within {timeout_ms} ms")
    return sock.recv_multipart()


def send_batch(sock: zmq.Socket, node: str, first: int, n: int, device: str = "dev",  # type: ignore[type-arg]
               pad: int = 0) -> list[bytes]:
    sock.send_multipart(wire.encode_batch(
        node, first, [reading(device, first + i, pad) for i in range(n)]))
    return recv(sock)


class Feed:
    """A storage-like feed consumer."""

    def __init__(self, middle: Middle, consumer: str = "c1", credit: int = 10_000) -> None:
        self.sock = middle.dealer(middle.feed_port)
        self.consumer = consumer
        self.credit = credit

    def request(self, acks: list[tuple[int, int]] = ()) -> None:  # type: ignore[assignment]
        self.sock.send_multipart(wire.encode_feed_request("storage", self.consumer,
                                                          self.credit, acks))

    def collect(self, expect: int, timeout: float = 10.0) -> dict[int, wire.LogRecord]:
        """Deliveries until ``expect`` records arrived (re-requesting like a heartbeat)."""
        got: dict[int, wire.LogRecord] = {}
        deadline = time.monotonic() + timeout
        self.request()
        while len(got) < expect and time.monotonic() < deadline:
            if not self.sock.poll(300):
                self.request()
                continue
            records = wire.decode_records(self.sock.recv_multipart())
            assert records.middle == "mid-0" and records.group == "storage"
            for seq, raw in enumerate(records.records, records.first):
                got[seq] = wire.decode_log_record(raw)
        assert len(got) >= expect, f"got {len(got)} records, expected {expect}"
        return got

    def quiet(self, wait_s: float = 0.5) -> list[wire.Records]:
        """Deliveries that arrive within ``wait_s`` (expected: none)."""
        self.request()
        out = []
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000) + 1):
                out.append(wire.decode_records(self.sock.recv_multipart()))
        return out


@pytest.fixture
def middle_factory(procs: ProcessGroup, tmp_path: Path) -> Iterator[object]:
    made: list[Middle] = []

    def make(*extra: str) -> Middle:
        m = Middle(procs, tmp_path / f"data{len(made)}", list(extra))
        made.append(m)
        m.start()
        return m

    yield make
    for m in made:
        m.ctx.destroy(linger=0)


def test_batches_acked_and_resends_stored_once(middle_factory) -> None:  # type: ignore[no-untyped-def]
    middle: Middle = middle_factory()
    ingest = middle.dealer(middle.router_port)
    assert wire.decode_ack(send_batch(ingest, "n1", 1, 10)) == wire.Ack("n1", 10)
    assert wire.decode_ack(send_batch(ingest, "n1", 1, 10)) == wire.Ack("n1", 10)  # resend
    assert wire.decode_ack(send_batch(ingest, "n1", 6, 10)) == wire.Ack("n1", 15)  # straddles
    assert wire.decode_ack(send_batch(ingest, "n2", 1, 3)) == wire.Ack("n2", 3)
    got = Feed(middle).collect(18)
    assert sorted(got) == list(range(1, 19))
    assert sorted((r.node, r.node_seq) for r in got.values()) == (
        [("n1", i) for i in range(1, 16)] + [("n2", i) for i in range(1, 4)])
    for r in got.values():
        assert wire.decode_reading(r.reading).msg_id == f"dev/{r.node_seq}"
    assert Feed(middle, "c2").quiet() == []  # another consumer: everything is leased to c1
    assert middle.metric("iotpipe_middle_duplicate_records_total") == 15
    assert middle.metric("iotpipe_middle_records_total") == 18
    assert 'iotpipe_queue_depth_records{queue="log",tier="middle"} 18.0' in middle.metrics()


# Rounds of at most 32 readings: a round that stops at the limit with more waiting, or a
# group of 32 or more, is written in the background, so acks wait for the worker thread.
BACKGROUND_WRITES = ("--max-group-records", "32")


@pytest.mark.parametrize("extra", [(), BACKGROUND_WRITES], ids=["inline", "background"])
def test_group_commit_of_pipelined_batches(middle_factory, extra: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    middle: Middle = middle_factory(*extra)
    ingest = middle.dealer(middle.router_port)
    for first in range(1, 2001, 10):  # a window of 200 batches in flight
        ingest.send_multipart(wire.encode_batch(
            "n1", first, [reading("d", first + i) for i in range(10)]))
    lasts = [wire.decode_ack(recv(ingest)).last for _ in range(200)]
    assert sorted(lasts) == list(range(10, 2001, 10))
    assert middle.metric("iotpipe_middle_group_commits_total") < 200
    got = Feed(middle).collect(2000)
    assert [got[s].node_seq for s in sorted(got)] == list(range(1, 2001))


@pytest.mark.parametrize("live_format", ["v2", "v1"])
def test_sub_sees_gapless_sequenced_events(middle_factory, live_format: str) -> None:  # type: ignore[no-untyped-def]
    middle: Middle = middle_factory("--live-format", live_format)
    ingest = middle.dealer(middle.router_port)
    sub = middle.ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{middle.pub_port}")
    # PUB/SUB joins late: send warm-up batches until the subscription is in place.
    warm = 0
    while not sub.poll(100):
        warm += 1
        send_batch(ingest, "warm", warm, 1)
        assert warm < 100, "SUB never received anything"
    while sub.poll(200):
        sub.recv_multipart()
    for first in range(1, 31, 10):
        send_batch(ingest, "n1", first, 10, device=f"sensor-{first}")
    events: list[wire.LiveEvent] = []
    kinds = set()
    while len(events) < 30:
        frames = recv(sub)
        kinds.add(len(frames))
        events += wire.decode_live_events(frames)
    assert kinds == {4 if live_format == "v2" else 3}  # a v2 message is a group
    seqs = [e.seq for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + 30))
    assert {e.middle_id for e in events} == {"mid-0"}
    assert [e.device_id for e in events] == [f"sensor-{f}" for f in (1, 11, 21) for _ in range(10)]
    assert [wire.decode_reading(e.reading).msg_id for e in events][:2] == ["sensor-1/1",
                                                                          "sensor-1/2"]


@pytest.mark.crash
def test_feed_redelivers_after_sigkill_and_loses_nothing(middle_factory) -> None:  # type: ignore[no-untyped-def]
    middle: Middle = middle_factory()
    ingest = middle.dealer(middle.router_port)
    for first in range(1, 101, 20):
        wire.decode_ack(send_batch(ingest, "n1", first, 20))
    feed = Feed(middle)
    got = feed.collect(100)
    assert sorted(got) == list(range(1, 101))
    feed.request(acks=[(1, 30), (41, 50)])  # out of order: 31..40 still unacked
    middle.wait_metrics('iotpipe_middle_feed_lag_records{group="storage"} 60.0')
    middle.kill()
    middle.start()
    feed2 = Feed(middle, "c1")  # the consumer restarted too: a new socket
    again = feed2.collect(60)
    # at least once: everything not acked comes again, intact
    assert set(range(31, 41)) | set(range(51, 101)) <= set(again)
    assert all(again[s] == got[s] for s in again)
    # and nothing acknowledged to ingest was lost: seq 101 is the next one
    assert wire.decode_ack(send_batch(ingest, "n1", 101, 1)) == wire.Ack("n1", 101)
    assert feed2.collect(1)[101].node_seq == 101


def test_sigterm_flushes_cursor_so_only_unacked_is_redelivered(middle_factory) -> None:  # type: ignore[no-untyped-def]
    middle: Middle = middle_factory()
    ingest = middle.dealer(middle.router_port)
    wire.decode_ack(send_batch(ingest, "n1", 1, 50))
    feed = Feed(middle)
    feed.collect(50)
    feed.request(acks=[(1, 20)])
    text = middle.wait_metrics('iotpipe_middle_feed_lag_records{group="storage"} 30.0')
    assert 'iotpipe_middle_feed_consumers{group="storage"} 1.0' in text
    assert middle.terminate() == 0
    assert "middle stopped" in middle.procs.log("middle-1")
    middle.start()
    again = Feed(middle, "c1").collect(30)
    assert sorted(again) == list(range(21, 51))


def test_expired_lease_is_redelivered_to_another_consumer(middle_factory) -> None:  # type: ignore[no-untyped-def]
    middle: Middle = middle_factory("--lease-timeout", "1")
    ingest = middle.dealer(middle.router_port)
    wire.decode_ack(send_batch(ingest, "n1", 1, 5))
    first = Feed(middle, "slow")
    assert sorted(first.collect(5)) == [1, 2, 3, 4, 5]  # never acked
    other = Feed(middle, "fast")
    again = other.collect(5, timeout=10)
    assert sorted(again) == [1, 2, 3, 4, 5]
    assert middle.metric("iotpipe_middle_feed_redelivered_records_total") >= 5


@pytest.mark.crash
def test_dedup_marks_survive_restart_and_reclaim(middle_factory) -> None:  # type: ignore[no-untyped-def]
    # Small segments so that acknowledged records are really reclaimed from the log.
    middle: Middle = middle_factory("--segment-bytes", "4096", "--log-bytes", "65536")
    ingest = middle.dealer(middle.router_port)
    for first in range(1, 41, 10):
        wire.decode_ack(send_batch(ingest, "n1", first, 10, pad=200))
    feed = Feed(middle)
    feed.collect(40)
    feed.request(acks=[(1, 40)])
    # Filler from another node, acknowledged too, pushes n1's records out of the log.
    for first in range(1, 41, 10):
        wire.decode_ack(send_batch(ingest, "n2", first, 10, pad=200))
    feed.request(acks=[(41, 80)])
    feed.collect(40)
    feed.request(acks=[(41, 80)])
    # Depth is the queue's own: 0 once its durable cursor (held at the checkpoint) moved.
    wait_for(lambda: middle.depth() == 0, 10, "acked records to leave the log")
    middle.kill()
    with PersistentQueue.open(middle.data_dir / "queue", capacity_bytes=65536,
                              segment_bytes=4096, consumers=["storage"]) as log:
        assert log.first_seq > 40, "n1's records should have been reclaimed"
    middle.start()
    # The log no longer holds n1's records; the marks come from the checkpoint.
    assert wire.decode_ack(send_batch(ingest, "n1", 1, 10, pad=200)) == wire.Ack("n1", 10)
    assert wire.decode_ack(send_batch(ingest, "n1", 31, 11, pad=200)) == wire.Ack("n1", 41)
    feed2 = Feed(middle, "c1")
    got = feed2.collect(1)
    assert [(r.node, r.node_seq) for r in got.values()] == [("n1", 41)]
    assert feed2.quiet() == []


@pytest.mark.crash
def test_dedup_survives_sigkill_before_any_checkpoint(middle_factory) -> None:  # type: ignore[no-untyped-def]
    middle: Middle = middle_factory()
    ingest = middle.dealer(middle.router_port)
    wire.decode_ack(send_batch(ingest, "n1", 1, 10))
    (middle.data_dir / "marks.ckpt").unlink(missing_ok=True)  # only the log remains
    middle.kill()
    (middle.data_dir / "marks.ckpt").unlink(missing_ok=True)
    middle.start()
    assert wire.decode_ack(send_batch(ingest, "n1", 5, 8)) == wire.Ack("n1", 12)
    got = Feed(middle).collect(12)
    assert sorted(r.node_seq for r in got.values()) == list(range(1, 13))


def test_full_log_answers_busy_then_recovers(middle_factory) -> None:  # type: ignore[no-untyped-def]
    middle: Middle = middle_factory("--segment-bytes", "8192", "--log-bytes", "65536",
                                    "--busy-retry-ms", "123")
    ingest = middle.dealer(middle.router_port)
    first = 1
    busy = None
    for _ in range(200):
        reply = send_batch(ingest, "n1", first, 4, pad=900)
        if wire.message_kind(reply) == wire.KIND_BUSY:
            busy = wire.decode_busy(reply)
            break
        assert wire.decode_ack(reply).last == first + 3
        first += 4
    assert busy is not None, "the log never filled"
    assert busy == wire.Busy("n1", first, 123, "log full")
    stored = first - 1
    assert middle.metric("iotpipe_middle_busy_replies_total") == 1
    feed = Feed(middle)
    got = feed.collect(stored)
    assert sorted(r.node_seq for r in got.values()) == list(range(1, stored + 1))
    feed.request(acks=[(min(got), max(got))])

    def acked_resend() -> list[bytes] | None:
        reply = send_batch(ingest, "n1", first, 4, pad=900)
        return reply if wire.message_kind(reply) == wire.KIND_ACK else None

    # the refused batch goes in once space is freed
    reply = wait_for(acked_resend, 10, "the refused batch to be acked once space is freed",
                     interval=0.1)
    assert wire.decode_ack(reply).last == first + 3
    more = feed.collect(4)
    assert sorted(r.node_seq for r in more.values()) == list(range(first, first + 4))


def test_malformed_frames_are_counted_and_harmless(middle_factory) -> None:  # type: ignore[no-untyped-def]
    middle: Middle = middle_factory()
    ingest = middle.dealer(middle.router_port)
    ingest.send_multipart([b"garbage"])
    ingest.send_multipart([wire.KIND_BATCH, b"\xc1"])
    ingest.send_multipart([wire.KIND_BATCH, b"\x83\xa4node\xa1n\xa5first\x01\xa1n\x05", b"x"])
    feed_sock = middle.dealer(middle.feed_port)
    feed_sock.send_multipart([wire.KIND_FEED, b"\x00"])
    feed_sock.send_multipart(wire.encode_feed_request("no-such-group", "c", 10))
    assert wire.decode_ack(send_batch(ingest, "n1", 1, 2)) == wire.Ack("n1", 2)
    text = middle.metrics()
    assert 'iotpipe_middle_malformed_frames_total{socket="router"} 3.0' in text
    assert 'iotpipe_middle_malformed_frames_total{socket="feed"} 2.0' in text
    assert feed_sock.poll(300) == 0  # the unknown group got nothing
    assert sorted(Feed(middle).collect(2)) == [1, 2]


@pytest.mark.crash
@pytest.mark.timeout(90)
@pytest.mark.parametrize("extra", [(), BACKGROUND_WRITES], ids=["inline", "background"])
def test_random_sigkills_lose_nothing_acked_and_store_each_seq_once(  # type: ignore[no-untyped-def]
        middle_factory, extra: tuple[str, ...]) -> None:
    """An ingest-like forwarder (window, resend all unacked on timeout) against a middle
    that is SIGKILLed and restarted at random moments: every seq ends up in the log
    exactly once, because the dedup marks are rebuilt after every crash."""
    rng = random.Random(20261126)
    middle: Middle = middle_factory(*extra)
    ingest = middle.dealer(middle.router_port)
    total, size, window, resend_after = 3000, 10, 6, 1.0
    next_first = 1
    inflight: dict[int, tuple[int, float]] = {}  # last -> (first, sent_at)
    acked: set[int] = set()
    kills = 0
    kill_at = sorted(rng.sample(range(200, total - 200), 3))  # acked counts to kill at
    deadline = time.monotonic() + 60

    def send(first: int) -> None:
        n = min(size, total - first + 1)
        ingest.send_multipart(wire.encode_batch(
            "n1", first, [reading("d", s) for s in range(first, first + n)]))
        inflight[first + n - 1] = (first, time.monotonic())

    while len(acked) < total:
        assert time.monotonic() < deadline, f"only {len(acked)} of {total} acked"
        while len(inflight) < window and next_first <= total:
            send(next_first)
            next_first += size
        if kills < 3 and len(acked) >= kill_at[kills]:
            middle.kill()  # with a window of batches in flight
            kills += 1
            middle.start()
        if ingest.poll(50):
            reply = ingest.recv_multipart()
            if wire.message_kind(reply) == wire.KIND_ACK:
                ack = wire.decode_ack(reply)
                if ack.last in inflight:
                    first, _ = inflight.pop(ack.last)
                    acked.update(range(first, ack.last + 1))
        oldest = min((sent for _, sent in inflight.values()), default=None)
        if oldest is not None and time.monotonic() - oldest > resend_after:
            for first, _ in sorted(inflight.values()):
                send(first)
    assert kills == 3
    got = Feed(middle).collect(total, timeout=20)
    assert sorted(r.node_seq for r in got.values()) == list(range(1, total + 1))
    assert len(got) == total  # no seq stored twice
    assert middle.metric("iotpipe_middle_log_tail_seq") == total


def test_group_dropped_from_settings_stops_holding_the_log(middle_factory) -> None:  # type: ignore[no-untyped-def]
    middle: Middle = middle_factory("--consumer-groups", "storage,lake")
    ingest = middle.dealer(middle.router_port)
    wire.decode_ack(send_batch(ingest, "n1", 1, 5))
    feed = Feed(middle)
    feed.collect(5)
    feed.request(acks=[(1, 5)])
    # Storage's ack has arrived (it must be in the cursors written at the SIGTERM below).
    middle.wait_metrics('iotpipe_middle_feed_lag_records{group="storage"} 0.0')
    assert middle.depth() == 5  # "lake" has not acknowledged anything
    assert middle.terminate() == 0
    middle.extra = ["--consumer-groups", "storage"]
    middle.start()
    assert middle.depth() == 0
    assert "consumer group no longer configured" in middle.procs.log("middle-2")


def test_competing_consumers_of_one_group_share_the_feed(middle_factory) -> None:  # type: ignore[no-untyped-def]
    middle: Middle = middle_factory()
    ingest = middle.dealer(middle.router_port)
    for first in range(1, 501, 50):
        wire.decode_ack(send_batch(ingest, "n1", first, 50))
    consumers = [Feed(middle, "c1", credit=40), Feed(middle, "c2", credit=40)]
    seen: list[set[int]] = [set(), set()]
    for feed in consumers:
        feed.request()
    deadline = time.monotonic() + 15
    while len(seen[0] | seen[1]) < 500:
        assert time.monotonic() < deadline, f"only {len(seen[0] | seen[1])} of 500 delivered"
        for i, feed in enumerate(consumers):
            if feed.sock.poll(50):
                records = wire.decode_records(feed.sock.recv_multipart())
                seen[i].update(range(records.first, records.last + 1))
                feed.request(acks=[(records.first, records.last)])  # frees window
    assert not seen[0] & seen[1], "a record went to both consumers without a lease expiry"
    assert seen[0] and seen[1], "one consumer got everything"
    assert seen[0] | seen[1] == set(range(1, 501))


def test_consumers_from_before_records_v2_still_get_v1_deliveries(middle_factory) -> None:  # type: ignore[no-untyped-def]
    # One consumer per group, so each gets every record: an old one and an upgraded one.
    middle: Middle = middle_factory("--consumer-groups", "old,new")
    ingest = middle.dealer(middle.router_port)
    wire.decode_ack(send_batch(ingest, "n1", 1, 30))
    kinds: dict[str, set[bytes]] = {}
    got: dict[str, set[int]] = {}
    for group, version in (("old", 1), ("new", 2)):
        sock = middle.dealer(middle.feed_port)
        sock.send_multipart(wire.encode_feed_request(group, "c", 30, records_version=version))
        kinds[group], got[group] = set(), set()
        while len(got[group]) < 30:
            frames = recv(sock)
            kinds[group].add(wire.message_kind(frames))
            records = wire.decode_records(frames)
            assert records.group == group
            assert all(wire.decode_log_record(r).node == "n1" for r in records.records)
            got[group].update(range(records.first, records.last + 1))
    assert kinds == {"old": {wire.KIND_RECORDS}, "new": {wire.KIND_RECORDS_V2}}
    assert got["old"] == got["new"] == set(range(1, 31))


def test_undecodable_reading_is_stored_but_not_published(middle_factory) -> None:  # type: ignore[no-untyped-def]
    # The middle passes readings through untouched; one without a device id cannot be
    # routed on a v1 PUB socket (the topic is the device id), so it is counted instead.
    middle: Middle = middle_factory("--live-format", "v1")
    ingest = middle.dealer(middle.router_port)
    ingest.send_multipart(wire.encode_batch("n1", 1, [b"\xc1", reading("d", 2)]))
    assert wire.decode_ack(recv(ingest)) == wire.Ack("n1", 2)
    got = Feed(middle).collect(2)
    assert [got[1].reading, got[2].node_seq] == [b"\xc1", 2]
    assert middle.metric("iotpipe_middle_unpublishable_records_total") == 1
    assert middle.metric("iotpipe_middle_pub_messages_total") == 1


def test_v2_publishes_an_undecodable_reading_in_its_group(middle_factory) -> None:  # type: ignore[no-untyped-def]
    # v2 groups do not look into readings: the seqs stay contiguous and the relay, which
    # decodes every reading anyway, counts the bad one.
    middle: Middle = middle_factory()
    sub = middle.ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{middle.pub_port}")
    ingest = middle.dealer(middle.router_port)
    first = 1
    while True:  # PUB/SUB joins late: until the subscription hears a group
        send_batch(ingest, "warm", first, 1)
        first += 1
        if sub.poll(100):
            break
        assert first < 100, "SUB never received anything"
    while sub.poll(200):
        sub.recv_multipart()
    ingest.send_multipart(wire.encode_batch("n1", 1, [b"\xc1", reading("d", 2)]))
    assert wire.decode_ack(recv(ingest)) == wire.Ack("n1", 2)
    group = wire.decode_live_group(recv(sub))
    assert group.readings == [b"\xc1", reading("d", 2)]
    assert [e.device_id for e in wire.live_group_events(group)] == ["", "d"]
    wait_for(lambda: middle.metric("iotpipe_middle_pub_messages_total") == first + 1, 10,
             "both readings counted as published")
    assert middle.metric("iotpipe_middle_unpublishable_records_total") == 0


def test_failing_checkpoint_holds_log_space_instead_of_forgetting_marks(middle_factory,  # type: ignore[no-untyped-def]
                                                                         tmp_path) -> None:
    # A directory where the checkpoint's temp file goes makes every write fail.
    data_dir = tmp_path / "data0"
    (data_dir / "marks.ckpt.tmp").mkdir(parents=True)
    middle: Middle = middle_factory()
    assert middle.data_dir == data_dir
    ingest = middle.dealer(middle.router_port)
    wire.decode_ack(send_batch(ingest, "n1", 1, 5))
    feed = Feed(middle)
    feed.collect(5)
    feed.request(acks=[(1, 5)])
    middle.wait_metrics('iotpipe_middle_feed_lag_records{group="storage"} 0.0')
    wait_for(lambda: middle.metric("iotpipe_middle_checkpoint_failures_total") >= 1, 20,
             "the failing checkpoint to be counted")
    assert middle.depth() == 5  # acked by storage, but not released without a checkpoint
    assert 'iotpipe_middle_feed_lag_records{group="storage"} 0.0' in middle.metrics()
    (data_dir / "marks.ckpt.tmp").rmdir()
    wait_for(lambda: middle.depth() == 0, 10, "space released after checkpoints recovered")


def test_stuck_subscriber_never_slows_the_log(middle_factory) -> None:  # type: ignore[no-untyped-def]
    # PUB is lossy by nature: a subscriber that never reads loses events (and sees the
    # gap in the sequence) while ingest acks and the feed carry on.
    middle: Middle = middle_factory("--pub-hwm", "50")
    stuck = middle.ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.setsockopt(zmq.RCVHWM, 10)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(f"tcp://127.0.0.1:{middle.pub_port}")
    ingest = middle.dealer(middle.router_port)
    warm = 0
    while not stuck.poll(100):  # the subscription is in place once one event arrives
        warm += 1
        send_batch(ingest, "warm", warm, 1)
        assert warm < 100, "SUB never received anything"
    for first in range(1, 10_001, 500):
        assert wire.decode_ack(send_batch(ingest, "n1", first, 500, pad=100)).last == first + 499
    got = Feed(middle, credit=30_000).collect(10_000 + warm, timeout=30)
    assert sum(1 for r in got.values() if r.node == "n1") == 10_000
    seqs = []
    while stuck.poll(100):
        seqs += [e.seq for e in wire.decode_live_events(stuck.recv_multipart())]
    assert len(seqs) < 10_000, "the stuck subscriber was not cut off"
    assert any(b - a > 1 for a, b in itertools.pairwise(seqs)), "no visible gap"
