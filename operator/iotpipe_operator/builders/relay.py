"""The relay tier: its Deployment's context (live subscribers, the live page's sources)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iotpipe_operator.builders.common import (
    COMMON_SETTINGS,
    ENDPOINTS_DIR,
    RELAY_PORT,
    health_urls,
    storage_history_urls,
    tier_context,
    tier_env,
)
from iotpipe_operator.builders.mounts import PipelineMounts


def relay_context(name: str, namespace: str, spec: Mapping[str, Any], mounts: PipelineMounts
                  ) -> dict[str, Any]:
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
