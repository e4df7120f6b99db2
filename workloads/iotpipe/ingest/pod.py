"""The parent of ``iotpipe ingest --processes N``: N children on one port, one pod endpoint.

The parent starts N children on one port (SO_REUSEPORT), forwards SIGTERM and SIGINT and
restarts a child that dies unexpectedly. Children die with the parent (Linux
``PR_SET_PDEATHSIG``), so a SIGKILLed parent leaves no process holding the port or a queue.

One health and metrics endpoint per pod: the parent serves ``/metrics``, ``/healthz`` and
``/readyz`` on ``metrics_port``; each child serves its own on a private loopback port that
it reports to the parent through a pipe. The parent's ``/metrics`` sums the children's
``iotpipe_*`` samples (connections, counters, queue depth: pod totals; see
``observability.merge_scrapes``) and its ``/readyz`` fails while any child is dead,
restarting, or not ready itself.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from iotpipe import lifecycle
from iotpipe.ingest.settings import IngestSettings
from iotpipe.observability import ObservabilityServer, PortInUse, merge_scrapes

__all__ = ["PodView", "die_with_parent", "run_parent"]

log = logging.getLogger("iotpipe.ingest")
PROCESS_INDEX_ENV = "IOTPIPE_INGEST_PROCESS_INDEX"
PARENT_PID_ENV = "IOTPIPE_INGEST_PARENT_PID"
REPORT_FD_ENV = "IOTPIPE_INGEST_REPORT_FD"


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies.

    Set by the child itself at startup; the parent may have died before that (the flag
    only covers deaths after it is set), so the parent pid is checked afterwards: a child
    re-parented already exits at once. SIGKILL rather than SIGTERM: the pod's parent is
    gone abnormally, a new one must find the port and the queues free, and nothing acked
    depends on a graceful exit (the queues are durable).
    """
    if not sys.platform.startswith("linux"):
        return
    if not lifecycle.die_with_parent(signal.SIGKILL):
        log.warning("prctl(PR_SET_PDEATHSIG) failed", extra={"fields": {
            "errno": ctypes.get_errno()}})
    if os.getppid() != parent_pid:
        log.error("parent process already gone; exiting", extra={"fields": {
            "parent_pid": parent_pid}})
        os._exit(1)


class _Child:
    """One child process as the parent sees it: the process and its private metrics port."""

    def __init__(self, index: int, argv: Sequence[str]) -> None:
        self.index = index
        read_fd, write_fd = os.pipe()
        env = {**os.environ, PROCESS_INDEX_ENV: str(index), PARENT_PID_ENV: str(os.getpid()),
               REPORT_FD_ENV: str(write_fd)}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iotpipe.cli", "ingest", *argv], env=env,
                pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        self._read_fd: int | None = read_fd
        self._buffer = b""
        self.metrics_port: int | None = None

    def poll_port(self) -> int | None:
        """Read the child's report pipe (non-blocking): its metrics port once known."""
        if self._read_fd is not None:
            try:
                chunk = os.read(self._read_fd, 64)
            except BlockingIOError:
                chunk = None
            if chunk is not None:
                self._buffer += chunk
                if b"\n" in self._buffer or not chunk:  # a line, or EOF (the child died)
                    line = self._buffer.split(b"\n", 1)[0].strip()
                    self.metrics_port = int(line) if line.isdigit() else None
                    self.close()
        return self.metrics_port

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None


# Straight to the child: an HTTP(S)_PROXY in the pod's environment must not apply.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_get(port: int, path: str, timeout: float) -> tuple[int, str]:
    try:
        with _LOCAL.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except OSError:
        return 0, ""


class PodView:
    """The pod's one health and metrics endpoint, served by the parent process.

    Asks every child's private endpoint at request time, all children at once (so a scrape
    is as fresh as a single process's, and one hung child costs one timeout, not N). Read
    from the observability thread while the main thread replaces children, hence the
    copies of ``children``.
    """

    def __init__(self, processes: int, probe_timeout: float = 0.8,
                 scrape_timeout: float = 3.0) -> None:
        self.processes = processes
        # Below Kubernetes' default probe timeout (1 s): a hung child makes the pod's
        # answer "not ready", not a probe timeout.
        self.probe_timeout = probe_timeout
        self.scrape_timeout = scrape_timeout
        self.children: dict[int, _Child] = {}
        self.restarts = 0
        self._pool = ThreadPoolExecutor(max_workers=max(2, 2 * processes),
                                        thread_name_prefix="pod-view")

    def _ports(self) -> dict[int, int | None]:
        return {i: (c.metrics_port if c.alive() else None)
                for i, c in list(self.children.items())}

    def _ask(self, ports: dict[int, int], path: str, timeout: float
             ) -> dict[int, tuple[int, str]]:
        futures = {i: self._pool.submit(_http_get, port, path, timeout)
                   for i, port in ports.items()}
        return {i: future.result() for i, future in futures.items()}

    def ready(self) -> bool:
        ports = self._ports()
        if len(ports) < self.processes or any(p is None for p in ports.values()):
            return False  # a child is dead, restarting, or not serving yet
        answers = self._ask({i: p for i, p in ports.items() if p is not None}, "/readyz",
                            self.probe_timeout)
        return all(status == 200 for status, _ in answers.values())

    def collect(self) -> Iterator[Metric]:
        ports = {i: p for i, p in self._ports().items() if p is not None}
        answers = self._ask(ports, "/metrics", self.scrape_timeout)
        scrapes = {str(i): text for i, (status, text) in sorted(answers.items())
                   if status == 200}
        yield from merge_scrapes(scrapes)
        yield GaugeMetricFamily("iotpipe_ingest_processes", "Ingest processes configured",
                                value=self.processes)
        yield GaugeMetricFamily("iotpipe_ingest_processes_scraped",
                                "Ingest processes whose metrics this scrape includes",
                                value=len(scrapes))
        yield CounterMetricFamily("iotpipe_ingest_process_restarts",
                                  "Child processes restarted after dying", value=self.restarts)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def run_parent(settings: IngestSettings, argv: Sequence[str]) -> int:
    """Start N children on one port; serve the pod's endpoint; forward signals; restart
    children that die."""
    view = PodView(settings.processes)
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in list(view.children.values()):
            if child.alive():
                child.proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if lifecycle.requested():
        return 0  # stopped while starting: no child was started
    registry = CollectorRegistry(auto_describe=False)
    registry.register(view)
    try:
        obs = ObservabilityServer(settings.host, settings.metrics_port, ready=view.ready,
                                  registry=registry).start()
    except PortInUse as exc:
        print(f"iotpipe ingest: error: {exc}", file=sys.stderr)
        return 1
    log.info("ingest pod endpoint", extra={"fields": {
        "metrics_port": obs.port, "processes": settings.processes}})
    try:
        for i in range(settings.processes):
            view.children[i] = _Child(i, argv)
        codes: dict[int, int] = {}
        while len(codes) < len(view.children):
            time.sleep(0.1)
            for i, child in list(view.children.items()):
                child.poll_port()
                if i in codes:
                    continue
                rc = child.proc.poll()
                if rc is None:
                    continue
                child.close()
                if stopping:
                    codes[i] = rc
                else:
                    log.error("ingest child died; restarting", extra={"fields": {
                        "index": i, "rc": rc}})
                    time.sleep(0.5)
                    view.restarts += 1
                    view.children[i] = _Child(i, argv)
        return max(codes.values(), default=0)
    finally:
        obs.stop()
        view.close()
        for child in view.children.values():
            child.close()
