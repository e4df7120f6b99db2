"""The middle, relay and storage tiers' template contexts (ingest, which also builds its
autoscaler and drain Job, has a module of its own)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iotpipe_operator.builders.common import (
    COMMON_SETTINGS,
    ENDPOINTS_DIR,
    FEED_PORT,
    MIDDLE_DATA_DIR,
    PUB_PORT,
    RELAY_PORT,
    ROUTER_PORT,
    STORAGE_DATA_DIR,
    health_urls,
    queue_volume,
    storage_history_urls,
    tier_context,
    tier_env,
)
from iotpipe_operator.builders.mounts import PipelineMounts
from iotpipe_operator.quantity import quantity_bytes


def middle_context(name: str, spec: Mapping[str, Any], mounts: PipelineMounts
                   ) -> dict[str, Any]:
    """Router, pub and feed ports; the log volume."""
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


def relay_context(name: str, namespace: str, spec: Mapping[str, Any], mounts: PipelineMounts
                  ) -> dict[str, Any]:
    """Live subscribers over WebSocket; the live page's sources."""
    relay = spec["relay"]
    curve, tls = mounts.curve["relay"], mounts.tls["relay"]
    config = tier_env("relay", {
        **COMMON_SETTINGS, "PORT": RELAY_PORT, "MIDDLE_PUB_ENDPOINTS_FILE": f"{ENDPOINTS_DIR}/pub",
        "CLIENT_QUEUE": relay["clientQueue"], **mounts.registry[2], **mounts.auth[2],
        # clients authenticate with the same secret as devices, or not at all
        "INSECURE_NO_AUTH": spec["ingest"]["auth"]["insecureNoAuth"],
        # the live page: device history from storage's read API, tier health from metrics
        "HISTORY_URLS": ",".join(storage_history_urls(name, namespace,
                                                      spec["storage"]["replicas"])) or None,
        "HEALTH_URLS": ",".join(health_urls(name, namespace)),
        **curve[2], **tls[2], **mounts.deny[2],
    })
    return tier_context(
        name, "relay", spec, config, replicas=relay["replicas"], args=["relay"],
        ports=[{"name": "ws", "port": RELAY_PORT}], volume=None,
        extra_volumes=mounts.auth[0] + mounts.registry[0] + mounts.endpoints[0] + curve[0]
        + tls[0] + mounts.deny[0],
        extra_mounts=mounts.auth[1] + mounts.registry[1] + mounts.endpoints[1] + curve[1]
        + tls[1] + mounts.deny[1],
        headless_name=f"{name}-relay-headless", service=relay["service"], grace_seconds=30)


def storage_context(name: str, spec: Mapping[str, Any], mounts: PipelineMounts
                    ) -> dict[str, Any]:
    """The feed consumer, its sinks and its read API; the data volume."""
    storage = spec["storage"]
    curve = mounts.curve["storage"]
    config = tier_env("storage", {
        **COMMON_SETTINGS, "FEED_ENDPOINTS_FILE": f"{ENDPOINTS_DIR}/feed",
        "GROUP": storage["group"], "SINKS": ",".join(storage["sinks"]),
        "DATA_DIR": STORAGE_DATA_DIR, **mounts.registry[2],
        "READ_API": True,  # the relay's live page reads device history from it
        **curve[2],
    })
    return tier_context(
        name, "storage", spec, config, replicas=storage["replicas"], args=["storage"],
        ports=[], volume=queue_volume(storage, STORAGE_DATA_DIR),
        extra_volumes=mounts.registry[0] + mounts.endpoints[0] + curve[0],
        extra_mounts=mounts.registry[1] + mounts.endpoints[1] + curve[1],
        headless_name=f"{name}-storage",
        grace_seconds=60)
