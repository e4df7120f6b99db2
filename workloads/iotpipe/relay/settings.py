"""Settings of ``iotpipe relay`` (flags and ``IOTPIPE_RELAY_*`` environment variables)."""

from __future__ import annotations

from pydantic import Field, field_validator

from iotpipe.relay.web import parse_health_targets
from iotpipe.settings import (
    CommaList,
    EdgeSecuritySettings,
    EndpointsReloadSettings,
    ServerSettings,
    metrics_port_field,
    tier_config,
)
from iotpipe.wire import LIVE_GROUP_RECORDS_MAX

__all__ = ["RelaySettings"]


class RelaySettings(EdgeSecuritySettings, EndpointsReloadSettings, ServerSettings):
    """Serve live device readings to client apps over WebSocket (path /v1/live)."""

    model_config = tier_config("iotpipe relay", "IOTPIPE_RELAY_")

    port: int = Field(8081, ge=0, le=65535, description="WebSocket port (path /v1/live)")
    metrics_port: int = metrics_port_field(9103)
    middle_pub_endpoints: CommaList = Field(
        default_factory=list,
        description="middle PUB endpoints, comma separated (tcp://host:5556,...)")
    middle_pub_endpoints_file: str = Field(
        "", description="file listing the middle PUB endpoints, one per line (key 'pub' of "
                        "the endpoints ConfigMap), re-read while running; wins over "
                        "--middle-pub-endpoints when usable")
    registry_file: str = Field(
        "/etc/iotpipe/registry/registry.yaml",
        description="device registry YAML (for class/location subscriptions); "
                    "a missing file means every device is 'unknown'")
    client_queue: int = Field(1000, ge=1,
                              description="frames queued per client before events are dropped "
                                          "for it (the client then gets a gap frame)")
    stall_timeout: float = Field(15.0, gt=0,
                                 description="close a client (code 4008) whose queue made no "
                                             "progress for this many seconds")
    max_filters: int = Field(1000, ge=1, description="subscription entries allowed per client")
    max_frame_bytes: int = Field(65536, ge=256,
                                 description="largest client frame accepted (larger: close 1009)")
    max_clients: int = Field(10000, ge=1, description="connections above this get HTTP 503")
    sub_hwm: int = Field(100_000, ge=1,
                         description="readings the SUB socket may hold per middle before "
                                     "live events are dropped (and announced by gap frames); "
                                     "ZeroMQ counts messages, so the socket holds this / 256 "
                                     "(the most readings in a v2 message; a v1 middle's "
                                     "messages hold one)")
    compression: bool = Field(False, description="offer permessage-deflate (costs memory)")
    insecure_no_auth: bool = Field(False, description="accept clients without a token "
                                                      "(local demos only)")
    # The live fleet page (iotpipe.relay.web): served at / on the WebSocket port.
    web: bool = Field(True, description="serve the live fleet page at / and its /api/ "
                                        "endpoints on the WebSocket port")
    history_urls: CommaList = Field(
        default_factory=list,
        description="storage read APIs for the page's device history, comma separated "
                    "(http://storage-host:9102; storage runs with --read-api)")
    health_urls: CommaList = Field(
        default_factory=list,
        description="tier metrics for the page's pipeline health, comma separated "
                    "TIER=URL (ingest=http://host:9100/metrics,...)")

    @field_validator("health_urls")
    @classmethod
    def _check_health_urls(cls, value: list[str]) -> list[str]:
        parse_health_targets(value)  # a ValueError names the bad entry
        return value

    @property
    def sub_rcvhwm(self) -> int:
        """The SUB socket's receive high-water mark in messages: about ``sub_hwm`` readings
        even when every message is a full v2 group."""
        return max(1, -(-self.sub_hwm // LIVE_GROUP_RECORDS_MAX))
