"""Startup checks shared by the tiers' security settings (CURVE keys, TLS, deny list).

The mechanisms live in ``curve``, ``tlsconfig`` and ``denylist``; see docs/security.md.
"""

from __future__ import annotations

from typing import Any

from iotpipe.curve import CurveKeyError, load_keys
from iotpipe.denylist import DenyListError, DenyListFile
from iotpipe.tlsconfig import ReloadingTLS, TLSConfigError

__all__ = ["check_security_settings"]


def check_security_settings(settings: Any, role: str) -> str | None:
    """The first problem with the CURVE, TLS and deny list settings (None if usable):
    checked before anything starts, so a typo is one clear line and exit 2."""
    try:
        if settings.curve_keys_dir:
            load_keys(settings.curve_keys_dir, role)
        if bool(settings.tls_cert) != bool(settings.tls_key):
            return "--tls-cert and --tls-key go together"
        if settings.tls_cert:
            ReloadingTLS(settings.tls_cert, settings.tls_key)
        if settings.deny_list_file:
            DenyListFile(settings.deny_list_file)
    except CurveKeyError as exc:
        return f"--curve-keys-dir: {exc}"
    except TLSConfigError as exc:
        return f"--tls-cert/--tls-key: {exc}"
    except DenyListError as exc:
        return f"--deny-list-file: {exc}"
    return None
