"""The bounded waits of the test suite: the tools' implementation (one for both)."""

from iotpipe_tools.waiting import (
    NotReady,
    Poll,
    eventually,
    exited,
    http_status,
    port_open,
    wait_for,
    wait_port,
    wait_ready,
)

__all__ = ["NotReady", "Poll", "eventually", "exited", "http_status", "port_open", "wait_for",
           "wait_port", "wait_ready"]
