"""The relay's live fleet page in headless Chromium, against a real local pipeline.

The four tiers run as processes on loopback (storage with its read API, the relay with the
page's history and health sources), ``iotpipe simulate`` plays a fleet, and a test device
sends readings the page must show. Chromium is Debian's (``/usr/bin/chromium``), driven by
Playwright with ``executable_path`` (no downloaded browser). Screenshots are saved under
the test's tmp dir (``live-page*.png``).

Time bounds here are deadlines for waiting, never assertions of speed (CI is a loaded
2-core machine); the reading-to-page latency is measured and printed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.pipeline import Pipeline
from support.processes import ProcessGroup
from support.waiting import wait_for
from websockets.sync.client import connect

from iotpipe.fleet import fleet_registry_yaml

CHROMIUM = "/usr/bin/chromium"
FLEET = 40
PROBE = "probe-1"
SILENT = "silent-1"  # listed in the registry, never sends
REGISTRY = fleet_registry_yaml("sim-", FLEET).replace(
    "devices:\n",
    f"devices:\n  {PROBE}: {{class: probe, location: test-bench, labels: {{team: qa}}}}\n"
    f"  {SILENT}: {{class: probe, location: cellar}}\n", 1)

pytestmark = pytest.mark.integration

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")


@pytest.fixture
def chromium() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


class Probe:
    """A test device: each reading is sent and acknowledged (so it is durable) in turn."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.next_id = 1

    def send(self, data: dict[str, object], ts: float | None = None) -> float:
        """Send one reading; returns the time its ack arrived."""
        message: dict[str, object] = {"id": f"p-{self.next_id}", "data": data}
        if ts is not None:
            message["ts"] = ts
        self.next_id += 1
        token = self.pipeline.device_token(PROBE)
        with connect(self.pipeline.ingest_url, open_timeout=10,
                     additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            ws.send(json.dumps(message))
            reply = json.loads(ws.recv(timeout=10))
        assert reply == {"type": "ack", "ids": [message["id"]]}, reply
        return time.monotonic()


# The page's strict Content-Security-Policy forbids eval, so the test reads the DOM through
# selectors and attributes rather than JavaScript snippets.
def rows(page: object) -> list[str]:
    return [row.get_attribute("data-device") or ""
            for row in page.query_selector_all("#devices tbody tr")]  # type: ignore[attr-defined]


def cell_texts(page: object, column: int) -> list[str]:
    return [cell.text_content() or "" for cell in page.query_selector_all(  # type: ignore[attr-defined]
        f"#devices tbody tr td:nth-child({column + 1})")]


def number(page: object, selector: str, attribute: str) -> float:
    value = page.get_attribute(selector, attribute)  # type: ignore[attr-defined]
    return float(value) if value else 0.0


@pytest.fixture
def pipeline(procs: ProcessGroup, tmp_path: Path) -> Pipeline:
    pipe = Pipeline(procs, tmp_path)
    pipe.registry.write_text(REGISTRY)
    ports = pipe.ports
    pipe.storage_args = ["--read-api"]
    pipe.relay_args = [
        "--history-urls", f"http://127.0.0.1:{ports['storage_m']}",
        "--health-urls", f"ingest=http://127.0.0.1:{ports['ingest_m']}/metrics,"
                         f"middle=http://127.0.0.1:{ports['middle_m']}/metrics,"
                         f"storage=http://127.0.0.1:{ports['storage_m']}/metrics"]
    pipe.start_all()
    procs.iotpipe("simulate", "--url", pipe.ingest_url, "--connections", str(FLEET),
                  "--rate", "2", "--duration", "600", "--device-prefix", "sim-",
                  "--payload", "fleet", "--reconnect", name="simulate", env=pipe.env)
    return pipe


def test_live_page_shows_the_fleet_filters_charts_and_reconnects(
        pipeline: Pipeline, chromium: object, tmp_path: Path) -> None:
    probe = Probe(pipeline)
    # History first: 20 readings of the probe, stored before the page opens.
    now = time.time()
    for i in range(20):
        probe.send({"v": float(i)}, ts=now - 20 + i)
    wait_for(lambda: int(pipeline.query("--device", PROBE, "--count").strip() or 0) == 20,
               30, "the probe's history is stored")

    context = chromium.new_context(viewport={"width": 1400, "height": 1100})  # type: ignore[attr-defined]
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    url = f"http://127.0.0.1:{pipeline.ports['relay']}/?token={pipeline.client_token('page')}"
    page.goto(url)
    page.wait_for_selector("#conn[data-state=open]", timeout=15_000)

    # Devices appear: the whole simulated fleet, with registry classes.
    wait_for(lambda: number(page, "#shown", "data-matched") >= FLEET, 30,
               "every simulated device is listed")
    page.wait_for_selector("#f-class option[value=thermometer]", state="attached",
                           timeout=15_000)

    # A reading sent now appears on the page (latency measured, not asserted).
    acked = probe.send({"v": 1234.5, "marker": "first-live"})
    page.wait_for_selector(f"#devices tr[data-device='{PROBE}'] td.data:has-text('first-live')",
                           timeout=10_000)
    latency = time.monotonic() - acked
    print(f"probe reading on the page {latency * 1000:.0f} ms after its ack")

    # Filters narrow the table.
    page.fill("#f-prefix", "sim-1")
    expected = sorted((f"sim-{i}" for i in range(FLEET) if f"sim-{i}".startswith("sim-1")),
                      key=lambda d: int(d[4:]))
    wait_for(lambda: rows(page) == expected, 10, f"prefix filter shows {expected}")
    page.fill("#f-prefix", "")
    page.wait_for_selector("#f-class option[value=probe]", state="attached", timeout=10_000)
    page.select_option("#f-class", "probe")
    wait_for(lambda: rows(page) == [PROBE, SILENT], 10, "class filter shows the probes")
    # The silent device is known from the registry and shown as stale.
    page.check("#f-stale")
    wait_for(lambda: rows(page) == [SILENT], 10, "stale filter shows the silent device")
    assert cell_texts(page, 3) == ["never"]
    page.uncheck("#f-stale")
    page.fill("#f-prefix", "probe")
    wait_for(lambda: rows(page) == [PROBE], 10, "class and prefix filters together")
    page.fill("#f-prefix", "")
    page.select_option("#f-class", "")
    page.fill("#f-label", "team=qa")
    wait_for(lambda: rows(page) == [PROBE], 10, "label filter shows only the probe")
    page.fill("#f-label", "")
    page.select_option("#f-location", "plant-a/hall-1")
    wait_for(lambda: 0 < len(rows(page)) < FLEET
               and set(cell_texts(page, 2)) == {"plant-a/hall-1"}, 10,
               "location filter shows only plant-a/hall-1")
    page.select_option("#f-location", "")
    wait_for(lambda: len(rows(page)) == FLEET + 2, 10, "all devices again")

    # The device chart: the stored history, then live points.
    page.click(f"#devices tr[data-device='{PROBE}']")
    wait_for(lambda: number(page, "#chart", "data-history") >= 21, 15,
               "the chart holds the probe's stored history")
    assert page.query_selector("#chart .uplot canvas") is not None
    for i in range(3):
        probe.send({"v": 2000.0 + i})
    wait_for(lambda: number(page, "#chart", "data-live") >= 3, 10,
               "the chart adds live points")

    # Pipeline health from every tier's metrics.
    for tier in ("ingest", "middle", "storage", "relay"):
        page.wait_for_selector(f"#health .tier[data-tier={tier}]", timeout=15_000)
    assert "unreachable" not in page.inner_text("#health")
    ingest_health = page.inner_text("#health .tier[data-tier=ingest]")
    assert "queue" in ingest_health and "ack p50/p99" in ingest_health, ingest_health

    page.screenshot(path=str(tmp_path / "live-page.png"), full_page=True)
    assert problems == [], problems

    # The relay restarts: the page reconnects by itself and the stream goes on.
    pipeline.kill("relay")
    page.wait_for_selector("#conn[data-state=reconnecting]", timeout=10_000)
    pipeline.start("relay")
    page.wait_for_selector("#conn[data-state=open]", timeout=30_000)
    page.wait_for_selector(".notice[data-kind=reconnect]", timeout=5_000)
    probe.send({"v": 1.0, "marker": "after-restart"})
    page.wait_for_selector(
        f"#devices tr[data-device='{PROBE}'] td.data:has-text('after-restart')",
        timeout=10_000)
    page.screenshot(path=str(tmp_path / "live-page-reconnected.png"), full_page=True)
    # While the relay was down the browser reports refused connections (the WebSocket and
    # the health poll); nothing else may go wrong.
    unexpected = [p for p in problems
                  if "ERR_CONNECTION_REFUSED" not in p and "WebSocket connection" not in p]
    assert unexpected == [], unexpected
    context.close()
