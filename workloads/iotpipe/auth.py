"""Device and client-app credentials: HS256 JWTs (PyJWT) signed with one shared secret.

A token binds an identity (``sub``: the device id or the client-app id) to an audience
(``iotpipe-device`` for devices talking to ingest, ``iotpipe-client`` for apps talking to
the relay) and an expiry (``exp``). Ingest and relay pods verify tokens locally with the
shared secret, so no database sits on the connection path.

The secret comes from ``IOTPIPE_AUTH_SECRET`` (the secret itself) or
``IOTPIPE_AUTH_SECRET_FILE`` (a path, e.g. a mounted Kubernetes Secret; surrounding
whitespace is stripped). ``iotpipe token DEVICE_ID`` prints a token.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jwt
from pydantic import Field
from pydantic_settings import CliPositionalArg

from iotpipe.settings import TierSettings, parse_settings, tier_config

__all__ = [
    "AUTH_REASONS",
    "CLIENT_AUDIENCE",
    "DEVICE_AUDIENCE",
    "AuthError",
    "issue_token",
    "load_secret",
    "token_main",
    "verify_token",
]

DEVICE_AUDIENCE = "iotpipe-device"
CLIENT_AUDIENCE = "iotpipe-client"
SECRET_ENV = "IOTPIPE_AUTH_SECRET"
SECRET_FILE_ENV = "IOTPIPE_AUTH_SECRET_FILE"
ALGORITHM = "HS256"
# Identities are used as ZeroMQ topics and storage keys: keep them short and printable.
MAX_SUBJECT_LEN = 128

AUTH_REASONS = ("missing", "malformed", "bad_signature", "expired", "wrong_audience")


class AuthError(Exception):
    """A credential was refused; ``reason`` is one of ``AUTH_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_secret(environ: dict[str, str] | None = None) -> bytes:
    """The shared signing secret from ``IOTPIPE_AUTH_SECRET`` or ``IOTPIPE_AUTH_SECRET_FILE``.

    Raises ``RuntimeError`` naming both variables when neither is set, the file cannot be
    read, or the secret is empty.
    """
    env = os.environ if environ is None else environ
    value = env.get(SECRET_ENV)
    if value:
        return value.encode()
    path = env.get(SECRET_FILE_ENV)
    if path:
        try:
            secret = Path(path).read_bytes().strip()
        except OSError as exc:
            raise RuntimeError(
                f"{SECRET_FILE_ENV}={path}: cannot read the secret ({exc})"
            ) from None
        if not secret:
            raise RuntimeError(f"{SECRET_FILE_ENV}={path}: the file is empty")
        return secret
    raise RuntimeError(
        f"no auth secret: set {SECRET_ENV} (the secret) or {SECRET_FILE_ENV} (a file holding it)"
    )


def issue_token(secret: bytes, subject: str, audience: str, ttl_s: int) -> str:
    """A signed HS256 token for ``subject`` valid for ``ttl_s`` seconds."""
    if not subject or len(subject) > MAX_SUBJECT_LEN:
        raise ValueError(f"subject must be 1..{MAX_SUBJECT_LEN} characters")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be > 0")
    now = int(time.time())
    claims = {"sub": subject, "aud": audience, "iat": now, "exp": now + int(ttl_s)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: bytes, token: str, audience: str) -> str:
    """The subject of a valid token; ``AuthError`` with the reason otherwise."""
    if not token:
        raise AuthError("missing", "no token")
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], audience=audience,
            options={"require": ["sub", "aud", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("expired", "token has expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("bad_signature", "signature does not match") from None
    except jwt.InvalidAudienceError:
        raise AuthError("wrong_audience", f"token is not for {audience}") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError("malformed", f"only {ALGORITHM} tokens are accepted") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError("malformed", f"missing claim {exc.claim}") from None
    except jwt.InvalidTokenError as exc:  # DecodeError, ImmatureSignature, bad claim types
        raise AuthError("malformed", str(exc)) from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_LEN:
        raise AuthError("malformed", f"'sub' must be a string of 1..{MAX_SUBJECT_LEN} characters")
    return subject


def bearer_token(authorization: str | None) -> str:
    """The token from an ``Authorization: Bearer <token>`` header value."""
    if not authorization:
        raise AuthError("missing", "no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed", "expected 'Authorization: Bearer <token>'")
    return token.strip()


class TokenSettings(TierSettings):
    """Print a signed token for a device (or, with --client, a client app)."""

    model_config = tier_config("iotpipe token", "IOTPIPE_TOKEN_")

    subject: CliPositionalArg[str] = Field(description="device id (or client-app id)")
    client: bool = Field(
        False, description="issue a client-app token (relay) instead of a device token"
    )
    ttl: int = Field(86400, gt=0, description="validity in seconds")


def token_main(argv: Sequence[str]) -> int:
    """``iotpipe token DEVICE_ID [--client] [--ttl SECONDS]``."""
    settings = parse_settings(TokenSettings, argv)
    try:
        secret = load_secret()
        token = issue_token(
            secret, settings.subject, CLIENT_AUDIENCE if settings.client else DEVICE_AUDIENCE,
            settings.ttl,
        )
    except (RuntimeError, ValueError) as exc:
        print(f"iotpipe token: error: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0
