"""What simulated devices send: padded synthetic messages (load tests) or the plausible
readings of a fleet of thermometers, meters and pumps (``--payload fleet``)."""

from __future__ import annotations

import math
import random
import time
from typing import Any

from iotpipe.fleet import fleet_kind

__all__ = ["FleetSensor", "message_data"]


def message_data(size: int, seq: int) -> dict[str, Any]:
    """A data object whose message is about ``size`` bytes of JSON."""
    data: dict[str, Any] = {"v": seq * 0.5}
    room = size - 40  # the {"id":..,"data":{"v":..}} envelope
    index = 0
    while room > 8:
        chunk = min(room - 8, 200)
        data[f"p{index}"] = "x" * chunk
        room -= chunk + 8
        index += 1
    return data


class FleetSensor:
    """Plausible, drifting readings of one simulated device (a bounded random walk).

    Thermometers follow a slow daily swing around their own set point; meters count energy
    up from a random start at a drifting load; pumps switch on and off now and then and
    report flow and pressure while running.
    """

    def __init__(self, index: int, seed: int | None = None) -> None:
        self.kind = fleet_kind(index)
        self._rng = random.Random(index if seed is None else seed)
        rng = self._rng
        self._last = time.time()
        self.setpoint = rng.uniform(18.0, 23.0)
        self.offset = 0.0
        self.humidity = rng.uniform(35.0, 55.0)
        self.energy_kwh = rng.uniform(1_000.0, 50_000.0)
        self.power_w = rng.uniform(800.0, 4_000.0)
        self.running = rng.random() < 0.7
        self.flow_lpm = rng.uniform(90.0, 150.0)
        self.pressure_bar = rng.uniform(2.5, 4.0)

    def _walk(self, value: float, step: float, low: float, high: float) -> float:
        return min(high, max(low, value + self._rng.gauss(0.0, step)))

    def reading(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        elapsed = max(0.0, now - self._last)
        self._last = now
        rng = self._rng
        if self.kind == "thermometer":
            self.offset = self._walk(self.offset, 0.05, -3.0, 3.0)
            daily = 1.5 * math.sin(2 * math.pi * ((now / 86400.0) % 1.0))
            self.humidity = self._walk(self.humidity, 0.2, 20.0, 80.0)
            return {"temp_c": round(self.setpoint + daily + self.offset, 2),
                    "humidity_pct": round(self.humidity, 1)}
        if self.kind == "meter":
            self.power_w = self._walk(self.power_w, 25.0, 200.0, 9_000.0)
            self.energy_kwh += self.power_w * elapsed / 3_600_000.0
            return {"energy_kwh": round(self.energy_kwh, 4), "power_w": round(self.power_w, 1),
                    "voltage_v": round(rng.gauss(230.0, 1.5), 1)}
        if rng.random() < 0.02:  # a pump changes state now and then
            self.running = not self.running
        if self.running:
            self.flow_lpm = self._walk(self.flow_lpm, 2.0, 60.0, 180.0)
            self.pressure_bar = self._walk(self.pressure_bar, 0.03, 1.5, 5.0)
        return {"running": self.running,
                "flow_lpm": round(self.flow_lpm, 1) if self.running else 0.0,
                "pressure_bar": round(self.pressure_bar if self.running else 0.2, 2)}
