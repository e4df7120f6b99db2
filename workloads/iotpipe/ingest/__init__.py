"""The ingest tier: device WebSocket server, forwarder to the middle tier, drain."""
