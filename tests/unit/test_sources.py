"""Client sockets from many loopback source addresses: the port is chosen at connect()."""

from __future__ import annotations

import socket

import pytest

from iotpipe_tools.sources import bound_socket

pytestmark = pytest.mark.unit


def test_bound_socket_defers_the_port_to_connect() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = bound_socket("127.0.0.2")
        try:
            # A plain bind((address, 0)) picks the port now, by a scan of the bind table
            # that ignores the destination; deferred, it is 0 until connect().
            assert sock.getsockname() == ("127.0.0.2", 0)
            assert not sock.getblocking()
            sock.setblocking(True)
            sock.settimeout(10)
            sock.connect(listener.getsockname())
            source, port = sock.getsockname()
            assert source == "127.0.0.2" and port > 0
            accepted, peer = listener.accept()
            accepted.close()
            assert peer == ("127.0.0.2", port)
        finally:
            sock.close()

