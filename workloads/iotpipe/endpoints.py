"""Middle-tier endpoints read from a file that can change while a tier runs.

The operator mounts a ConfigMap (``<pipeline>-endpoints``, keys ``router``, ``pub``,
``feed``) at ``/etc/iotpipe/endpoints/``; scaling the middle tier rewrites it, and the tiers
pick the new list up without restarting (kubelet swaps the mounted files atomically).

File format: one ZeroMQ endpoint per line (``tcp://HOST:PORT`` or ``ipc://PATH``); blank
lines and ``#`` comments are ignored; a repeated endpoint counts once.

The parsing and diffing are plain functions (tested without files or sockets);
``EndpointsFile`` is the small I/O part: it re-reads the file when asked and returns a new
list only when the content changed and is valid. An empty, unreadable or invalid file keeps
the last good list: the problem is logged once (until the file changes again) and counted
in ``iotpipe_endpoints_file_errors_total``, and the tier carries on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = [
    "EndpointsCollector",
    "EndpointsDiff",
    "EndpointsError",
    "EndpointsFile",
    "check_endpoint",
    "diff_endpoints",
    "parse_endpoints",
    "resolve_endpoints",
]

log = logging.getLogger("iotpipe.endpoints")

SCHEMES = ("tcp://", "ipc://")


class EndpointsError(ValueError):
    """An endpoints file or list that cannot be used; the message names the problem."""


def check_endpoint(endpoint: str) -> str | None:
    """None if ``endpoint`` looks like a ZeroMQ endpoint we can connect to, else why not."""
    if not endpoint.startswith(SCHEMES):
        return f"{endpoint!r} is not a ZeroMQ endpoint (expected tcp://HOST:PORT)"
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[len("tcp://"):].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"{endpoint!r} has no valid HOST:PORT"
    elif endpoint == "ipc://":
        return f"{endpoint!r} has no path"
    return None


def parse_endpoints(text: str, source: str = "endpoints file") -> list[str]:
    """The endpoints listed in ``text``, in order, each once.

    Raises ``EndpointsError`` naming ``source`` and the line for a bad entry, or when the
    file lists no endpoint at all (an empty list would cut a tier off from every middle).
    """
    found: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        problem = check_endpoint(line)
        if problem is not None:
            raise EndpointsError(f"{source}, line {number}: {problem}")
        if line not in found:
            found.append(line)
    if not found:
        raise EndpointsError(f"{source}: no endpoint listed")
    return found


@dataclass(frozen=True)
class EndpointsDiff:
    added: tuple[str, ...]
    removed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def diff_endpoints(old: Sequence[str], new: Sequence[str]) -> EndpointsDiff:
    """What to connect (``added``, in ``new``'s order) and disconnect (``removed``)."""
    old_set, new_set = set(old), set(new)
    return EndpointsDiff(tuple(e for e in new if e not in old_set),
                         tuple(e for e in old if e not in new_set))


class EndpointsFile:
    """Re-reads an endpoints file; ``check()`` returns a new valid list when it changed.

    ``current`` is the last good list (``initial`` until the file gave one). Not
    thread-safe: one owner calls ``check()``.
    """

    def __init__(self, path: str | Path, initial: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.current: list[str] = list(initial)
        self.reloads = 0
        self.errors = 0
        self.failing = False
        self._last_text: str | None = None
        self._last_problem: str | None = None

    def load(self) -> list[str]:
        """Read the file now; raises ``EndpointsError`` if it gives no usable list."""
        text = self._read()
        endpoints = parse_endpoints(text, str(self.path))
        self._last_text = text
        self.current = endpoints
        self.failing = False
        return endpoints

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise EndpointsError(f"{self.path}: cannot read: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None

    def check(self) -> list[str] | None:
        """The new list if the file changed to a valid, different one; else None."""
        try:
            text = self._read()
            if text == self._last_text:
                return None
            endpoints = parse_endpoints(text, str(self.path))
        except EndpointsError as exc:
            self._report(str(exc))
            return None
        self._last_text = text
        self._last_problem = None
        self.failing = False
        if endpoints == self.current:
            return None
        diff = diff_endpoints(self.current, endpoints)
        log.info("endpoints changed", extra={"fields": {
            "file": str(self.path), "added": list(diff.added), "removed": list(diff.removed)}})
        self.current = endpoints
        self.reloads += 1
        return endpoints

    def _report(self, problem: str) -> None:
        self.failing = True
        if problem != self._last_problem:  # log once per distinct problem, count each check
            self.errors += 1
            self._last_problem = problem
            self._last_text = None  # the same bad text again is not news; a fix is
            log.error("endpoints file unusable; keeping the last good list", extra={"fields": {
                "error": problem, "endpoints": self.current}})


def resolve_endpoints(flag: str, static: Sequence[str], file_flag: str, path: str,
                      required: bool = True) -> tuple[list[str], EndpointsFile | None]:
    """The endpoints a tier starts with: the file's list when it is usable, else the static
    list. Raises ``EndpointsError`` (message for the user) if neither gives one and
    ``required``; otherwise the tier starts with what it has and the file is watched."""
    for endpoint in static:
        problem = check_endpoint(endpoint)
        if problem is not None:
            raise EndpointsError(f"{flag}: {problem}")
    if not path:
        if not static and required:
            raise EndpointsError(f"{flag} or {file_flag} is required")
        return list(static), None
    watched = EndpointsFile(path, static)
    try:
        return watched.load(), watched
    except EndpointsError as exc:
        if not static and required:
            raise EndpointsError(f"{file_flag}: {exc}") from None
        log.error("endpoints file unusable; using the static list", extra={
            "fields": {"error": str(exc), "endpoints": list(static)}})
        watched.errors += 1
        watched.failing = True
        return list(static), watched


class EndpointsCollector:
    """``iotpipe_endpoints`` (listed now), reloads and errors of one or more files."""

    def __init__(self, files: dict[str, EndpointsFile]) -> None:
        self._files = files

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        listed = GaugeMetricFamily("iotpipe_endpoints", "Middle endpoints in use, per file key",
                                   labels=["key"])
        failing = GaugeMetricFamily("iotpipe_endpoints_file_failing",
                                    "1 while the endpoints file is unusable (last good list "
                                    "kept)", labels=["key"])
        reloads = CounterMetricFamily("iotpipe_endpoints_reloads",
                                      "Endpoint lists taken from a changed file", labels=["key"])
        errors = CounterMetricFamily("iotpipe_endpoints_file_errors",
                                     "Distinct problems found in the endpoints file",
                                     labels=["key"])
        for key, watched in self._files.items():
            listed.add_metric([key], len(watched.current))
            failing.add_metric([key], int(watched.failing))
            reloads.add_metric([key], watched.reloads)
            errors.add_metric([key], watched.errors)
        yield listed
        yield failing
        yield reloads
        yield errors
