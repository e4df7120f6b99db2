"""The one bounded wait of tools and tests: it returns the checked value, stops early when
a process died, and names what it waited for when it gives up."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from support.ports import free_port
from support.waiting import NotReady, exited, port_open, wait_for, wait_port

pytestmark = pytest.mark.unit


def test_wait_for_hands_back_the_first_truthy_value() -> None:
    values = iter([0, None, "", 7])
    assert wait_for(lambda: next(values), 5, "a value", interval=0) == 7


def test_wait_for_names_the_thing_and_the_details_when_time_runs_out() -> None:
    with pytest.raises(NotReady, match=r"timed out after 0\.05s waiting for nothing") as info:
        wait_for(lambda: False, 0.05, "nothing", interval=0.01, details=lambda: "log tail")
    assert "log tail" in str(info.value)
    assert isinstance(info.value, AssertionError)  # a failed wait fails a test as an assert


def test_wait_port_sees_a_listener_and_stops_when_the_process_exits() -> None:
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert port_open(port)
        wait_port(port, 5)
    assert not port_open(port)
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        proc.wait(timeout=30)
        with pytest.raises(NotReady, match="server exited with 3 while waiting for a listener"):
            wait_port(port, 30, abort=exited(proc, "server"))
    finally:
        proc.kill()
        proc.wait()
