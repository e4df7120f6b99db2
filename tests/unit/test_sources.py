"""Client sockets from many loopback source addresses: the port is chosen at connect()."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from iotpipe_tools.sources import bound_socket, connect_from
from iotpipe_tools.waiting import eventually

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



def test_connect_from_connects_from_the_source_address_to_the_urls_port() -> None:
    async def scenario() -> None:
        peers: list[tuple[str, int]] = []

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer.get_extra_info("peername"))
            writer.close()

        server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            sock = await connect_from("127.0.0.3", f"ws://127.0.0.1:{port}/v1/ingest")
            try:
                source, source_port = sock.getsockname()
                assert source == "127.0.0.3" and source_port > 0
                assert sock.getpeername() == ("127.0.0.1", port)
                await eventually(lambda: peers == [("127.0.0.3", source_port)], 10,
                                 "the server to see the connection")
            finally:
                sock.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_connect_from_closes_its_socket_when_nothing_listens() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]  # closed below: nothing listens on it then
    before = _open_fds()
    with pytest.raises(OSError):
        asyncio.run(asyncio.wait_for(connect_from("127.0.0.2", f"ws://127.0.0.1:{port}/"), 10))
    assert _open_fds() <= before


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))

