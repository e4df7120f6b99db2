"""The storage tier: consumes the middle tier's durable feed, enriches, writes to sinks.

``consumer`` holds the sans-I/O feed client state, ``enrich`` turns log records into
stored readings, ``sinks`` holds the ``Sink`` protocol and its implementations, ``server``
is the I/O shell (``iotpipe storage``) and ``query`` reads stored readings back
(``iotpipe query``).
"""
