"""The device registry: what each device is and where it stands.

The registry is a YAML file (in Kubernetes, a ConfigMap mounted as a file)::

    devices:
      boiler-17: {class: boiler, location: plant-a/hall-2, labels: {line: "3"}}
    prefixes:
      therm-: {class: thermometer, location: plant-a}

``Registry.lookup`` tries the exact device id first, then the longest matching prefix.
Every field of an entry is optional: a missing ``class`` or ``location`` is ``"unknown"``
and missing ``labels`` are empty. Scalar values (numbers, booleans) are turned into
strings, since YAML turns ``floor: 3`` into an int. Anything else that does not fit the
format (an unknown top-level key or entry field, a list where a map belongs) is an error
that names the place, because a typo silently leaving devices unenriched is worse.

``RegistryWatcher`` keeps the current registry and reloads the file when its mtime, size
or inode changes (a ConfigMap update swaps a symlink, which changes the inode). A file
that fails to load is logged and the previous registry is kept. A missing file is an
empty registry (every device unknown) until the file appears, so a tier starts without
one, as it does in local mode; a file that disappears later keeps the last registry.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

__all__ = ["UNKNOWN", "DeviceInfo", "Registry", "RegistryError", "RegistryWatcher"]

log = logging.getLogger(__name__)

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_ENTRY_FIELDS = ("class", "location", "labels")
_TOP_LEVEL_KEYS = ("devices", "prefixes")
# lookup() memoises results; the memo is dropped when it grows past this many ids.
_MEMO_LIMIT = 100_000


class RegistryError(ValueError):
    """The registry file cannot be read or does not follow the format."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    device_class: str
    location: str
    labels: dict[str, str] = field(default_factory=dict)


UNKNOWN = DeviceInfo("unknown", "unknown", {})


def _scalar(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    raise RegistryError(f"{where}: expected a string, got {type(value).__name__}")


def _checked_map(raw: object, where: str, expected: str, what: str,
                 allowed: tuple[str, ...]) -> dict[Any, Any]:
    """``raw`` if it is a map with only ``allowed`` keys, else a RegistryError naming why."""
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: expected {expected}, got {type(raw).__name__}")
    unknown = set(map(str, raw)) - set(allowed)
    if unknown:
        raise RegistryError(f"{where}: unknown {what} {sorted(unknown)}; "
                            f"allowed: {', '.join(allowed)}")
    return raw


def _parse_entry(raw: object, where: str) -> DeviceInfo:
    if raw is None:
        return UNKNOWN
    raw = _checked_map(raw, where, "a map with class/location/labels", "field(s)",
                       _ENTRY_FIELDS)
    labels_raw = raw.get("labels") or {}
    if not isinstance(labels_raw, dict):
        raise RegistryError(f"{where}.labels: expected a map, got {type(labels_raw).__name__}")
    labels = {
        _scalar(k, f"{where}.labels key"): _scalar(v, f"{where}.labels.{k}")
        for k, v in labels_raw.items()
    }
    device_class = raw.get("class")
    location = raw.get("location")
    return DeviceInfo(
        device_class="unknown" if device_class is None else _scalar(device_class, f"{where}.class"),
        location="unknown" if location is None else _scalar(location, f"{where}.location"),
        labels=labels,
    )


def _parse_section(doc: dict[Any, Any], name: str, source: str) -> dict[str, DeviceInfo]:
    section = doc.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise RegistryError(f"{source}: {name!r} must be a map of id -> entry, "
                            f"got {type(section).__name__}")
    entries: dict[str, DeviceInfo] = {}
    for key, raw in section.items():
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise RegistryError(f"{source}: {name}: key {key!r} is not a device id string")
        entries[str(key)] = _parse_entry(raw, f"{source}: {name}.{key}")
    return entries


class Registry:
    """An immutable snapshot of the registry; ``lookup`` is safe from any thread."""

    def __init__(
        self,
        devices: dict[str, DeviceInfo] | None = None,
        prefixes: dict[str, DeviceInfo] | None = None,
    ) -> None:
        self._devices = dict(devices or {})
        self._prefixes = dict(prefixes or {})
        if "" in self._prefixes:
            raise RegistryError("prefixes: the empty prefix is not allowed")
        # Longest first, so the first hit while scanning is the longest matching prefix.
        self._prefix_lengths = sorted({len(p) for p in self._prefixes}, reverse=True)
        self._memo: dict[str, DeviceInfo | None] = {}

    @classmethod
    def from_yaml(cls, text: str, source: str = "registry") -> Registry:
        try:
            doc = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            raise RegistryError(f"{source}: not valid YAML: {exc}") from None
        if doc is None:
            return cls()
        doc = _checked_map(doc, source, "a map with 'devices' and/or 'prefixes'",
                           "top-level key(s)", _TOP_LEVEL_KEYS)
        return cls(_parse_section(doc, "devices", source), _parse_section(doc, "prefixes", source))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Registry:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"registry file {os.fspath(path)!r}: {exc}") from None
        return cls.from_yaml(text, source=os.fspath(path))

    def __len__(self) -> int:
        return len(self._devices) + len(self._prefixes)

    def devices(self) -> Mapping[str, DeviceInfo]:
        """The devices listed by exact id (read-only; prefixes are not enumerable)."""
        return MappingProxyType(self._devices)

    def lookup(self, device_id: str) -> DeviceInfo | None:
        """The entry for ``device_id``: exact id first, then the longest prefix; else None."""
        info = self._devices.get(device_id)
        if info is not None:
            return info
        if not self._prefix_lengths:
            return None
        try:
            return self._memo[device_id]
        except KeyError:
            pass
        found: DeviceInfo | None = None
        for length in self._prefix_lengths:
            if length <= len(device_id):
                found = self._prefixes.get(device_id[:length])
                if found is not None:
                    break
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo = {}
        self._memo[device_id] = found
        return found


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class RegistryWatcher:
    """Holds the current ``Registry`` and reloads it when the file changes.

    The check is lazy: reading ``current`` stats the file at most once per ``interval_s``
    (a stat costs microseconds), so no thread is needed and any caller (a thread or an
    event loop) can use it. ``version`` goes up by one on every successful reload, for
    callers that keep derived state (such as attribute subscriptions).
    """

    def __init__(self, path: str | os.PathLike[str], interval_s: float = 2.0) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.version = 0
        self._lock = threading.Lock()
        self._registry = Registry()
        self._signature: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._warned_missing = False
        self.reload_if_changed()

    @property
    def current(self) -> Registry:
        if time.monotonic() >= self._next_check:
            self.reload_if_changed()
        return self._registry

    def reload_if_changed(self) -> bool:
        """Stat the file now and reload it if it changed. True when a new registry loaded."""
        with self._lock:
            self._next_check = time.monotonic() + self.interval_s
            signature = _file_signature(self.path)
            if signature == self._signature:
                return False
            self._signature = signature
            if signature is None:
                if not self._warned_missing:
                    log.warning("registry file missing; every device is unknown until it appears",
                                extra={"fields": {"path": str(self.path)}})
                    self._warned_missing = True
                return False
            self._warned_missing = False
            try:
                registry = Registry.from_file(self.path)
            except RegistryError as exc:
                log.error("registry file not loaded; keeping the previous registry",
                          extra={"fields": {"path": str(self.path), "error": str(exc)}})
                return False
            self._registry = registry
            self.version += 1
            log.info("registry loaded", extra={"fields": {"path": str(self.path),
                                                          "entries": len(registry)}})
            return True
