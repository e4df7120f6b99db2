"""Test helpers for ingest: a fake middle ROUTER in a thread, readiness, simulator runs, queues."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from iotpipe.ingest.identity import INCARNATION_FILE
from iotpipe.queue import PersistentQueue
from iotpipe.wire import BATCH_KINDS, decode_batch, decode_reading, encode_ack, encode_busy
from iotpipe_tools.simulate import SimulateSettings, SimulationReport
from support import waiting

SECRET = "ingest-test-secret-at-least-32-bytes-long"


class FakeMiddle:
    """A ROUTER that records every batch and acks it (or stays silent, or says busy).

    ``mode``: "ack" (default), "silent" (never answers), or "busy" (answers busy to the
    first ``busy_count`` batches, then acks).
    """

    @property
    def nodes(self) -> set[str]:
        with self.lock:
            return {node for node, _ in self.stored}

    def __init__(self, endpoint: str = "tcp://127.0.0.1:*", mode: str = "ack",
                 busy_count: int = 0, delay: float = 0.0) -> None:
        self.mode = mode
        self.delay = delay  # seconds before each ack: a slow middle lets the queue fill
        self.busy_count = busy_count
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.lock = threading.Lock()
        self.batches: list[tuple[str, int, int]] = []   # (node, first, n) in arrival order
        self.stored: dict[tuple[str, int], bytes] = {}  # (node, seq) -> reading
        self.busy_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(20):
                continue
            frames = self._sock.recv_multipart()
            ident, body = frames[0], frames[1:]
            if not body or body[0] not in BATCH_KINDS:
                continue
            batch = decode_batch(body)
            if self.delay:
                time.sleep(self.delay)
            with self.lock:
                self.batches.append((batch.node, batch.first, len(batch.readings)))
                if self.mode == "silent":
                    continue
                if self.mode == "busy" and self.busy_sent < self.busy_count:
                    self.busy_sent += 1
                    reply = encode_busy(batch.node, batch.first, 50, "log full")
                else:
                    for i, reading in enumerate(batch.readings):
                        self.stored[(batch.node, batch.first + i)] = reading
                    reply = encode_ack(batch.node, batch.last)
            self._sock.send_multipart([ident, *reply])

    def messages(self) -> set[tuple[str, str]]:
        """(device_id, msg_id) of every stored reading."""
        with self.lock:
            readings = list(self.stored.values())
        return {(r.device_id, r.msg_id) for r in map(decode_reading, readings)}

    def wait_for(self, predicate: Callable[[FakeMiddle], bool], timeout: float) -> bool:
        """Whether ``predicate`` held within ``timeout`` (for the caller to assert on)."""
        with contextlib.suppress(AssertionError):
            return waiting.wait_for(lambda: predicate(self), timeout, "the fake middle",
                                    interval=0.02)
        return predicate(self)

    async def until(self, predicate: Callable[[FakeMiddle], bool], within: float) -> bool:
        """``wait_for`` for coroutines: the event loop (and an in-process ingest's
        forwarder on it) keeps running while it waits."""
        with contextlib.suppress(AssertionError):
            return await waiting.eventually(lambda: predicate(self), within,
                                            "the fake middle", interval=0.02)
        return predicate(self)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
        self._context.term()


def node_identity(queue_dir: Path, base: str) -> str:
    """The identity a queue is forwarded under: ``base~<incarnation in the queue dir>``."""
    incarnation = (queue_dir / INCARNATION_FILE).read_text().strip()
    assert len(incarnation) == 16
    return f"{base}~{incarnation}"


def simulate(port: int, **kwargs: object) -> SimulateSettings:
    values: dict[str, object] = {"url": f"ws://127.0.0.1:{port}/v1/ingest",
                                 "secret": SECRET, "ack_timeout": 10.0}
    values.update(kwargs)
    return SimulateSettings(**values)  # type: ignore[arg-type]


def acked_pairs(report: SimulationReport) -> set[tuple[str, str]]:
    return {(d, str(i)) for d, ids in report.acked_ids.items() for i in ids}


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return sorted(found)


def queue_depth(path: Path) -> int:
    with PersistentQueue.open(path, capacity_bytes=1 << 30, consumers=("forwarder",)) as q:
        return q.depth().records


def wait_ready(metrics_port: int, timeout: float = 20.0) -> None:
    """Wait for an ingest's /readyz; TimeoutError (with the reason) when it never answers."""
    try:
        waiting.wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", timeout,
                           what=f"ingest on metrics port {metrics_port}")
    except AssertionError as exc:
        raise TimeoutError(str(exc)) from None
