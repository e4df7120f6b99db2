"""A local stand-in for a Kubernetes cluster that runs the real tiers.

KMock's emulator is the API server; small controllers written for the tests do what the
controller manager and the kubelet would (see ``cluster.py``); pods are local process
groups on their own loopback addresses. ``docs/local-cluster.md`` describes it.
"""

from support.cluster.api import ClusterEmulator
from support.cluster.cluster import LocalCluster

__all__ = ["ClusterEmulator", "LocalCluster"]
