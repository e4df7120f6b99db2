"""Settings of ``iotpipe middle`` (flags and ``IOTPIPE_MIDDLE_*`` environment variables)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field

from iotpipe.settings import CommaList, ServerSettings, metrics_port_field, tier_config
from iotpipe.wire import LIVE_GROUP_RECORDS_MAX

__all__ = ["MiddleSettings"]


class MiddleSettings(ServerSettings):
    """Fan-in log (ROUTER), live fan-out (PUB) and the durable storage feed (ROUTER)."""

    model_config = tier_config("iotpipe middle", "IOTPIPE_MIDDLE_")

    metrics_port: int = metrics_port_field(9101)
    router_port: int = Field(5555, ge=1, le=65535,
                             description="ROUTER port receiving batches from ingest nodes")
    pub_port: int = Field(5556, ge=1, le=65535, description="PUB port of live events (relay)")
    feed_port: int = Field(5557, ge=1, le=65535,
                           description="ROUTER port of the durable feed (storage consumers)")
    data_dir: Path = Field(Path("/var/lib/iotpipe/log"),
                           description="directory of the log (queue/) and the marks checkpoint")
    log_bytes: int = Field(4 << 30, ge=1 << 16, description="log capacity in bytes")
    segment_bytes: int = Field(64 << 20, ge=1 << 12,
                               description="log segment file size (capped to log_bytes)")
    persist: Literal["auto", "fdatasync", "pmem"] = Field(
        "auto", description="log persist backend: auto (pmem only on real pmem), fdatasync, pmem")
    middle_id: str = Field(default_factory=socket.gethostname,
                           description="this middle's name in live events and deliveries")
    consumer_groups: CommaList = Field(
        ["storage"],
        description="durable feed consumer groups, comma separated; the log keeps every "
                    "record until each of them acknowledged it")
    lease_timeout: float = Field(30.0, gt=0,
                                 description="seconds before an unacknowledged delivery is "
                                             "redelivered")
    consumer_timeout: float = Field(30.0, gt=0,
                                    description="seconds without a feed request after which a "
                                                "consumer is dropped and its deliveries "
                                                "redelivered")
    checkpoint_interval: float = Field(1.0, gt=0,
                                       description="seconds between dedup-marks checkpoints")
    max_holes: int = Field(256, ge=1,
                           description="open gaps remembered per ingest node (oldest closed)")
    max_delivery_records: int = Field(512, ge=1, description="records per feed delivery")
    max_delivery_bytes: int = Field(4 << 20, ge=1024, description="bytes per feed delivery")
    recent_bytes: int = Field(64 << 20, ge=0,
                              description="recently appended records kept in memory to serve "
                                          "feed deliveries without reading the log (whole "
                                          "groups are dropped, never the newest)")
    max_group_records: int = Field(4096, ge=1,
                                   description="readings gathered into one group commit; a "
                                   "group this large (a round that stops here with more "
                                   "waiting) is written and synced in the background while "
                                   "the next one is received and prepared")
    busy_retry_ms: int = Field(200, ge=1, description="retry hint sent with busy replies")
    pub_hwm: int = Field(100_000, ge=1,
                         description="PUB send high-water mark per subscriber, in records "
                                     "(v2: pub_hwm / live_group_records messages); a "
                                     "subscriber further behind misses events")
    live_format: Literal["v1", "v2"] = Field(
        "v2", description="live events on the PUB socket: v2 = one message per commit "
                          "group, v1 = one per record (for relays from before v2; "
                          "docs/protocols.md)")
    live_group_records: int = Field(LIVE_GROUP_RECORDS_MAX, ge=1, le=LIVE_GROUP_RECORDS_MAX,
                                    description="readings per v2 live message (a larger "
                                                "commit group is sent as several)")
    curve_keys_dir: str = Field(
        "", description="CurveZMQ keys directory (docs/security.md): every socket then admits "
                        "only the pipeline's own tiers; empty = no CURVE (plain ZeroMQ)")
    curve_reload_seconds: float = Field(
        5.0, gt=0, description="seconds between checks of the keys directory for changed "
                               "admitted client keys (rotation)")
