"""Fixtures for the scenarios: the local cluster with the pipeline's auth Secret."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.cluster import LocalCluster
from support.cluster.scenario import NAME
from support.pipeline import SECRET

from iotpipe_tools.sources import raise_nofile


@pytest.fixture
async def cluster(kmock: Any, tmp_path: Path) -> AsyncIterator[LocalCluster]:
    raise_nofile(65536)
    async with LocalCluster(kmock, tmp_path / "cluster") as local:
        await local.api.create("v1/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{NAME}-auth"},
            "data": {"secret": base64.b64encode(SECRET.encode()).decode()}})
        yield local
