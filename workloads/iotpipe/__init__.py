"""iotpipe: the data path (queue, ingest, middle, relay, storage) and its command line."""

__version__ = "0.1.0"
