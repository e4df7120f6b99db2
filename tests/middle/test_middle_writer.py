"""The middle's writer thread: a group is acked only once its append returned, and the
loop keeps receiving meanwhile (an in-process server whose log append is held by a gate)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq
from support.ports import free_port
from support.waiting import wait_for

from iotpipe import wire
from iotpipe.middle.server import MiddleServer
from iotpipe.middle.settings import MiddleSettings
from iotpipe.settings import parse_settings

pytestmark = [pytest.mark.timeout(60)]


def readings(node: str, first: int, n: int) -> list[bytes]:
    return [wire.encode_reading(f"{node}-dev", f"{node}/{s}", s, b'{"v":1}', s)
            for s in range(first, first + n)]


@dataclass
class GatedAppend:
    """Stands in for ``queue.append``: records each call, then waits for ``release``."""

    append: object
    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    calls: list[int] = field(default_factory=list)

    def __call__(self, records: Sequence[bytes], *, timeout: float = 0.0) -> range:
        self.calls.append(len(records))
        self.entered.set()
        assert self.release.wait(20), "the test never released the append"
        return self.append(records, timeout=timeout)  # type: ignore[operator]


@dataclass
class Running:
    server: MiddleServer
    gate: GatedAppend
    thread: threading.Thread
    ctx: zmq.Context  # type: ignore[type-arg]
    closed: bool = False

    def dealer(self) -> zmq.Socket:  # type: ignore[type-arg]
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{self.server.settings.router_port}")
        return sock


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    settings = parse_settings(MiddleSettings, [
        "--host", "127.0.0.1", "--router-port", str(free_port()),
        "--pub-port", str(free_port()), "--feed-port", str(free_port()),
        "--data-dir", str(tmp_path / "data"), "--consumer-groups", "storage"])
    server = MiddleServer(settings)
    gate = GatedAppend(server.queue.append)
    server.queue.append = gate  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, name="middle-loop", daemon=True)
    thread.start()
    ctx: zmq.Context = zmq.Context()  # type: ignore[type-arg]
    state = Running(server, gate, thread, ctx)
    try:
        yield state
    finally:
        gate.release.set()
        server.stop()
        thread.join(10)
        if not thread.is_alive() and not state.closed:
            server.close()
        ctx.destroy(linger=0)


def ack_of(sock: zmq.Socket, timeout_ms: int = 10_000) -> wire.Ack:  # type: ignore[type-arg]
    assert sock.poll(timeout_ms), f"no reply within {timeout_ms} ms"
    return wire.decode_ack(sock.recv_multipart())


def test_acks_wait_for_the_append_and_the_next_group_forms_meanwhile(running: Running) -> None:
    a, b = running.dealer(), running.dealer()
    a.send_multipart(wire.encode_batch("a", 1, readings("a", 1, 3)))
    assert running.gate.entered.wait(10)
    # While the first group is being written the loop still receives: both batches
    # below wait together for the next group.
    a.send_multipart(wire.encode_batch("a", 4, readings("a", 4, 3)))
    b.send_multipart(wire.encode_batch("b", 1, readings("b", 1, 2)))
    wait_for(lambda: running.server._arrival_readings == 5, 10,
             "both batches received while the first group is written")
    assert not a.poll(200), "acked before its append returned"
    running.gate.release.set()
    assert ack_of(a) == wire.Ack("a", 3)
    assert ack_of(a) == wire.Ack("a", 6)
    assert ack_of(b) == wire.Ack("b", 2)
    assert running.gate.calls == [3, 5]  # the two later batches were ONE append
    assert running.server.tail == 8


def test_a_group_being_written_at_stop_is_still_answered(running: Running) -> None:
    a = running.dealer()
    a.send_multipart(wire.encode_batch("a", 1, readings("a", 1, 4)))
    assert running.gate.entered.wait(10)
    running.server.stop()
    running.thread.join(10)
    assert not running.thread.is_alive()
    closing = threading.Thread(target=running.server.close)
    closing.start()
    running.gate.release.set()
    closing.join(10)
    running.closed = True
    assert ack_of(a) == wire.Ack("a", 4)


def test_a_resend_of_the_group_being_written_is_acked_without_a_second_copy(
        running: Running) -> None:
    a = running.dealer()
    batch = wire.encode_batch("a", 1, readings("a", 1, 3))
    a.send_multipart(batch)
    assert running.gate.entered.wait(10)
    a.send_multipart(batch)  # e.g. ingest timed out and failed over back here
    wait_for(lambda: running.server._arrival_readings == 3, 10, "the resend received")
    running.gate.release.set()
    assert ack_of(a) == wire.Ack("a", 3)
    assert ack_of(a) == wire.Ack("a", 3)
    assert running.gate.calls == [3]  # planned after the first group's marks: a duplicate
    assert running.server.queue.next_seq == 4
