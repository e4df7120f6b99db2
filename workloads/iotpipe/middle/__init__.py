"""The middle tier: fan-in log, live PUB fan-out and the durable storage feed.

``core`` gathers the sans-I/O cores (``intervals``, ``dedup``, ``intake``, ``recent``,
``feed``); ``server`` is the ZeroMQ I/O shell and ``main(argv)`` for ``iotpipe middle``,
with ``settings``, ``metrics`` and ``store`` (the marks checkpoint file) beside it.
"""
