"""The middle tier: fan-in log, live PUB fan-out and the durable storage feed.

``core`` holds the sans-I/O state machines (deduplication marks, batch intake, feed
leases); ``server`` is the ZeroMQ I/O shell and ``main(argv)`` for ``iotpipe middle``.
"""
