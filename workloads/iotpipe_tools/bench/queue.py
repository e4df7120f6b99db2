"""``iotpipe bench queue``: persistent-queue append throughput against the plainest way.

For each persist mode and batch size, the queue's ``append`` (framing, CRC32C, one write
and one sync per batch) runs for a fixed time in short slices that alternate with the
baseline: ``os.pwrite`` of the pre-joined payloads + ``os.fdatasync`` per batch on a
preallocated file, in the same directory. ``limit_ratio`` = queue / baseline, the fraction
of the disk's limit that the queue reaches from Python. ``framing_records_per_s`` runs the
same appends with fdatasync skipped (not durable): the CPU ceiling of framing + CRC.
``written_limit_ratio`` compares with the same baseline on a file whose extents were
written (zero-filled) beforehand: a fallocated file's first pass makes every sync also
journal the conversion of its unwritten extents, which the queue avoids by writing zeros
ahead of its records, so this is the stricter ceiling.

The pmem mode runs when libpmem loads. On a machine without persistent memory it runs
with ``PMEM_IS_PMEM_FORCE=1`` (libpmem then treats the ordinary file as pmem and its
persist only flushes CPU caches: it measures the code path, not durability); the result
says so in ``pmem_is_pmem_forced``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from iotpipe.queue.fileio import OsFileIO
from iotpipe.settings import CommaList, parse_settings, tier_config
from iotpipe_tools.bench.plainfile import PlainFile

READ_RECORDS = 1 << 16  # records the read case cycles through (in the page cache)


class QueueBenchSettings(BaseSettings):
    """Persistent-queue append throughput vs pwrite+fdatasync."""

    model_config = tier_config("iotpipe bench queue", "IOTPIPE_BENCH_QUEUE_",
                               {"json_output": "json"})

    json_output: bool = Field(False,
                              description="print one JSON object instead of a table")
    batches: CommaList = Field(["1", "16", "64", "256"], description="batch sizes to measure")
    modes: CommaList = Field(["fdatasync", "pmem"],
                             description="persist modes (pmem is skipped if libpmem is missing)")
    record_bytes: int = Field(128, ge=1, le=1 << 20, description="payload bytes per record")
    seconds: float = Field(1.0, gt=0, le=60,
                           description="seconds per case for each of queue, plain, framing")
    slices: int = Field(10, ge=1, le=1000,
                        description="alternate queue and plain this many times per case")
    dir: Path | None = Field(None, description="directory for the files (default: a temp dir)")

    @field_validator("batches")
    @classmethod
    def _positive_batches(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.isdigit() or int(item) < 1:
                raise ValueError(f"batch sizes must be positive integers, got {item!r}")
        return value

    @field_validator("modes")
    @classmethod
    def _known_modes(cls, value: list[str]) -> list[str]:
        for item in value:
            if item not in ("fdatasync", "pmem"):
                raise ValueError(f"unknown persist mode {item!r} (fdatasync, pmem)")
        return value


def _fs_type(path: Path) -> str:
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                mount_point = fields[1]
                if str(path).startswith(mount_point) and len(mount_point) > len(best):
                    best, fstype = mount_point, fields[2]
    except OSError:
        pass
    return fstype


def _machine(directory: Path) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "filesystem": _fs_type(directory.resolve()),
    }


def _run_for(append: Callable[[], object], seconds: float) -> tuple[int, float]:
    """(appends, elapsed) of calling ``append`` for about ``seconds``."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        append()
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count, now - start


def _alternate(cases: dict[str, Callable[[], object]], records_per_call: int,
               seconds: float, slices: int) -> dict[str, float]:
    """Records/s of each case, run in ``slices`` alternating slices of ``seconds`` in all."""
    totals = {name: [0, 0.0] for name in cases}
    for _ in range(slices):
        for name, call in cases.items():
            count, elapsed = _run_for(call, seconds / slices)
            totals[name][0] += count * records_per_call
            totals[name][1] += elapsed
    return {name: records / elapsed for name, (records, elapsed) in totals.items()}


class _NoSyncFileIO(OsFileIO):
    """Real writes, no sync: isolates the queue's CPU cost (NOT durable; bench only)."""

    def fdatasync(self, handle: int) -> None:
        pass

    def write_synced(self, handle: int, data: bytes, offset: int) -> None:
        self.pwrite(handle, data, offset)


def measure_case(directory: Path, payloads: list[bytes], mode: str, seconds: float,
                 slices: int) -> dict[str, float]:
    """Records/s of "queue", "plain", "plain_written" and "framing" (queue without syncs).

    Measured in alternating short slices so all see the same conditions: on a shared
    machine the sync latency swings by 10x from one second to the next.
    """
    from iotpipe.queue import PersistentQueue

    queue = PersistentQueue.open(directory / "queue", capacity_bytes=8 << 30,
                                 segment_bytes=64 << 20, persist=mode)
    framing = PersistentQueue.open(directory / "framing", capacity_bytes=8 << 30,
                                   segment_bytes=64 << 20, persist="fdatasync",
                                   file_io=_NoSyncFileIO())
    plain = PlainFile(directory / "plain.bin")
    plain_written = PlainFile(directory / "plain-written.bin", written=True)
    data = b"".join(payloads)  # the baseline writes the batch pre-joined
    try:
        if queue.persist_mode != mode:
            raise RuntimeError(f"asked for {mode}, queue runs {queue.persist_mode}")
        return _alternate({
            "plain": lambda: plain.append(data),
            "plain_written": lambda: plain_written.append(data),
            "queue": lambda: queue.append(payloads),
            "framing": lambda: framing.append(payloads),
        }, len(payloads), seconds, slices)
    finally:
        plain.close()
        plain_written.close()
        for opened in (queue, framing):
            opened.close()
            shutil.rmtree(opened.path)


class _Cycle:
    """Consecutive reads of ``batch`` records from a prefilled queue and its plain twin."""

    def __init__(self, directory: Path, payloads: list[bytes]) -> None:
        from iotpipe.queue import PersistentQueue
        from iotpipe.queue.framing import encode_records

        self.batch = len(payloads)
        rounds = max(READ_RECORDS // self.batch, 1)
        self.last_seq = rounds * self.batch
        self.queue = PersistentQueue.open(directory / "read", capacity_bytes=8 << 30,
                                          segment_bytes=64 << 20, file_io=_NoSyncFileIO())
        # The same framed bytes in a plain file: what reading them costs with no parsing.
        self.frames = encode_records(payloads, 1)
        self.path = directory / "read-plain.bin"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        for _ in range(rounds):
            self.queue.append(payloads)
        os.pwrite(self.fd, self.frames * rounds, 0)
        self.plain_end = len(self.frames) * rounds
        self.seq = 1
        self.offset = 0

    def read(self) -> None:
        records = self.queue.read(self.seq, max_records=self.batch)
        self.seq = records[-1].seq + 1 if records[-1].seq < self.last_seq else 1

    def plain(self) -> None:
        os.pread(self.fd, len(self.frames), self.offset)
        self.offset = (self.offset + len(self.frames)) % self.plain_end

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)
        self.queue.close()
        shutil.rmtree(self.queue.path)


def measure_reads(directory: Path, payloads: list[bytes], seconds: float,
                  slices: int) -> dict[str, float]:
    """Records/s of "read" (``PersistentQueue.read`` of ``len(payloads)`` records), "plain"
    (``os.pread`` of the same framed bytes, no parsing) and the parse alone in C ("parse")
    and in Python ("parse_python"), in alternating slices like the appends."""
    from iotpipe.queue.framing import parse_records, parse_records_python

    cycle = _Cycle(directory, payloads)
    frames = cycle.frames
    try:
        return _alternate({
            "read": cycle.read,
            "plain": cycle.plain,
            "parse": lambda: parse_records(frames, 0, len(frames), 1, []),
            "parse_python": lambda: parse_records_python(frames, 0, len(frames), 1, []),
        }, len(payloads), seconds, slices)
    finally:
        cycle.close()


def _pmem_available() -> tuple[bool, bool]:
    """(libpmem loads, PMEM_IS_PMEM_FORCE had to be set)."""
    forced = False
    if os.environ.get("PMEM_IS_PMEM_FORCE") is None:
        # Read by libpmem when it initialises: set before the first load in this process.
        os.environ["PMEM_IS_PMEM_FORCE"] = "1"
        forced = True
    from iotpipe.queue import pmem

    return pmem.available(), forced or os.environ.get("PMEM_IS_PMEM_FORCE") == "1"


def run(settings: QueueBenchSettings, directory: Path) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    modes = list(settings.modes)
    pmem_forced = False
    if "pmem" in modes:
        # The queue warns at every open with PMEM_IS_PMEM_FORCE=1; the report says it once.
        logging.getLogger("iotpipe.queue").setLevel(logging.ERROR)
        loaded, pmem_forced = _pmem_available()
        if not loaded:
            modes.remove("pmem")
            notes.append("pmem skipped: libpmem not loadable (Debian libpmem1)")
        elif pmem_forced:
            notes.append("pmem ran with PMEM_IS_PMEM_FORCE=1 on an ordinary file: pmem persist "
                         "only flushes CPU caches there, so pmem numbers measure the code "
                         "path, not durable throughput")
    for mode in modes:
        for batch in (int(b) for b in settings.batches):
            payloads = [os.urandom(settings.record_bytes) for _ in range(batch)]
            rates = measure_case(directory, payloads, mode, settings.seconds, settings.slices)
            queue_rate, plain_rate = rates["queue"], rates["plain"]
            result: dict[str, Any] = {
                "mode": mode,
                "batch": batch,
                "records_per_s": round(queue_rate),
                "plain_records_per_s": round(plain_rate),
                "limit_ratio": round(queue_rate / plain_rate, 3),
                # The same appends with fdatasync skipped: the CPU ceiling of the framing.
                "framing_records_per_s": round(rates["framing"]),
                # Against a file whose extents are already written (no conversion to
                # journal at each sync): the stricter ceiling.
                "written_plain_records_per_s": round(rates["plain_written"]),
                "written_limit_ratio": round(queue_rate / rates["plain_written"], 3),
            }
            if mode == "pmem":
                result["pmem_is_pmem_forced"] = pmem_forced
            results.append(result)
    reads: list[dict[str, Any]] = []
    for batch in (int(b) for b in settings.batches):
        payloads = [os.urandom(settings.record_bytes) for _ in range(batch)]
        rates = measure_reads(directory, payloads, settings.seconds, settings.slices)
        reads.append({
            "batch": batch,
            "read_records_per_s": round(rates["read"]),
            "plain_read_records_per_s": round(rates["plain"]),
            "read_limit_ratio": round(rates["read"] / rates["plain"], 3),
            "parse_records_per_s": round(rates["parse"]),
            "parse_python_records_per_s": round(rates["parse_python"]),
            "parse_c_vs_python": round(rates["parse"] / rates["parse_python"], 2),
        })
    return {
        "bench": "queue",
        "record_bytes": settings.record_bytes,
        "seconds_per_case": settings.seconds,
        "slices": settings.slices,
        "machine": _machine(directory),
        "notes": notes,
        "results": results,
        "reads": reads,
    }


def _table(report: dict[str, Any]) -> str:
    lines = [f"queue append, {report['record_bytes']}-byte records, "
             f"{report['seconds_per_case']}s per case in {report['slices']} alternating slices "
             f"({report['machine']['filesystem']}, load {report['machine']['loadavg_1m']})", "",
             f"{'mode':10} {'batch':>6} {'queue rec/s':>12} {'plain rec/s':>12} {'ratio':>6} "
             f"{'written rec/s':>14} {'ratio':>6} {'no-sync rec/s':>14}"]
    for r in report["results"]:
        lines.append(f"{r['mode']:10} {r['batch']:>6} {r['records_per_s']:>12,} "
                     f"{r['plain_records_per_s']:>12,} {r['limit_ratio']:>6.2f} "
                     f"{r['written_plain_records_per_s']:>14,} "
                     f"{r['written_limit_ratio']:>6.2f} {r['framing_records_per_s']:>14,}")
    lines += ["", f"{'read':10} {'batch':>6} {'read rec/s':>12} {'pread rec/s':>12} {'ratio':>6} "
              f"{'C parse rec/s':>14} {'Py parse rec/s':>14} {'ratio':>6}"]
    for r in report["reads"]:
        lines.append(f"{'':10} {r['batch']:>6} {r['read_records_per_s']:>12,} "
                     f"{r['plain_read_records_per_s']:>12,} {r['read_limit_ratio']:>6.2f} "
                     f"{r['parse_records_per_s']:>14,} {r['parse_python_records_per_s']:>14,} "
                     f"{r['parse_c_vs_python']:>6.2f}")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(QueueBenchSettings, argv)
    if settings.dir is not None:
        settings.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="iotpipe-bench-queue-",
                                     dir=settings.dir) as scratch:
        report = run(settings, Path(scratch))
    if settings.json_output:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        print(_table(report))
    return 0
