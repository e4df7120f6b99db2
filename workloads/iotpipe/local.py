"""``iotpipe up``: the whole pipeline on one machine, under one supervisor.

The four tiers run as separate processes exactly as they do in Kubernetes (same commands,
same flags), so local mode exercises the real wire paths: ``iotpipe middle``, ``iotpipe
storage`` (embedded SQLite sink under the data directory), ``iotpipe relay`` and ``iotpipe
ingest``, plus ``iotpipe simulate`` with ``--simulate N``. The supervisor restarts any tier
that dies, with exponential backoff (reset once a tier has stayed up for a while), forwards
SIGINT/SIGTERM to its children in a safe order (simulator, ingest - which drains its queue
to the middle tier -, relay, storage, middle last) and waits for them.

Before starting anything it checks that every port it will use is free and that no other
``iotpipe up`` holds the data directory, and exits 1 naming the port (or the holder)
otherwise: a second instance must not write into the first one's logs or queues. It prints
"iotpipe is up" only once every tier's ``/readyz`` answered 200; a tier that is not ready
within ``--ready-timeout`` stops everything with status 1.

Layout of ``--data-dir`` (default ``./data``)::

    auth.secret        generated signing secret (0600), reused on the next start
    registry.yaml      device registry (written when missing; while it still carries the
                       generated marker it is rewritten to list the simulated fleet)
    up.lock            held (flock) by the running ``iotpipe up``
    ingest/            ingest queue        middle/   middle log
    store/readings.db  embedded storage    logs/     one log file per tier

Ports: the contract defaults (ingest 8080, relay 8081, middle 5555/5556/5557, metrics
9100..9103 for ingest, middle, storage, relay); ``--base-port B`` moves them all to
``B .. B+8`` in that order; per-tier flags override either.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated

from pydantic import Field

from iotpipe import contract, curve, lifecycle
from iotpipe.auth import CLIENT_AUDIENCE, SECRET_FILE_ENV, issue_token, load_secret
from iotpipe.fleet import SIM_PREFIX, write_registry
from iotpipe.settings import CommaList, LogSettings, parse_settings, tier_config
from iotpipe.supervisor import (
    ChildSpec,
    RestartPolicy,
    Supervisor,
    log_tail,
    say,
)

__all__ = [
    "Ports",
    "UpSettings",
    "build_children",
    "main",
    "plan_ports",
]

# A TCP port number; the per-tier port settings are optional ones.
Port = Annotated[int, Field(ge=1, le=65535)]


class UpSettings(LogSettings):
    """Run middle, storage, relay and ingest on this machine (embedded storage)."""

    model_config = tier_config("iotpipe up", "IOTPIPE_UP_")

    data_dir: str = Field("./data", description="where queues, the store, logs and the "
                                                "generated secret live")
    host: str = Field("127.0.0.1", description="bind address of every tier")
    base_port: int | None = Field(None, ge=1, le=65535 - 8,
                                  description="put every port at BASE..BASE+8 (ingest, relay, "
                                              "middle router/pub/feed, metrics of ingest, "
                                              "middle, storage, relay)")
    ingest_port: Port | None = Field(None, description="device WebSocket port")
    relay_port: Port | None = Field(None, description="client WebSocket port")
    middle_router_port: Port | None = Field(None, description="middle ROUTER (ingest batches)")
    middle_pub_port: Port | None = Field(None, description="middle PUB (live events)")
    middle_feed_port: Port | None = Field(None, description="middle durable feed (storage)")
    ingest_metrics_port: Port | None = Field(None, description="ingest /metrics port")
    middle_metrics_port: Port | None = Field(None, description="middle /metrics port")
    storage_metrics_port: Port | None = Field(None, description="storage /metrics port")
    relay_metrics_port: Port | None = Field(None, description="relay /metrics port")
    insecure_no_auth: bool = Field(False, description="no tokens at all (demos only)")
    registry_file: str | None = Field(None, description="device registry YAML (default: "
                                                        "DATA_DIR/registry.yaml, created)")
    queue_bytes: int = Field(256 << 20, ge=1 << 20, description="ingest queue capacity")
    log_bytes: int = Field(1 << 30, ge=1 << 20, description="middle log capacity")
    simulate: int = Field(0, ge=0, description="also run a simulated fleet of N devices")
    simulate_rate: float = Field(1.0, gt=0, description="messages per second per simulated "
                                                        "device")
    simulate_duration: float = Field(365 * 86400.0, gt=0,
                                     description="seconds the simulated fleet sends")
    sinks: CommaList = Field(
        default_factory=list,
        description="storage sinks besides the embedded store DATA_DIR/store/readings.db, "
                    "comma separated (victoriametrics://127.0.0.1:8428, parquet:///dir, "
                    "akumuli://127.0.0.1:8282); a sqlite:// URL here replaces the store")
    curve: bool = Field(True, description="authenticate and encrypt the tiers' ZeroMQ traffic "
                                          "with CurveZMQ keys made under DATA_DIR/curve "
                                          "(docs/security.md)")
    drain_timeout: float = Field(15.0, gt=0, description="seconds ingest gets to forward its "
                                                         "queue on stop (the rest stays queued "
                                                         "for the next start)")
    ready_timeout: float = Field(60.0, gt=0, description="seconds to wait for every tier's "
                                                         "/readyz before printing the URLs")
    stop_timeout: float = Field(30.0, gt=0, description="seconds each tier gets to stop "
                                                        "before SIGKILL")
    max_backoff: float = Field(10.0, gt=0, description="longest wait before restarting a "
                                                       "tier that keeps dying")


def _storage_sinks(settings: UpSettings, data_dir: Path) -> list[str]:
    # The embedded store stays the store of record unless a sqlite:// URL replaces it.
    if any(url.lower().startswith("sqlite://") for url in settings.sinks):
        return list(settings.sinks)
    return [f"sqlite://{(data_dir / 'store' / 'readings.db').resolve()}", *settings.sinks]


@dataclass(frozen=True)
class Ports:
    """Every port of a local pipeline; the defaults are the contract's, and the field order
    is the ``--base-port`` order (BASE+0 ..)."""

    ingest: int = 8080
    relay: int = 8081
    middle_router: int = 5555
    middle_pub: int = 5556
    middle_feed: int = 5557
    ingest_metrics: int = 9100
    middle_metrics: int = 9101
    storage_metrics: int = 9102
    relay_metrics: int = 9103


_PORT_FIELDS = tuple(f.name for f in fields(Ports))


def plan_ports(settings: UpSettings) -> Ports:
    """Contract defaults, or BASE+offset; per-tier settings win. Duplicates are an error."""
    values: dict[str, int] = {}
    contract_ports = Ports()
    for offset, name in enumerate(_PORT_FIELDS):
        override = getattr(settings, f"{name}_port")
        if override is not None:
            values[name] = override
        elif settings.base_port is not None:
            values[name] = settings.base_port + offset
        else:
            values[name] = getattr(contract_ports, name)
    seen: dict[int, str] = {}
    for name, port in values.items():
        if port in seen:
            raise ValueError(f"port {port} is given to both {seen[port]} and {name}")
        seen[port] = name
    return Ports(**values)


def _iotpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "iotpipe.cli", *args]


def build_children(settings: UpSettings, ports: Ports, data_dir: Path, registry_file: Path,
                   secret_file: Path | None, curve_dir: Path | None = None) -> list[ChildSpec]:
    """The processes of a local pipeline, in start order (stop order is the reverse).
    ``curve_dir``: the CurveZMQ keys every tier's ZeroMQ sockets use (None: plain TCP).

    Every tier flag is named by the deployment contract (:mod:`iotpipe.contract`, the one
    the Kubernetes operator uses too), so a renamed setting fails here, not in a tier."""
    host = settings.host
    loop_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    env = {"IOTPIPE_AUTH_SECRET_FILE": str(secret_file)} if secret_file is not None else {}

    def args(tier: str, values: dict[str, object]) -> list[str]:
        """Flags of ``tier`` from its setting names; True: a bare flag, False/None: left
        out (the tier's default)."""
        out: list[str] = []
        common: dict[str, object] = {"host": host, "log_level": settings.log_level,
                                     "curve_keys_dir": curve_dir}
        for name, value in {**common, **values}.items():
            if value is None or value is False:
                continue
            out.append(contract.flag(tier, name))
            if value is not True:
                out.append(str(value))
        return out

    no_auth = secret_file is None
    node = "local-ingest"
    children = [
        ChildSpec("middle", _iotpipe("middle", *args("middle", {
            "metrics_port": ports.middle_metrics, "router_port": ports.middle_router,
            "pub_port": ports.middle_pub, "feed_port": ports.middle_feed,
            "data_dir": data_dir / "middle", "log_bytes": settings.log_bytes,
            "middle_id": "local-middle", "consumer_groups": "storage"}))),
        ChildSpec("storage", _iotpipe("storage", *args("storage", {
            "metrics_port": ports.storage_metrics,
            "feed_endpoints": f"tcp://{loop_host}:{ports.middle_feed}",
            "group": "storage", "consumer_id": "local-storage",
            "sinks": ",".join(_storage_sinks(settings, data_dir)),
            "registry_file": registry_file, "data_dir": data_dir / "store",
            "read_api": True}))),
        ChildSpec("relay", _iotpipe("relay", *args("relay", {
            "port": ports.relay, "metrics_port": ports.relay_metrics,
            "middle_pub_endpoints": f"tcp://{loop_host}:{ports.middle_pub}",
            "registry_file": registry_file, "insecure_no_auth": no_auth,
            # The live page's device history and pipeline health.
            "history_urls": f"http://{loop_host}:{ports.storage_metrics}",
            "health_urls": f"ingest=http://{loop_host}:{ports.ingest_metrics}/metrics,"
                           f"middle=http://{loop_host}:{ports.middle_metrics}/metrics,"
                           f"storage=http://{loop_host}:{ports.storage_metrics}/metrics"})),
                  env),
        ChildSpec("ingest", _iotpipe("ingest", *args("ingest", {
            "port": ports.ingest, "metrics_port": ports.ingest_metrics,
            "data_dir": data_dir / "ingest", "queue_bytes": settings.queue_bytes,
            "node_id": node, "drain_timeout": settings.drain_timeout,
            "middle_endpoints": f"tcp://{loop_host}:{ports.middle_router}",
            "insecure_no_auth": no_auth})), env),
    ]
    if settings.simulate:
        children.append(ChildSpec("simulate", _iotpipe(
            "simulate", "--url", f"ws://{loop_host}:{ports.ingest}/v1/ingest",
            "--connections", str(settings.simulate), "--rate", str(settings.simulate_rate),
            "--duration", str(settings.simulate_duration), "--device-prefix", SIM_PREFIX,
            "--payload", "fleet",
            "--reconnect", *(["--insecure"] if no_auth else [])),
            env, restart=False))
    return children


def _ensure_secret(path: Path) -> None:
    if path.exists() and path.read_bytes().strip():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def busy_ports(host: str, ports: Ports) -> list[tuple[str, int]]:
    """The (name, port) pairs of ``ports`` that cannot be bound on ``host`` right now.

    Binds the way the tiers do (SO_REUSEADDR, so a port in TIME_WAIT counts as free).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    busy: list[tuple[str, int]] = []
    for name in _PORT_FIELDS:
        port = getattr(ports, name)
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                busy.append((name.replace("_", " "), port))
    return busy


def _lock_data_dir(data_dir: Path) -> int | None:
    """Hold ``data_dir/up.lock`` for the life of this process; None if another holds it."""
    fd = os.open(data_dir / "up.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _lock_holder(data_dir: Path) -> str:
    with contextlib.suppress(OSError):
        pid = (data_dir / "up.lock").read_text().strip()
        if pid:
            return f" (pid {pid})"
    return ""


def _iotpipe_command() -> str:
    """How to run ``iotpipe`` from a shell: on PATH, else the script beside this Python."""
    if shutil.which("iotpipe") == str(Path(sys.executable).parent / "iotpipe"):
        return "iotpipe"
    beside = Path(sys.executable).parent / "iotpipe"
    if beside.exists():
        return os.path.relpath(beside) if not os.path.relpath(beside).startswith("..") \
            else str(beside)
    return f"{sys.executable} -m iotpipe.cli"


# The local demo's page token: long enough for a demo left running, and only ever printed.
LIVE_PAGE_TOKEN_TTL_S = 30 * 86400


def live_page_url(host: str, port: int, secret_file: Path | None) -> str:
    """The relay's live page, with a client token when the pipeline checks tokens."""
    url = f"http://{host}:{port}/"
    if secret_file is None:
        return url
    secret = load_secret({SECRET_FILE_ENV: str(secret_file)})
    token = issue_token(secret, "live-page", CLIENT_AUDIENCE, LIVE_PAGE_TOKEN_TTL_S)
    return f"{url}?token={token}"


def _banner(settings: UpSettings, ports: Ports, data_dir: Path, secret_file: Path | None,
            registry_file: Path) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    cmd = _iotpipe_command()
    env = "" if secret_file is None else f"IOTPIPE_AUTH_SECRET_FILE={secret_file} "
    db = data_dir / "store" / "readings.db"
    db_arg = "" if db == (Path.cwd() / "data" / "store" / "readings.db") else f" --db {db}"
    watch_auth = " --insecure" if secret_file is None else ""
    lines = [
        "iotpipe is up",
        f"  live page   {live_page_url(host, ports.relay, secret_file)}",
        f"  devices     ws://{host}:{ports.ingest}/v1/ingest",
        f"  client apps ws://{host}:{ports.relay}/v1/live",
        f"  metrics     ingest http://{host}:{ports.ingest_metrics}/metrics  "
        f"middle http://{host}:{ports.middle_metrics}/metrics",
        f"              storage http://{host}:{ports.storage_metrics}/metrics  "
        f"relay http://{host}:{ports.relay_metrics}/metrics",
        f"  data        {data_dir}  (logs in {data_dir / 'logs'}, registry {registry_file})",
    ]
    if secret_file is None:
        lines.append("  auth        OFF (--insecure-no-auth): devices pass ?device=ID")
    else:
        lines += [
            f"  device token: {env}{cmd} token DEVICE_ID",
            f"  client token: {env}{cmd} token APP_ID --client",
        ]
    relay_arg = "" if ports.relay == 8081 and host == "127.0.0.1" else \
        f" --url ws://{host}:{ports.relay}/v1/live"
    lines.append(f"  live:        {env}{cmd} watch{relay_arg}{watch_auth}")
    lines.append(f"  stored data: {cmd} query{db_arg} --device DEVICE_ID")
    lines.append("  Ctrl-C stops everything (ingest drains its queue first)")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """``iotpipe up``: run until SIGINT/SIGTERM, then stop every tier and exit."""
    lifecycle.catch_early()
    settings = parse_settings(UpSettings, argv)
    try:
        ports = plan_ports(settings)
    except ValueError as exc:
        print(f"iotpipe up: error: {exc}", file=sys.stderr)
        return 2
    # Nothing is started, created or written before these checks: a second instance must
    # leave the first one's logs, queues and registry alone.
    try:
        busy = busy_ports(settings.host, ports)
    except OSError as exc:
        print(f"iotpipe up: error: --host {settings.host}: {exc.strerror}", file=sys.stderr)
        return 2
    if busy:
        (name, port), others = busy[0], busy[1:]
        also = f"; also in use: {', '.join(str(p) for _, p in others)}" if others else ""
        print(f"iotpipe up: error: port {port} ({name}) on {settings.host} is in use "
              f"(another iotpipe up?){also}", file=sys.stderr)
        return 1
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock_data_dir(data_dir)
    if lock_fd is None:
        print(f"iotpipe up: error: {data_dir} is in use by another iotpipe up"
              f"{_lock_holder(data_dir)}", file=sys.stderr)
        return 1
    for sub in ("ingest", "middle", "store", "logs"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    secret_file: Path | None = None
    if not settings.insecure_no_auth:
        secret_file = data_dir / "auth.secret"
        _ensure_secret(secret_file)
    if settings.registry_file:
        registry_file = Path(settings.registry_file).resolve()
    else:
        registry_file = data_dir / "registry.yaml"
        write_registry(registry_file, settings.simulate)
    curve_dir = curve.ensure_keys(data_dir) if settings.curve else None
    specs = build_children(settings, ports, data_dir, registry_file, secret_file, curve_dir)
    supervisor = Supervisor(specs, data_dir / "logs",
                            RestartPolicy(max_s=settings.max_backoff), settings.stop_timeout)
    stop_requested: list[int] = []

    if lifecycle.on_stop(stop_requested.append) is not None:
        return 0  # stopped before anything was started
    loop_host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    readyz = {
        "middle": f"http://{loop_host}:{ports.middle_metrics}/readyz",
        "storage": f"http://{loop_host}:{ports.storage_metrics}/readyz",
        "relay": f"http://{loop_host}:{ports.relay_metrics}/readyz",
        "ingest": f"http://{loop_host}:{ports.ingest_metrics}/readyz",
    }
    status = 0
    try:
        supervisor.start_all()
        # The banner means "usable now": wait (bounded) for every tier's /readyz first.
        deadline = time.monotonic() + settings.ready_timeout
        waiting = dict(readyz)
        while waiting and not stop_requested and time.monotonic() < deadline:
            supervisor.poll()
            waiting = {name: url for name, url in waiting.items() if not _is_ready(url)}
            if waiting:
                time.sleep(0.2)
        if waiting and not stop_requested:
            logs = data_dir / "logs"
            tails = "".join(f"\n  {name}:{log_tail(logs / f'{name}.log')}" for name in waiting)
            say(f"error: not ready after {settings.ready_timeout:g}s: {', '.join(waiting)} "
                 f"(see {logs}){tails}")
            status = 1
            return status
        if not stop_requested:
            print(_banner(settings, ports, data_dir, secret_file, registry_file), flush=True)
        while not stop_requested:
            supervisor.poll()
            time.sleep(0.2)
    finally:
        # Children run in their own sessions, so a terminal Ctrl-C reaches only us; we stop
        # them in order so ingest can drain into a still-running middle tier.
        say("stopping")
        stopped = supervisor.stop_all()
        os.close(lock_fd)
    return status or stopped
