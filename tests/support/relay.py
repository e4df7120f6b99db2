"""A relay process under test: its addresses, the PUB socket feeding it, tokens."""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import zmq

from iotpipe.auth import CLIENT_AUDIENCE, issue_token
from iotpipe.wire import encode_live, encode_live_group, encode_reading
from support.processes import ProcessGroup
from support.waiting import wait_for

SECRET = b"relay-test-secret-0123456789abcdef"


@dataclass
class Relay:
    url: str
    metrics: str
    pub: zmq.Socket  # type: ignore[type-arg]
    proc_name: str
    procs: ProcessGroup
    registry: Path

    def publish(self, device: str, seq: int, source: str = "m0", data: bytes = b'{"v":1}') -> None:
        reading = encode_reading(device, f"{device}/{seq}", seq, data, seq + 1)
        self.pub.send_multipart(encode_live(device, source, seq, reading))

    def publish_group(self, devices: list[str], first: int, source: str = "m0") -> None:
        """One v2 live message: ``devices[i]``'s reading at seq ``first + i``."""
        readings = [encode_reading(d, f"{d}/{first + i}", first + i, b'{"v":1}', first + i + 1)
                    for i, d in enumerate(devices)]
        self.pub.send_multipart(encode_live_group(source, first, readings))

    def token(self, subject: str = "app", audience: str = CLIENT_AUDIENCE) -> str:
        return issue_token(SECRET, subject, audience, 600)

    def headers(self, subject: str = "app") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(subject)}"}


def wait_http(url: str, timeout: float = 20.0) -> str:
    """The body of GET ``url`` once it answers 200."""
    def fetch() -> tuple[str] | None:
        with contextlib.suppress(urllib.error.URLError, ConnectionError), \
                urllib.request.urlopen(url, timeout=2) as response:
            return (response.read().decode(),)
        return None

    return wait_for(fetch, timeout, f"{url} to answer 200", interval=0.1)[0]
