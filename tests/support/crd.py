"""Validate IoTPipeline objects the way an API server would, against the CRD *file*
(crds/iotpipelines.yaml): the operator's own validation (defaults, unknown fields, the
structural schema, every CEL rule including transition rules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from iotpipe_operator import validation

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "iotpipelines.yaml"


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def root_schema(definition: dict[str, Any] | None = None) -> dict[str, Any]:
    return validation.root_schema(definition or load_crd())


def validate(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Every error an API server would report for creating ``obj`` (or updating ``old``)."""
    schema = root_schema()
    errors = validation.schema_errors(obj, schema)
    if errors:
        return errors  # the API server stops before CEL on schema errors
    return validation.cel_errors(obj, old, schema)
