"""Pod and Service addresses on loopback, DNS through hosts files, a kube-proxy stand-in.

Each cluster takes one ``127.A.0.0/16`` (``A`` random, so concurrent test runs rarely
meet): Services get ``127.A.0.n`` and pods ``127.A.1.n`` upwards, so every pod keeps its
real ports. Names resolve through a hosts file per pod, bind-mounted over ``/etc/hosts``
in the pod's private mount namespace and rewritten in place (same inode) as pods come
and go; glibc reads the file on every lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class Addresses:
    def __init__(self) -> None:
        self.block = random.randrange(100, 250)
        self._services = itertools.count(2)
        self._pods = itertools.count(1)

    def service(self) -> str:
        return f"127.{self.block}.0.{next(self._services)}"

    def pod(self) -> str:
        n = next(self._pods)
        # 127.A.1.1 .. 127.A.254.254: never reused within one cluster (k8s may reuse, but
        # a fresh address keeps a dead pod's half-open connections from meeting its heir)
        return f"127.{self.block}.{1 + (n - 1) // 254}.{1 + (n - 1) % 254}"


def dns_names(name: str, namespace: str) -> list[str]:
    """``name`` as a pod in ``namespace`` would write it, shortest first."""
    return [name, f"{name}.{namespace}", f"{name}.{namespace}.svc",
            f"{name}.{namespace}.svc.cluster.local"]


def hosts_text(records: dict[str, list[str]], own: tuple[str, list[str]] | None) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if own is not None:
        lines.append(f"{own[0]}\t{' '.join(own[1])}")
    for name in sorted(records):
        lines.extend(f"{address}\t{name}" for address in records[name])
    return "\n".join(lines) + "\n"


def write_in_place(path: Path, text: str) -> bool:
    """Rewrite ``path`` keeping its inode (a bind mount follows the inode, not the name)."""
    data = text.encode()
    if path.exists() and path.read_bytes() == data:
        return False
    with open(path, "r+b" if path.exists() else "wb") as handle:
        handle.write(data)
        handle.truncate()
    return True


class ServiceProxy:
    """kube-proxy for one Service port: connections to ``ip:port`` go to a ready endpoint."""

    def __init__(self, ip: str, port: int, endpoints: Callable[[], list[tuple[str, int]]]
                 ) -> None:
        self.ip = ip
        self.port = port
        self._endpoints = endpoints
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.ip, self.port,
                                                  reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            endpoints = self._endpoints()
            if not endpoints:
                return  # no ready endpoint: refused, as a ClusterIP without endpoints is
            host, port = random.choice(endpoints)
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), timeout=5)
            except (OSError, TimeoutError):
                return
            try:
                await asyncio.gather(self._pipe(reader, up_writer),
                                     self._pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._conns.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            # pass the half-close on, so a close from either side reaches the other
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()
