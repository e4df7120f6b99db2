"""Free loopback ports for test servers: the tools' implementation (one for both)."""

from iotpipe_tools.ports import free_port, free_port_block

__all__ = ["free_port", "free_port_block"]
