"""``iotpipe ingest`` settings: every option, its limits, and the checks between options.

Checks that need no file or network live here, so a bad command line fails before anything
opens: each static middle endpoint must look like a ZeroMQ endpoint, and ``--compression``
is refused with ``--ws-core picows`` (picows has no permessage-deflate). Whether the
endpoints file gives a usable list is known only by reading it (``resolve_endpoints``).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from iotpipe.endpoints import EndpointsFile, check_endpoint, resolve_endpoints
from iotpipe.settings import (
    CommaList,
    EdgeSecuritySettings,
    EndpointsReloadSettings,
    Internal,
    ServerSettings,
    TierSettings,
    metrics_port_field,
    tier_config,
)

__all__ = ["DEFAULT_LISTEN_BACKLOG", "IngestQueueSettings", "IngestSettings",
           "MiddleEndpointsSettings",
           "listen_backlog", "ws_core"]

# Handshakes the kernel queues for accept(): asyncio's default of 100 drops SYNs when a fleet
# (re)connects at once, costing each dropped device a 1 s, 3 s, ... SYN retransmit. Linux
# caps it at net.core.somaxconn (4096 by default since 5.4), so asking high costs nothing.
DEFAULT_LISTEN_BACKLOG = 65535
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


class MiddleEndpointsSettings(EndpointsReloadSettings):
    """Mixin: the middle ROUTER endpoints an ingest queue is forwarded to (ingest, drain)."""

    middle_endpoints: CommaList = Field(default_factory=list,
                                        description="middle ROUTER endpoints, comma separated")
    middle_endpoints_file: str = Field(
        "", description="file listing the middle ROUTER endpoints, one per line (key 'router' "
                    "of the endpoints ConfigMap), re-read while running; wins over "
                    "--middle-endpoints when usable")

    @field_validator("middle_endpoints")
    @classmethod
    def _endpoints_look_right(cls, endpoints: list[str]) -> list[str]:
        for endpoint in endpoints:
            problem = check_endpoint(endpoint)
            if problem is not None:
                raise ValueError(problem)
        return endpoints

    def resolved_endpoints(self) -> tuple[list[str], EndpointsFile | None]:
        """The endpoints to start with and the file to watch; EndpointsError when neither
        option gives a usable list (known only by reading the file)."""
        return resolve_endpoints("--middle-endpoints", self.middle_endpoints,
                                 "--middle-endpoints-file", self.middle_endpoints_file)


class IngestQueueSettings(TierSettings):
    """Mixin: where an ingest pod keeps its queues and who wrote them (ingest, drain)."""

    data_dir: Path = Field(Path("/var/lib/iotpipe/queue"),
                           description="ingest queue directory (process i uses <data_dir>/p<i>)")
    queue_bytes: int = Field(1 << 30, gt=0, description="queue capacity per process in bytes")
    node_id: str = Field(default_factory=socket.gethostname,
                         description="node identity of the ingest pod (process i is NODE_ID-pI)")


class IngestSettings(EdgeSecuritySettings, MiddleEndpointsSettings, IngestQueueSettings,
                     ServerSettings):
    """Device WebSocket server: authenticates devices, stores each message durably, acks it,
    and forwards the queue to the middle tier."""

    model_config = tier_config("iotpipe ingest", "IOTPIPE_INGEST_")

    port: int = Field(8080, ge=0, le=65535, description="WebSocket port (path /v1/ingest)")
    metrics_port: int = metrics_port_field(9100, "of the pod (covers every process)")
    processes: int = Field(1, ge=1, le=256, description="processes on one port (SO_REUSEPORT)")
    insecure_no_auth: bool = Field(False, description="no tokens; device from ?device= or the "
                                   "message's 'device' field (local demos only)")
    rate_limit: float = Field(1000.0, ge=0, description="messages/s per device (0 = unlimited)")
    rate_burst: float = Field(0.0, ge=0, description="token bucket size (0 = 2 x rate_limit)")
    flood_limit: int = Field(20, ge=1, description="consecutive rate-limited frames before the "
                             "device is closed with 1008")
    max_frame_bytes: int = Field(65536, ge=128, description="largest frame (bigger -> close 1009)")
    max_batch: int = Field(1000, ge=1, description="messages per batch frame")
    busy_wait: float = Field(1.0, ge=0, description="seconds to wait for queue space before "
                             "answering busy")
    busy_retry_ms: int = Field(1000, ge=1, description="retry hint sent with busy")
    compression: bool = Field(False, description="permessage-deflate (costs ~35 KB/connection; "
                              "needs the websockets core)")
    ws_core: Literal["auto", "picows", "websockets"] = Field(
        "auto", description="WebSocket implementation: picows (about 3x cheaper per message, "
                            "no permessage-deflate) or websockets; auto = websockets with "
                            "--compression, else picows")
    open_timeout: float = Field(10.0, gt=0, description="seconds to finish the handshake")
    listen_backlog: int = Field(DEFAULT_LISTEN_BACKLOG, ge=1, le=2**31 - 1,
                                description="connections the kernel queues before accept "
                                            "(capped by net.core.somaxconn)")
    ping_interval: float = Field(20.0, gt=0, description="seconds between keepalive pings")
    ping_timeout: float = Field(20.0, gt=0, description="seconds to wait for a pong")
    drain_timeout: float = Field(60.0, gt=0, description="seconds to empty the queue on SIGTERM")
    drain_close_rate: float = Field(500.0, gt=0, description="device closes per second on drain")
    forward_batch: int = Field(512, ge=1, description="records per batch to the middle tier")
    forward_window: int = Field(8, ge=1, description="batches in flight to the middle tier")
    forward_ack_timeout: float = Field(5.0, gt=0, description="seconds before failover/resend")
    gil_switch_interval: float = Field(
        0.0005, gt=0, le=0.1,
        description="seconds a thread may keep the GIL while another waits for it (Python's "
                    "default is 0.005): the event loop shares it with a few helper threads "
                    "(the metrics endpoint, the forwarder's disk jobs, retired queues' "
                    "drains), and an ack waits each time the loop waits for it")
    # Set by the parent of --processes N for each child; not user options.
    process_index: int = Field(-1, ge=-1, description=Internal)
    parent_pid: int = Field(0, ge=0, description=Internal)
    report_fd: int = Field(-1, ge=-1, description=Internal)

    @field_validator("ws_core")
    @classmethod
    def _core_can_compress(cls, core: str, info: ValidationInfo) -> str:
        if core == "picows" and info.data.get("compression"):
            raise ValueError("--compression (permessage-deflate) needs the websockets core: "
                             "use --ws-core websockets or auto (picows has no "
                             "permessage-deflate)")
        return core


def ws_core(settings: IngestSettings) -> str:
    """The WebSocket core in use: picows unless compression needs websockets."""
    if settings.ws_core == "auto":
        return "websockets" if settings.compression else "picows"
    return settings.ws_core


def listen_backlog(requested: int, somaxconn: Path = SOMAXCONN) -> tuple[int, int | None]:
    """The backlog a listener gets for ``requested`` and the somaxconn cap that applies
    (None where it cannot be read: then ``requested`` is reported as is)."""
    try:
        cap = int(somaxconn.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return requested, None
    return min(requested, cap), cap
