"""The four tiers as real processes on loopback ports, and checks against what they stored."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from iotpipe.auth import CLIENT_AUDIENCE, DEVICE_AUDIENCE, issue_token
from support.devices import Fleet
from support.ports import free_port
from support.processes import ProcessGroup
from support.waiting import exited, wait_for, wait_ready

SECRET = "integration-secret-0123456789abcdef0123456789"
# Ingest gives up on a middle that has not acked its oldest batch for this long, and fails over.
FORWARD_ACK_TIMEOUT_S = 1.0

REGISTRY_YAML = """\
devices:
  dev-000: {class: boiler, location: hall-1, labels: {line: "1"}}
prefixes:
  dev-: {class: thermometer, location: hall-2}
"""


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def metric_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample, or the sum over labelled ones."""
    total: float | None = None
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Pipeline:
    """The four tiers on loopback ports, each a separate process that tests may kill."""

    procs: ProcessGroup
    root: Path
    ingest_args: list[str] = field(default_factory=list)
    middle_args: list[str] = field(default_factory=list)
    relay_args: list[str] = field(default_factory=list)
    storage_args: list[str] = field(default_factory=list)
    middles: int = 1  # tiers "middle" (id mid-0), "middle1" (mid-1), ...

    def __post_init__(self) -> None:
        self.middle_names = ["middle"] + [f"middle{i}" for i in range(1, self.middles)]
        names = ["ingest", "relay", "ingest_m", "storage_m", "relay_m"]
        for i in range(self.middles):
            names += [f"router{i}", f"pub{i}", f"feed{i}", f"{self.middle_names[i]}_m"]
        self.ports = {name: free_port() for name in names}
        self.registry = self.root / "registry.yaml"
        self.registry.write_text(REGISTRY_YAML)
        self.db = self.root / "store" / "readings.db"
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {"IOTPIPE_AUTH_SECRET": SECRET}

    @property
    def tiers(self) -> list[str]:
        return [*self.middle_names, "storage", "relay", "ingest"]

    @property
    def ingest_url(self) -> str:
        return f"ws://127.0.0.1:{self.ports['ingest']}/v1/ingest"

    @property
    def relay_url(self) -> str:
        return f"ws://127.0.0.1:{self.ports['relay']}/v1/live"

    def metrics_url(self, tier: str) -> str:
        return f"http://127.0.0.1:{self.ports[tier + '_m']}"

    def _endpoints(self, kind: str) -> str:
        return ",".join(f"tcp://127.0.0.1:{self.ports[f'{kind}{i}']}"
                        for i in range(self.middles))

    def argv(self, tier: str) -> list[str]:
        p = self.ports
        common = ["--host", "127.0.0.1", "--metrics-port", str(p[tier + "_m"])]
        if tier in self.middle_names:
            i = self.middle_names.index(tier)
            return ["middle", *common, "--router-port", str(p[f"router{i}"]),
                    "--pub-port", str(p[f"pub{i}"]), "--feed-port", str(p[f"feed{i}"]),
                    "--data-dir", str(self.root / tier), "--log-bytes", str(256 << 20),
                    "--segment-bytes", str(8 << 20), "--middle-id", f"mid-{i}",
                    "--consumer-groups", "storage", "--lease-timeout", "3",
                    "--consumer-timeout", "3", *self.middle_args]
        if tier == "storage":
            return ["storage", *common, "--feed-endpoints", self._endpoints("feed"),
                    "--group", "storage", "--consumer-id", "store-0",
                    "--sinks", f"sqlite://{self.db}", "--registry-file", str(self.registry),
                    "--data-dir", str(self.root / "store"), *self.storage_args]
        if tier == "relay":
            return ["relay", *common, "--port", str(p["relay"]),
                    "--middle-pub-endpoints", self._endpoints("pub"),
                    "--registry-file", str(self.registry), *self.relay_args]
        if tier == "ingest":
            return ["ingest", *common, "--port", str(p["ingest"]),
                    "--data-dir", str(self.root / "ingest"), "--queue-bytes", str(64 << 20),
                    "--node-id", "ing-0", "--middle-endpoints", self._endpoints("router"),
                    "--forward-ack-timeout", str(FORWARD_ACK_TIMEOUT_S), "--rate-limit", "0",
                    *self.ingest_args]
        raise ValueError(tier)

    def start(self, tier: str, wait: bool = True) -> subprocess.Popen[bytes]:
        proc = self.procs.iotpipe(*self.argv(tier), name=tier, env=self.env)
        self.running[tier] = proc
        if wait:
            self.wait_ready(tier)
        return proc

    def start_all(self) -> None:
        for tier in self.tiers:
            self.start(tier, wait=False)
        for tier in self.tiers:
            self.wait_ready(tier)

    def wait_ready(self, tier: str, timeout: float = 30.0) -> None:
        wait_ready(self.metrics_url(tier) + "/readyz", timeout, what=f"{tier} to be ready",
                   abort=exited(self.running[tier], tier),
                   details=lambda: self.procs.log(tier)[-3000:])

    def kill(self, tier: str) -> None:
        proc = self.running[tier]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def terminate(self, tier: str, timeout: float = 60.0) -> int:
        proc = self.running[tier]
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)

    def metrics(self, tier: str) -> str:
        return http_get(self.metrics_url(tier) + "/metrics")

    def device_token(self, device: str) -> str:
        return issue_token(SECRET.encode(), device, DEVICE_AUDIENCE, 3600)

    def client_token(self, app: str = "test-app") -> str:
        return issue_token(SECRET.encode(), app, CLIENT_AUDIENCE, 3600)

    # -- storage checks -------------------------------------------------------------------

    def query(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "iotpipe.cli", "query", "--db", str(self.db), *args],
            capture_output=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    def stored_count(self) -> int:
        if not self.db.exists():
            return 0
        return int(self.query("--count").strip() or 0)

    def stored(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.query("--json").splitlines() if line]

    def wait_stored(self, expected: int, timeout: float = 60.0) -> int:
        """The stored count once it reaches ``expected``, or the last count seen (for the
        caller's assertion to report) when it does not within ``timeout``."""
        counts = [-1]

        def reached() -> bool:
            counts.append(self.stored_count())
            return counts[-1] >= expected

        with contextlib.suppress(AssertionError):
            wait_for(reached, timeout, f"{expected} stored rows", interval=0.5)
        return counts[-1]


def assert_stored_exactly_once(pipeline: Pipeline, fleet: Fleet) -> list[dict[str, object]]:
    """Storage against every ack of ``fleet``: none missing, none twice, nothing unsent."""
    acked = fleet.acked_pairs()
    expected = len(acked)
    count = pipeline.wait_stored(expected, timeout=60)
    rows = pipeline.stored()
    keys = Counter((str(r["device_id"]), str(r["msg_id"])) for r in rows)
    duplicates = [k for k, n in keys.items() if n > 1]
    assert not duplicates, f"stored more than once: {duplicates[:5]}"
    missing = acked - set(keys)
    assert not missing, f"{len(missing)} acknowledged messages not stored " \
                        f"(count {count}), e.g. {sorted(missing)[:5]}"
    phantom = set(keys) - fleet.sent_pairs()
    assert not phantom, f"stored messages nobody sent: {sorted(phantom)[:5]}"
    return rows
