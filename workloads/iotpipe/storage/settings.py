"""Settings of ``iotpipe storage`` (flags and ``IOTPIPE_STORAGE_*`` environment variables)."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field

from iotpipe.settings import (
    CommaList,
    CurveSettings,
    EndpointsReloadSettings,
    ServerSettings,
    metrics_port_field,
    tier_config,
)
from iotpipe.storage.sinks import sink_scheme

__all__ = ["StorageSettings"]


class StorageSettings(CurveSettings, EndpointsReloadSettings, ServerSettings):
    """Consume the middle tier's durable feed, enrich readings and write them to sinks."""

    model_config = tier_config("iotpipe storage", "IOTPIPE_STORAGE_")

    metrics_port: int = metrics_port_field(9102)
    feed_endpoints: CommaList = Field(
        default_factory=list,
        description="middle feed endpoints, comma separated (tcp://host:5557,...); "
                    "the feed of every one is consumed")
    feed_endpoints_file: str = Field(
        "", description="file listing the middle feed endpoints, one per line (key 'feed' of "
                        "the endpoints ConfigMap), re-read while running; wins over "
                        "--feed-endpoints when usable")
    group: str = Field("storage", min_length=1, description="consumer group name")
    consumer_id: str = Field(default_factory=socket.gethostname, min_length=1,
                             description="this consumer's id in the group (default: hostname)")
    sinks: CommaList = Field(
        default_factory=list,
        description="sink URLs, comma separated (victoriametrics://host:8428, parquet:///dir, "
                    "akumuli://host:8282, sqlite:///path/x.db); the store of record "
                    "sqlite://<data-dir>/readings.db is always used: the first sqlite:// URL "
                    "given replaces it")
    store_retention: float = Field(
        0.0, ge=0,
        description="seconds to keep readings in the store of record once every sink holds "
                    "them (the store becomes a spool for the other sinks, and a reading "
                    "redelivered after that is stored again); 0 keeps them for good")
    sink_batch_rows: int = Field(2000, ge=1,
                                 description="rows a tailing sink writes in one go at most")
    registry_file: str = Field("/etc/iotpipe/registry/registry.yaml",
                               description="device registry YAML, reloaded when it changes; "
                                           "a missing file means every device is 'unknown'")
    data_dir: str = Field("/var/lib/iotpipe/store",
                          description="directory of the embedded default sink")
    window: int = Field(2000, ge=1, description="feed credit window: delivered but unacknowledged "
                                             "records each middle may send ahead")
    max_batch_records: int = Field(
        5000, ge=1, description="records written to the sinks in one go at most")
    heartbeat: float = Field(1.0, gt=0,
                             description="seconds between credit restatements to each middle")
    registry_interval: float = Field(2.0, gt=0,
                                     description="seconds between registry file checks")
    read_api: bool = Field(False, description="serve GET /v1/history (recent readings of one "
                                              "device, from the store of record) on the "
                                              "metrics port, for the relay's live page")

    def sink_urls(self) -> list[str]:
        """The store of record first (the first sqlite:// URL, or the default), then the rest."""
        for i, url in enumerate(self.sinks):
            if sink_scheme(url) == "sqlite":
                return [url, *self.sinks[:i], *self.sinks[i + 1:]]
        return [f"sqlite://{Path(self.data_dir).resolve()}/readings.db", *self.sinks]
