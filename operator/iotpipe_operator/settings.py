"""Settings of the ``iotpipe-operator`` commands (flags and ``IOTPIPE_*`` environment variables).

A module of its own so that ``cli`` (which parses them) and ``handlers`` (which runs with
``RunSettings``) both import it, and not each other.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings

from iotpipe.settings import CommaList, tier_config

__all__ = ["RenderSettings", "RunSettings", "ValidateSettings"]


class RunSettings(BaseSettings):
    """Run the kopf operator (in-cluster config, or $KUBECONFIG)."""

    model_config = tier_config("iotpipe-operator run", "IOTPIPE_OPERATOR_")

    namespaces: CommaList = Field(
        default_factory=list,
        description="Namespaces to watch (comma list); empty: the whole cluster.")
    reconcile_interval: float = Field(
        default=60.0, gt=0,
        description="Seconds between drift/status/drain reconciliations of each pipeline.")
    standalone: bool = Field(
        default=False, description="Run without peering (no coordination between replicas).")
    peering_name: str = Field(
        default="iotpipe-operator", description="kopf peering object name (when not standalone).")
    liveness_endpoint: str = Field(
        default="http://0.0.0.0:8080/healthz",
        description="kopf liveness probe endpoint (empty: none).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level.")
    metrics_access: Literal["proxy", "direct"] = Field(
        default="proxy",
        description="How deletionPolicy Drain reads the tiers' queue depths: through the API "
                    "server's pod proxy (RBAC pods/proxy get), or directly from the pod IPs "
                    "(the operator must reach the pods' metrics port).")
    scanning: bool = Field(
        default=True,
        description="Let kopf watch CRDs and namespaces for changes at run time (needs "
                    "cluster-wide read access to both); off: discover once at startup.")


class RenderSettings(BaseSettings):
    """Print every child object of an IoTPipeline manifest as YAML (no cluster needed)."""

    model_config = tier_config("iotpipe-operator render", "IOTPIPE_RENDER_")

    file: str = Field(validation_alias=AliasChoices("f", "file"),
                      description="IoTPipeline manifest (YAML); '-' reads stdin.")
    namespace: str = Field(default="", description="Namespace override (default: the "
                                                   "manifest's, else 'default').")
    keda: bool = Field(default=False, description="Assume KEDA's ScaledObject API exists.")
    service_monitor: bool = Field(default=False,
                                  description="Assume the ServiceMonitor API exists.")
    drain_ordinals: CommaList = Field(
        default_factory=list, description="Also render drain Jobs for these ingest ordinals.")


class ValidateSettings(BaseSettings):
    """Check an IoTPipeline as the API server would (schema, unknown fields, CEL rules,
    transition rules against --old) and warn about what will crash-loop. Exit 0 when valid,
    1 when invalid, 2 on unreadable input."""

    model_config = tier_config("iotpipe-operator validate", "IOTPIPE_VALIDATE_")

    file: str = Field(validation_alias=AliasChoices("f", "file"),
                      description="IoTPipeline manifest (YAML); '-' reads stdin.")
    old: str = Field(default="", description="The stored object this one would update "
                                             "(enables the transition rules).")
