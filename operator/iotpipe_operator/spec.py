"""The IoTPipeline spec as one typed model (pydantic).

The CRD's OpenAPI schema (:mod:`iotpipe_operator.crd`) carries what only the API server can
use (descriptions, CEL rules, structural markers); this model carries the same fields, types,
bounds, enums and defaults for Python code. A test walks both and fails on any difference,
so neither can drift. :func:`parse` gives the builders a typed, defaulted spec.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from iotpipe_operator import crd

QUANTITY = crd.QUANTITY_PATTERN


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)


class Volume(_Model):
    size: str = Field("1Gi", max_length=32, pattern=QUANTITY)
    storage_class_name: str | None = Field(None, max_length=253)
    access_mode: Literal["ReadWriteOnce", "ReadWriteOncePod"] = "ReadWriteOnce"


class MiddleVolume(Volume):
    size: str = Field("4Gi", max_length=32, pattern=QUANTITY)


class Service(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(8080, ge=1, le=65535)
    annotations: dict[str, str] | None = None


class RelayService(Service):
    port: int = Field(8081, ge=1, le=65535)


class EnvVar(_Model):
    model_config = ConfigDict(extra="allow")  # an EnvVar: valueFrom and friends pass through
    name: str = Field(max_length=253)


class _Tier(_Model):
    replicas: int = Field(1, ge=0, le=1000)
    resources: dict[str, Any] | None = None
    env: list[EnvVar] | None = Field(None, max_length=64)


class Auth(_Model):
    secret_name: str | None = Field(None, max_length=253)
    secret_key: str = Field("secret", max_length=253)
    insecure_no_auth: bool = False


class Tls(_Model):
    secret_name: str | None = Field(None, max_length=253)


class ScaleDown(_Model):
    stabilization_window_seconds: int = Field(300, ge=0, le=3600)
    pods_per_period: int = Field(1, ge=1, le=100)
    period_seconds: int = Field(120, ge=1, le=1800)


class Keda(_Model):
    prometheus_server_address: str = Field("http://prometheus-operated.monitoring.svc:9090",
                                           max_length=512)
    polling_interval: int = Field(30, ge=1, le=3600)
    cooldown_period: int = Field(300, ge=0, le=86400)


class Autoscaling(_Model):
    mode: Literal["none", "hpa", "keda"] = "none"
    min_replicas: int = Field(2, ge=1, le=1000)
    max_replicas: int = Field(10, ge=1, le=1000)
    target_cpu_utilization_percentage: int = Field(
        70, ge=1, le=100, alias="targetCPUUtilizationPercentage")
    target_connections_per_pod: int | None = Field(None, ge=1, le=1_000_000)
    scale_down: ScaleDown = ScaleDown()
    keda: Keda = Keda()


class Drain(_Model):
    grace_seconds: int = Field(120, ge=5, le=86400)
    pre_stop_seconds: int = Field(5, ge=0, le=300)
    job_backoff_limit: int = Field(6, ge=0, le=100)


class Ingest(_Tier):
    replicas: int = Field(2, ge=0, le=1000)
    processes: int = Field(1, ge=1, le=64)
    queue: Volume = Volume()
    service: Service = Service()
    auth: Auth = Auth()
    rate_limit: float | None = Field(None, ge=0)
    max_frame_bytes: int | None = Field(None, ge=128, le=64 * 1024 * 1024)
    autoscaling: Autoscaling = Autoscaling()
    drain: Drain = Drain()
    tls: Tls = Tls()


class Middle(_Tier):
    replicas: int = Field(2, ge=1, le=1000)
    queue: MiddleVolume = MiddleVolume()


class Relay(_Tier):
    client_queue: int = Field(1000, ge=1, le=1_000_000)
    service: RelayService = RelayService()
    tls: Tls = Tls()


class Registry(_Model):
    config_map_name: str = Field(max_length=253)
    key: str = Field("registry.yaml", max_length=253)


class Storage(_Tier):
    queue: Volume = Volume()
    group: str = Field("storage", max_length=63, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    sinks: list[str] = Field(["sqlite:///var/lib/iotpipe/store/readings.db"], min_length=1,
                             max_length=16)
    registry: Registry | None = None


class Metrics(_Model):
    service_monitor: bool = False
    interval: str = Field("30s", max_length=16, pattern=r"^[0-9]+(ms|s|m|h)$")


class NetworkPolicy(_Model):
    enabled: bool = True
    web_socket_from: list[dict[str, Any]] | None = Field(None, max_length=32)
    metrics_from: list[dict[str, Any]] | None = Field(None, max_length=32)


class Curve(_Model):
    enabled: bool = True
    rotation: str | None = Field(None, max_length=63)


class Security(_Model):
    curve: Curve = Curve()


class PipelineSpec(_Model):
    image: str = Field("ghcr.io/iotpipe/iotpipe:0.1.0", max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] | None = Field(None, max_length=16)
    paused: bool = False
    deletion_policy: Literal["Drain", "Retain", "Delete"] = "Drain"
    network_policy: NetworkPolicy = NetworkPolicy()
    security: Security = Security()
    metrics: Metrics = Metrics()
    ingest: Ingest = Ingest()
    middle: Middle = Middle()
    relay: Relay = Relay()
    storage: Storage = Storage()


def parse(spec: dict[str, Any] | None) -> PipelineSpec:
    """The typed, defaulted spec (pydantic's ValidationError names the field)."""
    return PipelineSpec.model_validate(spec or {})
