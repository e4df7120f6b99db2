"""The operator against a local cluster that runs the real tiers (see docs/local-cluster.md)."""
