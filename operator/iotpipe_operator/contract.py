"""The deployment contract between the operator and the tiers: a re-export of
:mod:`iotpipe.contract` (shared with ``iotpipe up``), plus the default ports the builders
use, read from the tiers' settings models.
"""

from __future__ import annotations

from iotpipe.contract import default, env, flag, has_setting, settings_model

__all__ = [
           "FEED_PORT",
           "INGEST_PORT",
           "METRICS_PORT",
           "PUB_PORT",
           "RELAY_PORT",
           "ROUTER_PORT",
           "default",
           "env",
           "flag",
           "has_setting",
           "settings_model",
]

INGEST_PORT: int = default("ingest", "port")
RELAY_PORT: int = default("relay", "port")
ROUTER_PORT: int = default("middle", "router_port")
PUB_PORT: int = default("middle", "pub_port")
FEED_PORT: int = default("middle", "feed_port")
METRICS_PORT: int = default("ingest", "metrics_port")  # every pod serves it on this port
