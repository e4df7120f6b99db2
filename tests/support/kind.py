"""What the kind e2e run deploys: chart, images, names, the sample pipeline it applies.

Shared by the kind tests and the checks that run without a cluster (tests/e2e).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "iotpipe-operator"
SAMPLE = REPO / "samples" / "minimal.yaml"
TAG = "e2e"
WORKLOAD_IMAGE = f"ghcr.io/iotpipe/iotpipe:{TAG}"
OPERATOR_IMAGE = f"ghcr.io/iotpipe/iotpipe-operator:{TAG}"
OPERATOR_NAMESPACE = "iotpipe-system"
RELEASE = "iotpipe"
NAMESPACE = "iot-e2e"
PIPELINE = "demo"
STORE_DB = "/var/lib/iotpipe/store/readings.db"



def operator_name() -> str:
    return f"{RELEASE}-iotpipe-operator"


def pipeline_manifest() -> dict[str, Any]:
    """samples/minimal.yaml, named for the test and pointed at the loaded workload image."""
    manifest: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    manifest["metadata"].update(name=PIPELINE, namespace=NAMESPACE)
    manifest["spec"]["image"] = WORKLOAD_IMAGE
    manifest["spec"]["imagePullPolicy"] = "IfNotPresent"
    return manifest
