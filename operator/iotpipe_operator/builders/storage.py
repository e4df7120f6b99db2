"""The storage tier: its StatefulSet's context (the feed consumer, its sinks, the read API)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iotpipe_operator.builders.common import (
    COMMON_SETTINGS,
    ENDPOINTS_DIR,
    STORAGE_DATA_DIR,
    queue_volume,
    tier_context,
    tier_env,
)
from iotpipe_operator.builders.mounts import PipelineMounts


def storage_context(name: str, spec: Mapping[str, Any], mounts: PipelineMounts
                    ) -> dict[str, Any]:
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
