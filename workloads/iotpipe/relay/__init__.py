"""The relay tier: live events from the middle tier's PUB sockets to client apps over WebSocket.

``core`` is the sans-I/O core (subscriptions, fan-out, bounded per-client queues, gap
reporting); ``server`` is the asyncio/ZeroMQ shell and ``main`` for ``iotpipe relay``;
``settings`` and ``metrics`` hold its settings model and its Prometheus collector.
"""
