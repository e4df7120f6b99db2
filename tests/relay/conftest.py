"""Fixtures for the relay tests: a real relay process fed by the test's PUB socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from support.ports import free_port
from support.processes import ProcessGroup
from support.relay import SECRET, Relay, wait_http


@pytest.fixture
def relay(procs: ProcessGroup, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Relay]:
    """A relay process; parametrize indirectly with a list of extra flags."""
    extra: list[str] = list(getattr(request, "param", []))
    registry = tmp_path / "registry.yaml"
    registry.write_text("devices:\n  boiler-1: {class: boiler, location: hall-1}\n"
                        "prefixes:\n  therm-: {class: thermometer, location: hall-2}\n")
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    pub.setsockopt(zmq.LINGER, 0)
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    port, metrics_port = free_port(), free_port()
    procs.iotpipe(
        "relay", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
        "--middle-pub-endpoints", f"tcp://127.0.0.1:{pub_port}",
        "--registry-file", str(registry), "--client-queue", "50", "--stall-timeout", "2",
        *extra, name="relay", env={"IOTPIPE_AUTH_SECRET": SECRET.decode()},
    )
    metrics = f"http://127.0.0.1:{metrics_port}"
    wait_http(metrics + "/readyz")
    try:
        yield Relay(f"ws://127.0.0.1:{port}/v1/live", metrics, pub, "relay", procs, registry)
    finally:
        pub.close(0)
        context.term()
