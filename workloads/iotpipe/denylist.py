"""Revocation without rotating the signing secret: a deny list file that ingest and relay reload.

The file (a ConfigMap key, or any file) is YAML::

    devices: [dev-17, dev-42]          # device ids (the 'sub' of device tokens): ingest
    clients: [dashboard-old]           # client-app ids (the 'sub' of client tokens): relay
    token_ids: [8c1e0d0a9f8b4c0e...]   # token ids (the 'jti' claim of tokens from
                                       # 'iotpipe token'): both tiers

Every key is optional; an empty file denies nothing. A denied identity is refused at the
handshake (HTTP 403 naming the reason), and connections already open are closed with code
1008 and reason ``revoked: device`` / ``revoked: client`` / ``revoked: token`` within one
reload interval (``--deny-list-reload-seconds``). Removing an entry lets the device
connect again.

``parse_deny_list`` is the sans-I/O part. ``DenyListFile`` watches the file (and, on a
change, names the open connections to close: ``revoke``); ``reload_security`` is the
loop of ingest and relay that checks it and the TLS certificate. A file that
cannot be parsed at start is an error; a file that becomes unparsable or disappears later
is reported and the last good list stays in force (a botched edit must not un-revoke
anyone).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import yaml

if TYPE_CHECKING:
    from iotpipe.tlsconfig import ReloadingTLS

__all__ = ["CLOSE_REVOKED", "DenyList", "DenyListError", "DenyListFile", "parse_deny_list",
           "reload_security"]

C = TypeVar("C")

log = logging.getLogger("iotpipe.denylist")

# RFC 6455 policy violation: the device is not allowed in, and should not retry as is.
CLOSE_REVOKED = 1008
KEYS = ("devices", "clients", "token_ids")
MAX_ENTRY_LEN = 256


class DenyListError(ValueError):
    """The deny list cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class DenyList:
    devices: frozenset[str] = frozenset()
    clients: frozenset[str] = frozenset()
    token_ids: frozenset[str] = frozenset()

    def refusal(self, kind: str, subject: str | None, token_id: str | None) -> str | None:
        """Why ``subject`` (a device when ``kind`` is "device", else a client app) holding a
        token with ``token_id`` is refused: ``"device"``, ``"client"``, ``"token"``; None if
        it is not."""
        subjects = self.devices if kind == "device" else self.clients
        if subject is not None and subject in subjects:
            return kind
        if token_id is not None and token_id in self.token_ids:
            return "token"
        return None

    def __len__(self) -> int:
        return len(self.devices) + len(self.clients) + len(self.token_ids)


def _entries(source: str, key: str, value: object) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise DenyListError(f"{source}: '{key}' must be a list of strings")
    for item in value:
        if not isinstance(item, str) or not item or len(item) > MAX_ENTRY_LEN:
            raise DenyListError(f"{source}: '{key}' entry {item!r} must be a string of "
                                f"1..{MAX_ENTRY_LEN} characters")
    return frozenset(value)


def parse_deny_list(text: str, source: str = "deny list") -> DenyList:
    """A ``DenyList`` from the file's text; ``DenyListError`` naming ``source`` otherwise."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DenyListError(f"{source}: not valid YAML ({exc})") from None
    if data is None:
        return DenyList()
    if not isinstance(data, dict):
        raise DenyListError(f"{source}: expected a mapping with keys {', '.join(KEYS)}")
    unknown = sorted(str(k) for k in data if k not in KEYS)
    if unknown:
        raise DenyListError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                            f"expected {', '.join(KEYS)}")
    return DenyList(**{key: _entries(source, key, data.get(key)) for key in KEYS})


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows a ConfigMap volume's symlinks
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class DenyListFile:
    """The deny list of one file, re-read by ``check()`` when the file changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._signature = _signature(self.path)
        self.failures = 0
        if self._signature is None:
            raise DenyListError(f"{self.path}: deny list file not found")
        self.current = self._read()

    def _read(self) -> DenyList:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DenyListError(f"{self.path}: cannot read ({exc})") from None
        return parse_deny_list(text, str(self.path))

    def check(self) -> DenyList | None:
        """The new list when the file changed and parses; None otherwise (the last good
        list stays in ``current``)."""
        signature = _signature(self.path)
        if signature == self._signature:
            return None
        self._signature = signature
        if signature is None:
            self.failures += 1
            log.error("deny list file is gone; keeping the last list", extra={"fields": {
                "path": str(self.path), "entries": len(self.current)}})
            return None
        try:
            fresh = self._read()
        except DenyListError as exc:
            self.failures += 1
            log.error("deny list not reloaded; keeping the last list", extra={"fields": {
                "error": str(exc), "entries": len(self.current)}})
            return None
        self.current = fresh
        log.info("deny list reloaded", extra={"fields": {
            "path": str(self.path), "devices": len(fresh.devices),
            "clients": len(fresh.clients), "token_ids": len(fresh.token_ids)}})
        return fresh


    def revoke(self, kind: str, connections: Iterable[C],
               identity: Callable[[C], tuple[str | None, str | None]],
               close: Callable[[C, str], object]) -> int:
        """Re-read the file; if it changed, ``close(connection, reason)`` each of
        ``connections`` whose ``identity`` (subject, token id) the new list refuses as a
        ``kind`` ("device" or "client"). How many were closed."""
        fresh = self.check()
        if fresh is None:
            return 0
        closed = 0
        for connection in list(connections):
            reason = fresh.refusal(kind, *identity(connection))
            if reason is not None:
                close(connection, f"revoked: {reason}")
                closed += 1
        if closed:
            log.info("revoked connections closed", extra={"fields": {
                "kind": kind, "connections": closed}})
        return closed


async def reload_security(tls: ReloadingTLS | None, tls_seconds: float,
                          reload_deny_list: Callable[[], object],
                          deny_seconds: float) -> NoReturn:
    """Forever: check the TLS certificate every ``tls_seconds`` and call
    ``reload_deny_list`` every ``deny_seconds`` (a tier's own revoke step)."""
    loop = asyncio.get_running_loop()
    next_tls = loop.time() + tls_seconds
    next_deny = loop.time() + deny_seconds
    while True:
        await asyncio.sleep(max(0.05, min(next_tls, next_deny) - loop.time()))
        now = loop.time()
        if tls is not None and now >= next_tls:
            next_tls = now + tls_seconds
            tls.check()
        if now >= next_deny:
            next_deny = now + deny_seconds
            reload_deny_list()
