"""The ``iotpipe`` command: one entry point for every tier and tool.

Subcommands are imported lazily so that ``iotpipe token`` does not pay for ZeroMQ and
``iotpipe ingest`` does not pay for the benchmark code. Each subcommand is a function
``main(argv: list[str]) -> int`` that parses its own settings model. ``simulate`` and
``bench`` live in the separate ``iotpipe_tools`` package, named here only as strings: the
product never imports it, and an install without it (the workload image) says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("iotpipe.local:main", "run the whole pipeline on this machine (embedded storage)"),
    "watch": ("iotpipe.watch:main", "print live readings from the relay (like mosquitto_sub)"),
    "query": ("iotpipe.storage.query:main", "read stored readings by device and time range"),
    "token": ("iotpipe.auth:token_main", "issue a device or client-app token"),
    "simulate": ("iotpipe_tools.simulate:main", "device fleet simulator and load generator"),
    "ingest": ("iotpipe.ingest.server:main", "tier: device WebSocket server + forwarder"),
    "middle": ("iotpipe.middle.server:main", "tier: fan-in log, live PUB and durable feed"),
    "relay": ("iotpipe.relay.server:main", "tier: live events to client apps over WebSocket"),
    "storage": ("iotpipe.storage.server:main", "tier: durable feed consumer, enrichment, sinks"),
    "keys": ("iotpipe.curve:keys_main", "create or rotate the pipeline's CurveZMQ keys"),
    "drain": ("iotpipe.ingest.drain:main", "forward a retained ingest queue until it is empty"),
    "bench": ("iotpipe_tools.bench:main", "benchmarks (queue, ingest, ...)"),
}

_TOOLS = "iotpipe_tools"

# Long-running commands that stop cleanly on SIGTERM: they get the early handler (see
# iotpipe.lifecycle) before their module is even imported.
SERVICES = frozenset({"up", "ingest", "middle", "relay", "storage"})


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: iotpipe COMMAND [options]   (iotpipe COMMAND --help for details)", ""]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SERVICES:
        from iotpipe import lifecycle

        lifecycle.catch_early()
    if not args:
        # As argparse does for a missing command: usage on stderr, status 2.
        print(f"{_usage()}\n\niotpipe: error: a COMMAND is required", file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        from iotpipe import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"iotpipe: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        if importlib.util.find_spec(_TOOLS) is not None:
            raise  # the tools are here: a genuinely missing module
        print(f"iotpipe {name}: the tools package ({_TOOLS}) is not installed here; "
              "it comes with the source install (make venv), not the workload image",
              file=sys.stderr)
        return 2
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
