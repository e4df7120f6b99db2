"""``iotpipe bench middle``: batches/s and records/s through the middle tier's ROUTER.

For each batch size, a real ``iotpipe middle`` process (fdatasync log in a temp dir) is
driven by ``--nodes`` DEALER sockets, each keeping ``--window`` batches in flight like the
ingest forwarder does, while a feed consumer (a process of its own, reading only each
delivery's header) acknowledges every delivery so the log never fills. The same load is
also sent, in the same run, to two baselines:

- the plainest possible ROUTER, one that acknowledges each batch at once and stores
  nothing: ``ratio`` is middle / bare (the issue's measure);
- the plainest DURABLE acknowledgement: a ROUTER that takes every batch waiting, writes
  their bytes to a file with one ``pwrite`` and one ``fdatasync`` (``PlainFile``, the queue
  bench's baseline) and only then acknowledges them, with no framing, dedup, feed or live
  events: ``durable_ratio`` is middle / that.

Latency is from send to ack, per batch. ``records_per_cpu_s`` divides by the server
process's own CPU time, so it shows what one dedicated core would sustain even on a shared,
busy machine.

``--curve`` runs the middle a second time per batch size with CurveZMQ on every socket
(fresh keys; the driver's DEALERs and the feed consumer are the ingest and storage roles)
and reports ``curve_records_per_s``, ``curve_ratio`` (CURVE / plain throughput) and
``curve_cpu_ratio`` (CURVE / plain records per CPU-second of the middle), same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import msgpack
import zmq

from iotpipe import curve, wire
from iotpipe_tools.bench.plainfile import PlainFile
from iotpipe_tools.ports import free_port
from iotpipe_tools.waiting import exited, wait_ready

__all__ = ["bare_durable_router", "bare_router", "main"]


def bare_router(port: int) -> None:
    """Acknowledge every batch at once, storing nothing (the baseline)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        msg = router.recv_multipart()
        try:
            batch = wire.decode_batch(msg[1:])
        except wire.WireError:
            continue
        router.send_multipart([msg[0], *wire.encode_ack(batch.node, batch.last)])


def bare_durable_router(port: int, path: str) -> None:
    """Acknowledge batches once their bytes are durable, storing nothing else (the baseline
    of a durable ack): a group commit of everything waiting, then every ack."""
    ring = PlainFile(Path(path), written=True)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    group_bytes = ring.size // 4  # a bounded group, as the middle's, well inside the ring
    while True:
        waiting = [router.recv_multipart()]
        size = sum(map(len, waiting[0]))
        while size < group_bytes:
            try:
                waiting.append(router.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            size += sum(map(len, waiting[-1]))
        parts: list[bytes] = []
        acks: list[list[bytes]] = []
        for msg in waiting:
            try:
                batch = wire.decode_batch(msg[1:])
            except wire.WireError:
                continue
            parts.extend(msg[2:])  # the batch as received: header and readings
            acks.append([msg[0], *wire.encode_ack(batch.node, batch.last)])
        ring.append(b"".join(parts))
        for ack in acks:
            router.send_multipart(ack)


def _client(ctx: zmq.Context[zmq.Socket[bytes]], keys: curve.CurveKeys | None
            ) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        curve.secure_client(sock, keys)
    return sock


def feed_acker(port: int, keys_dir: str | None = None) -> None:
    """Acknowledge every feed delivery at once, as a storage tier would once it stored it.

    It runs in a process of its own and reads only each delivery's kind and header (its
    first seq and count): it stands in for storage so the log never fills, and it must not
    weigh on the load generator. Decoding every record in a thread of the driver took the
    driver's GIL for about 0.1 ms per 512-record delivery, which delayed the acks the
    driver waits on: a cost only the middle's run paid (the bare ROUTERs have no feed).
    """
    keys = curve.load_keys(keys_dir, "storage") if keys_dir else None
    ctx = zmq.Context()
    sock = _client(ctx, keys)
    sock.connect(f"tcp://127.0.0.1:{port}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock.send_multipart(wire.encode_feed_request("storage", "bench", 50_000))
    last_request = time.monotonic()
    kinds = (wire.KIND_RECORDS, wire.KIND_RECORDS_V2)
    while True:
        acks: list[tuple[int, int]] = []
        if sock.poll(100):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if wire.message_kind(frames) not in kinds or len(frames) < 2:
                    raise RuntimeError(f"the middle sent a feed message of kind "
                                       f"{wire.message_kind(frames)!r}")
                header = msgpack.unpackb(frames[1])
                acks.append((header["first"], header["first"] + header["n"] - 1))
        if acks or time.monotonic() - last_request > 1.0:
            sock.send_multipart(wire.encode_feed_request("storage", "bench", 50_000, acks))
            last_request = time.monotonic()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drive(port: int, nodes: int, window: int, batch: int, record_bytes: int,
           seconds: float, warmup: float, server_pid: int,
           keys: curve.CurveKeys | None = None) -> dict[str, float]:
    """Keep ``window`` batches in flight per node for ``seconds``; measure acks.

    The server's CPU time over the measured period gives records per CPU-second: what one
    core would sustain, a figure that does not depend on how busy the shared machine is.
    """
    ctx = zmq.Context.instance()
    pad = b"x" * max(0, record_bytes - 60)
    socks = []
    for _ in range(nodes):
        sock = _client(ctx, keys)
        sock.connect(f"tcp://127.0.0.1:{port}")
        socks.append(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    # one reading payload per batch slot, reused: the middle never looks inside twice
    readings = [wire.encode_reading(f"dev-{i}", f"m{i}", i, b'{"v":1,"p":"%s"}' % pad, i)
                for i in range(batch)]
    next_seq = [1] * nodes
    sent_at: list[dict[int, float]] = [{} for _ in range(nodes)]
    latencies: list[float] = []
    acked_batches = 0
    busy = 0

    def send(i: int) -> None:
        first = next_seq[i]
        socks[i].send_multipart(wire.encode_batch(f"bench-{i}", first, readings))
        sent_at[i][first + batch - 1] = time.perf_counter()
        next_seq[i] += batch

    for i in range(nodes):
        for _ in range(window):
            send(i)
    start = time.perf_counter()
    measuring = False
    t0 = start + warmup
    cpu0 = _cpu_seconds(server_pid)
    end = start + warmup + seconds
    index = {sock: i for i, sock in enumerate(socks)}
    while True:
        now = time.perf_counter()
        if not measuring and now >= start + warmup:
            measuring, acked_batches, busy, latencies = True, 0, 0, []
            t0 = now
            cpu0 = _cpu_seconds(server_pid)
        if now >= end:
            break
        for sock, _ in poller.poll(1000):
            i = index[sock]
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if wire.message_kind(frames) == wire.KIND_BUSY:
                    # resend the refused batch after the hint (rare: the feed keeps up)
                    refused = wire.decode_busy(frames)
                    busy += 1
                    time.sleep(refused.retry_ms / 1000)
                    socks[i].send_multipart(wire.encode_batch(
                        f"bench-{i}", refused.first, readings))
                    continue
                ack = wire.decode_ack(frames)
                sent = sent_at[i].pop(ack.last, None)
                if sent is not None:
                    latencies.append(time.perf_counter() - sent)
                acked_batches += 1
                send(i)
    elapsed = time.perf_counter() - t0
    cpu = _cpu_seconds(server_pid) - cpu0
    for sock in socks:
        sock.close()
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3, 3) \
            if latencies else 0.0

    return {
        "batches_per_s": round(acked_batches / elapsed, 1),
        "records_per_s": round(acked_batches * batch / elapsed, 1),
        "ack_p50_ms": pct(0.50),
        "ack_p99_ms": pct(0.99),
        "busy": busy,
        "server_cpu_s": round(cpu, 3),
        "records_per_cpu_s": round(acked_batches * batch / cpu, 1) if cpu > 0 else 0.0,
    }


def _run_middle(batch: int, args: argparse.Namespace, secure: bool = False
                ) -> dict[str, float]:
    ports = {name: free_port() for name in ("router", "pub", "feed", "metrics")}
    with tempfile.TemporaryDirectory(prefix="iotpipe-bench-middle-", dir=args.dir) as tmp:
        extra: list[str] = []
        ingest_keys = None
        keys_dir = ""
        if secure:
            keys_dir = str(curve.ensure_keys(tmp))
            extra = ["--curve-keys-dir", keys_dir]
            ingest_keys = curve.load_keys(keys_dir, "ingest")
        proc = subprocess.Popen(
            [sys.executable, "-m", "iotpipe.cli", "middle", "--host", "127.0.0.1",
             "--router-port", str(ports["router"]), "--pub-port", str(ports["pub"]),
             "--feed-port", str(ports["feed"]), "--metrics-port", str(ports["metrics"]),
             "--data-dir", str(Path(tmp) / "log"), "--log-bytes", str(args.log_bytes),
             "--log-level", "warning", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        acker: subprocess.Popen[bytes] | None = None
        try:
            wait_ready(f"http://127.0.0.1:{ports['metrics']}/readyz", 30,
                       what="the middle to be ready", abort=exited(proc, "middle"))
            acker = subprocess.Popen(
                [sys.executable, "-c", "import sys; from iotpipe_tools.bench.middle import "
                 "feed_acker; feed_acker(int(sys.argv[1]), sys.argv[2] or None)",
                 str(ports["feed"]), keys_dir],
                start_new_session=True,
            )
            return _drive(ports["router"], args.nodes, args.window, batch, args.record_bytes,
                          args.seconds, args.warmup, proc.pid, ingest_keys)
        finally:
            if acker is not None:
                acker.terminate()
                try:
                    acker.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    acker.kill()
                    acker.wait()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _run_bare(batch: int, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from iotpipe_tools.bench.middle import bare_router; "
                               f"bare_router({port})"],
        start_new_session=True,
    )
    try:
        time.sleep(0.5)  # DEALERs connect lazily; the driver's sends wait for the bind
        return _drive(port, args.nodes, args.window, batch, args.record_bytes, args.seconds,
                      args.warmup, proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _run_durable_bare(batch: int, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="iotpipe-bench-durable-", dir=args.dir) as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from iotpipe_tools.bench.middle import "
             "bare_durable_router; bare_durable_router(int(sys.argv[1]), sys.argv[2])",
             str(port), str(Path(tmp) / "ring.bin")],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":  # the file is written, bound
                raise RuntimeError("the durable bare ROUTER did not start")
            return _drive(port, args.nodes, args.window, batch, args.record_bytes,
                          args.seconds, args.warmup, proc.pid)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="iotpipe bench middle", description=__doc__)
    parser.add_argument("--batches", default="1,16,64,256,512",
                        help="batch sizes (readings per batch), comma separated; "
                             "512 is the ingest forwarder's default")
    parser.add_argument("--nodes", type=int, default=4, help="ingest nodes (DEALER sockets)")
    parser.add_argument("--window", type=int, default=8, help="batches in flight per node")
    parser.add_argument("--record-bytes", type=int, default=200, help="bytes per reading")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    parser.add_argument("--log-bytes", type=int, default=1 << 30, help="middle log capacity")
    parser.add_argument("--dir", default=None, help="where the temporary log lives")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip both bare ROUTERs (acking, and acking once durable)")
    parser.add_argument("--curve", action="store_true",
                        help="also run the middle with CurveZMQ and report the ratio")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(list(argv))
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches must be integers, got {args.batches!r}")
    if not batches or min(batches) < 1:
        parser.error("--batches must list sizes >= 1")
    results = []
    for batch in batches:
        row: dict[str, object] = {"batch": batch, **_run_middle(batch, args)}
        if not args.no_baseline:
            bare = _run_bare(batch, args)
            row["bare_records_per_s"] = bare["records_per_s"]
            row["bare_records_per_cpu_s"] = bare["records_per_cpu_s"]
            row["ratio"] = round(float(row["records_per_s"]) / bare["records_per_s"], 3) \
                if bare["records_per_s"] else None
            durable = _run_durable_bare(batch, args)
            row["durable_bare_records_per_s"] = durable["records_per_s"]
            row["durable_bare_records_per_cpu_s"] = durable["records_per_cpu_s"]
            row["durable_ratio"] = (round(float(row["records_per_s"]) / durable["records_per_s"],
                                          3) if durable["records_per_s"] else None)
        if args.curve:
            secure = _run_middle(batch, args, secure=True)
            row["curve_records_per_s"] = secure["records_per_s"]
            row["curve_records_per_cpu_s"] = secure["records_per_cpu_s"]
            row["curve_ack_p99_ms"] = secure["ack_p99_ms"]
            plain_s, plain_cpu = float(row["records_per_s"]), float(row["records_per_cpu_s"])
            row["curve_ratio"] = round(secure["records_per_s"] / plain_s, 3) if plain_s else None
            row["curve_cpu_ratio"] = (round(secure["records_per_cpu_s"] / plain_cpu, 3)
                                      if plain_cpu else None)
        results.append(row)
        if not args.json:
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.json:
        print(json.dumps({
            "bench": "middle", "nodes": args.nodes, "window": args.window,
            "record_bytes": args.record_bytes,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "zmq": zmq.zmq_version()},
            "results": results,
        }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
