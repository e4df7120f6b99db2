"""The middle tier: its StatefulSet's context (router, pub and feed ports, the log volume)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iotpipe_operator.builders.common import (
    COMMON_SETTINGS,
    FEED_PORT,
    MIDDLE_DATA_DIR,
    PUB_PORT,
    ROUTER_PORT,
    queue_volume,
    tier_context,
    tier_env,
)
from iotpipe_operator.builders.mounts import PipelineMounts
from iotpipe_operator.quantity import quantity_bytes


def middle_context(name: str, spec: Mapping[str, Any], mounts: PipelineMounts
                   ) -> dict[str, Any]:
    middle = spec["middle"]
    curve = mounts.curve["middle"]
    config = tier_env("middle", {
        **COMMON_SETTINGS, "ROUTER_PORT": ROUTER_PORT, "PUB_PORT": PUB_PORT,
        "FEED_PORT": FEED_PORT,
        "DATA_DIR": MIDDLE_DATA_DIR, "LOG_BYTES": quantity_bytes(middle["queue"]["size"]),
        "CONSUMER_GROUPS": spec["storage"]["group"], **curve[2],
    })
    return tier_context(
        name, "middle", spec, config, replicas=middle["replicas"], args=["middle"],
        ports=[{"name": "router", "port": ROUTER_PORT}, {"name": "pub", "port": PUB_PORT},
               {"name": "feed", "port": FEED_PORT}],
        volume=queue_volume(middle, MIDDLE_DATA_DIR), extra_volumes=curve[0],
        extra_mounts=curve[1],
        # Ingest pods must resolve every middle pod before it is ready (ZeroMQ reconnects).
        headless_name=f"{name}-middle", publish_not_ready=True, grace_seconds=60)
