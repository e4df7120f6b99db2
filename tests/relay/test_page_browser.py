"""The live page in headless Chromium against a real relay process fed by the test's own
PUB socket: what the real pipeline rarely does on cue (sequence gaps, a middle whose log
starts again, 10,000 devices at once) is published here.

Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright with ``executable_path``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.relay import Relay
from support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
MAX_ROWS = 200  # app.js: rows drawn at once

# Frame pacing seen by the page (installed before the page's own script; measurement
# only, so this context bypasses the page's CSP to run it).
FRAME_PROBE = """
window.__frames = {count: 0, worst: 0, last: 0, long: 0};
(function tick(t) {
  const f = window.__frames;
  if (f.last) { const gap = t - f.last; f.worst = Math.max(f.worst, gap); if (gap > 50) f.long++; }
  f.last = t; f.count++;
  requestAnimationFrame(tick);
})(0);
"""


@pytest.fixture
def browser() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM,
                                              args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


def page_url(target: Relay) -> str:
    http = target.url.replace("ws://", "http://").removesuffix("/v1/live")
    return f"{http}/?token={target.token('page')}"


def wait_until(predicate: object, within_s: float, what: str, tick: object = None) -> None:
    """Poll ``predicate``, calling ``tick`` (which returns None) after each miss."""
    wait_for(lambda: predicate() or (tick() if tick is not None else None),  # type: ignore[operator]
             within_s, what, interval=0.1)


def open_page(browser: object, target: Relay, bypass_csp: bool = False
              ) -> tuple[object, list[str]]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000},  # type: ignore[attr-defined]
                                  bypass_csp=bypass_csp)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    if bypass_csp:
        page.add_init_script(FRAME_PROBE)
    page.goto(page_url(target))
    page.wait_for_selector("#conn[data-state=open]", timeout=15_000)
    return page, problems


def warm_up(target: Relay, page: object, device: str = "therm-0") -> int:
    """PUB/SUB drops everything until the relay's subscription reaches the test's PUB:
    publish until the page shows the device. Returns the last seq used (source m0)."""
    seq = 0

    def publish() -> None:
        nonlocal seq
        seq += 1
        target.publish(device, seq, source="m0")

    wait_until(lambda: page.query_selector(f"#devices tr[data-device='{device}']") is not None,  # type: ignore[attr-defined]
               20, "the page shows the first device", tick=publish)
    return seq


def test_gap_and_reset_frames_are_shown_to_the_user(relay: Relay, browser: object,
                                                   tmp_path: Path) -> None:
    page, problems = open_page(browser, relay)
    seq = warm_up(relay, page)
    # Four events never reach the relay: the relay sends an upstream gap frame.
    relay.publish("therm-0", seq + 5, source="m0")
    gap = page.wait_for_selector(".notice[data-kind=gap]", timeout=10_000)
    text = gap.inner_text()
    assert "4 readings lost between middle m0 and the relay" in text, text
    assert f"seq {seq + 1}\u2013{seq + 4}" in text, text
    # The middle's log starts again at 1: a reset frame.
    relay.publish("therm-0", 1, source="m0")
    reset = page.wait_for_selector(".notice[data-kind=reset]", timeout=10_000)
    assert "middle m0 started its log afresh" in reset.inner_text()
    assert f"last sequence number was {seq + 5}" in reset.inner_text()
    page.screenshot(path=str(tmp_path / "live-page-gap-reset.png"))
    assert problems == [], problems


# The page must get every reading here: a queue that holds the whole burst, no stall close.
@pytest.mark.parametrize("relay", [["--client-queue", "100000", "--stall-timeout", "60"]],
                         indirect=True)
def test_ten_thousand_devices_update_in_batches(relay: Relay, browser: object,
                                               tmp_path: Path) -> None:
    page, problems = open_page(browser, relay, bypass_csp=True)
    seq = warm_up(relay, page)
    devices = 10_000
    started = time.monotonic()
    for i in range(devices):  # every device appears at once
        seq += 1
        relay.publish(f"therm-{i}", seq, source="m0", data=b'{"t":0.5}')
    published = time.monotonic() - started
    # Every device, and boiler-1, which the registry lists but which never sends.
    wait_until(lambda: page.get_attribute("#shown", "data-matched") == str(devices + 1), 60,  # type: ignore[attr-defined]
               "the page lists every device")
    # Steady state: the whole fleet reporting once a second (10,000 readings/s) for 5 s.
    cdp = page.context.new_cdp_session(page)  # type: ignore[attr-defined]
    cdp.send("Performance.enable")

    def cpu() -> dict[str, float]:
        return {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}

    before = cpu()
    page.evaluate("window.__frames = {count: 0, worst: 0, last: 0, long: 0}")  # type: ignore[attr-defined]
    for second in range(1, 6):
        start = time.monotonic()
        for chunk in range(10):
            for i in range(chunk * devices // 10, (chunk + 1) * devices // 10):
                seq += 1
                relay.publish(f"therm-{i}", seq, source="m0", data=b'{"t":%d.5}' % second)
            time.sleep(max(0.0, start + (chunk + 1) * 0.1 - time.monotonic()))
    frames = page.evaluate("window.__frames")  # type: ignore[attr-defined]
    after = cpu()
    busy = {name: after[name] - before[name] for name in
            ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration")}
    # Never one row per device in the DOM: the table draws at most MAX_ROWS and says so.
    rows = page.query_selector_all("#devices tbody tr")  # type: ignore[attr-defined]
    assert len(rows) == MAX_ROWS
    assert "narrow the filters" in page.inner_text("#shown")  # type: ignore[attr-defined]
    # Filtering 10,000 devices down to an exact id prefix.
    page.fill("#f-prefix", "therm-999")  # type: ignore[attr-defined]
    wait_until(lambda: page.get_attribute("#shown", "data-matched") == "11", 10,  # type: ignore[attr-defined]
               "therm-999 and therm-9990..9999")
    wait_until(lambda: "t=5.5" in (page.text_content(  # type: ignore[attr-defined]
        "#devices tr[data-device='therm-9999'] td.data") or ""), 30,
        "the last second's reading of the last device is shown")
    print(f"10,000 new devices published in {published:.2f} s; then 10,000 readings/s for "
          f"5 s: {frames['count']} frames, worst frame gap {frames['worst']:.0f} ms, "
          f"gaps over 50 ms {frames['long']}; page main thread busy (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()))
    page.screenshot(path=str(tmp_path / "live-page-10k.png"))
    assert problems == [], problems
