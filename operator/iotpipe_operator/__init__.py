"""iotpipe_operator: the kopf operator that turns an IoTPipeline into running workloads."""

__version__ = "0.1.0"
