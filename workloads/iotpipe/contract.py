"""The deployment contract: how a tier's settings are named on a command line and in the
environment, taken from the tiers' own settings models (pydantic-settings) instead of
retyped: environment keys (``<env_prefix><FIELD>``), command-line flags (``--field-name``)
and defaults.

Both deployers use it: the Kubernetes operator (``iotpipe_operator.contract`` re-exports
this module) and ``iotpipe up`` (:mod:`iotpipe.local`). It lives in the workloads package
because ``iotpipe up`` must work without the operator extra installed. A deployer that names
a setting a tier does not have fails here, at build time and in the unit tests, not in a
crash-looping pod or a local tier that exits 2.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from pydantic_settings import BaseSettings

# tier -> (module, settings class); imported on first use (a tier module pulls in its
# server's dependencies, which a deployer only needs once it asks about that tier)
_MODELS = {
    "ingest": ("iotpipe.ingest.server", "IngestSettings"),
    "middle": ("iotpipe.middle.server", "MiddleSettings"),
    "relay": ("iotpipe.relay.settings", "RelaySettings"),
    "storage": ("iotpipe.storage.settings", "StorageSettings"),
    "drain": ("iotpipe.ingest.drain", "DrainSettings"),
}
TIERS = tuple(_MODELS)


@cache
def settings_model(tier: str) -> type[BaseSettings]:
    if tier not in _MODELS:
        raise KeyError(f"unknown tier {tier!r} (known: {', '.join(_MODELS)})")
    module, name = _MODELS[tier]
    model: type[BaseSettings] = getattr(importlib.import_module(module), name)
    return model


def has_setting(tier: str, field: str) -> bool:
    return field in settings_model(tier).model_fields


def _check(tier: str, field: str) -> None:
    if not has_setting(tier, field):
        model = settings_model(tier)
        raise KeyError(f"{model.__name__} ({tier}) has no setting {field!r}")


def env(tier: str, field: str) -> str:
    """The environment variable of a tier setting, e.g. IOTPIPE_INGEST_QUEUE_BYTES."""
    _check(tier, field)
    prefix = str(settings_model(tier).model_config.get("env_prefix", ""))
    return prefix + field.upper()


def flag(tier: str, field: str) -> str:
    """The command-line flag of a tier setting, e.g. --queue-bytes."""
    _check(tier, field)
    return "--" + field.replace("_", "-")


def default(tier: str, field: str) -> Any:
    _check(tier, field)
    return settings_model(tier).model_fields[field].default
