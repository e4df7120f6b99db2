"""``iotpipe-operator``: run the operator, or render a pipeline's children without a cluster.

    iotpipe-operator run [--namespaces a,b] [--reconcile-interval 60] [--standalone]
    iotpipe-operator render -f pipeline.yaml [--keda] [--service-monitor]
    iotpipe-operator validate -f pipeline.yaml [--old previous.yaml]
    iotpipe-operator crd            # print the CustomResourceDefinition (crds/iotpipelines.yaml)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import BaseSettings

from iotpipe.settings import CommaList, parse_settings, tier_config
from iotpipe_operator import builders, crd


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


class _Empty(BaseModel):
    pass


def _usage() -> str:
    return (__doc__ or "").strip()


def read_pipeline(path: str) -> dict[str, Any]:
    """The one IoTPipeline document of a file (not validated)."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML: {exc}") from exc
    pipelines = [doc for doc in docs if isinstance(doc, dict) and doc.get("kind") == crd.KIND]
    if len(pipelines) != 1:
        raise ValueError(f"{path}: expected exactly one {crd.KIND} document, "
                         f"found {len(pipelines)}")
    return pipelines[0]


def load_pipeline(path: str) -> tuple[dict[str, Any], list[str]]:
    """Read and validate (what validate refuses, render refuses); returns the pipeline and
    the warnings."""
    from iotpipe_operator import validation

    pipeline = read_pipeline(path)
    report = validation.validate(pipeline)
    if report.errors:
        raise ValueError(f"{path}: " + "; ".join(report.errors))
    return pipeline, report.warnings


def validate_main(argv: list[str]) -> int:
    from iotpipe_operator import validation

    settings = parse_settings(ValidateSettings, argv)
    try:
        pipeline = read_pipeline(settings.file)
        old = read_pipeline(settings.old) if settings.old else None
    except (OSError, ValueError) as exc:
        print(f"iotpipe-operator validate: error: {exc}", file=sys.stderr)
        return 2
    report = validation.validate(pipeline, old)
    for warning in report.warnings:
        print(f"{settings.file}: warning: {warning}", file=sys.stderr)
    for error in report.errors:
        print(f"{settings.file}: error: {error}", file=sys.stderr)
    if report.errors:
        return 1
    print(f"{settings.file}: valid {crd.KIND} {pipeline['metadata']['name']}"
          + (f" (update of {settings.old})" if settings.old else ""))
    return 0


def render_main(argv: list[str]) -> int:
    settings = parse_settings(RenderSettings, argv)
    try:
        pipeline, warnings = load_pipeline(settings.file)
        if settings.namespace:
            pipeline.setdefault("metadata", {})["namespace"] = settings.namespace
        caps = builders.ClusterCapabilities(keda=settings.keda,
                                            service_monitor=settings.service_monitor)
        result = builders.build(pipeline, caps)
        docs = list(result.children)
        for ordinal in settings.drain_ordinals:
            docs.append(builders.build_drain_job(pipeline, int(ordinal)))
    except (OSError, ValueError) as exc:
        print(f"iotpipe-operator render: error: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"iotpipe-operator render: warning: {warning}", file=sys.stderr)
    for problem in result.problems:
        print(f"iotpipe-operator render: warning: {problem.reason}: {problem.message}",
              file=sys.stderr)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


def crd_main(argv: list[str]) -> int:
    if argv:
        print("usage: iotpipe-operator crd   (prints the CRD YAML)", file=sys.stderr)
        return 0 if argv[0] in ("-h", "--help") else 2
    sys.stdout.write(crd_yaml())
    return 0


def crd_yaml() -> str:
    header = ("# Generated by `iotpipe-operator crd` from operator/iotpipe_operator/crd.py;\n"
              "# do not edit by hand (tests/operator checks they are identical).\n")
    return header + yaml.safe_dump(crd.build_crd(), sort_keys=False, width=100)


def run_main(argv: list[str]) -> int:
    settings = parse_settings(RunSettings, argv)
    from iotpipe_operator import handlers  # kopf is imported only when running

    return handlers.run(settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    commands = {"run": run_main, "render": render_main, "validate": validate_main,
                "crd": crd_main}
    if command not in commands:
        print(f"iotpipe-operator: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return commands[command](rest)


if __name__ == "__main__":
    raise SystemExit(main())
