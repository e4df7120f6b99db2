"""The NetworkPolicy of one pipeline's pods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iotpipe_operator.builders.common import (
    FEED_PORT,
    INGEST_PORT,
    METRICS_PORT,
    PIPELINE_LABEL,
    PUB_PORT,
    RELAY_PORT,
    ROUTER_PORT,
    labels_for,
    selector_for,
)


def build_network_policy(name: str, namespace: str, policy: Mapping[str, Any]
                         ) -> dict[str, Any]:
    """One NetworkPolicy for the pipeline's pods: each ZeroMQ port admits only the tier of
    this pipeline that uses it (ingest and drain Jobs -> router, relay -> pub, storage ->
    feed), so nothing else in the cluster can inject records that bypass device tokens; the
    WebSocket and metrics ports admit the configured peers (unset: anyone), the metrics
    port also this pipeline's relay (the live page's health panel and device history)."""
    def tier_peer(tier: str) -> dict[str, Any]:
        return {"podSelector": {"matchLabels": selector_for(name, tier)}}

    def open_rule(ports: list[int], peers: list[Any] | None) -> dict[str, Any]:
        rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": p} for p in ports]}
        if peers:  # no "from": every source (an empty list would admit nothing)
            rule["from"] = list(peers)
        return rule

    ingress = [
        {"ports": [{"protocol": "TCP", "port": ROUTER_PORT}],
         "from": [tier_peer("ingest"), tier_peer("ingest-drain")]},
        {"ports": [{"protocol": "TCP", "port": PUB_PORT}], "from": [tier_peer("relay")]},
        {"ports": [{"protocol": "TCP", "port": FEED_PORT}], "from": [tier_peer("storage")]},
        open_rule([INGEST_PORT, RELAY_PORT], policy.get("webSocketFrom")),
        # the relay's live page reads every tier's metrics and storage's read API there
        open_rule([METRICS_PORT], [*policy["metricsFrom"], tier_peer("relay")]
                  if policy.get("metricsFrom") else None),
    ]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": labels_for(name, "network")},
        "spec": {"podSelector": {"matchLabels": {PIPELINE_LABEL: name}},
                 "policyTypes": ["Ingress"], "ingress": ingress},
    }

