"""TLS for the device and client WebSockets, with the certificate reloaded when its files change.

``ReloadingTLS(cert, key)`` builds a server ``SSLContext`` (TLS 1.2 or newer) from a PEM
certificate chain and key, e.g. the ``tls.crt`` / ``tls.key`` of a cert-manager Secret.
``check()`` (called every ``--tls-reload-seconds`` by the tier) looks at the files and, when
they changed, loads them into a fresh context. The context handed to the server keeps a
``sni_callback`` that points every new handshake at the newest good context: connections
already open keep the session they have, new ones get the new certificate, and no listener
is restarted. A pair that cannot be loaded (half-written, key not matching the
certificate) is reported and the previous certificate stays in use; the tier tries again
at the next change.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

__all__ = ["ReloadingTLS", "TLSConfigError"]

log = logging.getLogger("iotpipe.tls")


class TLSConfigError(ValueError):
    """The certificate or key cannot be used; the message names the file and the problem."""


def _signature(*paths: Path) -> tuple[tuple[int, int, int], ...]:
    sig = []
    for path in paths:
        try:
            st = os.stat(path)  # follows the symlinks of a Secret volume
        except OSError:
            sig.append((0, 0, 0))
        else:
            sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(sig)


def _load(cert: Path, key: Path) -> ssl.SSLContext:
    for path, what in ((cert, "certificate"), (key, "key")):
        if not path.is_file():
            raise TLSConfigError(f"{path}: TLS {what} file not found")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{cert} / {key}: cannot load the TLS certificate and key "
                             f"({exc.reason or exc})") from None
    except OSError as exc:
        raise TLSConfigError(f"{cert} / {key}: cannot read ({exc})") from None
    return context


class ReloadingTLS:
    """A server SSLContext whose certificate follows its files."""

    def __init__(self, cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self._signature = _signature(self.cert, self.key)
        self._current = _load(self.cert, self.key)
        self.reloads = 0
        self.failures = 0
        # The context given to the server: new handshakes are switched to the newest one.
        self.context = _load(self.cert, self.key)
        self.context.sni_callback = self._pick

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None,
              context: ssl.SSLContext) -> None:
        current = self._current
        if sslobj.context is not current:
            sslobj.context = current

    def check(self) -> bool:
        """Reload if the files changed; True when a new certificate is in use."""
        signature = _signature(self.cert, self.key)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            fresh = _load(self.cert, self.key)
        except TLSConfigError as exc:
            # Often a rotation caught between writing the two files: the next change fixes it.
            self.failures += 1
            log.error("TLS certificate not reloaded; the previous one stays in use",
                      extra={"fields": {"error": str(exc)}})
            return False
        self._current = fresh
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"fields": {"cert": str(self.cert)}})
        return True

